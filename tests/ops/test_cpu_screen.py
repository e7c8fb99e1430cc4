"""The bf16-screened TopK encoder (sparsekit.ops.cpu.screen, csrc/bf16_screen.hpp) against the float32
path and the reference: same selection, float32 values, on any CPU (SPARSEKIT_BF16_SCREEN=on runs
it where bf16 is emulated too)."""
import pytest
import torch

from sparsekit import ops
from sparsekit.ops import reference
from sparsekit.ops.backend import _C
from sparsekit.ops.cpu import screen as cpu_screen


@pytest.fixture
def screen_on(monkeypatch):
    monkeypatch.setenv("SPARSEKIT_BACKEND", "cpp")
    monkeypatch.setenv("SPARSEKIT_BF16_SCREEN", "on")
    monkeypatch.setattr(cpu_screen, "SCREEN_ROWS", 7)  # several row blocks even at test sizes


def bf16_bits(t: torch.Tensor) -> torch.Tensor:
    return t.bfloat16().view(torch.int16)


def float64_topk_sets(x, W, b, k):
    pre = x.double() @ W.double() + b.double()
    return pre.topk(k, dim=1).indices.sort(dim=1).values


def test_pack_bf16_rounds_to_nearest_even_like_torch():
    gen = torch.Generator().manual_seed(0)
    src = torch.cat([torch.randn(10_000, generator=gen) * 10.0 ** torch.randint(-30, 30, (10_000,), generator=gen),
                     torch.tensor([0.0, -0.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 3.0e38, -1e-40])])
    out = torch.empty(src.shape, dtype=torch.int16)
    _C.pack_bf16(src.numpy(), out.numpy())
    assert torch.equal(out, bf16_bits(src))


def test_pack_encoder_bf16_gives_the_rounded_copy_the_transpose_and_both_column_norms():
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(37, 150, generator=gen)  # a column count that is not a multiple of the strip
    W_bits = torch.empty(37, 150, dtype=torch.int16)
    W_t, w_norms, err_norms = torch.empty(150, 37), torch.empty(150), torch.empty(150)
    _C.pack_encoder_bf16(W.numpy(), W_bits.numpy(), W_t.numpy(), w_norms.numpy(), err_norms.numpy())
    rounded = W.bfloat16().double()
    assert torch.equal(W_bits, bf16_bits(W))
    assert torch.equal(W_t, W.t())
    torch.testing.assert_close(w_norms.double(), rounded.norm(dim=0))
    torch.testing.assert_close(err_norms.double(), (W.double() - rounded).norm(dim=0))


@pytest.mark.parametrize("batch,d,n,k", [(1, 8, 5, 5), (3, 16, 100, 1), (20, 64, 300, 7), (33, 32, 1000, 40),
                                         (9, 128, 64 * 3 + 5, 64)])
def test_screened_topk_encode_selects_what_the_float32_path_selects(batch, d, n, k, screen_on):
    gen = torch.Generator().manual_seed(batch * 1000 + n)
    x = torch.randn(batch, d, generator=gen) + 2.0
    W = torch.randn(d, n, generator=gen) / d**0.5
    b = torch.randn(n, generator=gen) * 0.1
    got = ops.topk_encode(x, W, b, k)
    values, indices = reference.topk_encode(x, W, b, k)
    assert torch.equal(got.indices.sort(dim=1).values, float64_topk_sets(x, W, b, k))
    torch.testing.assert_close(got.values, values, rtol=1e-5, atol=1e-5)
    assert torch.all(got.values[:, :-1] >= got.values[:, 1:])  # sorted descending


def test_screened_topk_separates_pre_activations_closer_than_bf16_can_tell(screen_on):
    """Columns built so the top pre-activations differ by ~1e-5 relative: bf16 (8 bits) sees them
    equal, and only the float32 recompute orders them."""
    gen = torch.Generator().manual_seed(5)
    d, n, k = 64, 200, 10
    x = torch.randn(4, d, generator=gen)
    base = torch.randn(d, generator=gen)
    W = torch.randn(d, n, generator=gen) * 0.01
    W[:, :60] = base[:, None] * (1.0 + 1e-5 * torch.randperm(60, generator=gen).float())[None, :]
    b = torch.zeros(n)
    got = ops.topk_encode(x, W, b, k)
    assert torch.equal(got.indices.sort(dim=1).values, float64_topk_sets(x, W, b, k))


def test_screened_topk_keeps_the_lower_index_on_exact_ties(screen_on):
    x = torch.zeros(3, 16)  # every pre-activation is its bias
    b = torch.tensor([1.0, 2.0, 2.0, 0.5, 2.0] * 20)
    W = torch.randn(16, 100)
    got = ops.topk_encode(x, W, b, 4)
    values, indices = reference.topk_encode(x, W, b, 4)
    assert torch.equal(got.indices, indices)
    assert torch.equal(got.values, values)


@pytest.mark.parametrize("encode", ["topk_encode", "batchtopk_encode"])
def test_screened_centered_encoders_match_the_float32_fold_and_its_gradients(encode, screen_on, monkeypatch):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(40, 32, generator=gen) + 5.0  # far from the origin: pre_bias carries the mean
    W = (torch.randn(32, 500, generator=gen) / 32**0.5).requires_grad_()
    b = (torch.randn(500, generator=gen) * 0.1 + 0.5).requires_grad_()  # BatchTopK: enough positive
    pre_bias = torch.full((32,), 5.0, requires_grad=True)

    def codes_and_grads():
        codes = getattr(ops, encode)(x, W, b, 8, pre_bias=pre_bias)
        return codes, torch.autograd.grad(codes.values.square().sum(), (W, b, pre_bias))

    got, got_grads = codes_and_grads()
    monkeypatch.setenv("SPARSEKIT_BF16_SCREEN", "off")
    want, want_grads = codes_and_grads()
    for name in got._fields[1:]:  # the selection: indices, or rows and cols
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    torch.testing.assert_close(got.values, want.values, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads):  # the fold rounds differently: values ~5 apart by ~1e-6
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-4)


def test_topk_screened_reports_overflowing_pre_activations():
    Q = torch.full((2, 70), float("inf")).bfloat16().view(torch.int16)
    x, W_t = torch.ones(2, 4), torch.ones(70, 4)
    norms = torch.ones(70)
    values, indices = torch.empty(2, 3), torch.empty(2, 3, dtype=torch.int64)
    found = _C.topk_screened(Q.numpy(), torch.zeros(70).numpy(), x.numpy(), W_t.numpy(), norms.numpy(),
                             norms.numpy(), 3, values.numpy(), indices.numpy())
    assert found == -1


def test_the_rounding_bound_holds_for_torchs_bf16_gemm_on_this_machine():
    """The screen is exact only if |bf16 GEMM - float32| stays within the bound of
    csrc/bf16_screen.hpp (oneDNN: float32 accumulation, output rounded to nearest). Checked here,
    with the bound written out in float64."""
    gen = torch.Generator().manual_seed(3)
    d, n = 512, 1024  # small: where bf16 is emulated (AVX2 CPUs), it runs at ~0.3 GFLOP/s
    x = torch.randn(256, d, generator=gen) * torch.logspace(-2, 2, 256)[:, None]
    W = torch.randn(d, n, generator=gen) / d**0.5
    Q = (x.bfloat16() @ W.bfloat16()).double()
    exact = x.double() @ W.double()
    x_r, W_r = x.bfloat16().double(), W.bfloat16().double()
    x_err, W_err = (x.double() - x_r).norm(dim=1), (W.double() - W_r).norm(dim=0)
    gamma = d * 2.0**-24 / (1 - d * 2.0**-24)
    x_rn, W_rn = x_r.norm(dim=1), W_r.norm(dim=0)
    bound = ((x_rn + x_err)[:, None] * W_err[None, :] * (1 + gamma) + x_err[:, None] * W_rn[None, :]
             + gamma * x_rn[:, None] * W_rn[None, :] + 2.0**-8 * Q.abs())
    assert torch.all((Q - exact).abs() <= bound)


def test_screen_mode_rejects_an_unknown_setting(monkeypatch):
    monkeypatch.setenv("SPARSEKIT_BF16_SCREEN", "sometimes")
    with pytest.raises(RuntimeError, match="SPARSEKIT_BF16_SCREEN"):
        cpu_screen.screen_mode()


def test_screen_is_used_only_for_float32_and_never_when_off(monkeypatch):
    x, W = torch.zeros(2, 3), torch.zeros(3, 4)
    monkeypatch.setenv("SPARSEKIT_BF16_SCREEN", "off")
    assert not cpu_screen.use_screen(x, W, 2)
    monkeypatch.setenv("SPARSEKIT_BF16_SCREEN", "on")
    assert cpu_screen.use_screen(x, W, 2)
    assert not cpu_screen.use_screen(x.double(), W.double(), 2)
    monkeypatch.setenv("SPARSEKIT_BF16_SCREEN", "auto")
    assert not cpu_screen.use_screen(x, W, 2)  # far below SCREEN_MIN_FLOP
    big_x, big_W = torch.empty(4096, 512, device="meta"), torch.empty(512, 16384, device="meta")
    monkeypatch.setattr(cpu_screen, "_native_bf16", True)
    assert cpu_screen.use_screen(big_x, big_W, 32)
    assert not cpu_screen.use_screen(big_x, big_W, 16384 // 32)  # k too large a share of n
    monkeypatch.setattr(cpu_screen, "_native_bf16", False)
    assert not cpu_screen.use_screen(big_x, big_W, 32)  # bf16 would be emulated


def test_screened_topk_on_gaussian_data_recomputes_few_candidates(screen_on):
    """The screen's point: about 2k candidates per row, not n (here d=256, n=4096, k=16)."""
    gen = torch.Generator().manual_seed(9)
    x, W = torch.randn(64, 256, generator=gen), torch.randn(256, 4096, generator=gen) / 16
    before = dict(cpu_screen.stats)
    ops.topk_encode(x, W, torch.zeros(4096), 16)
    per_row = (cpu_screen.stats["candidates"] - before["candidates"]) / (cpu_screen.stats["rows"] - before["rows"])
    assert 16 <= per_row <= 4 * 16


def flat_topk(pre: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of the m largest of relu(pre), flat order, ties to the lower flat index."""
    flat = torch.relu(pre).flatten()
    order = sorted(range(flat.numel()), key=lambda i: (-float(flat[i]), i))[:m]
    kept = torch.tensor(sorted(order))
    return kept // pre.shape[1], kept % pre.shape[1]


@pytest.mark.parametrize("batch,d,n,k", [(1, 8, 70, 3), (13, 16, 300, 2), (40, 64, 500, 5), (7, 32, 64 * 4 + 9, 9)])
def test_screened_batchtopk_encode_selects_what_float64_selects(batch, d, n, k, screen_on):
    gen = torch.Generator().manual_seed(batch * 100 + n)
    x = torch.randn(batch, d, generator=gen) + 1.0
    W = torch.randn(d, n, generator=gen) / d**0.5
    b = torch.randn(n, generator=gen) * 0.1 + 0.5  # enough positive pre-activations for the screen
    got = ops.batchtopk_encode(x, W, b, k)
    want_rows, want_cols = flat_topk(x.double() @ W.double() + b.double(), batch * k)
    assert torch.equal(got.rows, want_rows) and torch.equal(got.cols, want_cols)
    reference_values = reference.batchtopk_encode(x, W, b, k)[0]
    torch.testing.assert_close(got.values, reference_values, rtol=1e-5, atol=1e-5)


def test_screened_batchtopk_falls_back_when_too_few_pre_activations_are_positive(screen_on):
    """relu's zeros take part in the selection then (ties to the lower flat index): the float32
    path decides it."""
    gen = torch.Generator().manual_seed(2)
    x, W = torch.randn(6, 8, generator=gen), torch.randn(8, 100, generator=gen) * 0.1
    b = torch.full((100,), -3.0)
    b[:5] = 3.0  # 5 positive columns per row, 6 rows: 30 positive entries < B*k = 60
    before = dict(cpu_screen.stats)
    got = ops.batchtopk_encode(x, W, b, 10)
    want = reference.batchtopk_encode(x, W, b, 10)
    assert cpu_screen.stats["calls"] == before["calls"]  # the screen declined
    assert torch.equal(got.rows, want[1]) and torch.equal(got.cols, want[2])
    torch.testing.assert_close(got.values, want[0])


def test_screened_batchtopk_keeps_the_lower_flat_index_on_exact_ties(screen_on):
    x = torch.zeros(4, 16)
    b = torch.tensor([1.0, 2.0, 2.0, 0.5, 2.0] * 20)  # every row the same: ties across rows and columns
    W = torch.randn(16, 100)
    got = ops.batchtopk_encode(x, W, b, 3)
    want = reference.batchtopk_encode(x, W, b, 3)
    assert torch.equal(got.rows, want[1]) and torch.equal(got.cols, want[2])
    assert torch.equal(got.values, want[0])


def relu_case(seed: int, positive_share: float):
    """x, W, b, pre_bias with about positive_share of the pre-activations positive."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(50, 32, generator=gen) + 3.0
    pre_bias = torch.full((32,), 3.0, requires_grad=True)
    W = (torch.randn(32, 700, generator=gen) / 32**0.5).requires_grad_()
    pre = (x - pre_bias.detach()) @ W.detach()
    b = (-pre.flatten().quantile(1 - positive_share) + torch.zeros(700)).requires_grad_()
    return x, W, b, pre_bias


@pytest.mark.parametrize("positive_share", [0.005, 0.3])  # sparse codes; dense (the float32 path decides)
def test_screened_relu_adaptive_matches_the_float32_path_and_its_gradients(positive_share, screen_on, monkeypatch):
    x, W, b, pre_bias = relu_case(4, positive_share)

    def codes_and_grads():
        codes = ops.relu_encode_adaptive(x, W, b, pre_bias=pre_bias)
        values = codes.values if isinstance(codes, ops.SparseCodes) else codes
        return codes, torch.autograd.grad(values.square().sum(), (W, b, pre_bias))

    before = dict(cpu_screen.stats)
    got, got_grads = codes_and_grads()
    assert (cpu_screen.stats["calls"] > before["calls"]) == (positive_share < 1 / 64)
    monkeypatch.setenv("SPARSEKIT_BF16_SCREEN", "off")
    want, want_grads = codes_and_grads()
    assert type(got) is type(want)
    if isinstance(want, ops.SparseCodes):
        assert torch.equal(got.rows, want.rows) and torch.equal(got.cols, want.cols)
        torch.testing.assert_close(got.values, want.values, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-4)


def test_screened_relu_with_no_positive_entry_gives_empty_codes(screen_on):
    x, W = torch.randn(5, 8), torch.randn(8, 200)
    codes = ops.relu_encode_adaptive(x, W, torch.full((200,), -100.0))
    assert isinstance(codes, ops.SparseCodes) and codes.values.numel() == 0 and codes.batch_size == 5
