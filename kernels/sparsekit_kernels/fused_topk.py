"""TopK with the selection fused into the encoder GEMM's epilogue: pre [B, n] never reaches memory.

The unfused path (``gemm.py`` then ``select.py``) writes pre = x @ W_enc + b_enc [B, n] and reads it
five times to select; on an H200 that made the bf16 TopK step 6.65x the bf16 GEMM at B=8192, d=2048,
n=131072, k=64 (bench/results/2026-12-04-nvidia-h200.md). Here:

1. ``_gemm_topk_kernel``: each program computes a [BLOCK_M, BLOCK_N] tile of pre exactly as
   ``gemm._gemm_kernel`` does (same loads, BLOCK_K, tl.dot precision, float32 accumulator, bias add,
   rounding to x's dtype: on the same tile config the values are the unfused path's bit for bit).
   Instead of storing the tile it keeps, per row, the tile's KT largest entries as int64 keys
   (below) in a candidate buffer [B, tiles_n * KT], and, unless KT covers the whole selection, the
   tile's next largest key, its (KT+1)-th, in next [B, tiles_n]. Each of the KT (+1) rounds takes
   the row's largest key (a max over the tile's columns), then the lowest column holding it (a min),
   and removes that one entry.
2. The merge: ``torch.topk`` of each row's candidate keys gives the k largest, already in the
   contract's order (descending value, ties to the lower index), from which values and indices are
   decoded exactly.
3. Exactness. A tile's entries that are not among its candidates all have keys <= its next key.
   With KT >= min(k, BLOCK_N) every tile lists all the entries it could contribute, so the merge is
   the selection over all n (the union of per-tile top-k holds the global top-k). With KT smaller, a
   row is exact when every tile's next key is below the row's k-th selected key (every true top-k
   entry has a key >= the true k-th, which is >= the candidates' k-th, so it was listed); the rows
   where a tile overflowed (its next key above that k-th key; rare: ``choose_kt`` picks KT so that
   about 1% of the rows of unstructured data overflow) are computed again with 4x KT, up to
   min(k, BLOCK_N), which needs no check. The values are the same in the rerun: each
   entry's dot product is the same sums in the same order whichever rows share its tile.

**Keys.** A value v (x's dtype, widened to float32: exact) maps to the 32-bit key whose unsigned
order is the float order (``select.sortable_key``: -0.0 counts as +0.0), ``u``; an entry outside
the matrix (ragged edges) or already taken gets u = 0, below every real key (u(-inf) = 0x007FFFFF).
The candidate key is ``(u - 2^31) * 2^32 + (2^32 - 1 - column)`` as int64: its order is (value,
then lower column), every real key differs, and an exhausted tile's filler (u = 0) lies below every
real one.

**Packed keys** (16-bit inputs, the default; SPARSEKIT_GPU_TOPK_EPILOGUE=rounds turns them off). A
bf16 (fp16) value widened to float32 has its low 16 (13) bits zero, so its order key's low bits are
constant (0 for values >= +0, all 1s below: the key inverts a negative value's bits). Those bits then
carry BLOCK_N - 1 - column (BLOCK_N <= 256: 8 bits): a row's packed keys all differ, their order is
(value, then lower column), and a round is one max (the entry), one compare and one select (its
removal), 3 operations per entry instead of 6; the next key is one max. Storing a key puts the
constant bits back, so the candidate keys are the unpacked path's, bit for bit. Float32 values use
all 32 bits: their epilogue keeps the rounds. The bf16 screen (screen.py) packs float32 a into a
*truncated* key (``value_f32``: low bits zeroed, no restoring) and works with the range it leaves.

Cost per tile entry: the GEMM's 2d FLOPs on the tensor cores (16-bit inputs) plus, unpacked, ~6 integer
instructions per round on the CUDA cores (the sm_90 PTX of a round: 2 compares, 2 selects, a max and
a min per entry), (KT + 1) rounds; packed (read off the sm_90 SASS, bench/aot_compile.py), ~3 per round,
~3 for the next key and ~4 for the key (``_packed_key``): 16 per entry at KT = 3; the memory traffic is x, W_enc and
B * tiles_n * (KT + 1) * 8 bytes of keys instead of pre (B * n * s bytes written, 5x read). The
overflow check and any rerun sync with the host once per call.

Selection: SPARSEKIT_GPU_TOPK=auto (default) | fused | unfused. ``auto`` takes this path when its KT
is at most ``AUTO_MAX_KT`` (else the per-entry rounds cost more than writing pre: unmeasured, from
the operation count), ``fused`` always, ``unfused`` never (the GEMM + radix select of ``select.py``,
kept for comparison: ``bench/gpu.py`` times both). Float32 calls that the bf16 screen takes
(``screen.py``) stay screened.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._config import INTERPRETING, check_dtype, dot_precision, env_choice, layout_code, size_bucket, upcast_inputs
from .gemm import GPU_BLOCK_K, block_k, tile_of_product
from .select import sortable_key

# The default config per dtype (BLOCK_K: gemm.block_k's), used where TUNED has no entry. One config per
# call, not autotuned per launch: the candidate buffer's width (tiles_n * KT) depends on BLOCK_N, and
# the rerun of overflowed rows must compute the same values, so a call picks its tile once.
_HOPPER = {torch.float32: dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=3),
           torch.bfloat16: dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
           torch.float16: dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)}
_SMALL = dict(BLOCK_M=16, BLOCK_N=32, num_warps=1, num_stages=1)  # as gemm.py's under the interpreter

# The configs bench/gpu_fused_tune.py times for 16-bit inputs: the grid BLOCK_M 64/128 x BLOCK_N
# 64/128/256 x BLOCK_K 32/64 x num_warps 4/8 x num_stages 3/4/5 (72), less what the sm_90 compile rules
# out (``python bench/gpu_fused_tune.py --prune``, Triton 3.9's ptxas, bf16 at KT = 3, the KT every
# BLOCK_N gets at B=8192 d=2048 n=131072 k=64; 2026-12-04): 128x256 with 4 warps spills ~3.4 KB per
# thread (255 registers: the float32 accumulator and the uint32 keys, 256 values each), and 128x256x64
# at 5 stages needs 240 KB of shared memory (sm_90: 227 KB). The 65 kept use 48-235 registers, 24-200
# KB of shared memory and wgmma.
GRID = [dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=bk, num_warps=w, num_stages=s)
        for m in (64, 128) for n in (64, 128, 256) for bk in (32, 64) for w in (4, 8) for s in (3, 4, 5)]
CANDIDATES = [t for t in GRID if not (t["BLOCK_M"] == 128 and t["BLOCK_N"] == 256
                                      and (t["num_warps"] == 4 or (t["BLOCK_K"] == 64 and t["num_stages"] == 5)))]

# Winners per size bucket, set from a GPU run of bench/gpu_fused_tune.py (which prints the lines to
# paste): key (dtype, dot precision, layout, M bucket, N bucket, K bucket) as ``tune_key`` makes it,
# value a config with BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages. A BLOCK_K other than
# gemm.block_k(dtype) changes the order each entry sums in, so that bucket's values may differ from the
# unfused GEMM's in the last bit (the selection is still the exact top k of the values computed).
TUNED: dict[tuple, dict] = {}

TILE_FIELDS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
AUTO_MAX_KT = 16
OVERFLOWING_ROWS = 0.01  # the share of rows choose_kt lets overflow (and run again), on unstructured data

stats = {"calls": 0, "rows": 0, "overflow_rows": 0}  # running totals, for benchmarks and tests


@triton.jit
def _take_largest(key, local, first_col):
    """One round: per row of key [BM, BN] (uint32, 0 = empty), the largest key's int64 candidate key
    (ties: the lowest column) [BM], and key with that one entry removed."""
    best = tl.max(key, axis=1)
    at = tl.min(tl.where(key == best[:, None], local[None, :], 2147483647), axis=1)
    key = tl.where(local[None, :] == at[:, None], 0, key)
    signed = (best ^ 0x80000000).to(tl.int32, bitcast=True).to(tl.int64)
    column = first_col + at.to(tl.int64)
    return (signed << 32) + (tl.full((), 4294967295, tl.int64) - column), key


@triton.jit
def _candidate(best, first_col, MASK: tl.constexpr, RESTORE: tl.constexpr):
    """A packed key's int64 candidate key (packed: the 32-bit order key with its low bits replaced by
    MASK - column; 0 = empty). RESTORE: the low bits were the dtype's zero bits (16-bit values), put
    them back (1s for negative values, whose order key is the bits inverted); else they stay 0 (a
    truncated key: the screen)."""
    low = best & MASK
    u = best - low
    if RESTORE:
        u = tl.where(((u >> 31) == 1) | (best == 0), u, u + MASK)
    signed = (u ^ 0x80000000).to(tl.int32, bitcast=True).to(tl.int64)
    column = first_col + (MASK - low).to(tl.int64)
    return (signed << 32) + (tl.full((), 4294967295, tl.int64) - column)


@triton.jit
def _packed_key(value, col_ok, local, BLOCK_N: tl.constexpr):
    """Packed keys of a tile [BM, BN] of float32 values: ``select.sortable_key``'s order key with its
    low log2(BLOCK_N) bits replaced by BLOCK_N - 1 - column; 0 in the columns outside the matrix
    (rows outside it are never stored, so they need no mask). The same bits as ``sortable_key``
    then ``key - (key & (BLOCK_N - 1)) + code`` then the mask, in three integer instructions per entry
    on sm_90 (an arithmetic shift and two three-input logic ops, LOP3) instead of seven: the sign's
    flip mask comes from the shift, not a compare and select, and the per-column mask and code fold
    into one AND-OR."""
    bits = (value + 0.0).to(tl.uint32, bitcast=True)  # -0.0 -> +0.0
    flip = (bits.to(tl.int32, bitcast=True) >> 31).to(tl.uint32, bitcast=True) | 0x80000000
    keep = tl.where(col_ok, 0xFFFFFFFF ^ (BLOCK_N - 1), 0).to(tl.uint32)
    code = tl.where(col_ok, BLOCK_N - 1 - local, 0).to(tl.uint32)
    return ((bits ^ flip) & keep[None, :]) | code[None, :]


@triton.jit
def _gemm_topk_kernel(a_ptr, b_ptr, bias_ptr, keys_ptr, next_ptr, M, N, K,
                      stride_am, stride_ak, stride_bk, stride_bn,
                      KT: tl.constexpr, NEXT: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
                      PRECISION: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr = 8,
                      PACK: tl.constexpr = False, RESTORE: tl.constexpr = False, VALUE_F32: tl.constexpr = False):
    # The tile of pre: gemm._gemm_kernel's own tile (the same function), so the same bits.
    acc, rows, cols, row_ok, col_ok, pid_n, tiles_n = tile_of_product(
        a_ptr, b_ptr, bias_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
        HAS_BIAS, UPCAST, PRECISION, BLOCK_K, BLOCK_M, BLOCK_N, GROUP_M)

    # pre as the unfused path stores it (x's dtype; VALUE_F32: the float32 accumulator, the screen's a),
    # as an order-preserving key; 0 off the matrix.
    if VALUE_F32:
        value = acc
    else:
        value = acc.to(a_ptr.dtype.element_ty).to(tl.float32)
    local = tl.arange(0, BLOCK_N)
    first_col = pid_n.to(tl.int64) * BLOCK_N
    out = keys_ptr + rows * (tiles_n * KT) + pid_n * KT
    inside = row_ok[:, None] & col_ok[None, :]
    if PACK:
        # The column in the key's low log2(BLOCK_N) bits: one max per round finds the entry (packed
        # keys of a row differ), one compare and select remove it.
        key = _packed_key(value, col_ok, local, BLOCK_N)
        for r in range(KT):
            best = tl.max(key, axis=1)
            key = tl.where(key == best[:, None], 0, key)
            tl.store(out + r, _candidate(best, first_col, BLOCK_N - 1, RESTORE), mask=row_ok)
        if NEXT:
            best = tl.max(key, axis=1)
            tl.store(next_ptr + rows * tiles_n + pid_n, _candidate(best, first_col, BLOCK_N - 1, RESTORE),
                     mask=row_ok)
    else:
        key = tl.where(inside, sortable_key(value), 0)
        for r in range(KT):
            candidate, key = _take_largest(key, local, first_col)
            tl.store(out + r, candidate, mask=row_ok)
        if NEXT:
            candidate, key = _take_largest(key, local, first_col)
            tl.store(next_ptr + rows * tiles_n + pid_n, candidate, mask=row_ok)


def tune_key(dtype: torch.dtype, M: int, N: int, K: int, x_unit_stride: bool = True,
             w_unit_stride: bool = True) -> tuple:
    """TUNED's key for x [M, K] and W_enc [K, N] in dtype: (dtype name, dot precision, layout code
    (bit 0: x contiguous along K, bit 1: W_enc along N), and M, N, K to their next power of two)."""
    return (str(dtype).removeprefix("torch."), dot_precision(dtype), layout_code(x_unit_stride, w_unit_stride),
            size_bucket(M), size_bucket(N), size_bucket(K))


def tile_config(dtype: torch.dtype, M: int = 0, N: int = 0, K: int = 0, x_unit_stride: bool = True,
                w_unit_stride: bool = True) -> dict:
    """The fused kernel's launch config for x [M, K] @ W_enc [K, N] in dtype: BLOCK_M, BLOCK_N, BLOCK_K,
    num_warps, num_stages. TUNED's entry for the size bucket, layout and precision, else the dtype's
    default; one small config under the interpreter."""
    if INTERPRETING:
        return dict(_SMALL, BLOCK_K=block_k(dtype))
    tuned = TUNED.get(tune_key(dtype, M, N, K, x_unit_stride, w_unit_stride))
    return dict(tuned) if tuned is not None else dict(_HOPPER[dtype], BLOCK_K=GPU_BLOCK_K[dtype])


def choosable_tiles(dtype: torch.dtype) -> list[dict]:
    """Every config the launcher may run on a GPU for this dtype: the default, TUNED's entries for the
    dtype and, for 16-bit dtypes, CANDIDATES (which ``tile=`` and bench/gpu_fused_tune.py run)."""
    name = str(dtype).removeprefix("torch.")
    tiles = [dict(_HOPPER[dtype], BLOCK_K=GPU_BLOCK_K[dtype])]
    tiles += [dict(tile) for key, tile in TUNED.items() if key[0] == name]
    if dtype != torch.float32:
        tiles += [dict(tile) for tile in CANDIDATES]
    unique = []
    for tile in tiles:
        if tile not in unique:
            unique.append(tile)
    return unique


def tile_for(x: Tensor, W_enc: Tensor) -> dict:
    """tile_config for these operands (their dtype, sizes and strides)."""
    return tile_config(x.dtype, x.shape[0], W_enc.shape[1], x.shape[1], x.stride(1) == 1, W_enc.stride(1) == 1)


def check_tile(tile: dict) -> dict:
    """tile with every launch field present, blocks and warps powers of two, stages positive; else a
    ValueError naming the field."""
    tile = dict(tile)
    missing = [name for name in TILE_FIELDS if name not in tile]
    extra = [name for name in tile if name not in TILE_FIELDS]
    if missing or extra:
        raise ValueError(f"tile needs exactly {', '.join(TILE_FIELDS)}; missing {missing}, unknown {extra}")
    for name in TILE_FIELDS:
        value = tile[name]
        if not isinstance(value, int) or value < 1 or (name != "num_stages" and value & (value - 1)):
            raise ValueError(f"tile[{name!r}] must be a {'positive integer' if name == 'num_stages' else 'power of two'}"
                             f", got {value!r}")
    if tile["BLOCK_K"] < 16 or tile["BLOCK_M"] < 16 or tile["BLOCK_N"] < 16:
        raise ValueError(f"tile's BLOCK_M, BLOCK_N and BLOCK_K must be at least 16 (tl.dot), got {tile}")
    return tile


def choose_kt(n: int, k: int, block_n: int, overflowing_rows: float = OVERFLOWING_ROWS) -> int:
    """Candidates kept per row and tile: the smallest KT for which, on unstructured data, at most
    ``overflowing_rows`` of the rows have a tile holding more than KT of the row's top k (those rows
    run again). A row's top k fall into one of its tiles about Poisson(lam), lam = k * block_n / n,
    so a row overflows with probability ~ tiles * P(Poisson(lam) > KT). At B=8192 d=2048 n=131072
    k=64 (block_n = 128, lam = 1/16, 1024 tiles): KT = 3 (~0.2% of rows; KT = 2 would rerun ~4%).
    Capped by min(k, block_n), which is exact alone."""
    cap = min(k, block_n)
    lam = k * block_n / n
    tiles = -(-n // block_n)
    term = cdf = math.exp(-lam)
    for kt in range(1, cap):
        term *= lam / kt
        cdf += term
        if tiles * max(0.0, 1.0 - cdf) <= overflowing_rows:
            return kt
    return cap


def topk_mode() -> str:
    return env_choice("SPARSEKIT_GPU_TOPK", ("auto", "fused", "unfused"))


def use_fused(x: Tensor, W_enc: Tensor, k: int) -> bool:
    """Whether topk_encode of x [B, d] with W_enc [d, n] runs fused (SPARSEKIT_GPU_TOPK, above)."""
    mode = topk_mode()
    if mode == "unfused" or x.shape[0] == 0 or W_enc.shape[1] == 0:
        return False
    if mode == "fused":
        return True
    return choose_kt(W_enc.shape[1], k, tile_for(x, W_enc)["BLOCK_N"]) <= AUTO_MAX_KT


def epilogue_mode() -> str:
    return env_choice("SPARSEKIT_GPU_TOPK_EPILOGUE", ("auto", "rounds"))


def packs(dtype: torch.dtype) -> bool:
    """Whether the fused selection packs the column into the key's low bits (SPARSEKIT_GPU_TOPK_EPILOGUE,
    module docstring): for 16-bit dtypes, whose values widened to float32 leave those bits zero."""
    return dtype != torch.float32 and epilogue_mode() == "auto"


def launch(x: Tensor, W_enc: Tensor, b_enc: Tensor | None, kt: int, with_next: bool,
           tile: dict, pack: bool | None = None, value_f32: bool = False) -> tuple[tuple, tuple, dict, Tensor, Tensor | None]:
    """What one launch of _gemm_topk_kernel takes: (grid, args, kwargs, keys, next), the outputs
    allocated (``candidate_keys`` runs it; bench/gpu_fused_tune.py compiles it ahead of time).
    ``pack``: packed keys (default ``packs(x.dtype)``); ``value_f32``: select on the float32 accumulator
    with truncated packed keys (the fused bf16 screen, screen.py), not on pre rounded to x's dtype."""
    check_dtype(x, W_enc)
    M, K = x.shape
    N = W_enc.shape[1]
    meta = dict(tile)
    tiles_n = triton.cdiv(N, meta["BLOCK_N"])
    keys = torch.empty((M, tiles_n * kt), dtype=torch.int64, device=x.device)
    following = torch.empty((M, tiles_n), dtype=torch.int64, device=x.device) if with_next else None
    if K == 0:  # tl.dot needs one K tile; an empty sum is zero
        x, W_enc, K = x.new_zeros(M, 1), W_enc.new_zeros(1, N), 1
    grid = (triton.cdiv(M, meta["BLOCK_M"]) * tiles_n,)
    args = (x, W_enc, b_enc if b_enc is not None else keys, keys, following if following is not None else keys,
            M, N, K, x.stride(0), x.stride(1), W_enc.stride(0), W_enc.stride(1))
    if pack is None:
        pack = packs(x.dtype)
    if value_f32:
        pack = True
    elif pack and x.dtype == torch.float32:
        raise ValueError("pack: float32 values use all 32 key bits; packed keys are exact for 16-bit inputs only")
    kwargs = dict(KT=kt, NEXT=with_next, HAS_BIAS=b_enc is not None, UPCAST=upcast_inputs(x.dtype),
                  PRECISION=dot_precision(x.dtype), PACK=pack, RESTORE=pack and not value_f32,
                  VALUE_F32=value_f32, **meta)
    return grid, args, kwargs, keys, following


def candidate_keys(x: Tensor, W_enc: Tensor, b_enc: Tensor | None, kt: int,
                   with_next: bool, tile: dict | None = None, pack: bool | None = None,
                   value_f32: bool = False) -> tuple[Tensor, Tensor | None]:
    """x [B, d], W_enc [d, n] (any strides), b_enc [n] -> (keys [B, tiles_n * kt] int64, each tile's
    kt largest per row in order; next [B, tiles_n] int64, each tile's (kt+1)-th, or None).
    ``tile``: the launch config (default ``tile_for(x, W_enc)``); ``pack``, ``value_f32``: as ``launch``."""
    grid, args, kwargs, keys, following = launch(x, W_enc, b_enc, kt, with_next, tile or tile_for(x, W_enc),
                                                 pack, value_f32)
    _gemm_topk_kernel[grid](*args, **kwargs)
    return keys, following


def decode_keys(keys: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Candidate keys (any shape, int64) -> (their values in dtype, their columns int64), exactly."""
    unsigned = (keys >> 32) + 2**31                      # the 32-bit order key u, in [0, 2^32)
    bits = torch.where(unsigned >= 2**31, unsigned - 2**31, 2**32 - 1 - unsigned)
    values = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32)
    columns = 2**32 - 1 - (keys & (2**32 - 1))
    return values.to(dtype), columns


def _select(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, kt: int, exact_kt: int, tile: dict) -> Tensor:
    """The k largest candidate keys per row [B, k], descending; rows whose tiles overflowed are
    selected again with 4x kt until exact, at the same tile (so with the same values)."""
    keys, following = candidate_keys(x, W_enc, b_enc, kt, with_next=kt < exact_kt, tile=tile)
    top = torch.topk(keys, k, dim=1, sorted=True).values
    if following is None:
        return top
    overflowed = torch.nonzero((following > top[:, -1:]).any(dim=1)).flatten()
    if overflowed.numel():  # a tile may hold more of these rows' top k than it listed
        stats["overflow_rows"] += overflowed.numel()
        top[overflowed] = _select(x[overflowed], W_enc, b_enc, k, min(exact_kt, 4 * kt), exact_kt, tile)
    return top


def topk_encode_fused(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, kt: int | None = None,
                      tile: dict | None = None) -> tuple[Tensor, Tensor]:
    """relu of the k largest of pre = x @ W_enc + b_enc per row, the selection fused into the GEMM.

    x [B, d], W_enc [d, n] (any strides), b_enc [n] -> (values [B, k] in x's dtype, descending;
    indices [B, k] int64), ties to the lower index: topk_encode's contract (reference.py).
    ``kt``: candidates per tile and row (default ``choose_kt`` at the tile's BLOCK_N; any value in
    [1, n] is exact). ``tile``: BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages (default
    ``tile_for(x, W_enc)``: TUNED's entry for the size bucket, else the dtype's default).
    """
    x, W_enc, b_enc = x.detach(), W_enc.detach(), b_enc.detach().contiguous()
    n = W_enc.shape[1]
    tile = tile_for(x, W_enc) if tile is None else check_tile(tile)
    block_n = tile["BLOCK_N"]
    exact_kt = min(k, block_n)
    kt = choose_kt(n, k, block_n) if kt is None else kt
    if kt < 1:
        raise ValueError(f"kt must be at least 1, got {kt}")
    kt = min(kt, exact_kt)
    if kt * triton.cdiv(n, block_n) < k:  # too few candidates per row to hold k
        kt = exact_kt
    top = _select(x, W_enc, b_enc, k, kt, exact_kt, tile)
    stats["calls"] += 1
    stats["rows"] += x.shape[0]
    values, indices = decode_keys(top, x.dtype)
    return torch.relu(values), indices
