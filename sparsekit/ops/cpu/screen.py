"""Exact float32 TopK, BatchTopK and sparse ReLU codes from a bfloat16 GEMM (CPUs with native bf16).

On CPUs with AVX512-BF16 or AMX, torch's bfloat16 GEMM (oneDNN, float32 accumulation) runs the
encoder's [B, d] x [d, n] product ~1.9x faster than the fastest float32 GEMM (measured on the
2-core AVX-512 EPYC at B=4096, d=512, n=16384: 0.18 s against 0.37 s). Its result is
not the float32 one, but it is within a bound computed entry by entry from the norms of x, W and
their bf16 rounding errors (csrc/bf16_screen.hpp derives it). So for each row:

1. Q = bf16(x) @ bf16(W_enc) for a block of rows (torch, all threads);
2. C++: the k-th largest lower bound of Q + b_enc, and every entry whose upper bound reaches it
   (about 2k candidates per row on Gaussian data at d=512); for BatchTopK the B*k-th over the
   batch; for ReLU every entry whose upper bound is positive;
3. C++: those candidates' pre-activations recomputed in float32 from x and W_enc's transpose
   (grouped by column strips so each strip of W_enc^T is read from L2), then the selection
   among them.

The selection and values are those of the float32 path (the recompute's dot products are float32,
in their own summation order, as the OpenBLAS and MKL GEMMs each have theirs). The bound assumes
what oneDNN documents for bf16 matmul: products summed in float32 and the result rounded to
nearest; tests/ops/test_cpu_screen.py checks it on the machine that runs the suite.

SPARSEKIT_BF16_SCREEN=auto (default) | on | off. auto: float32 GEMMs of at least
screen_min_flop (TopK and BatchTopK: with n >= screen_min_n_over_k * k), on a CPU whose flags
include avx512_bf16 or amx_bf16 (read from /proc/cpuinfo; elsewhere bf16 is emulated and slower
than float32). on: always for float32 (tests use it on any CPU). off: never. Those crossovers and
the rows per bf16 GEMM block (screen_rows) are ``tuning.chosen``'s: this machine's when `sparsekit
tune` measured them, else the defaults below.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from sparsekit.ops.backend import _C

from . import tuning
from .gemm import scratch

# The defaults of sparsekit.ops.cpu.tuning's screen_min_flop, screen_min_n_over_k and screen_rows.
# The crossover, measured on the 2-core AVX-512 EPYC (topk_encode, screened / float32 time):
# 1.1-2.1x slower at 0.27 GFLOP (B=128, d=256, n=4096; B=64, d=512, n=4096), 0.71x at 0.54 GFLOP
# (B=256, d=256, n=4096), 0.64-0.68x from 2 to 34 GFLOP.
SCREEN_MIN_FLOP = 2**29  # ~0.54 GFLOP
# ...and only when k is a small share of n: the screen's per-row selection costs grow with k and
# its candidates with the density of pre-activations at the k-th largest. Measured at B=4096,
# d=512: n=16384, k=32 took 0.24 s against 0.39 s on float32; n=1638, k=256 (AuxK's dead latents)
# 0.17 s against torch's addmm + topk 0.12 s.
SCREEN_MIN_N_OVER_K = 64
SCREEN_ROWS = 1024  # rows per bf16 GEMM block: 32 MiB of bf16 pre-activations at n=16384

_native_bf16: bool | None = None

stats = {"calls": 0, "rows": 0, "candidates": 0}  # running totals, for benchmarks


def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bfloat16 dot products natively (AVX512-BF16 or AMX-BF16)."""
    global _native_bf16
    if _native_bf16 is None:
        try:
            with open("/proc/cpuinfo") as info:
                flags = next((line for line in info if line.startswith("flags")), "").split()
        except OSError:
            flags = []
        _native_bf16 = "avx512_bf16" in flags or "amx_bf16" in flags
    return _native_bf16


def screen_mode() -> str:
    mode = os.environ.get("SPARSEKIT_BF16_SCREEN", "auto").strip().lower()
    if mode not in ("auto", "on", "off"):
        raise RuntimeError(f"SPARSEKIT_BF16_SCREEN={mode!r} is not 'auto', 'on' or 'off'")
    return mode


def use_screen(x: Tensor, W_enc: Tensor, k: int | None = None) -> bool:
    """Whether an encoder of x [B, d] with W_enc [d, n] (TopK: k per row; ReLU: k None) takes the
    bf16-screened path."""
    mode = screen_mode()
    if mode == "off" or x.dtype != torch.float32 or W_enc.dtype != torch.float32:
        return False
    if mode == "on":
        return True
    large = 2.0 * x.shape[0] * x.shape[1] * W_enc.shape[1] >= tuning.chosen("screen_min_flop")
    return (large and (k is None or W_enc.shape[1] >= tuning.chosen("screen_min_n_over_k") * k)
            and cpu_has_native_bf16())


def _prepare(x: Tensor, W_enc: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(bf16 x, bf16 W_enc, W_enc^T [n, d], column norms [2, n]) in reused buffers."""
    d, n = W_enc.shape
    W_bits = scratch(d, n, torch.int16, "bf16 W_enc")
    W_t = scratch(n, d, torch.float32, "W_enc transposed")
    norms = scratch(2, n, torch.float32, "W_enc column norms")
    _C.pack_encoder_bf16(W_enc.numpy(), W_bits.numpy(), W_t.numpy(), norms[0].numpy(), norms[1].numpy())
    return _bf16(x, "bf16 x").view(torch.bfloat16), W_bits.view(torch.bfloat16), W_t, norms


def _bf16(t: Tensor, purpose: str) -> Tensor:
    """t (contiguous float32) rounded to bfloat16 (nearest, ties to even) in a reused buffer."""
    bits = scratch(t.shape[0], t.shape[1], torch.int16, purpose)
    _C.pack_bf16(t.detach().numpy(), bits.numpy())
    return bits


def _bf16_gemm_blocks(x_bf16: Tensor, W_bf16: Tensor, out: Tensor | None = None):
    """For each block of at most screen_rows rows (``tuning.chosen``): Q = x_bf16[start:stop] @ W_bf16 (bf16 bits,
    [stop - start, n]), yielded as (start, stop, Q). Q is a reused block-sized buffer, or the rows
    [start, stop) of out [B, n] (int16), which then holds every block."""
    batch, n = x_bf16.shape[0], W_bf16.shape[1]
    block = tuning.chosen("screen_rows")
    Q_bits = out if out is not None else scratch(min(batch, block), n, torch.int16, "bf16 pre-activations")
    for start in range(0, batch, block):
        stop = min(batch, start + block)
        Q = Q_bits[start:stop] if out is not None else Q_bits[: stop - start]
        torch.mm(x_bf16[start:stop], W_bf16, out=Q.view(torch.bfloat16))
        yield start, stop, Q


def _count(rows: int, candidates: int = 0) -> None:
    stats["calls"] += 1
    stats["rows"] += rows
    stats["candidates"] += candidates


def topk_encode_screened(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int) -> tuple[Tensor, Tensor] | None:
    """The float32 top-k of relu(x @ W_enc + b_enc) per row, through a bf16 GEMM and an exact
    recompute of the candidates. x [B, d], W_enc [d, n], b_enc [n] (contiguous float32 CPU)
    -> (values [B, k] sorted descending, indices [B, k]), or None when the bf16 pre-activations
    overflow (the caller then takes the float32 path)."""
    x, W_enc, b_enc = x.detach(), W_enc.detach(), b_enc.detach()
    x_bf16, W_bf16, W_t, norms = _prepare(x, W_enc)
    values = x.new_empty(x.shape[0], k)
    indices = torch.empty(x.shape[0], k, dtype=torch.int64)
    total = 0
    for start, stop, Q in _bf16_gemm_blocks(x_bf16, W_bf16):
        found = _C.topk_screened(Q.numpy(), b_enc.numpy(), x[start:stop].numpy(), W_t.numpy(), norms[0].numpy(),
                                 norms[1].numpy(), k, values[start:stop].numpy(), indices[start:stop].numpy())
        if found < 0:
            return None
        total += found
    _count(x.shape[0], total)
    return values, indices


def batchtopk_encode_screened(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor] | None:
    """BatchTopK through the bf16 GEMM: the B*k largest of relu(x @ W_enc + b_enc) over the batch,
    exact float32, ties to the lower flat index. x [B, d], W_enc [d, n], b_enc [n] (contiguous
    float32 CPU) -> (values, rows, cols), each [B*k], in flat order; or None when the float32 path
    must run (the bf16 products overflow, or fewer than B*k pre-activations may be positive)."""
    x, W_enc, b_enc = x.detach(), W_enc.detach(), b_enc.detach()
    x_bf16, W_bf16, W_t, norms = _prepare(x, W_enc)
    Q_all = scratch(x.shape[0], W_enc.shape[1], torch.int16, "bf16 pre-activations, whole batch")
    for _ in _bf16_gemm_blocks(x_bf16, W_bf16, out=Q_all):
        pass
    m = x.shape[0] * k
    values = x.new_empty(m)
    rows = torch.empty(m, dtype=torch.int64)
    cols = torch.empty(m, dtype=torch.int64)
    found = _C.batchtopk_screened(Q_all.numpy(), b_enc.numpy(), x.numpy(), W_t.numpy(), norms[0].numpy(),
                                  norms[1].numpy(), m, values.numpy(), rows.numpy(), cols.numpy())
    if found < 0:
        return None
    _count(x.shape[0], found)
    return values, rows, cols


def relu_encode_screened(x: Tensor, W_enc: Tensor, b_enc: Tensor,
                         max_density: float) -> tuple[Tensor, Tensor, Tensor] | None:
    """The positive entries of relu(x @ W_enc + b_enc), exact float32, as COO (values, rows, cols,
    each [E], row-major) when E <= max_density * B * n; None otherwise, or when a block of rows has
    more than twice its share of possibly positive entries (a dense batch: the float32 path decides
    it, having spent at most one block's bf16 GEMM), or when bf16 overflows.
    x [B, d], W_enc [d, n], b_enc [n] contiguous float32 CPU."""
    batch, n = x.shape[0], W_enc.shape[1]
    x, W_enc, b_enc = x.detach(), W_enc.detach(), b_enc.detach()
    x_bf16, W_bf16, W_t, norms = _prepare(x, W_enc)
    values, cols, counts = [], [], []
    for start, stop, Q in _bf16_gemm_blocks(x_bf16, W_bf16):
        found = _C.relu_screened(Q.numpy(), b_enc.numpy(), x[start:stop].numpy(), W_t.numpy(), norms[0].numpy(),
                                 norms[1].numpy(), int(2 * max_density * (stop - start) * n))
        if found is None:
            return None
        for part, array in zip((values, cols, counts), found):
            part.append(torch.from_numpy(array))
    counts_all = torch.cat(counts)
    if int(counts_all.sum()) > max_density * batch * n:
        return None
    _count(batch)
    return torch.cat(values), torch.repeat_interleave(torch.arange(batch), counts_all), torch.cat(cols)
