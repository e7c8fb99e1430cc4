"""What each op means, pinned on both backends: tie rules, ordering, ReLU, sums, the JumpReLU
pseudo-derivative and the ghost-grads scaling."""
import pytest
import torch

import sparsekit
from sparsekit.ops import reference

BACKENDS = ["torch", "cpp"]


@pytest.fixture(params=BACKENDS)
def on_backend(request, monkeypatch):
    monkeypatch.setenv("SPARSEKIT_BACKEND", request.param)
    return request.param


def _encoder(d_in=6, n=10, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(d_in, n, generator=g, dtype=dtype), torch.randn(n, generator=g, dtype=dtype))


def test_topk_ties_pick_lowest_index(on_backend):
    W, b = _encoder(n=6)
    W[:, 4], b[4] = W[:, 1], b[1]  # latent 4 duplicates latent 1
    W[:, 5], b[5] = W[:, 1], b[1]  # and so does latent 5
    x = torch.randn(20, 6, dtype=torch.float64)
    for k in range(1, 7):
        values, indices = sparsekit.topk_encode(x, W, b, k)
        for row in range(20):
            chosen = set(indices[row].tolist())
            # among the identical latents 1, 4, 5 only a prefix of (1, 4, 5) may be chosen
            dup = [i for i in (1, 4, 5) if i in chosen]
            assert dup == [1, 4, 5][: len(dup)], (k, row, indices[row])


def test_topk_values_sorted_descending_relu_applied_and_indices_distinct(on_backend):
    W, b = _encoder(n=40)
    b -= 1.0  # many negative pre-activations
    x = torch.randn(30, 6, dtype=torch.float64)
    values, indices = sparsekit.topk_encode(x, W, b, 12)
    assert (values >= 0).all()
    assert (values[:, :-1] >= values[:, 1:]).all()
    assert all(len(set(r.tolist())) == 12 for r in indices)
    pre = x @ W + b
    assert torch.allclose(values, torch.relu(pre.gather(1, indices)))
    assert torch.equal(torch.sort(pre, -1, descending=True).values[:, :12], pre.gather(1, indices))


def test_topk_backward_passes_kept_preactivation_gradient_to_encoder(on_backend):
    # A loss on the codes alone (as an auxiliary loss is) must reach W_enc and b_enc: the bug a
    # peer library has. grad W_enc = x.T @ G with G the dense gradient at kept, positive entries.
    W, b = _encoder(n=16)
    W.requires_grad_(), b.requires_grad_()
    x = torch.randn(8, 6, dtype=torch.float64)
    values, indices = sparsekit.topk_encode(x, W, b, 4)
    weights = torch.randn_like(values)
    gW, gb = torch.autograd.grad((values * weights).sum(), [W, b])
    G = torch.zeros(8, 16, dtype=torch.float64).scatter(1, indices, weights * (values > 0))
    torch.testing.assert_close(gW, x.T @ G)
    torch.testing.assert_close(gb, G.sum(0))
    assert gW.abs().sum() > 0


def test_batchtopk_keeps_the_global_largest_in_flat_order(on_backend):
    W, b = _encoder(n=12, seed=3)
    x = torch.randn(9, 6, dtype=torch.float64)
    k = 3
    codes = sparsekit.batchtopk_encode(x, W, b, k)
    acts = torch.relu(x @ W + b)
    flat = codes.rows * 12 + codes.cols
    assert torch.equal(flat, torch.sort(flat).values), "not in flat order"
    threshold = acts.reshape(-1).sort(descending=True).values[9 * k - 1]
    assert (codes.values >= threshold).all()
    assert int((acts > threshold).sum()) <= 9 * k
    torch.testing.assert_close(codes.values, acts[codes.rows, codes.cols])
    per_row = torch.bincount(codes.rows, minlength=9)
    assert per_row.sum() == 9 * k and per_row.max() > k, "some row should keep more than k"


def test_batchtopk_ties_at_zero_pick_lowest_flat_index(on_backend):
    W, b = _encoder(n=5)
    x = torch.randn(4, 6, dtype=torch.float64)
    b[:] = -1e3  # every activation is relu(negative) = 0: all tie
    codes = sparsekit.batchtopk_encode(x, W, b, 2)
    assert torch.equal(codes.rows * 5 + codes.cols, torch.arange(8))
    assert (codes.values == 0).all()


def test_sparse_decode_equals_dense_codes_times_decoder(on_backend):
    g = torch.Generator().manual_seed(4)
    values = torch.randn(7, 3, generator=g, dtype=torch.float64)
    indices = torch.stack([torch.randperm(11, generator=g)[:3] for _ in range(7)])
    W_dec, b_dec = torch.randn(11, 5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    dense = torch.zeros(7, 11, dtype=torch.float64).scatter(1, indices, values)
    torch.testing.assert_close(sparsekit.sparse_decode(values, indices, W_dec, b_dec), dense @ W_dec + b_dec)


def test_sparse_decode_coo_sums_duplicate_entries(on_backend):
    W_dec, b_dec = torch.randn(4, 3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    rows, cols = torch.tensor([0, 0, 2, 0]), torch.tensor([1, 1, 3, 2])
    values = torch.tensor([1.0, 2.0, -1.0, 0.5], dtype=torch.float64)
    y = sparsekit.sparse_decode_coo(values, rows, cols, W_dec, b_dec, 3)
    torch.testing.assert_close(y[0], 3 * W_dec[1] + 0.5 * W_dec[2])
    torch.testing.assert_close(y[1], torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(y[2], -W_dec[3])


def test_jumprelu_threshold_gradient_is_the_rectangle_kernel(on_backend):
    W, b = _encoder(n=8, seed=5)
    x = torch.randn(50, 6, dtype=torch.float64)
    log_threshold = torch.full((8,), -0.5, dtype=torch.float64, requires_grad=True)
    bandwidth = 0.4
    out = sparsekit.jumprelu_encode(x, W, b, log_threshold, bandwidth)
    pre, theta = x @ W + b, torch.exp(log_threshold.detach())
    torch.testing.assert_close(out, pre * (pre > theta))
    weights = torch.randn_like(out)
    (grad,) = torch.autograd.grad((out * weights).sum(), [log_threshold])
    window = ((pre - theta).abs() < bandwidth / 2).double()
    expected = (weights * -(theta / bandwidth) * window).sum(0) * theta
    torch.testing.assert_close(grad, expected)
    assert grad.abs().sum() > 0


def test_ghost_loss_value_equals_mse_main_and_gradient_stays_on_dead_latents(on_backend):
    W, b = _encoder(n=12, seed=6)
    W.requires_grad_(), b.requires_grad_()
    x = torch.randn(10, 6, dtype=torch.float64) * 0.5
    W_dec = torch.randn(12, 6, dtype=torch.float64)
    dead = torch.tensor([2, 7, 9])
    mse_main = torch.tensor(0.83, dtype=torch.float64)
    loss = sparsekit.ghost_grad_loss(x, W, b, W_dec, dead, torch.randn(10, 6, dtype=torch.float64), mse_main)
    torch.testing.assert_close(loss, mse_main, rtol=1e-6, atol=0)
    gW, gb = torch.autograd.grad(loss, [W, b])
    alive = torch.ones(12, dtype=torch.bool)
    alive[dead] = False
    assert (gW[:, alive] == 0).all() and (gb[alive] == 0).all()
    assert (gW[:, dead] != 0).all() and (gb[dead] != 0).all()


def test_ghost_loss_is_zero_without_dead_latents(on_backend):
    W, b = _encoder()
    x = torch.randn(3, 6, dtype=torch.float64)
    loss = sparsekit.ghost_grad_loss(x, W, b, torch.randn(10, 6, dtype=torch.float64),
                                     torch.empty(0, dtype=torch.int64), torch.randn(3, 6, dtype=torch.float64),
                                     torch.tensor(1.0, dtype=torch.float64))
    assert loss.item() == 0.0


def test_reference_and_ops_agree_for_bfloat16_on_cpu():
    # CPU half precision runs the reference path whatever the default backend.
    W, b = _encoder(dtype=torch.bfloat16)
    x = torch.randn(4, 6).bfloat16()
    values, indices = sparsekit.topk_encode(x, W, b, 3)
    ref_values, ref_indices = reference.topk_encode(x, W, b, 3)
    assert values.dtype == torch.bfloat16 and torch.equal(indices, ref_indices)
    assert torch.equal(values, ref_values)
