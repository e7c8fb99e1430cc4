"""Exact float32 TopK and BatchTopK selection from a bfloat16 tensor-core GEMM (the GPU twin of
``sparsekit.ops.cpu.screen``).

An H100 runs a bf16 GEMM with float32 accumulation at ~990 dense TFLOP/s against ~67 for the IEEE
float32 GEMM the float32 encoders use (no tensor cores). Its result is not the float32 one, but it
lies within a bound computed entry by entry from the norms of the rows of x, the columns of W_enc
and their bf16 rounding errors (derived below). So, for x [B, d], W_enc [d, n], b_enc [n]:

1. one GEMM (``gemm.py``, float32 output) of x' = bf16(x) [B, d] and W' = bf16(W_enc) [d, n] on
   the tensor cores, accumulating in float32, plus b_enc: a [B, n] float32;
2. coarse candidates, one margin M_r per row (the columns' largest norms, |a| bounded per row;
   ``row_margins``), so the pass over [B, n] is one comparison against a per-row threshold. TopK:
   a_k = the row's k-th largest a (the radix select of ``select.py``); every entry with
   a >= a_k - 2 M_r. BatchTopK: t_c = the B*k-th largest of fl(a - M_r) over the batch (radix
   select); every entry with a >= t_c - M_r (and the float32 path runs instead unless t_c > 0, as
   relu's zeros would then take part);
3. fine candidates, among the coarse ones, with each entry's own bounds lower/upper = a -+ margin
   (``screen_bounds``, float64): TopK per row t_r = the k-th largest lower bound, BatchTopK t = the
   B*k-th over the batch; every entry with upper >= t. The coarse set holds all of them: each
   lower bound is >= a - M_r, so t_r >= a_k - M_r (t >= t_c), and upper >= t then gives
   a >= t - margin >= a_k - 2 M_r (a >= t_c - M_r);
4. the fine candidates' pre-activations recomputed in float32 from x and W_enc (read in place), one fixed
   summation order (``sparse.sampled_dot``: chunks of BLOCK_D summed in a fixed tree, then in
   sequence), plus b_enc: R [E];
5. the selection among them, by R, ties to the lower index (TopK: the row's radix select on the
   candidates padded with -inf, in column order; BatchTopK: the flat radix select over the
   candidates in row-major order).

**TopK's steps 1-3 in the GEMM's epilogue** (``topk_encode_screened_fused``, the default;
SPARSEKIT_GPU_SCREEN_SELECT=passes keeps the steps above): a is never written. The fused TopK kernel
(``fused_topk.py``, ``value_f32``) keeps per tile and row the KT largest a as packed keys truncated
to BLOCK_N's bits (each kept key gives lo <= a <= hi), and the next one. Over the keys: their k-th
largest gives lo_k <= a_k, the coarse test keeps the keys whose hi may reach lo_k - 2 M_r, the fine
test uses per-entry bounds from the ranges (lower = lo - margin, upper = hi + margin, margin at
max(|lo|, |hi|)), so t = the k-th largest such lower bound is <= the true t_r and the kept entries
with upper >= t hold every candidate their tiles kept. A tile's unkept entries have a <= its next
key's hi, so upper <= that + M_r; a row where some tile's next key may reach t - M_r runs again with
4x KT (KT = BLOCK_N keeps every entry). KT (``screen_kt``) leaves room for 4k candidates per row at
~1% of rows run again on Gaussian data. Finiteness is decided before the GEMM from the norms (|a|
and every partial sum <= (1 + gamma) ||x'|| ||w'|| + |b| < 2^127), as there is no a to check;
the test hook ``perturb`` takes the passes. The GEMM's bf16 operands and the bound's norms come
from one pass over each of x and W_enc (``split_norms``: bf16 rounding to nearest even in integers,
the squares summed in float64). The recompute reads W_enc in place, its entries in column order
(no transposed copy), in both designs.

A first version fused the per-entry bounds into the GEMM's epilogue (two float32 outputs, four
norm vectors): compiled for sm_90 it needed twice the plain GEMM's registers and spilled up to
1.9 KB per thread on the large tiles, so the per-entry work moved to the sparse coarse set.

Why this is exact: every entry satisfies lower <= R <= upper (below). The k largest R of a row are
each >= the k-th largest R >= the k-th largest lower bound t_r (k entries have R >= lower >= t_r),
so each has upper >= R >= t_r and is a candidate; an entry that is not a candidate has
R <= upper < t_r <= the k-th largest R, strictly below every selected value, so it cannot take
part in a tie either. The selection among the candidates is therefore the selection over all n
entries of R, value for value and index for index. R is a float32 dot product in its own fixed
order, as the float32 GEMM has its own: on data where float32 is exact (integers) the two agree
bit for bit; elsewhere they differ by float32 roundings (see tests/ops/test_triton_screen.py).

**The bound.** Write x' = bf16(x), dx = x - x' (round to nearest: dx is exact in float32), and
w', dw likewise for a column w of W_enc; ||.|| is the Euclidean norm; u = 2^-24. Exactly,
x.w = x'.w' + x'.dw + dx.w, so by Cauchy-Schwarz

    (i)   |x.w - x'.w'| <= ||x'|| ||dw|| + ||dx|| (||w'|| + ||dw||).

The GEMM's sum S of the d products x'_i w'_i. bf16 has 8 significand bits, so each product has
at most 16 and is exact in float32 (24 bits; the tensor cores' products are exact: Fasi, Higham,
Mikaitis and Pranesh 2021, "Numerical behavior of NVIDIA tensor cores", PeerJ Computer Science
7:e330), except below float32's normal range, where a flushed product errs by < 2^-126. The
accumulation is where tensor cores differ from IEEE: Fasi et al. measured (V100, T4, A100) that a
tensor core adds a block of m products and the float32 accumulator in one step, aligning every
addend's significand to the largest one's exponent and *truncating* what falls off (no guard
bits), then normalising the sum with truncation, not rounding. Take any such block of at most
m + 1 addends a_j: each alignment errs by < 2^-23 max|a_j| and the normalisation by
< 2^-23 |sum|, so the block returns sum a_j + delta, |delta| <= (m + 2) 2^-23 sum |a_j|: the
model fl(sum a_j) = sum a_j (1 + theta_j), |theta_j| <= (m + 2) 2^-23, for an addition of any
arity (m = 1 is a plain two-term truncating add, counted pessimistically as 3 2^-23). A product
meets one block, and the accumulator then at most ceil(d/m) - 1 more, in whatever order the GEMM
tiles K (split-K, BLOCK_K, the instruction's k) and for any block size m >= 1 (hardware with
extra alignment bits, or true rounding, only errs less). With ceil(d/m) (m + 2) <= 4d:

    (ii)  |S - x'.w'| <= gamma(4d, 2^-23) ||x'|| ||w'|| + d 2^-126,
          gamma(N, v) = N v / (1 - N v),  using sum |x'_i w'_i| <= ||x'|| ||w'||.

The epilogue's a = fl(S + b) is one IEEE float32 add (CUDA cores, round to nearest):
(iii) |a - (S + b)| <= 2u |a|. The recompute R = fl(D + b), D a float32 dot product in any order
(round to nearest; products may be fused): (iv) |D - x.w| <= gamma(d, u) ||x|| ||w|| + 2d 2^-126
(flushed products and sums), ||x|| <= ||x'|| + ||dx||, ||w|| <= ||w'|| + ||dw||, and
|R - (D + b)| <= u |R|. Summing (i)-(iv):

    |R - a| <= coef_err ||dw|| + coef_w ||w'|| + rel |a| + floor,
    coef_err = (||x'|| + ||dx||) (1 + gamma(d, u)),
    coef_w   = ||dx|| + gamma(4d, 2^-23) ||x'|| + gamma(d, u) (||x'|| + ||dx||),

per row (coef_err, coef_w) and per column (||dw||, ||w'||). The norms and the bounds are computed
in float64 (no square under- or overflows; a -+ margin rounds by ~2^-53); the coefficients carry a
1.0625 safety factor that covers those roundings and the u |R| term's margin part; rel = 2^-20
covers (iii) and u |R|'s |a| part; floor = (4d + 16) 2^-126 covers every flushed product and sum.
The coarse margin M_r adds room for the float32 rounding of a - M_r. A non-finite a (bf16
overflows near float32's maximum) sends the call to the float32 path, as does d >= 2^20
(gamma's premise).

The crossover is **unmeasured on a GPU**: ``auto`` screens float32 encoders on CUDA when
n >= SCREEN_MIN_N_OVER_K * k and the GEMM is at least SCREEN_MIN_FLOP, figures carried over from
the CPU screen's measured crossover (``sparsekit.ops.cpu.screen``); the first GPU run should time
both paths at bench/gpu.py's shapes and set them. The screen syncs with the host a few times per
call (the finiteness check, the candidate counts, BatchTopK's threshold check).

SPARSEKIT_GPU_BF16_SCREEN=auto (default) | on | off: ``on`` screens every float32 TopK and
BatchTopK encoder on the Triton path (tests; CPU tensors under the interpreter too), ``off`` never.
The backward is unchanged: the codes (indices, values) are the float32 path's.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import fused_topk
from ._config import env_choice, fixed
from .gemm import gemm
from .select import batch_topk, topk_rows
from .sparse import sampled_dot

SCREEN_MIN_FLOP = 2**30  # ~1.07 GFLOP: unmeasured on a GPU (see above)
SCREEN_MIN_N_OVER_K = 64
SAFETY = 1.0625
REL = 2.0**-20
MAX_D = 2**20

stats = {"calls": 0, "rows": 0, "candidates": 0, "overflow_rows": 0}  # running totals, for benchmarks and tests

# Test hook: when set, called as perturb(a) on the screen GEMM's a = fl(x' . W' + b) [B, n]
# (float32) and its result used in place of a, the bounds then computed in plain torch
# (screen_bounds). Tests inject a GEMM that errs by the full bound this way.
perturb = None


def screen_mode() -> str:
    return env_choice("SPARSEKIT_GPU_BF16_SCREEN", ("auto", "on", "off"))


def select_mode() -> str:
    """SPARSEKIT_GPU_SCREEN_SELECT: ``auto`` (default) TopK's candidates from the screen GEMM's epilogue
    (``topk_encode_screened_fused``), ``passes`` from a [B, n] written and read six times (steps 2-3)."""
    return env_choice("SPARSEKIT_GPU_SCREEN_SELECT", ("auto", "passes"))


def use_screen(x: Tensor, W_enc: Tensor, k: int) -> bool:
    """Whether a TopK/BatchTopK encoder of x [B, d] with W_enc [d, n] and k per row is screened."""
    mode = screen_mode()
    if mode == "off" or x.dtype != torch.float32 or W_enc.dtype != torch.float32:
        return False
    if not 0 < x.shape[1] < MAX_D or x.shape[0] == 0 or W_enc.shape[1] == 0:  # empty: nothing to screen
        return False
    if mode == "on":
        return True
    batch, d = x.shape
    n = W_enc.shape[1]
    return _on_cuda(x) and n >= SCREEN_MIN_N_OVER_K * k and 2.0 * batch * d * n >= SCREEN_MIN_FLOP


def _on_cuda(x: Tensor) -> bool:
    return x.is_cuda


def _gamma(count: int, unit: float) -> float:
    return count * unit / (1.0 - count * unit)


@triton.jit
def _split_norms_kernel(t_ptr, bf16_ptr, norms_ptr, D, N, stride_d, stride_n,
                        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """One pass over the columns of t [D, N] (float32, any strides): t' = bf16(t) stored with t's strides
    (bf16_ptr: int16 bits),
    and per column ||t - t'|| and ||t'|| in float64 (squares summed in float64, in d order by BLOCK_D
    chunks: exact to float64's rounding, as the bound's 1.0625 safety factor assumes)."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    err_sq = tl.zeros((BLOCK_N,), dtype=tl.float64)
    val_sq = tl.zeros((BLOCK_N,), dtype=tl.float64)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        mask = (ds < D)[:, None] & col_ok[None, :]
        offsets = ds[:, None].to(tl.int64) * stride_d + cols[None, :] * stride_n
        value = tl.load(t_ptr + offsets, mask=mask, other=0.0)
        # bf16 rounding to nearest, ties to even, in integers (Triton's interpreter truncates in its
        # cast; the GPU rounds to nearest: this is both): wide is the bf16 value, exact in float32.
        bits = value.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        wide = bits.to(tl.float32, bitcast=True)
        # stored as its 16 bits (bf16_ptr: the copy viewed as int16), so no cast can flush a subnormal
        tl.store(bf16_ptr + offsets, (bits >> 16).to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
        kept = wide.to(tl.float64)
        err = value.to(tl.float64) - kept  # exact in float64, subnormal inputs included (no float32 flush)
        err_sq += tl.sum(err * err, axis=0)
        val_sq += tl.sum(kept * kept, axis=0)
    tl.store(norms_ptr + cols, tl.sqrt(err_sq), mask=col_ok)
    tl.store(norms_ptr + N + cols, tl.sqrt(val_sq), mask=col_ok)


def split_norms(t: Tensor) -> tuple[Tensor, Tensor]:
    """t [D, N] float32 (any strides) -> (bf16(t) with t's strides, [2, N] float64: per column ||t - bf16(t)||
    and ||bf16(t)||), in one pass over t (the fused screen's inputs: W_enc's columns, x's rows as x.t())."""
    D, N = t.shape
    rounded = torch.empty_like(t, dtype=torch.bfloat16)
    norms = torch.empty((2, N), dtype=torch.float64, device=t.device)
    if N == 0:
        return rounded, norms
    if D == 0:
        return rounded, norms.zero_()
    # 8 warps: with 4 the ragged float32 body spilled 244-420 B/thread (make gpu-check, 2026-12-05)
    meta = fixed(dict(BLOCK_D=32, BLOCK_N=128, num_warps=8), dict(BLOCK_D=16, BLOCK_N=32, num_warps=1))
    _split_norms_kernel[(triton.cdiv(N, meta["BLOCK_N"]),)](t, rounded.view(torch.int16), norms, D, N, t.stride(0),
                                                             t.stride(1), **meta)
    return rounded, norms


def row_coefficients(x: Tensor, norms: Tensor | None = None) -> Tensor:
    """x [B, d] float32 -> [4, B] float64: per row coef_err, coef_w, the floor (module docstring)
    and ||x'||. ``norms``: x's rows' [||x - x'||, ||x'||] when already computed (``split_norms``)."""
    d = x.shape[1]
    if norms is None:
        rounded = x.bfloat16().double()
        x_norm = rounded.norm(dim=1)
        err_norm = (x.double() - rounded).norm(dim=1)
    else:
        err_norm, x_norm = norms[0], norms[1]
    g_dot, g_gemm = _gamma(d, 2.0**-24), _gamma(4 * d, 2.0**-23)
    coef_err = SAFETY * (x_norm + err_norm) * (1.0 + g_dot)
    coef_w = SAFETY * (err_norm + g_gemm * x_norm + g_dot * (x_norm + err_norm))
    floor = torch.full_like(x_norm, (4 * d + 16) * 2.0**-126)
    return torch.stack([coef_err, coef_w, floor, x_norm])


def column_norms(W_enc: Tensor) -> Tensor:
    """W_enc [d, n] float32 -> [2, n] float64: per column ||dw|| and ||w'|| (w' = bf16(w), dw = w - w')."""
    rounded = W_enc.bfloat16().double()
    return torch.stack([(W_enc.double() - rounded).norm(dim=0), rounded.norm(dim=0)])


def screen_bounds(a: Tensor, rows: Tensor, cols: Tensor) -> tuple[Tensor, Tensor]:
    """Per entry, in float64: a (the screen GEMM's, float32), rows [4, ...] and cols [2, ...]
    broadcastable to it (row_coefficients, column_norms) -> (a - margin, a + margin), a's shape."""
    a = a.double()
    margin = rows[0] * cols[0] + rows[1] * cols[1] + REL * a.abs() + rows[2]
    return a - margin, a + margin


def row_margins(rows: Tensor, cols: Tensor, b_enc: Tensor) -> Tensor:
    """[B] float64 margins M_r >= every margin of row r (screen_bounds), with room for the float32
    rounding of a - M_r: the columns' largest norms, and |a| <= (1 + gamma(4d, 2^-23)) ||x'|| max ||w'||
    + max |b| (+ its rounding). rows [4, B] (row_coefficients), cols [2, n] (column_norms), b_enc [n]."""
    largest = cols.amax(dim=1) if cols.shape[1] else cols.new_zeros(2)
    bias = float(b_enc.abs().max()) if b_enc.numel() else 0.0
    a_max = (1.0 + 2.0**-20) * (rows[3] * largest[1] * 2.0 + bias)  # gamma(4d, 2^-23) < 1: d < 2^20
    margin = rows[0] * largest[0] + rows[1] * largest[1] + REL * a_max + rows[2]
    return (margin + 2.0**-22 * (a_max + margin)) * (1.0 + 2.0**-20)


def _float32_at_most(t: Tensor) -> Tensor:
    """float64 -> the largest float32 values <= t."""
    down = t.float()
    return torch.where(down.double() > t, torch.nextafter(down, torch.full_like(down, float("-inf"))), down)


def screen_gemm(x: Tensor, W_enc: Tensor, b_enc: Tensor) -> Tensor | None:
    """a = fl(bf16(x) @ bf16(W_enc) + b_enc) [B, n] float32 on the tensor cores (float32 accumulation);
    None when a is not finite (bf16 overflow)."""
    a = gemm(x.bfloat16(), W_enc.bfloat16(), b_enc, out_dtype=torch.float32)
    if perturb is not None:
        a = perturb(a)
    return a if bool(torch.isfinite(a).all()) else None


def bounds(x: Tensor, W_enc: Tensor, b_enc: Tensor) -> tuple[Tensor, Tensor] | None:
    """Every entry's (lower, upper) [B, n] float64 bounds on its recomputed pre-activation (tests;
    the screen itself bounds only the coarse candidates entry by entry); None as screen_gemm."""
    a = screen_gemm(x, W_enc, b_enc)
    if a is None:
        return None
    return screen_bounds(a, row_coefficients(x)[:, :, None], column_norms(W_enc)[:, None, :])


def recompute(x: Tensor, W_enc: Tensor, b_enc: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """R [E] = x[rows[e]] . W_enc[:, cols[e]] + b_enc[cols[e]] in float32, one fixed summation order.
    x [B, d], W_enc [d, n] (any strides: read in place, no transposed copy), rows/cols [E] int64. The
    entries are dotted in column order (stable), so that neighbouring programs read neighbouring
    columns of W_enc's rows, and the results put back in the entries' order."""
    order = torch.sort(cols, stable=True).indices
    out = torch.empty(rows.shape[0], dtype=x.dtype, device=x.device)
    out[order] = sampled_dot(rows[order], cols[order], x, W_enc.t())
    return out + b_enc[cols]


def _count(rows: int, candidates: int) -> None:
    stats["calls"] += 1
    stats["rows"] += rows
    stats["candidates"] += candidates


def _padded_rows(values: Tensor, rows: Tensor, cols: Tensor, batch: int) -> tuple[Tensor, Tensor]:
    """Entries in row-major order (values, rows, cols [E]) -> per row, in column order, padded
    with -inf: (values [B, C], cols [B, C]), C the largest count."""
    counts = torch.bincount(rows, minlength=batch)
    width = int(counts.max()) if rows.numel() else 0
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(rows.numel(), device=rows.device) - starts[rows]
    padded = values.new_full((batch, width), float("-inf"))
    padded_cols = cols.new_zeros((batch, width))
    padded[rows, slot] = values
    padded_cols[rows, slot] = cols
    return padded, padded_cols


def _fine_bounds(a: Tensor, row_coefs: Tensor, col_norms: Tensor, rows: Tensor, cols: Tensor):
    """Coarse candidates (rows, cols [E]) -> their per-entry (lower, upper) [E] float64."""
    return screen_bounds(a[rows, cols], row_coefs[:, rows], col_norms[:, cols])


def topk_encode_screened(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int) -> tuple[Tensor, Tensor] | None:
    """The float32 top-k of relu(x @ W_enc + b_enc) per row, screened by a bf16 GEMM.
    x [B, d], W_enc [d, n], b_enc [n] float32 -> (values [B, k] descending, indices [B, k] int64),
    ties to the lower index; None when the float32 path must run (bf16 overflow). The candidates come
    from the GEMM's epilogue (``topk_encode_screened_fused``) unless SPARSEKIT_GPU_SCREEN_SELECT=passes
    or the test hook ``perturb`` is set (it needs a to exist)."""
    if select_mode() == "auto" and perturb is None:
        return topk_encode_screened_fused(x, W_enc, b_enc, k)
    return topk_encode_screened_passes(x, W_enc, b_enc, k)


def topk_encode_screened_passes(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int) -> tuple[Tensor, Tensor] | None:
    """topk_encode_screened through a [B, n] written by the GEMM and read six times (steps 1-5 above)."""
    x, W_enc, b_enc = x.detach().contiguous(), W_enc.detach(), b_enc.detach().contiguous()
    batch = x.shape[0]
    a = screen_gemm(x, W_enc, b_enc)
    if a is None:
        return None
    row_coefs, col_norms = row_coefficients(x), column_norms(W_enc)
    # Coarse: one margin per row. The k-th largest a, a_k, less M_r bounds the k-th largest R from
    # below, so every candidate has a >= a_k - 2 M_r.
    _, top = topk_rows(a, k)
    a_k = a.gather(1, top).amin(dim=1).double()
    coarse = a >= _float32_at_most(a_k - 2.0 * row_margins(row_coefs, col_norms, b_enc))[:, None]
    rows, cols = torch.nonzero(coarse, as_tuple=True)
    # Fine: per entry, among the coarse ones (which hold every entry the fine test could keep).
    lower, upper = _fine_bounds(a, row_coefs, col_norms, rows, cols)
    padded_lower, _ = _padded_rows(lower, rows, cols, batch)
    threshold = padded_lower.topk(k, dim=1).values[:, -1]
    keep = upper >= threshold[rows]
    rows, cols = rows[keep], cols[keep]
    exact = recompute(x, W_enc, b_enc, rows, cols)
    padded, padded_cols = _padded_rows(exact, rows, cols, batch)
    values, slots = topk_rows(padded, k)
    _count(batch, rows.numel())
    return values, padded_cols.gather(1, slots)


# --- TopK's screen with the candidates found in the GEMM's epilogue -------------------------------

# Candidates per row the epilogue should keep room for, as a multiple of k: the fine candidates on
# Gaussian data are ~2k-4k (docs/backends.md; 285 rows' worth at d=2048, n=131072, k=64 pass the
# overflow test below), and KT follows from it as fused_topk.choose_kt's Poisson rule.
SCREEN_KEEP_OVER_K = 4


def screen_kt(n: int, k: int, block_n: int) -> int:
    """Keys kept per tile and row by the fused screen: the smallest KT for which ~1% of the rows of
    Gaussian data have a tile holding more than KT entries that could be candidates (those run again)."""
    return fused_topk.choose_kt(n, min(SCREEN_KEEP_OVER_K * k, n), block_n)


def _key_values(u: Tensor) -> Tensor:
    """32-bit order keys (int64 in [0, 2^32)) -> their float32 values (select.sortable_key inverted)."""
    bits = torch.where(u >= 2**31, u - 2**31, 2**32 - 1 - u)
    return torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32)


def _truncated_range(keys: Tensor, mask: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Packed truncated candidate keys (fused_topk's int64 form, the low bits of the order key zeroed)
    -> (lo, hi) float64 with lo <= a <= hi for the entry's a, its column, and whether it is an entry
    (False: an empty slot, order key 0)."""
    u = (keys >> 32) + 2**31
    columns = 2**32 - 1 - (keys & (2**32 - 1))
    real = u > 0
    return _key_values(u).double(), _key_values(u + mask).double(), columns, real


def _order_keys(values: Tensor) -> Tensor:
    """float32 values -> their 32-bit order keys as int64 (select.sortable_key: -0.0 as +0.0)."""
    bits = (values + 0.0).view(torch.int32).to(torch.int64) & (2**32 - 1)
    return torch.where(bits >= 2**31, 2**32 - 1 - bits, bits + 2**31)


def _keys_reaching(at_least: Tensor, mask: int) -> Tensor:
    """Per row, the smallest packed candidate key (fused_topk's int64 form) whose range's hi may reach
    ``at_least`` [R] float64: a key >= it may have hi >= at_least; every key below has hi < at_least."""
    floor = _order_keys(_float32_at_most(at_least))  # hi >= at_least implies hi >= this float32
    return (floor - mask - 2**31) * 2**32


def _fused_candidates(xb: Tensor, Wb: Tensor, b_enc: Tensor, k: int, kt: int, tile: dict,
                      row_coefs: Tensor, col_norms: Tensor, margins: Tensor) -> tuple[Tensor, Tensor]:
    """Candidates (rows, cols [E], any order) of the rows of xb, from the keys the GEMM's epilogue kept;
    rows whose tiles may have dropped a candidate are run again with 4x kt (all BLOCK_N: exact).

    Over the kept keys, two integer passes: their k-th largest gives lo_k <= the row's k-th largest a,
    and the keys whose hi reaches lo_k - 2 M_r (the coarse test, step 2) go on; per-entry bounds are
    computed for those only."""
    block_n = tile["BLOCK_N"]
    mask = block_n - 1
    batch = xb.shape[0]
    keys, following = fused_topk.candidate_keys(xb, Wb, b_enc, kt, kt < block_n, tile, value_f32=True)
    kth = keys.topk(k, dim=1).values[:, -1]
    lo_k = _key_values((kth >> 32) + 2**31).double()
    rows, slots = torch.nonzero(keys >= _keys_reaching(lo_k - 2.0 * margins, mask)[:, None], as_tuple=True)
    lo, hi, cols, _ = _truncated_range(keys[rows, slots], mask)
    margin = (row_coefs[0][rows] * col_norms[0][cols] + row_coefs[1][rows] * col_norms[1][cols]
              + REL * torch.maximum(lo.abs(), hi.abs()) + row_coefs[2][rows])
    lower, upper = lo - margin, hi + margin
    # t <= the row's k-th largest lower bound over all n (kept ranges' lower bounds are <= the true
    # ones, over a subset); the coarse set holds at least k entries per row (the k largest keys).
    threshold = _padded_rows(lower, rows, cols, batch)[0].topk(k, dim=1).values[:, -1]
    keep = upper >= threshold[rows]
    if following is not None:
        # A tile's unkept entries have a <= its next key's hi, so upper <= that + M_r: below t, none of
        # them is a candidate. Rows where a next key may reach t - M_r run again.
        dropped = (following >= _keys_reaching(threshold - margins, mask)[:, None]).any(dim=1)
    else:
        dropped = torch.zeros(batch, dtype=torch.bool, device=xb.device)
    keep &= ~dropped[rows]
    out_rows, out_cols = rows[keep], cols[keep]
    again = torch.nonzero(dropped).flatten()
    if again.numel():
        stats["overflow_rows"] += again.numel()
        r, c = _fused_candidates(xb[again], Wb, b_enc, k, min(block_n, 4 * kt), tile,
                                 row_coefs[:, again], col_norms, margins[again])
        out_rows, out_cols = torch.cat([out_rows, again[r]]), torch.cat([out_cols, c])
    return out_rows, out_cols


def topk_encode_screened_fused(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, kt: int | None = None,
                               tile: dict | None = None) -> tuple[Tensor, Tensor] | None:
    """topk_encode_screened with steps 1-3 in one kernel: the screen GEMM (bf16 inputs, float32
    accumulator a, never written) keeps per tile and row its kt largest a as keys truncated to
    BLOCK_N's bits with the column packed below (``fused_topk``, ``value_f32``), and the next one.
    A kept key gives a range lo <= a <= hi, so per-entry bounds lower = lo - margin, upper = hi +
    margin (margin at max(|lo|, |hi|)) still hold; t = the k-th largest kept lower bound is <= the
    row's k-th largest lower bound over all n, so the kept entries with upper >= t hold every
    candidate the tile kept. A tile's unkept entries have a <= hi of its next key, hence upper <=
    that + M_r (row_margins); a row where that reaches t for some tile is run again with 4x kt (at
    kt = BLOCK_N every entry is kept). The candidates are then recomputed in float32 and selected as
    topk_encode_screened does: the same values and indices.

    None (the float32 path runs) when a might not be finite: |a| is bounded from the norms
    (row_margins' a_max) before the GEMM runs, as no [B, n] is there to check. ``kt``: keys per tile
    (default ``screen_kt``); ``tile``: fused_topk's launch config (default its tile for bf16)."""
    x, W_enc, b_enc = x.detach().contiguous(), W_enc.detach(), b_enc.detach().contiguous()
    batch, n = x.shape[0], W_enc.shape[1]
    # One pass each over x and W_enc: the bf16 operands of the GEMM and the norms of the bound.
    xb_t, x_norms = split_norms(x.t())
    Wb, col_norms = split_norms(W_enc)
    xb = xb_t.t()
    row_coefs = row_coefficients(x, x_norms)
    largest = col_norms.amax(dim=1)
    bias = float(b_enc.abs().max()) if b_enc.numel() else 0.0
    a_max = (1.0 + 2.0**-20) * (row_coefs[3] * largest[1] * 2.0 + bias)
    if not bool((a_max < 2.0**127).all()):  # a, or a partial sum, might overflow (or bf16 did)
        return None
    margins = row_margins(row_coefs, col_norms, b_enc)
    tile = fused_topk.tile_for(xb, Wb) if tile is None else fused_topk.check_tile(tile)
    block_n = tile["BLOCK_N"]
    kt = screen_kt(n, k, block_n) if kt is None else kt
    if kt < 1:
        raise ValueError(f"kt must be at least 1, got {kt}")
    kt = min(kt, block_n)
    if kt * (n // block_n) < k:  # too few keys kept per row to hold k: keep every entry
        kt = block_n
    rows, cols = _fused_candidates(xb, Wb, b_enc, k, kt, tile, row_coefs, col_norms, margins)
    order = torch.sort(rows * n + cols).indices  # row-major, columns ascending: the ties' order
    rows, cols = rows[order], cols[order]
    exact = recompute(x, W_enc, b_enc, rows, cols)
    padded, padded_cols = _padded_rows(exact, rows, cols, batch)
    values, slots = topk_rows(padded, k)
    _count(batch, rows.numel())
    return values, padded_cols.gather(1, slots)


def batchtopk_encode_screened(x: Tensor, W_enc: Tensor, b_enc: Tensor,
                              k: int) -> tuple[Tensor, Tensor, Tensor] | None:
    """BatchTopK screened by a bf16 GEMM: the B*k largest of relu(x @ W_enc + b_enc), exact
    float32, ties to the lower flat index, as flat COO in row-major order (values, rows, cols, each
    [B*k]); None when the float32 path must run (bf16 overflow, or the B*k-th largest lower bound
    is not positive)."""
    x, W_enc, b_enc = x.detach().contiguous(), W_enc.detach(), b_enc.detach().contiguous()
    m = x.shape[0] * k
    a = screen_gemm(x, W_enc, b_enc)
    if a is None:
        return None
    row_coefs, col_norms = row_coefficients(x), column_norms(W_enc)
    margins = row_margins(row_coefs, col_norms, b_enc)
    # Coarse: fl(a - M_r) <= every lower bound; its m-th largest t_c; candidates have a >= t_c - M_r.
    coarse_floor = batch_topk(a - margins.float()[:, None], m)[0].amin().double()
    if not bool(coarse_floor > 0):
        return None
    rows, cols = torch.nonzero(a >= _float32_at_most(coarse_floor - margins)[:, None], as_tuple=True)
    lower, upper = _fine_bounds(a, row_coefs, col_norms, rows, cols)
    threshold = lower.topk(m).values[-1]
    keep = upper >= threshold
    rows, cols = rows[keep], cols[keep]
    exact = recompute(x, W_enc, b_enc, rows, cols)
    values, _, slots = batch_topk(exact[None, :], m)
    _count(x.shape[0], rows.numel())
    return values, rows[slots], cols[slots]


# --- the reference: the same screened selection in plain torch ----------------------------------

def _candidates_reference(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int | None, m: int | None):
    """Every entry's bounds (no coarse stage) -> candidates (rows, cols), row-major; None as the fast path."""
    a = x.bfloat16().float() @ W_enc.bfloat16().float() + b_enc  # exact products, float32 sums
    if perturb is not None:
        a = perturb(a)
    if not bool(torch.isfinite(a).all()):
        return None
    lower, upper = screen_bounds(a, row_coefficients(x)[:, :, None], column_norms(W_enc)[:, None, :])
    if k is not None:
        return torch.nonzero(upper >= lower.topk(k, dim=1).values[:, -1:], as_tuple=True)
    threshold = lower.flatten().topk(m).values[-1]
    if not bool(threshold > 0):
        return None
    return torch.nonzero(upper >= threshold, as_tuple=True)


def _recompute_reference(x: Tensor, W_enc: Tensor, b_enc: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    return (x[rows] * W_enc.t()[cols]).sum(dim=1) + b_enc[cols]


def topk_encode_screened_reference(x: Tensor, W_enc: Tensor, b_enc: Tensor,
                                   k: int) -> tuple[Tensor, Tensor, Tensor] | None:
    """topk_encode_screened in plain torch -> (values [B, k], indices [B, k], candidates per row [B]),
    or None where the fast path gives None."""
    found = _candidates_reference(x, W_enc, b_enc, k, None)
    if found is None:
        return None
    rows, cols = found
    exact = _recompute_reference(x, W_enc, b_enc, rows, cols)
    # Order: value descending, then column ascending (rows, cols are row-major already).
    order = torch.sort(exact, descending=True, stable=True).indices
    order = order[torch.sort(rows[order], stable=True).indices]
    counts = torch.bincount(rows, minlength=x.shape[0])
    starts = torch.cumsum(counts, 0) - counts
    kept = order[(torch.arange(k, device=x.device)[None, :] + starts[:, None]).flatten()]
    return torch.relu(exact[kept]).view(-1, k), cols[kept].view(-1, k), counts


def batchtopk_encode_screened_reference(x: Tensor, W_enc: Tensor, b_enc: Tensor,
                                        k: int) -> tuple[Tensor, Tensor, Tensor, int] | None:
    """batchtopk_encode_screened in plain torch -> (values, rows, cols [B*k] flat order, candidates)."""
    m = x.shape[0] * k
    found = _candidates_reference(x, W_enc, b_enc, None, m)
    if found is None:
        return None
    rows, cols = found
    exact = _recompute_reference(x, W_enc, b_enc, rows, cols)
    kept = torch.sort(torch.sort(exact, descending=True, stable=True).indices[:m]).values
    return exact[kept], rows[kept], cols[kept], rows.numel()
