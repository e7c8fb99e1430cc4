"""The dead-latent remedies' dense products: gemm.matmul (OpenBLAS row tiles on the pool, or torch.mm
below the tuned crossover) and ops.dense_decode (AuxK's reconstruction when it keeps most dead
latents) against torch and the reference, forward and backward; the crossover taken from the
tuning knob; bad input named."""
import pytest
import torch

from sparsekit import ops
from sparsekit.ops import reference
from sparsekit.ops.cpu import gemm, tuning


@pytest.fixture
def pool_calls(monkeypatch):
    """The row_tiles calls gemm.matmul makes (each one a product on the pool)."""
    calls = []
    real = gemm.row_tiles

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)
    monkeypatch.setattr(gemm, "row_tiles", counting)
    return calls


def layouts(gen, m=37, p=23, q=29, dtype=torch.float32):
    """(a, b) pairs of every layout the remedies use: plain, transposed b, transposed a."""
    a, b = torch.randn(m, p, generator=gen, dtype=dtype), torch.randn(p, q, generator=gen, dtype=dtype)
    return {"a @ b": (a, b), "a @ c.t()": (a, b.t().contiguous().t()),
            "c.t() @ b": (a.t().contiguous().t(), b), "expanded a": (torch.ones(1, p, dtype=dtype).expand(m, p), b),
            "strided b": (a, torch.randn(p, 2 * q, generator=gen, dtype=dtype)[:, ::2])}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pooled_matmul_equals_torch_mm_for_every_layout(two_torch_threads, pool_calls, monkeypatch, dtype):
    if not gemm.openblas_available():
        pytest.skip("NumPy's OpenBLAS cannot be controlled in this process")
    monkeypatch.setenv("SPARSEKIT_CPU_GEMM", "numpy")
    gen = torch.Generator().manual_seed(0)
    for name, (a, b) in layouts(gen, dtype=dtype).items():
        got = gemm.matmul(a, b)
        assert got.is_contiguous() and got.dtype == dtype, name
        torch.testing.assert_close(got, a @ b, msg=name)
    assert len(pool_calls) == 5


def test_matmul_takes_the_pool_from_the_tuned_crossover_and_torch_below_it(two_torch_threads, pool_calls, monkeypatch):
    if not gemm.openblas_available():
        pytest.skip("NumPy's OpenBLAS cannot be controlled in this process")
    monkeypatch.delenv("SPARSEKIT_CPU_GEMM", raising=False)
    a, b = torch.randn(40, 30), torch.randn(30, 20)
    flop = 2 * 40 * 30 * 20
    with tuning.trying(pooled_mm_min_flop=flop + 1):
        torch.testing.assert_close(gemm.matmul(a, b), a @ b)
    assert pool_calls == []
    with tuning.trying(pooled_mm_min_flop=flop):
        torch.testing.assert_close(gemm.matmul(a, b), a @ b)
    assert len(pool_calls) == 1
    monkeypatch.setenv("SPARSEKIT_CPU_GEMM", "torch")  # forced: never the pool
    with tuning.trying(pooled_mm_min_flop=0):
        gemm.matmul(a, b)
    assert len(pool_calls) == 1


def test_matmul_on_one_thread_stays_on_torch(pool_calls, monkeypatch):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        monkeypatch.setenv("SPARSEKIT_CPU_GEMM", "numpy")
        a, b = torch.randn(8, 5), torch.randn(5, 3)
        torch.testing.assert_close(gemm.matmul(a, b), a @ b)
    finally:
        torch.set_num_threads(before)
    assert pool_calls == []


@pytest.mark.parametrize("backend,gemm_library", [("torch", "auto"), ("cpp", "numpy"), ("cpp", "torch")])
def test_dense_decode_and_its_gradients_match_the_reference(two_torch_threads, monkeypatch, backend, gemm_library):
    monkeypatch.setenv("SPARSEKIT_BACKEND", backend)
    monkeypatch.setenv("SPARSEKIT_CPU_GEMM", gemm_library)
    gen = torch.Generator().manual_seed(1)
    n, d, batch = 50, 12, 33
    latents = torch.randperm(n, generator=gen)[:17]  # distinct, not sorted
    codes = torch.relu(torch.randn(batch, 17, generator=gen))
    W_dec = torch.randn(n, d, generator=gen)
    grad = torch.randn(batch, d, generator=gen)
    got_leaves = [codes.clone().requires_grad_(), W_dec.clone().requires_grad_()]
    want_leaves = [codes.clone().requires_grad_(), W_dec.clone().requires_grad_()]
    got = ops.dense_decode(got_leaves[0], got_leaves[1], latents)
    want = reference.dense_decode(want_leaves[0], want_leaves[1], latents)
    torch.testing.assert_close(got, want)
    got.backward(grad)
    want.backward(grad)
    torch.testing.assert_close(got_leaves[0].grad, want_leaves[0].grad)
    torch.testing.assert_close(got_leaves[1].grad, want_leaves[1].grad)
    untouched = torch.ones(n, dtype=torch.bool)
    untouched[latents] = False
    assert torch.all(got_leaves[1].grad[untouched] == 0)  # rows outside L get exactly zero


def test_dense_decode_backward_takes_an_expanded_gradient(two_torch_threads, monkeypatch):
    monkeypatch.setenv("SPARSEKIT_BACKEND", "cpp")
    monkeypatch.setenv("SPARSEKIT_CPU_GEMM", "numpy")  # the pool, on operands BLAS cannot read as they are
    gen = torch.Generator().manual_seed(3)
    latents = torch.tensor([5, 1, 2, 8])
    codes = torch.rand(6, 4, generator=gen, requires_grad=True)
    W_dec = torch.randn(10, 3, generator=gen, requires_grad=True)
    ops.dense_decode(codes, W_dec, latents).sum().backward()  # grad_y: ones expanded, strides (0, 0)
    torch.testing.assert_close(codes.grad, W_dec.detach()[latents].sum(1).expand(6, 4))
    torch.testing.assert_close(W_dec.grad[latents], codes.detach().sum(0)[:, None].expand(4, 3))


def test_dense_decode_gradcheck_in_float64(monkeypatch):
    monkeypatch.setenv("SPARSEKIT_BACKEND", "cpp")
    gen = torch.Generator().manual_seed(2)
    latents = torch.tensor([4, 0, 7])
    codes = torch.randn(5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    W_dec = torch.randn(9, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c, w: ops.dense_decode(c, w, latents), (codes, W_dec))


@pytest.mark.parametrize("change,named", [
    (lambda c, w, l: (c[:, :2], w, l), "codes"),
    (lambda c, w, l: (c, w, torch.tensor([1, 1, 2])), "latents must not repeat"),
    (lambda c, w, l: (c, w, torch.tensor([1, 2, 9])), "latents"),
    (lambda c, w, l: (c, w.double(), l), "W_dec"),
    (lambda c, w, l: (c, w, l.float()), "latents"),
    (lambda c, w, l: (c.fill_(float("nan")), w, l), "codes"),
])
def test_dense_decode_names_the_bad_argument(change, named):
    codes, W_dec, latents = torch.rand(4, 3), torch.randn(9, 5), torch.tensor([0, 3, 8])
    with pytest.raises((ValueError, TypeError), match=named):
        ops.dense_decode(*change(codes, W_dec, latents))
