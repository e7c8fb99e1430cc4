"""The CPU GEMM behind the TopK encoder: the one GEMM a fused step cannot avoid.

On the CPUs measured here NumPy's bundled OpenBLAS runs the float32 encoder GEMM faster than
torch's MKL (docs/design.md: ~1.7x on an AVX2 EPYC; ~1.2x on an AVX-512 one). Tensors cross as
zero-copy ``Tensor.numpy()`` views and each product is written into a preallocated output.

OpenBLAS's own worker threads spin for ~0.1 s after each call and fight torch's OpenMP threads
(which sparsekit._C shares) for the cores; on a busy machine its 2-thread GEMM ran 2x slower than
two single-threaded ones. So the encoder runs as **row tiles on a pool of Python threads** (one
per torch thread), each calling a single-threaded OpenBLAS GEMM on its tile and then the C++
epilogue (top-k selection) on the same tile while it is cache-hot; both release the GIL. Nothing
spins, the [B, n] matrix is never materialised, and the selection runs on every core.

OpenBLAS's thread count is process-wide (its ``openblas_set_num_threads_local`` changes the
global count in the pthreads builds NumPy ships), so ``row_tiles`` limits it to 1 for the duration
of a call and restores it after, under a lock. NumPy's OpenBLAS is found and limited through
``threadpoolctl`` (one controller, built once, selecting that library alone; entering and leaving
the limit costs microseconds). Where no OpenBLAS can be found (NumPy built on another BLAS, or
threadpoolctl missing), or for float dtypes OpenBLAS does not run, the tiles run on torch's GEMM in
the calling thread.

SPARSEKIT_CPU_GEMM=auto (default) | numpy | torch picks the library (auto: OpenBLAS when it can
be controlled and the GEMM reaches the crossover ``tuning.chosen("parallel_min_flop")``, torch
otherwise: PARALLEL_MIN_FLOP below unless `sparsekit tune` measured this machine's).
"""
from __future__ import annotations

import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from . import tuning


def numpy_view(t: Tensor) -> np.ndarray:
    """t's data as a NumPy array, zero-copy (t detached): how tensors and preallocated outputs
    reach sparsekit._C, which refuses to copy."""
    return t.detach().numpy()


def _numpy_folders() -> list[str]:
    """Where a NumPy wheel keeps the libraries it bundles: inside the package (macOS: numpy/.dylibs)
    or beside it (Linux and Windows: numpy.libs)."""
    package = Path(np.__file__).resolve().parent
    return [str(package) + os.sep, str(package.parent / "numpy.libs") + os.sep]


def _find_openblas():
    """A threadpoolctl ThreadpoolController holding only the OpenBLAS that NumPy uses, or None.

    The OpenBLAS libraries loaded in the process (user_api "blas", internal_api "openblas") are
    listed by threadpoolctl; NumPy's is the one in NumPy's own folders (a wheel's bundled copy) or,
    where NumPy links a system OpenBLAS, the only one loaded. Several candidates and none of them
    NumPy's: None (the caller falls back to torch's GEMM)."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    np.ones((2, 2)) @ np.ones((2, 2))  # make sure NumPy's BLAS is loaded
    controller = ThreadpoolController()
    openblas = [lib for lib in controller.select(user_api="blas").lib_controllers
                if lib.internal_api == "openblas" and lib.get_num_threads() is not None]
    folders = _numpy_folders()
    numpy_own = [lib for lib in openblas if os.path.realpath(lib.filepath).startswith(tuple(folders))]
    chosen = numpy_own or (openblas if len(openblas) == 1 else [])
    if not chosen:
        return None
    return controller.select(filepath=chosen[0].filepath)


# The default crossover (sparsekit.ops.cpu.tuning's "parallel_min_flop"), ~8.6 GFLOP: measured on
# the 2-core EPYC (topk_encode at B=2048, d=256, n=8192 took 66 ms either way; at 1024 x 256 x 4096,
# 27 ms on the pool vs 20 ms).
PARALLEL_MIN_FLOP = 2**33

_openblas = None
_openblas_searched = False
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_lock = threading.Lock()
_search_lock = threading.Lock()
_local = threading.local()


def openblas_controller():
    """The threadpoolctl ThreadpoolController of NumPy's OpenBLAS alone (found once), or None."""
    global _openblas, _openblas_searched
    if not _openblas_searched:
        with _search_lock:
            if not _openblas_searched:
                _openblas = _find_openblas()
                _openblas_searched = True
    return _openblas


def openblas_available() -> bool:
    """Whether NumPy's OpenBLAS was found and its thread count can be set."""
    return openblas_controller() is not None


def gemm_library(flop: float = float("inf"), crossover: str = "parallel_min_flop") -> str:
    """The library that runs row-tile GEMMs: "numpy" (OpenBLAS, one thread per tile) under
    SPARSEKIT_CPU_GEMM=auto for a GEMM of at least ``flop`` FLOP at the tuning knob ``crossover``
    (``tuning.chosen``; the encoder's "parallel_min_flop" by default, the remedies' products
    "pooled_mm_min_flop") when NumPy's OpenBLAS can be controlled, or "torch"."""
    name = os.environ.get("SPARSEKIT_CPU_GEMM", "auto").strip().lower()
    if name not in ("auto", "numpy", "torch"):
        raise RuntimeError(f"SPARSEKIT_CPU_GEMM={name!r} is not 'auto', 'numpy' or 'torch'")
    if name == "auto":  # tiny GEMMs stay on torch: a thread pool's hand-off would dominate them
        return "numpy" if flop >= tuning.chosen(crossover) and openblas_available() else "torch"
    if name == "numpy" and not openblas_available():
        raise RuntimeError("SPARSEKIT_CPU_GEMM=numpy but NumPy's OpenBLAS was not found in this process")
    return name


def matmul_into(a: Tensor, b: Tensor, out: Tensor, library: str = "torch") -> Tensor:
    """out = a @ b for CPU float tensors a [m, p], b [p, q] (a column block of a wider matrix is
    fine), out [m, q] through ``library``; a non-contiguous out (a column block of a wider output)
    is written through a temporary."""
    a, b = a.detach(), b.detach()
    if not out.is_contiguous():
        out.copy_(a @ b)
    elif library == "numpy":
        np.matmul(a.numpy(), b.numpy(), out=out.detach().numpy())
    else:
        torch.matmul(a, b, out=out)
    return out


# The default of sparsekit.ops.cpu.tuning's "pooled_mm_min_flop", ~2.1 GFLOP: measured on the 2-core
# AVX2 EPYC (B=4096, d=512, q latents; torch.mm against ``matmul``): 1.3-1.6x slower on the pool at
# 0.27 GFLOP, even at 1.07 and 4.3, 1.0-1.4x faster from 6.9 GFLOP (the products with a transposed
# operand gain most: torch.mm(g, W.t()) 55 ms against 39).
POOLED_MM_MIN_FLOP = 2**31


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """a @ b -> [m, q] (a new contiguous tensor) for CPU float tensors a [m, p], b [p, q] of any
    strides BLAS reads (either may be a transposed view), no autograd: the rows of the output split
    over one pool thread per torch thread, each a single-threaded OpenBLAS GEMM (``row_tiles``), when
    the product has at least ``tuning.chosen("pooled_mm_min_flop")`` FLOP and NumPy's OpenBLAS can
    be controlled (SPARSEKIT_CPU_GEMM=auto; numpy: always that path; torch: never); else torch.mm.
    The dense products of the dead-latent remedies (ghost grads, AuxK keeping most dead latents)
    run here: [B, |D|] by [|D|, d] and their gradients."""
    a, b = a.detach(), b.detach()
    flop = 2.0 * a.shape[0] * a.shape[1] * b.shape[1]
    workers = min(torch.get_num_threads(), a.shape[0])
    pooled = (gemm_library(flop, "pooled_mm_min_flop") == "numpy" and a.dtype in (torch.float32, torch.float64)
              and a.dtype == b.dtype and workers > 1 and b.shape[1] > 0)
    if not pooled:
        return torch.mm(a, b)
    # BLAS reads row- or column-major operands; anything else (an expanded gradient, a strided
    # slice) is copied first rather than left to NumPy's slow non-BLAS loop.
    a, b = (t if t.is_contiguous() or t.t().is_contiguous() else t.contiguous() for t in (a, b))
    out = empty_output((a.shape[0], b.shape[1]), a.dtype)
    row_tiles(a, b, -(-a.shape[0] // workers), library="numpy", out=out)
    return out


HUGE_PAGE_MIN_BYTES = 4 * 2**20  # NumPy asks for transparent huge pages from this size (Linux)


class _PooledBuffer:
    """One pooled NumPy array and whether a tensor handed out over it may still be alive."""
    __slots__ = ("array", "in_use")

    def __init__(self, array: np.ndarray):
        self.array = array
        self.in_use = False


def _release(buffer: _PooledBuffer) -> None:
    # A single attribute store: safe from any thread and from the garbage collector without the
    # lock (empty_output only ever takes a buffer that is not in use, under the lock).
    buffer.in_use = False


_recycled: dict[tuple, list[_PooledBuffer]] = {}
_recycled_lock = threading.Lock()
RECYCLED_PER_SHAPE = 4


def empty_output(shape, dtype: torch.dtype, recycle: bool = True) -> Tensor:
    """torch.empty(shape, dtype) on the CPU, recycled when it is large.

    A fresh 32 MiB output (a weight gradient, new every training step) costs its page faults on
    first write: ~13 ms with 4 KiB pages, and measured ~15 ms per op on 2 threads even with the
    transparent huge pages NumPy asks for. So large outputs are NumPy arrays kept in a small pool,
    handed out again once nothing can reach their memory; it is already mapped. At most
    RECYCLED_PER_SHAPE arrays are kept per shape and dtype.

    Ownership is explicit: each hand-out gives torch.from_numpy a fresh ndarray view of the pooled
    array, and a weakref.finalize on that view marks the buffer free when the view dies.
    torch.from_numpy keeps the ndarray it was given alive for as long as any tensor sharing the
    storage lives (views, slices, a ``.grad``, ``t.numpy()`` arrays, whose base is the tensor, and
    tensors made from those), so the view dies only when the last of them does."""
    np_dtype = {torch.float32: np.float32, torch.float64: np.float64, torch.int64: np.int64}.get(dtype)
    shape = tuple(int(size) for size in shape)
    count = 1
    for size in shape:
        count *= size
    if np_dtype is None or count * np.dtype(np_dtype).itemsize < HUGE_PAGE_MIN_BYTES:
        return torch.empty(shape, dtype=dtype)
    if not recycle:  # a buffer the caller keeps: NumPy's huge pages, no pool slot
        return torch.from_numpy(np.empty(shape, dtype=np_dtype))
    key = (shape, np_dtype)
    with _recycled_lock:
        pool = _recycled.setdefault(key, [])
        buffer = next((b for b in pool if not b.in_use), None)
        if buffer is None:
            if len(pool) >= RECYCLED_PER_SHAPE:  # every slot in use: an ordinary, unpooled array
                return torch.from_numpy(np.empty(shape, dtype=np_dtype))
            buffer = _PooledBuffer(np.empty(shape, dtype=np_dtype))
            pool.append(buffer)
        buffer.in_use = True
        view = buffer.array.view()  # the one object whose death frees the buffer
        weakref.finalize(view, _release, buffer).atexit = False
        return torch.from_numpy(view)


def scratch(rows: int, cols: int, dtype: torch.dtype, purpose: str = "tile") -> Tensor:
    """A per-thread [rows, cols] buffer for ``purpose``, reused across calls (grown when too
    small). A fresh buffer of this size costs its page faults on every call: ~90 ms of kernel time
    per 256 MiB on the CPUs measured here, against ~14 ms to write a reused one. Callers must not
    hand the buffer out (its contents change on the thread's next call)."""
    key = (purpose, cols, dtype)
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    buf = buffers.get(key)
    if buf is None or buf.shape[0] < rows:
        buf = buffers[key] = empty_output((rows, cols), dtype, recycle=False)
    return buf[:rows]


def _get_pool(workers: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    if _pool is None or _pool_size != workers:
        if _pool is not None:
            _pool.shutdown(wait=True)
        _pool = ThreadPoolExecutor(workers, thread_name_prefix="sparsekit-gemm")
        _pool_size = workers
    return _pool


def row_tiles(x: Tensor, W: Tensor, tile: int, epilogue: Callable[[int, int, int, Tensor, int], None] | None = None,
              library: str | None = None, out: Tensor | None = None, col_tile: int | None = None) -> None:
    """For each block of at most ``tile`` rows of x [B, p], and within it each block of at most
    ``col_tile`` columns of W [p, q] in column order (default: all q at once):
    pre = x[start:stop] @ W[:, col0:col0 + width] (in a per-thread scratch buffer, or the matching
    block of ``out`` [B, q] when given), then ``epilogue(start, stop, col0, pre, threads)``.

    A row block's column blocks all run on one thread, in order. With OpenBLAS the row blocks run
    on one Python thread per torch thread, each GEMM single-threaded, and ``threads`` is 1: the
    epilogue must then release the GIL to run in parallel, use one thread, and write only rows
    [start, stop) of its outputs. Otherwise (or when OpenBLAS's thread count cannot be limited to 1
    just now, see below) the blocks run in order in the calling thread and ``threads`` is 0 (the
    epilogue's default pool).
    x, W: contiguous CPU float tensors."""
    batch, cols = x.shape[0], W.shape[1]
    library = library or gemm_library(2.0 * batch * x.shape[1] * cols)
    workers = min(torch.get_num_threads(), batch)
    parallel = (library == "numpy" and workers > 1 and x.dtype in (torch.float32, torch.float64)
                and openblas_available())
    if parallel:
        tile = max(1, min(tile, -(-batch // workers)))  # at least one tile per worker
    col_tile = cols if col_tile is None else max(1, min(col_tile, cols))
    x, W = x.detach(), W.detach()

    def run(start: int, threads: int) -> None:
        stop = min(batch, start + tile)
        for col0 in range(0, cols, col_tile):
            col1 = min(cols, col0 + col_tile)
            pre = out[start:stop, col0:col1] if out is not None else scratch(stop - start, col1 - col0, x.dtype)
            matmul_into(x[start:stop], W if col1 - col0 == cols else W[:, col0:col1], pre, library)
            if epilogue is not None:
                epilogue(start, stop, col0, pre, threads)

    starts = range(0, batch, tile)
    if parallel:
        with _lock, _openblas.limit(limits=1):  # restored on leaving, after every tile is done
            # threadpoolctl (3.8+) ignores the limit while another thread holds its control of a
            # pthreads OpenBLAS (inside that thread's own threadpool_limits): then no pool on top of
            # OpenBLAS's threads; the tiles run in order below.
            if all(lib.get_num_threads() == 1 for lib in _openblas.lib_controllers):
                futures = [_get_pool(workers).submit(run, s, 1) for s in starts]
                wait(futures)
                for future in futures:
                    future.result()
                return
    for start in starts:
        run(start, 0)
