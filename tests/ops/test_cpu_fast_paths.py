"""The CPU step's fast paths against their references: the encoder's row tiles on a pool of
single-threaded OpenBLAS GEMMs (sparsekit.ops.cpu.gemm), and the decoder's fused row constraints."""
import numpy as np
import pytest
import torch

from sparsekit import ops
from sparsekit.ops import reference
from sparsekit.ops.cpu import gemm as cpu_gemm

needs_openblas = pytest.mark.skipif(not cpu_gemm.openblas_available(),
                                    reason="NumPy in this environment is not built on OpenBLAS")


@needs_openblas
@pytest.mark.parametrize("batch", [1, 2, 3, 17, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_encode_on_openblas_row_tiles_matches_the_reference(batch, dtype, monkeypatch, two_torch_threads):
    monkeypatch.setenv("SPARSEKIT_BACKEND", "cpp")
    monkeypatch.setenv("SPARSEKIT_CPU_GEMM", "numpy")  # the pool even at these tiny sizes
    monkeypatch.setattr("sparsekit.ops.cpu.encode.TOPK_TILE_ROWS", 4)  # many row blocks...
    monkeypatch.setattr("sparsekit.ops.cpu.encode.L2_TILE_BYTES", 4 * 8 * 3)  # ...of 3 (f64) or 6 (f32) columns: < k
    gen = torch.Generator().manual_seed(batch)
    x, W, b = (torch.randn(*s, generator=gen, dtype=dtype) for s in ((batch, 6), (6, 50), (50,)))
    got = ops.topk_encode(x, W, b, 7)
    want = reference.topk_encode(x, W, b, 7)
    assert torch.equal(got.indices, want[1])
    torch.testing.assert_close(got.values, want[0])


@pytest.mark.parametrize("library", ["numpy", "torch"])
@pytest.mark.parametrize("width_bytes", [4, 4 * 5, 4 * 64])
def test_topk_over_column_blocks_keeps_the_lower_index_on_ties(library, width_bytes, monkeypatch, two_torch_threads):
    if library == "numpy" and not cpu_gemm.openblas_available():
        pytest.skip("NumPy in this environment is not built on OpenBLAS")
    monkeypatch.setenv("SPARSEKIT_BACKEND", "cpp")
    monkeypatch.setenv("SPARSEKIT_CPU_GEMM", library)
    monkeypatch.setattr("sparsekit.ops.cpu.encode.TOPK_TILE_ROWS", 5)
    monkeypatch.setattr("sparsekit.ops.cpu.encode.L2_TILE_BYTES", width_bytes * 5)  # 1, 5 or 64 columns per block
    gen = torch.Generator().manual_seed(11)
    # Small integers: many exact ties within and across column blocks, and k = n for one case.
    x = torch.randint(-2, 3, (13, 4), generator=gen).float()
    W = torch.randint(-2, 3, (4, 40), generator=gen).float()
    b = torch.randint(-1, 2, (40,), generator=gen).float()
    for k in (1, 6, 40):
        got = ops.topk_encode(x, W, b, k)
        want = reference.topk_encode(x, W, b, k)
        assert torch.equal(got.indices, want[1]), k
        assert torch.equal(got.values, want[0]), k


@needs_openblas
def test_batchtopk_encode_on_openblas_row_tiles_matches_the_reference(monkeypatch, two_torch_threads):
    monkeypatch.setenv("SPARSEKIT_BACKEND", "cpp")
    monkeypatch.setenv("SPARSEKIT_CPU_GEMM", "numpy")
    monkeypatch.setattr("sparsekit.ops.cpu.encode.TILE_BYTES", 4 * 40 * 3)
    gen = torch.Generator().manual_seed(0)
    x, W, b = (torch.randn(*s, generator=gen) for s in ((23, 6), (6, 40), (40,)))
    got = ops.batchtopk_encode(x, W, b, 3)
    want = reference.batchtopk_encode(x, W, b, 3)
    assert torch.equal(got.rows, want[1]) and torch.equal(got.cols, want[2])
    torch.testing.assert_close(got.values, want[0])


@needs_openblas
def test_row_tiles_restore_openblas_threads_and_raise_a_failing_epilogue(two_torch_threads):
    (openblas,) = cpu_gemm.openblas_controller().lib_controllers
    before = openblas.get_num_threads()
    x, W = torch.randn(40, 8), torch.randn(8, 12)
    seen = []

    def fail_on_third_tile(start, stop, col0, pre, threads):
        seen.append((start, threads))
        if start == 10:
            raise RuntimeError("tile failed")

    with pytest.raises(RuntimeError, match="tile failed"):
        cpu_gemm.row_tiles(x, W, 5, fail_on_third_tile, library="numpy")
    assert openblas.get_num_threads() == before
    assert sorted(s for s, _ in seen) == list(range(0, 40, 5))  # every tile ran before the raise
    assert {t for _, t in seen} == {1}  # each tile's epilogue told to use one thread


@needs_openblas
def test_row_tiles_write_every_row_of_out_with_the_product(two_torch_threads):
    x, W = torch.randn(37, 8, dtype=torch.float64), torch.randn(8, 12, dtype=torch.float64)
    out = torch.full((37, 12), float("nan"), dtype=torch.float64)
    cpu_gemm.row_tiles(x, W, 4, library="numpy", out=out)
    torch.testing.assert_close(out, x @ W)


def test_numpy_and_torch_gemm_choice_follows_the_environment(monkeypatch):
    monkeypatch.setenv("SPARSEKIT_CPU_GEMM", "torch")
    assert cpu_gemm.gemm_library(1e12) == "torch"
    monkeypatch.setenv("SPARSEKIT_CPU_GEMM", "auto")
    assert cpu_gemm.gemm_library(1.0) == "torch"  # tiny: no thread hand-off
    assert cpu_gemm.gemm_library(1e12) == ("numpy" if cpu_gemm.openblas_available() else "torch")
    monkeypatch.setenv("SPARSEKIT_CPU_GEMM", "blis")
    with pytest.raises(RuntimeError, match="SPARSEKIT_CPU_GEMM='blis'"):
        cpu_gemm.gemm_library()


@pytest.mark.parametrize("backend_name", ["torch", "cpp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decoder_row_constraints_match_the_reference(backend_name, dtype, monkeypatch):
    monkeypatch.setenv("SPARSEKIT_BACKEND", backend_name)
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(33, 7, generator=gen, dtype=dtype) * torch.rand(33, 1, generator=gen, dtype=dtype) * 3
    W[4] = 0.0  # a zero row: the 1e-12 floor, no division by zero
    grad = torch.randn(33, 7, generator=gen, dtype=dtype)
    expected_grad = reference.remove_parallel_rows(grad, W)
    projected = grad.clone()
    assert ops.remove_parallel_rows_(projected, W) is projected
    torch.testing.assert_close(projected, expected_grad)
    assert torch.all((projected * W).sum(-1).abs() <= 1e-5 * W.norm(dim=-1) * grad.norm(dim=-1) + 1e-12)
    normalized = W.clone()
    assert ops.normalize_rows_(normalized) is normalized
    torch.testing.assert_close(normalized, reference.normalize_rows(W))
    norms = normalized.norm(dim=-1)
    torch.testing.assert_close(norms[norms > 0], torch.ones_like(norms[norms > 0]))
    assert torch.equal(normalized[4], torch.zeros(7, dtype=dtype))


def test_decoder_row_constraints_refuse_mismatched_shapes_by_name():
    with pytest.raises(ValueError, match="grad has size 6 on axis 1"):
        ops.remove_parallel_rows_(torch.zeros(3, 6), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="W must be 2-D"):
        ops.normalize_rows_(torch.zeros(3))
    with pytest.raises(ValueError, match="grad has dtype torch.float64"):
        ops.remove_parallel_rows_(torch.zeros(3, 5, dtype=torch.float64), torch.zeros(3, 5))


def test_openblas_is_found_where_numpy_links_it():
    # Where NumPy reports OpenBLAS, the fast path must not silently fall back to torch.
    config = np.show_config(mode="dicts") if hasattr(np, "show_config") else {}
    blas = str(config.get("Build Dependencies", {}).get("blas", {}).get("name", ""))
    if "openblas" in blas.lower():
        assert cpu_gemm.openblas_available()


@pytest.mark.parametrize("shape, dtype", [((3, 5), torch.float32), ((1024, 1024), torch.float32),
                                          ((600, 1000), torch.float64), ((2 ** 20,), torch.int64),
                                          ((4, 2 ** 20), torch.float16)])
def test_empty_output_is_a_plain_writable_tensor_of_the_shape_and_dtype(shape, dtype):
    out = cpu_gemm.empty_output(shape, dtype)
    assert out.shape == shape and out.dtype == dtype and out.device.type == "cpu" and out.is_contiguous()
    out.fill_(3)
    assert bool((out == 3).all())
    # Large float/int64 blocks come from NumPy (huge pages); they must still be resizable-free
    # ordinary tensors to autograd and the optimiser.
    p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype)) if dtype.is_floating_point else None
    if p is not None:
        p.grad = out
        torch.optim.SGD([p], lr=1.0).step()
        assert bool((p == -3).all())


def test_large_outputs_are_recycled_only_once_nothing_refers_to_them():
    shape = (1024, 1024 + 7)  # 4 MiB of float32 and a shape no other test uses
    first = cpu_gemm.empty_output(shape, torch.float32)
    address = first.data_ptr()
    second = cpu_gemm.empty_output(shape, torch.float32)
    assert second.data_ptr() != address  # `first` is alive
    view = first[3:]
    del first
    assert cpu_gemm.empty_output(shape, torch.float32).data_ptr() != address  # a view keeps it
    del view
    again = cpu_gemm.empty_output(shape, torch.float32)
    assert again.data_ptr() == address  # nothing refers to it any more: reused
    grad_holder = torch.nn.Parameter(torch.zeros(shape))
    grad_holder.grad = again
    del again
    assert cpu_gemm.empty_output(shape, torch.float32).data_ptr() != address  # alive as a .grad
    kept = cpu_gemm.empty_output(shape, torch.float32, recycle=False)
    del kept  # not pooled: nothing to assert but that it is a plain buffer


def _select(pre: np.ndarray, k: int, share: int, col0: int = 0, bias: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    from sparsekit.ops.backend import _C
    values, indices = np.empty((pre.shape[0], k), pre.dtype), np.empty((pre.shape[0], k), np.int64)
    _C.topk_select_block(pre, np.full(pre.shape[1], bias, pre.dtype), col0, k, True, True, values, indices, 0, share)
    return values, indices


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("width,k", [(1, 1), (7, 7), (40, 3), (300, 64), (1000, 250)])
def test_whole_row_selection_by_threshold_equals_the_heap_on_ties_signed_zeros_and_non_finite_values(dtype, width, k,
                                                                                        two_torch_threads):
    rng = np.random.default_rng(width * 31 + k)
    pre = rng.integers(-4, 5, size=(64, width)).astype(dtype) * 0.5  # few distinct values: ties everywhere
    pre[1] = rng.standard_normal(width)  # distinct values
    pre[2] = 1.0  # one value
    specials = rng.random((64, width)) < 0.1
    pre[3:][specials[3:]] = rng.choice([np.nan, np.inf, -np.inf], size=int(specials[3:].sum()))
    pre[4, : width - k + 1] = -np.inf  # fewer than k entries above -inf when k > 1: the heap's sentinels
    pre[5] = np.nan
    pre[6] = rng.choice(np.array([-0.0, 0.0, -2.0], dtype), size=width)  # -0 and +0 tie: lower column first
    pre[7] = rng.choice(np.array([np.finfo(dtype).tiny / 4, -np.finfo(dtype).tiny / 4, 3e38], dtype), size=width)
    for bias in (0.0, -0.0):  # a bias of -0 keeps -0 entries -0 (with +0 they become +0)
        heap = _select(pre, k, share=0, col0=3, bias=bias)
        threshold = _select(pre, k, share=10**9, col0=3, bias=bias)  # every whole row by threshold
        assert np.array_equal(heap[1], threshold[1])
        np.testing.assert_array_equal(heap[0], threshold[0])  # NaN-free: ReLU'd values, or 0 for sentinels


def test_topk_positions_by_threshold_match_the_reference_with_ties(two_torch_threads, monkeypatch):
    monkeypatch.setenv("SPARSEKIT_BACKEND", "cpp")
    gen = torch.Generator().manual_seed(5)
    pre = torch.randint(-20, 20, (300, 1638), generator=gen).float() / 4  # k / width >= 1/64: by threshold
    for k in (26, 256, 1638):
        assert torch.equal(ops.topk_positions(pre, k), reference.topk_positions(pre, k))
