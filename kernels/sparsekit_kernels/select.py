"""Top-k selection by radix select on the pre-activations: per row (TopK) and over the batch (BatchTopK).

Design (a clear two-pass encoder; TopK now runs fused into the GEMM by default, ``fused_topk.py``,
and this is its SPARSEKIT_GPU_TOPK=unfused path, BatchTopK's and the bf16 screen's selection):
pass 1 is the GEMM with the bias fused (``gemm.py``), writing pre [B, n] once; pass 2 selects.
Selection maps each value to a 32-bit key whose unsigned order is the float order (-0.0 counts
as +0.0), then finds the k-th largest key 8 bits at a time: four histogram passes over the
candidates whose higher digits match the prefix found so far, then one compaction pass that keeps
every key above the threshold and, of the keys equal to it, the first ones in index order (the
tie rule: lower index wins). Selected entries come out in index order; ``topk_rows`` then sorts
the k of each row (stable, descending) to the contract's order. Cost: the GEMM, plus reading pre
five times with no [B, n] scratch beyond pre itself (the H200 showed it dominating in bf16: the
reason for ``fused_topk.py``).

Keys and histograms are exact integers, so both selections are deterministic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import check_dtype, fixed


@triton.jit
def sortable_key(value):
    """float32 -> uint32 whose unsigned order is the float order; -0.0 maps like +0.0."""
    bits = (value + 0.0).to(tl.uint32, bitcast=True)
    return tl.where((bits >> 31) == 1, ~bits, bits | 0x80000000)


@triton.jit
def _digit_histogram(key, valid, prefix, SHIFT: tl.constexpr, FIRST: tl.constexpr):
    """Histogram [256] of digit (key >> SHIFT) & 255 over the valid keys whose higher bits equal prefix."""
    if FIRST:
        match = valid
    else:
        match = valid & ((key >> (SHIFT + 8)) == prefix)
    digit = tl.where(match, (key >> SHIFT) & 255, 0).to(tl.int32)
    hist = tl.histogram(digit, 256)
    # Unmatched keys were counted in bin 0: take them out again.
    return hist - tl.where(tl.arange(0, 256) == 0, tl.sum((~match).to(tl.int32)), 0)


@triton.jit
def _choose_digit(hist, remaining):
    """The largest digit D with count(digit >= D) >= remaining, and count(digit > D)."""
    bins = tl.arange(0, 256)
    above = tl.sum(hist) - tl.cumsum(hist, 0)        # count with digit > bin
    digit = tl.max(tl.where(above + hist >= remaining, bins, -1))
    return digit, tl.sum(tl.where(bins > digit, hist, 0))


# --- per row (TopK) ---------------------------------------------------------------------------

@triton.jit
def _row_topk_kernel(pre_ptr, out_pre_ptr, out_idx_ptr, n, k, BLOCK_N: tl.constexpr):
    """One program per row: the k largest of pre[row, :n] in index order (ties: lower index)."""
    row = tl.program_id(0).to(tl.int64)
    base = pre_ptr + row * n
    offs = tl.arange(0, BLOCK_N)
    prefix = tl.zeros((), dtype=tl.uint32)
    remaining = tl.zeros((), dtype=tl.int32) + k
    for p in tl.static_range(4):
        hist = tl.zeros((256,), dtype=tl.int32)
        for start in range(0, n, BLOCK_N):
            valid = (start + offs) < n
            key = sortable_key(tl.load(base + start + offs, mask=valid, other=0.0).to(tl.float32))
            hist += _digit_histogram(key, valid, prefix, 24 - 8 * p, p == 0)
        digit, above = _choose_digit(hist, remaining)
        remaining -= above
        prefix = (prefix << 8) | digit.to(tl.uint32)
    # Compaction: keys above the threshold, plus the first `remaining` keys equal to it.
    taken = tl.zeros((), dtype=tl.int32)
    equal_seen = tl.zeros((), dtype=tl.int32)
    for start in range(0, n, BLOCK_N):
        valid = (start + offs) < n
        value = tl.load(base + start + offs, mask=valid, other=0.0)
        key = sortable_key(value.to(tl.float32))
        equal = valid & (key == prefix)
        equal_rank = equal_seen + tl.cumsum(equal.to(tl.int32), 0) - equal.to(tl.int32)
        take = (valid & (key > prefix)) | (equal & (equal_rank < remaining))
        position = taken + tl.cumsum(take.to(tl.int32), 0) - take.to(tl.int32)
        tl.store(out_pre_ptr + row * k + position, value, mask=take)
        tl.store(out_idx_ptr + row * k + position, (start + offs).to(tl.int64), mask=take)
        taken += tl.sum(take.to(tl.int32))
        equal_seen += tl.sum(equal.to(tl.int32))


def topk_rows(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of pre [B, n]: (relu of the k largest, sorted descending; their indices [B, k] int64).

    Ties: lower index first. The row's kept pre-activations are found by the radix-select kernel
    in index order, then a stable sort of the [B, k] result orders them (cheap next to the GEMM).
    """
    check_dtype(pre)
    pre = pre.contiguous()
    batch, n = pre.shape
    kept = torch.empty((batch, k), dtype=pre.dtype, device=pre.device)
    indices = torch.empty((batch, k), dtype=torch.int64, device=pre.device)
    meta = fixed(dict(BLOCK_N=2048, num_warps=8), dict(BLOCK_N=64, num_warps=1))
    _row_topk_kernel[(batch,)](pre, kept, indices, n, k, **meta)
    order = torch.sort(kept, dim=1, descending=True, stable=True).indices
    return torch.relu(kept.gather(1, order)), indices.gather(1, order)


# --- over the whole batch (BatchTopK) -----------------------------------------------------------

@triton.jit
def _flat_keys(pre_ptr, offsets, total):
    """Keys of relu(pre) at flat offsets (BatchTopK ranks activations, so every negative is 0)."""
    valid = offsets < total
    value = tl.load(pre_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
    return sortable_key(tl.maximum(value, 0.0)), valid


@triton.jit
def _batch_histogram_kernel(pre_ptr, total, state_ptr, hist_ptr, SHIFT: tl.constexpr, FIRST: tl.constexpr,
                            BLOCK: tl.constexpr):
    """Add this block's digit histogram into hist [256] (int64 atomics: exact, order-free)."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    key, valid = _flat_keys(pre_ptr, offsets, total)
    prefix = tl.load(state_ptr).to(tl.uint32)
    hist = _digit_histogram(key, valid, prefix, SHIFT, FIRST)
    tl.atomic_add(hist_ptr + tl.arange(0, 256), hist.to(tl.int64), sem="relaxed")  # read by the next launch


@triton.jit
def _batch_choose_kernel(state_ptr, hist_ptr):
    """state = (prefix, remaining): append the digit chosen from hist [256]."""
    hist = tl.load(hist_ptr + tl.arange(0, 256))
    remaining = tl.load(state_ptr + 1)
    digit, above = _choose_digit(hist, remaining)
    tl.store(state_ptr, (tl.load(state_ptr) << 8) | digit.to(tl.int64))
    tl.store(state_ptr + 1, remaining - above)


@triton.jit
def _batch_count_kernel(pre_ptr, total, state_ptr, counts_ptr, n_blocks, BLOCK: tl.constexpr):
    """Per block: how many keys lie above the threshold and how many equal it."""
    block = tl.program_id(0)
    offsets = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    key, valid = _flat_keys(pre_ptr, offsets, total)
    threshold = tl.load(state_ptr).to(tl.uint32)
    tl.store(counts_ptr + block, tl.sum((valid & (key > threshold)).to(tl.int64)))
    tl.store(counts_ptr + n_blocks + block, tl.sum((valid & (key == threshold)).to(tl.int64)))


@triton.jit
def _batch_compact_kernel(pre_ptr, total, n, state_ptr, starts_ptr, n_blocks, values_ptr, rows_ptr, cols_ptr,
                          BLOCK: tl.constexpr):
    """Write the kept entries in flat order: each lands after every kept entry before it."""
    block = tl.program_id(0)
    offsets = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    key, valid = _flat_keys(pre_ptr, offsets, total)
    threshold = tl.load(state_ptr).to(tl.uint32)
    needed_equal = tl.load(state_ptr + 1)
    above = (valid & (key > threshold)).to(tl.int64)
    equal = (valid & (key == threshold)).to(tl.int64)
    above_before = tl.load(starts_ptr + block) + tl.cumsum(above, 0) - above
    equal_before = tl.load(starts_ptr + n_blocks + block) + tl.cumsum(equal, 0) - equal
    take = (above == 1) | ((equal == 1) & (equal_before < needed_equal))
    position = above_before + tl.minimum(equal_before, needed_equal)
    value = tl.load(pre_ptr + offsets, mask=take, other=0.0)
    tl.store(values_ptr + position, tl.maximum(value, 0.0), mask=take)
    tl.store(rows_ptr + position, offsets // n, mask=take)
    tl.store(cols_ptr + position, offsets % n, mask=take)


def batch_topk(pre: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The m largest of relu(pre) over all of pre [B, n] as flat COO in row-major order:
    (values [m], rows [m], cols [m]); ties: lower flat index. Runs without a host sync."""
    check_dtype(pre)
    pre = pre.contiguous()
    n = pre.shape[1]
    total = pre.numel()
    meta = fixed(dict(BLOCK=4096, num_warps=8), dict(BLOCK=256, num_warps=1))
    n_blocks = triton.cdiv(total, meta["BLOCK"])
    device = pre.device
    state = torch.tensor([0, m], dtype=torch.int64, device=device)
    hists = torch.zeros((4, 256), dtype=torch.int64, device=device)
    for p in range(4):
        _batch_histogram_kernel[(n_blocks,)](pre, total, state, hists[p], SHIFT=24 - 8 * p, FIRST=p == 0, **meta)
        _batch_choose_kernel[(1,)](state, hists[p])
    counts = torch.empty((2, n_blocks), dtype=torch.int64, device=device)
    _batch_count_kernel[(n_blocks,)](pre, total, state, counts, n_blocks, **meta)
    starts = torch.cumsum(counts, dim=1) - counts
    values = torch.empty(m, dtype=pre.dtype, device=device)
    rows = torch.empty(m, dtype=torch.int64, device=device)
    cols = torch.empty(m, dtype=torch.int64, device=device)
    _batch_compact_kernel[(n_blocks,)](pre, total, n, state, starts, n_blocks, values, rows, cols, **meta)
    return values, rows, cols
