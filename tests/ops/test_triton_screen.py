"""The bf16-screened TopK/BatchTopK encoders on the Triton path (kernels/sparsekit_kernels/screen.py):
the float32 selection from a bf16 GEMM, under Triton's interpreter on CPU tensors (tests/conftest.py),
or natively on CUDA tensors where a GPU exists (inputs are drawn on the CPU and moved: `on_device`),
with the screen forced on, against float64, the unscreened path and the plain-torch reference;
the bound itself on adversarial data and against a GEMM that errs by all of it (a test hook).
The last test runs natively where CUDA exists (tensor cores truncate; the interpreter does not)."""
import pytest
import torch
from helpers.triton_device import DEVICE, fresh_generator, on_device

from sparsekit import ops
from sparsekit.kernels import screen


@pytest.fixture
def screen_on(monkeypatch):
    monkeypatch.setenv("SPARSEKIT_BACKEND", "triton")
    monkeypatch.setenv("SPARSEKIT_GPU_BF16_SCREEN", "on")




def float64_topk_sets(x, W, b, k):
    pre = x.double() @ W.double() + b.double()
    return pre.topk(k, dim=1).indices.sort(dim=1).values


def calls_made(before: dict) -> int:
    return screen.stats["calls"] - before["calls"]


@pytest.mark.parametrize("batch,d,n,k", [(1, 8, 70, 3), (9, 40, 300, 5), (17, 64, 160, 16)])
def test_screened_topk_selects_what_float64_selects(batch, d, n, k, screen_on):
    gen = fresh_generator()
    x = torch.randn(batch, d, generator=gen) + 1.0
    W = torch.randn(d, n, generator=gen) / d**0.5
    b = torch.randn(n, generator=gen) * 0.1
    x, W, b = on_device(x, W, b)
    before = dict(screen.stats)
    got = ops.topk_encode(x, W, b, k)
    assert calls_made(before) == 1
    assert torch.equal(got.indices.sort(dim=1).values, float64_topk_sets(x, W, b, k))
    values, indices, _ = screen.topk_encode_screened_reference(x, W, b, k)
    assert torch.equal(got.indices, indices)
    torch.testing.assert_close(got.values, values, rtol=1e-6, atol=1e-6)
    assert torch.all(got.values[:, :-1] >= got.values[:, 1:])


@pytest.mark.parametrize("batch,d,n,k", [(1, 8, 70, 3), (13, 16, 300, 2), (7, 32, 64 * 4 + 9, 9)])
def test_screened_batchtopk_selects_what_float64_selects(batch, d, n, k, screen_on):
    gen = fresh_generator()
    x = torch.randn(batch, d, generator=gen) + 1.0
    W = torch.randn(d, n, generator=gen) / d**0.5
    b = torch.randn(n, generator=gen) * 0.1 + 0.5  # enough positive pre-activations for the screen
    x, W, b = on_device(x, W, b)
    before = dict(screen.stats)
    got = ops.batchtopk_encode(x, W, b, k)
    assert calls_made(before) == 1
    flat = torch.relu(x.double() @ W.double() + b.double()).flatten()
    kept = flat.topk(batch * k).indices.sort().values
    assert torch.equal(got.rows, kept // n) and torch.equal(got.cols, kept % n)
    values, rows, cols, _ = screen.batchtopk_encode_screened_reference(x, W, b, k)
    assert torch.equal(got.rows, rows) and torch.equal(got.cols, cols)
    torch.testing.assert_close(got.values, values, rtol=1e-6, atol=1e-6)


def integer_case(gen, batch, d, n, duplicates):
    """Integer data whose float32 products and sums are exact, with pre-activations 1 apart where
    bf16 (8 bits) rounds W's entries by up to 4: ties and near-ties below bf16's resolution.
    The first `duplicates` columns repeat one column: exact ties across columns."""
    x = torch.randint(-6, 7, (batch, d), generator=gen).float()
    W = torch.randint(-1500, 1501, (d, n), generator=gen).float()
    W[:, :duplicates] = W[:, duplicates:duplicates + 1]
    b = torch.randint(-3, 4, (n,), generator=gen).float() * 1000.0
    return x, W, b


@pytest.mark.parametrize("encode", ["topk_encode", "batchtopk_encode"])
def test_screened_selection_on_exact_integer_ties_equals_the_unscreened_path_bit_for_bit(encode, screen_on,
                                                                                         monkeypatch):
    gen = fresh_generator()
    x, W, b = integer_case(gen, 11, 24, 150, duplicates=40)
    b[:40] = 10_000_000.0  # the duplicated columns lead every row: the selection is made among ties
    x, W, b = on_device(x, W, b)
    before = dict(screen.stats)
    got = getattr(ops, encode)(x, W, b, 6)
    assert calls_made(before) == 1
    monkeypatch.setenv("SPARSEKIT_GPU_BF16_SCREEN", "off")
    want = getattr(ops, encode)(x, W, b, 6)
    assert calls_made(before) == 1
    for name in got._fields:
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    if encode == "topk_encode":  # ties go to the lower index: the first six duplicated columns
        assert torch.equal(got.indices, torch.arange(6, device=DEVICE).expand(11, 6))


@pytest.mark.parametrize("encode", ["topk_encode", "batchtopk_encode"])
def test_screened_selection_orders_integer_near_ties_bf16_cannot_tell_apart(encode, screen_on, monkeypatch):
    gen = fresh_generator()
    batch, d, n = 9, 32, 200
    x = torch.randint(1, 7, (batch, d), generator=gen).float()
    # Columns 1000..1500 plus a few units: bf16 rounds each entry by up to 4 (its spacing there is 8),
    # about as much as the columns differ, so bf16 alone orders them wrongly.
    W = torch.randint(1000, 1500, (d, 1), generator=gen).float() + torch.randint(-3, 4, (d, n), generator=gen).float()
    b = torch.full((n,), 100_000.0)
    x, W, b = on_device(x, W, b)
    pre = x.double() @ W.double() + b.double()
    bf16_pre = x.bfloat16().double() @ W.bfloat16().double() + b.double()
    assert not torch.equal(pre.topk(5, dim=1).indices, bf16_pre.topk(5, dim=1).indices)  # bf16 alone errs
    got = getattr(ops, encode)(x, W, b, 5)
    monkeypatch.setenv("SPARSEKIT_GPU_BF16_SCREEN", "off")
    want = getattr(ops, encode)(x, W, b, 5)
    for name in got._fields:
        assert torch.equal(getattr(got, name), getattr(want, name)), name


def test_screened_topk_separates_pre_activations_closer_than_bf16_can_tell(screen_on):
    gen = fresh_generator()
    d, n, k = 64, 200, 10
    x = torch.randn(4, d, generator=gen)
    base = torch.randn(d, generator=gen)
    W = torch.randn(d, n, generator=gen) * 0.01
    W[:, :60] = base[:, None] * (1.0 + 1e-5 * torch.randperm(60, generator=gen).float())[None, :]
    x, W, b = on_device(x, W, torch.zeros(n))
    got = ops.topk_encode(x, W, b, k)
    assert torch.equal(got.indices.sort(dim=1).values, float64_topk_sets(x, W, b, k))


def near_tie_case(gen):
    """Rows whose top pre-activations lie ~1e-5 apart (far inside the bound) among 60 columns."""
    d, n = 48, 160
    x = torch.randn(6, d, generator=gen)
    x = x * torch.sign(x @ torch.ones(d))[:, None]
    base = torch.ones(d) + 0.1 * torch.randn(d, generator=gen)
    W = torch.randn(d, n, generator=gen) * 0.02
    W[:, :60] = base[:, None] * (1.0 + 1e-5 * torch.randperm(60, generator=gen).float())[None, :]
    return on_device(x, W, torch.randn(n, generator=gen) * 1e-3)


def dense_bounds(a, x, W):
    """Every entry's (lower, upper) [B, n] float64 for a screen GEMM result a [B, n]."""
    return screen.screen_bounds(a, screen.row_coefficients(x)[:, :, None], screen.column_norms(W)[:, None, :])


def every_recomputed(x, W, b):
    """R [B, n]: the screen's float32 recompute at every entry."""
    batch, n = x.shape[0], W.shape[1]
    rows = torch.arange(batch, device=x.device).repeat_interleave(n)
    cols = torch.arange(n, device=x.device).repeat(batch)
    return screen.recompute(x, W, b, rows, cols).view(batch, n)


def top_k_lowest_index_first(R, k):
    """R's k largest per row, equal values in index order (the ops' rule). torch.topk leaves the
    order of ties unspecified: near_tie_case's recomputed values tie exactly now and then (a fresh
    seed in a fresh-clone run: columns 10 and 55 equal, topk took 55)."""
    values, indices = R.sort(dim=1, descending=True, stable=True)
    return torch.return_types.topk((values[:, :k], indices[:, :k]))


def adversarial_gemm(x, W, b, k):
    """A screen GEMM result that errs by (all but 1e-3 of) the full bound, against the selection:
    each row's k largest recomputed values R pushed down, every other entry pushed up."""
    R = every_recomputed(x, W, b)
    lower, upper = dense_bounds(R, x, W)
    margin = (upper - lower) / 2
    top = torch.zeros_like(R, dtype=torch.bool).scatter_(1, top_k_lowest_index_first(R, k).indices, True)
    return torch.where(top, R - 0.999 * margin, R + 0.999 * margin).float(), R


def test_screen_selects_exactly_when_the_gemm_errs_by_the_full_bound(screen_on, monkeypatch):
    gen = fresh_generator()
    x, W, b = near_tie_case(gen)
    k = 8
    Q, R = adversarial_gemm(x, W, b, k)
    monkeypatch.setattr(screen, "perturb", lambda a: Q)
    values, indices = screen.topk_encode_screened(x, W, b, k)
    want = top_k_lowest_index_first(R, k)
    assert torch.equal(indices, want.indices) and torch.equal(values, torch.relu(want.values))
    # The reference recomputes in torch's summation order: exact against its own recompute.
    batch, n = R.shape
    R_ref = screen._recompute_reference(x, W, b, torch.arange(batch, device=DEVICE).repeat_interleave(n),
                                        torch.arange(n, device=DEVICE).repeat(batch)).view(batch, n)
    assert torch.equal(screen.topk_encode_screened_reference(x, W, b, k)[1], top_k_lowest_index_first(R_ref, k).indices)
    # The test has teeth: with the margin halved, the same GEMM error changes the selection.
    monkeypatch.setattr(screen, "SAFETY", screen.SAFETY / 2)
    _, wrong = screen.topk_encode_screened(x, W, b, k)
    assert not torch.equal(wrong, want.indices)


def test_the_bound_holds_on_adversarial_dynamic_range():
    """lower <= R <= upper and lower <= float64 <= upper at every entry, from the screen GEMM,
    for rows and columns scaled over 1e-25..1e15 (tiny products underflow float32's normal range),
    entries at bf16 rounding midpoints and biases from 1e-30 to 1e6; and the bound is not vacuous."""
    gen = fresh_generator()
    batch, d, n = 24, 40, 96
    x = torch.randn(batch, d, generator=gen) * torch.logspace(-25, 15, batch)[:, None]
    W = torch.randn(d, n, generator=gen) * torch.logspace(-20, 8, n)[None, :]
    x[0] = 1.0 + 2.0**-8  # halfway between two bf16 values: ties to even
    W[:, 0] = -(1.0 + 3 * 2.0**-8)
    b = torch.randn(n, generator=gen) * torch.logspace(-30, 6, n)
    x, W, b = on_device(x, W, b)
    lower, upper = screen.bounds(x, W, b)
    exact = x.double() @ W.double() + b.double()
    R = every_recomputed(x, W, b)
    assert torch.all(lower <= R) and torch.all(R <= upper)
    assert torch.all(lower <= exact) and torch.all(exact <= upper)
    # The coarse stage's one margin per row is at least every entry's margin in that row.
    margins = screen.row_margins(screen.row_coefficients(x), screen.column_norms(W), b)
    assert torch.all((upper - lower) / 2 <= margins[:, None])
    scale = (x.double().norm(dim=1)[:, None] * W.double().norm(dim=0)[None, :] + b.double().abs())
    assert torch.all((upper - lower) / 2 <= 2.0**-6 * scale)


def truncating_tensor_core_gemm(x: torch.Tensor, W: torch.Tensor, block: int) -> torch.Tensor:
    """bf16(x) @ bf16(W) [B, n] as Fasi et al. (2021) measured NVIDIA tensor cores sum in float32:
    per step, `block` exact products and the accumulator aligned to the largest addend's exponent
    with the bits below its 24th truncated, summed, and the sum truncated (not rounded) to 24 bits."""
    products = x.bfloat16().double()[:, :, None] * W.bfloat16().double()[None, :, :]  # exact
    acc = torch.zeros(x.shape[0], W.shape[1], dtype=torch.float64, device=x.device)

    def truncate(v, exponent):
        quantum = torch.exp2(exponent - 23)
        return torch.trunc(v / quantum) * quantum

    for start in range(0, x.shape[1], block):
        addends = torch.cat([acc[:, None, :], products[:, start:start + block, :]], dim=1)
        largest = addends.abs().amax(dim=1, keepdim=True)
        exponent = torch.floor(torch.log2(largest.clamp_min(2.0**-126)))
        total = truncate(addends, exponent).sum(dim=1)
        acc = truncate(total, torch.floor(torch.log2(total.abs().clamp_min(2.0**-126))))
    return acc.float()


@pytest.mark.parametrize("block", [1, 8, 16])
def test_the_bound_covers_a_truncating_tensor_core_and_the_selection_stays_exact(block, monkeypatch):
    """The worst accumulation the bound claims to cover, emulated: all-positive products (every
    truncation errs the same way) on d=256; the screen fed this GEMM still selects exactly."""
    gen = fresh_generator()
    batch, d, n, k = 6, 256, 96, 8
    x = torch.rand(batch, d, generator=gen) + 0.5
    W = torch.rand(d, n, generator=gen) * torch.logspace(-3, 3, n)[None, :]
    b = torch.randn(n, generator=gen)
    a = truncating_tensor_core_gemm(x, W, block) + b
    x, W, b, a = on_device(x, W, b, a)
    lower, upper = dense_bounds(a, x, W)
    exact = x.double() @ W.double() + b.double()
    R = every_recomputed(x, W, b)
    assert torch.all(lower <= R) and torch.all(R <= upper)
    assert torch.all(lower <= exact) and torch.all(exact <= upper)
    sum_error = (a.double() - b.double() - x.bfloat16().double() @ W.bfloat16().double()).abs()
    assert sum_error.max() > 0  # the emulation truncates: it is not float64 in disguise
    monkeypatch.setattr(screen, "perturb", lambda _: a)
    values, indices = screen.topk_encode_screened(x, W, b, k)
    want = top_k_lowest_index_first(R, k)
    assert torch.equal(indices, want.indices) and torch.equal(values, torch.relu(want.values))


def test_screened_topk_on_gaussian_data_recomputes_few_candidates(screen_on):
    """The screen's point: a few times k candidates per row, not n (d=64, n=1024, k=16)."""
    gen = fresh_generator()
    x, W, b = on_device(torch.randn(16, 64, generator=gen), torch.randn(64, 1024, generator=gen) / 8,
                        torch.zeros(1024))
    before = dict(screen.stats)
    ops.topk_encode(x, W, b, 16)
    per_row = (screen.stats["candidates"] - before["candidates"]) / (screen.stats["rows"] - before["rows"])
    print(f"candidates per row: {per_row:.1f} (k=16, n=1024)")
    assert 16 <= per_row <= 4 * 16


def test_screened_batchtopk_falls_back_when_too_few_pre_activations_are_positive(screen_on, monkeypatch):
    gen = fresh_generator()
    x, W = torch.randn(6, 8, generator=gen), torch.randn(8, 100, generator=gen) * 0.1
    b = torch.full((100,), -3.0)
    b[:5] = 3.0  # 30 positive entries < B*k = 60: relu's zeros take part, the float32 path decides
    x, W, b = on_device(x, W, b)
    before = dict(screen.stats)
    got = ops.batchtopk_encode(x, W, b, 10)
    assert calls_made(before) == 0
    monkeypatch.setenv("SPARSEKIT_GPU_BF16_SCREEN", "off")
    want = ops.batchtopk_encode(x, W, b, 10)
    for name in got._fields:
        assert torch.equal(getattr(got, name), getattr(want, name)), name


@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # the interpreter's NumPy on infinities
def test_screened_topk_falls_back_when_bf16_overflows(screen_on):
    gen = fresh_generator()
    x, W = torch.randn(3, 8, generator=gen), torch.randn(8, 50, generator=gen)
    x[1, 2] = 3.4e38  # bf16 rounds it to infinity
    x, W, b = on_device(x, W, torch.zeros(50))
    assert screen.topk_encode_screened(x, W, b, 4) is None
    before = dict(screen.stats)
    got = ops.topk_encode(x, W, b, 4)
    assert calls_made(before) == 0 and torch.isfinite(got.values[0]).all()


@pytest.mark.parametrize("encode", ["topk_encode", "batchtopk_encode"])
def test_screened_gradients_are_the_unscreened_paths(encode, screen_on, monkeypatch):
    gen = fresh_generator()
    x, W, b = integer_case(gen, 5, 16, 90, duplicates=0)
    b = b.abs() + 100_000.0
    x, W, b = on_device(x, W, b)
    leaves = [t.clone().requires_grad_() for t in (x, W, b)]

    def grads():
        codes = getattr(ops, encode)(*leaves, 4)
        weights = torch.arange(codes.values.numel(), device=DEVICE).view_as(codes.values)
        return torch.autograd.grad((codes.values * weights).sum(), leaves)

    got = grads()
    monkeypatch.setenv("SPARSEKIT_GPU_BF16_SCREEN", "off")
    for g, w in zip(got, grads()):
        assert torch.equal(g, w)


def test_screen_mode_is_read_from_the_environment(monkeypatch):
    x, W = torch.zeros(2, 3), torch.zeros(3, 4)
    monkeypatch.setenv("SPARSEKIT_GPU_BF16_SCREEN", "sometimes")
    with pytest.raises(RuntimeError, match="SPARSEKIT_GPU_BF16_SCREEN"):
        screen.use_screen(x, W, 2)
    monkeypatch.setenv("SPARSEKIT_GPU_BF16_SCREEN", "on")
    assert screen.use_screen(x, W, 2) and not screen.use_screen(x.bfloat16(), W.bfloat16(), 2)
    monkeypatch.setenv("SPARSEKIT_GPU_BF16_SCREEN", "off")
    assert not screen.use_screen(x, W, 2)
    monkeypatch.setenv("SPARSEKIT_GPU_BF16_SCREEN", "auto")
    big_x, big_W = torch.empty(4096, 768, device="meta"), torch.empty(768, 32768, device="meta")
    assert not screen.use_screen(big_x, big_W, 32)  # not CUDA
    monkeypatch.setattr(screen, "_on_cuda", lambda t: True)
    assert screen.use_screen(big_x, big_W, 32)
    assert not screen.use_screen(big_x, big_W, 32768 // 32)  # k too large a share of n
    assert not screen.use_screen(big_x[:8], big_W, 32)  # a GEMM far below a GFLOP


@pytest.mark.skipif(not torch.cuda.is_available(), reason="native tensor cores: runs where CUDA exists")
def test_on_a_gpu_the_screen_matches_the_unscreened_float32_path_and_its_bound_holds(monkeypatch):
    monkeypatch.setenv("SPARSEKIT_BACKEND", "triton")
    gen = torch.Generator(device="cuda")
    gen.seed()
    batch, d, n, k = 512, 768, 8192, 32
    x = torch.randn(batch, d, generator=gen, device="cuda")
    W = torch.randn(d, n, generator=gen, device="cuda") / d**0.5
    b = torch.randn(n, generator=gen, device="cuda") * 0.1 + 0.5
    runs = {}
    for mode in ("on", "off"):
        monkeypatch.setenv("SPARSEKIT_GPU_BF16_SCREEN", mode)
        runs[mode] = ops.topk_encode(x, W, b, k), ops.batchtopk_encode(x, W, b, k)
    (top_on, batch_on), (top_off, batch_off) = runs["on"], runs["off"]
    pre = x.double() @ W.double() + b.double()
    sorted_pre = pre.topk(k + 1, dim=1).values
    clear = (sorted_pre[:, k - 1] - sorted_pre[:, k]) > 1e-4  # rows whose k-th value stands clear
    want = pre.topk(k, dim=1).indices.sort(dim=1).values
    assert torch.equal(top_on.indices.sort(dim=1).values[clear], want[clear])
    assert torch.equal(top_on.indices.sort(dim=1).values[clear], top_off.indices.sort(dim=1).values[clear])
    torch.testing.assert_close(top_on.values, top_off.values, rtol=1e-5, atol=1e-5)
    flat_on, flat_off = batch_on.rows * n + batch_on.cols, batch_off.rows * n + batch_off.cols
    assert torch.isin(flat_on, flat_off).float().mean() > 0.999  # all but float32 near-ties
    # The bound on the tensor cores' own rounding: a large dynamic range, and all-positive products
    # (no cancellation: truncation errors all of one sign, the accumulation's worst case).
    scaled = x * torch.logspace(-20, 20, batch, device="cuda")[:, None]
    for xs, Ws in ((scaled, W), (x.abs(), W.abs())):
        lower, upper = screen.bounds(xs, Ws, b)
        exact = xs.double() @ Ws.double() + b.double()
        assert torch.all(lower <= exact) and torch.all(exact <= upper)
