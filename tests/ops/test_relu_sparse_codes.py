"""ReLU codes as SparseCodes when they are sparse (ops.relu_encode_adaptive): the same codes, the
same losses and the same gradients as the dense path, chosen per batch by density."""
import pytest
import torch

import sparsekit
from sparsekit import ops
from sparsekit.ops import reference


def _sparse_problem(seed: int, dtype=torch.float64, batch=12, d_in=6, n=40, live=(3, 17, 29)):
    """Pre-activations far from 0 everywhere; only the `live` columns can be positive."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, d_in, generator=gen, dtype=dtype)
    W = torch.randn(d_in, n, generator=gen, dtype=dtype) * 0.1
    b = torch.full((n,), -5.0, dtype=dtype)
    b[list(live)] = 1.0
    p = torch.randn(d_in, generator=gen, dtype=dtype) * 0.1
    return x, W, b, p


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_batches_come_back_as_sparse_codes_equal_to_the_dense_relu(dtype, monkeypatch):
    monkeypatch.setenv("SPARSEKIT_BACKEND", "cpp")
    x, W, b, p = _sparse_problem(0, dtype)
    codes = ops.relu_encode_adaptive(x, W, b, pre_bias=p, max_density=0.1)  # 3 live columns of 40
    assert isinstance(codes, ops.SparseCodes) and codes.batch_size == x.shape[0]
    assert torch.all(codes.values > 0)
    flat = codes.rows * W.shape[1] + codes.cols
    assert torch.all(flat[1:] > flat[:-1])  # row-major, no repeats
    dense = torch.zeros(x.shape[0], W.shape[1], dtype=dtype).index_put((codes.rows, codes.cols), codes.values)
    torch.testing.assert_close(dense, reference.relu_encode(x - p, W, b))


def test_dense_batches_stay_dense_and_the_threshold_is_the_fraction_of_positive_entries(monkeypatch):
    monkeypatch.setenv("SPARSEKIT_BACKEND", "cpp")
    x, W, b, p = _sparse_problem(1)
    positive = int((reference.relu_encode(x - p, W, b) > 0).sum())
    fraction = positive / (x.shape[0] * W.shape[1])
    assert isinstance(ops.relu_encode_adaptive(x, W, b, p, max_density=fraction), ops.SparseCodes)
    dense = ops.relu_encode_adaptive(x, W, b, p, max_density=fraction * 0.99)
    assert isinstance(dense, torch.Tensor)
    torch.testing.assert_close(dense, reference.relu_encode(x - p, W, b))


@pytest.mark.parametrize("sparse", [True, False])
def test_gradients_through_either_form_match_the_dense_reference(sparse, monkeypatch):
    x, W, b, p = _sparse_problem(2)
    W_dec = torch.randn(W.shape[1], x.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    b_dec = torch.randn(x.shape[1], dtype=torch.float64)

    def loss_and_grads(backend_name):
        monkeypatch.setenv("SPARSEKIT_BACKEND", backend_name)
        leaves = [t.clone().requires_grad_() for t in (x, W, b, p, W_dec)]
        codes = ops.relu_encode_adaptive(*leaves[:3], pre_bias=leaves[3], max_density=1.0 if sparse else 0.0)
        if backend_name == "cpp":
            assert isinstance(codes, ops.SparseCodes) == sparse
        if isinstance(codes, ops.SparseCodes):
            x_hat = ops.sparse_decode_coo(codes.values, codes.rows, codes.cols, leaves[4], b_dec, codes.batch_size)
            l1 = codes.values.sum() / codes.batch_size
        else:
            x_hat = codes @ leaves[4] + b_dec
            l1 = codes.sum(-1).mean()
        loss = (x_hat - x).pow(2).sum(-1).mean() + 0.3 * l1
        return loss, torch.autograd.grad(loss, leaves)

    loss, grads = loss_and_grads("cpp")
    want_loss, want_grads = loss_and_grads("torch")
    torch.testing.assert_close(loss, want_loss)
    for name, got, want in zip(("x", "W_enc", "b_enc", "pre_bias", "W_dec"), grads, want_grads):
        torch.testing.assert_close(got, want, msg=f"gradient of {name}")


@pytest.mark.parametrize("decoder_norm_penalty", [False, True])
def test_relu_sae_training_step_on_sparse_codes_matches_the_dense_step(decoder_norm_penalty, monkeypatch):
    x, W, b, _ = _sparse_problem(4, n=400)  # 3 live columns of 400: under the default 1/64
    results = {}
    for backend_name in ("cpp", "torch"):
        monkeypatch.setenv("SPARSEKIT_BACKEND", backend_name)
        sae = sparsekit.ReLUSAE(6, 400, l1_coeff=0.2, decoder_norm_penalty=decoder_norm_penalty, seed=0,
                                dtype=torch.float64)
        with torch.no_grad():
            sae.W_enc.copy_(W)
            sae.b_enc.copy_(b)
        out = sae(x)
        assert isinstance(out.codes, ops.SparseCodes) == (backend_name == "cpp")
        sum(out.losses.values()).backward()
        results[backend_name] = ({k: v.detach() for k, v in out.losses.items()}, sae.fire_counts(out.codes),
                                 sae.dense_codes(out.codes).detach(),
                                 {name: t.grad.clone() for name, t in sae.named_parameters()})
    (losses, fires, dense, grads), (want_losses, want_fires, want_dense, want_grads) = results["cpp"], results["torch"]
    for key in want_losses:
        torch.testing.assert_close(losses[key], want_losses[key])
    assert torch.equal(fires, want_fires)
    torch.testing.assert_close(dense, want_dense)
    for name in want_grads:
        torch.testing.assert_close(grads[name], want_grads[name], msg=f"gradient of {name}")


def test_relu_sae_in_eval_mode_keeps_dense_codes(monkeypatch):
    monkeypatch.setenv("SPARSEKIT_BACKEND", "cpp")
    x, W, b, _ = _sparse_problem(5)
    sae = sparsekit.ReLUSAE(6, 40, l1_coeff=0.1, seed=0, dtype=torch.float64).eval()
    with torch.no_grad():
        sae.W_enc.copy_(W)
        sae.b_enc.copy_(b)
    assert isinstance(sae.encode(x), torch.Tensor)


def test_a_batch_with_no_positive_entry_gives_empty_sparse_codes(monkeypatch):
    monkeypatch.setenv("SPARSEKIT_BACKEND", "cpp")
    x, W, b, p = _sparse_problem(6)
    codes = ops.relu_encode_adaptive(x, W, torch.full_like(b, -100.0), pre_bias=p)
    assert isinstance(codes, ops.SparseCodes) and codes.values.numel() == 0
    x_hat = ops.sparse_decode_coo(codes.values, codes.rows, codes.cols, torch.ones(40, 6, dtype=torch.float64),
                                  torch.zeros(6, dtype=torch.float64), codes.batch_size)
    assert torch.equal(x_hat, torch.zeros(12, 6, dtype=torch.float64))


@pytest.mark.parametrize("bad", [-0.1, 1.5, "0.1", True, float("nan")])
def test_max_density_outside_zero_to_one_is_refused_by_name(bad):
    x, W, b, p = _sparse_problem(7)
    with pytest.raises(ValueError, match="max_density must be a number in"):
        ops.relu_encode_adaptive(x, W, b, p, max_density=bad)


def test_encode_stays_dense_in_training_mode_and_only_the_loss_path_goes_sparse(monkeypatch):
    # encode()'s contract is dense codes [B, n] in either mode (analysis code and the property
    # tests index them); only forward's loss path takes SparseCodes.
    monkeypatch.setenv("SPARSEKIT_BACKEND", "cpp")
    x, W, b, _ = _sparse_problem(8, n=400)
    sae = sparsekit.ReLUSAE(6, 400, l1_coeff=0.1, seed=0, dtype=torch.float64).train()
    with torch.no_grad():
        sae.W_enc.copy_(W)
        sae.b_enc.copy_(b)
    dense = sae.encode(x)
    assert isinstance(dense, torch.Tensor) and dense.shape == (12, 400)
    out = sae(x)
    assert isinstance(out.codes, ops.SparseCodes)
    torch.testing.assert_close(sae.dense_codes(out.codes), dense)
