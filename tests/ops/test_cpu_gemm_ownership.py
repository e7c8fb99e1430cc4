"""sparsekit.ops.cpu.gemm without interpreter internals: NumPy's OpenBLAS found and limited through
threadpoolctl, and the pool of large outputs handing a buffer out again only once nothing can reach
its memory (explicit ownership, not reference counts)."""
import gc
import threading
import time

import numpy as np
import pytest
import torch

from sparsekit.ops.cpu import gemm as cpu_gemm

threadpoolctl = pytest.importorskip("threadpoolctl")


def numpy_openblas_threads() -> int:
    """NumPy's OpenBLAS's thread count as threadpoolctl reports it (a fresh look each call)."""
    (lib,) = [info for info in threadpoolctl.threadpool_info()
              if info["internal_api"] == "openblas" and info["filepath"] == numpy_openblas_path()]
    return lib["num_threads"]


def numpy_openblas_path() -> str:
    (lib,) = cpu_gemm.openblas_controller().lib_controllers
    return lib.filepath


def test_openblas_is_available_in_the_dev_environment_and_is_numpys():
    assert cpu_gemm.openblas_available()
    (lib,) = cpu_gemm.openblas_controller().lib_controllers
    assert (lib.user_api, lib.internal_api) == ("blas", "openblas")
    assert any(lib.filepath.startswith(folder) or __import__("os").path.realpath(lib.filepath).startswith(folder)
               for folder in cpu_gemm._numpy_folders())


def test_row_tiles_run_openblas_on_one_thread_and_restore_it_after(two_torch_threads):
    before = numpy_openblas_threads()
    if before < 2:
        pytest.skip("OpenBLAS runs one thread here already: a limit to 1 cannot be seen")
    seen = []

    def epilogue(start, stop, col0, pre, threads):
        seen.append((threads, numpy_openblas_threads()))

    x, W = torch.randn(40, 8), torch.randn(8, 12)
    cpu_gemm.row_tiles(x, W, 5, epilogue, library="numpy")
    assert seen and set(seen) == {(1, 1)}  # on the pool, OpenBLAS on one thread
    assert numpy_openblas_threads() == before


def test_row_tiles_from_another_thread_restore_openblas_and_leave_threadpoolctl_usable(two_torch_threads):
    before = numpy_openblas_threads()
    if before < 2:
        pytest.skip("OpenBLAS runs one thread here already: a limit to 1 cannot be seen")
    seen, errors = [], []

    def call():
        try:
            cpu_gemm.row_tiles(torch.randn(16, 4), torch.randn(4, 6), 4,
                               lambda *a: seen.append((a[-1], numpy_openblas_threads())), library="numpy")
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    worker = threading.Thread(target=call)
    worker.start()
    worker.join()
    assert not errors and set(seen) == {(1, 1)}
    assert numpy_openblas_threads() == before
    # threadpoolctl's own limits still work in this thread afterwards (the worker kept no control).
    with threadpoolctl.threadpool_limits(1, user_api="blas"):
        assert numpy_openblas_threads() == 1
    assert numpy_openblas_threads() == before


def test_while_another_thread_holds_a_threadpoolctl_limit_the_pool_never_runs_on_multithreaded_openblas(
        two_torch_threads):
    x, W = torch.randn(37, 8, dtype=torch.float64), torch.randn(8, 12, dtype=torch.float64)
    out = torch.full((37, 12), float("nan"), dtype=torch.float64)
    seen = []

    def call():
        cpu_gemm.row_tiles(x, W, 4, lambda *a: seen.append((a[-1], numpy_openblas_threads())), library="numpy",
                           out=out)

    with threadpoolctl.threadpool_limits(2, user_api="blas"):  # this thread now controls OpenBLAS
        worker = threading.Thread(target=call)
        worker.start()
        worker.join()
        assert numpy_openblas_threads() == 2
    # Tiles on the pool (threads == 1) only ever with OpenBLAS on one thread; otherwise in order (0).
    assert seen and all(openblas == 1 for threads, openblas in seen if threads == 1)
    torch.testing.assert_close(out, x @ W)


def test_entering_and_leaving_the_openblas_limit_costs_microseconds():
    controller = cpu_gemm.openblas_controller()
    for _ in range(100):
        with controller.limit(limits=1):
            pass
    calls = 2000
    started = time.perf_counter()
    for _ in range(calls):
        with controller.limit(limits=1):
            pass
    per_call = (time.perf_counter() - started) / calls
    assert per_call < 200e-6, f"{per_call * 1e6:.1f} us per limit"  # ~8 us measured on a 2-core EPYC


SHAPE = (1024, 1024 + 11)  # 4 MiB of float32 and a shape no other test uses
PATTERN = 7.25


def _keep(kind: str):
    """A pooled output filled with PATTERN; returns (what is kept, its data pointer)."""
    t = cpu_gemm.empty_output(SHAPE, torch.float32)
    t.fill_(PATTERN)
    address = t.data_ptr()
    if kind == "tensor":
        return t, address
    if kind == "slice":
        return t[5:, 3:], address
    if kind == "numpy":
        return t.numpy(), address
    if kind == "from_numpy":
        return torch.from_numpy(t.numpy()), address
    if kind == "grad":
        holder = torch.nn.Parameter(torch.zeros(SHAPE))
        holder.grad = t
        return holder, address
    raise ValueError(kind)


def _data_pointer(kept) -> int:
    if isinstance(kept, np.ndarray):
        return kept.__array_interface__["data"][0]
    if isinstance(kept, torch.nn.Parameter):
        return kept.grad.data_ptr()
    return kept.data_ptr()


def _all_pattern(kept) -> bool:
    data = kept.grad if isinstance(kept, torch.nn.Parameter) else kept
    return bool((torch.as_tensor(data) == PATTERN).all())


@pytest.mark.parametrize("kind", ["tensor", "slice", "numpy", "from_numpy", "grad"])
def test_a_pooled_output_is_never_handed_out_while_any_part_of_it_is_alive(kind):
    gc.collect()
    kept, address = _keep(kind)
    assert _data_pointer(kept) >= address and _data_pointer(kept) < address + 4 * SHAPE[0] * SHAPE[1]
    others = [cpu_gemm.empty_output(SHAPE, torch.float32) for _ in range(cpu_gemm.RECYCLED_PER_SHAPE + 1)]
    for other in others:
        other.fill_(-1.0)
    assert address not in {o.data_ptr() for o in others}
    assert _all_pattern(kept)
    del others
    gc.collect()
    again = cpu_gemm.empty_output(SHAPE, torch.float32)  # a free pooled buffer, not the kept one
    assert again.data_ptr() != address
    again.fill_(-2.0)
    assert _all_pattern(kept)
    del again
    del kept
    gc.collect()
    pooled = {b.array.__array_interface__["data"][0] for b in cpu_gemm._recycled[(SHAPE, np.float32)]}
    assert address in pooled
    handed = [cpu_gemm.empty_output(SHAPE, torch.float32) for _ in range(len(pooled))]
    assert {h.data_ptr() for h in handed} == pooled  # the pool still works: every buffer reused, this one too


def test_a_buffer_kept_only_in_a_reference_cycle_is_freed_by_the_collector():
    gc.collect()
    t = cpu_gemm.empty_output(SHAPE, torch.float32)
    address = t.data_ptr()
    cycle = {"tensor": t}
    cycle["self"] = cycle
    del t, cycle
    gc.collect()
    handed = [cpu_gemm.empty_output(SHAPE, torch.float32) for _ in range(cpu_gemm.RECYCLED_PER_SHAPE)]
    assert address in {h.data_ptr() for h in handed}


def test_the_pool_is_safe_under_threads():
    gc.collect()
    errors = []

    def work(seed):
        try:
            for i in range(30):
                t = cpu_gemm.empty_output(SHAPE, torch.float32)
                t.fill_(seed * 1000 + i)
                time.sleep(0.0005)
                if not bool((t == seed * 1000 + i).all()):
                    errors.append((seed, i))
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(cpu_gemm._recycled[(SHAPE, np.float32)]) <= cpu_gemm.RECYCLED_PER_SHAPE
