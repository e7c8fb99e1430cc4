"""Sparse products over COO codes (values, rows, cols, each [E]): the decoder and every sparse backward.

- ``coo_times_dense``    out[r] = sum over entries of row r of values[e] * dense[cols[e]] (+ bias):
  the decoder forward (dense = W_dec, gathering rows) and grad x of a sparse encoder
  (dense = W_enc.t(), a strided view: no transpose is copied).
- ``coo_t_times_dense``  out[c] = sum over entries of column c of values[e] * dense[rows[e]], plus the
  column sums of values: grad W_dec (dense = grad_y) and grad W_enc / grad b_enc (dense = x, written
  transposed into [d, n]). Deterministic by default: entries are sorted by column (stable) and each
  column is summed in a fixed sequential order (a segment reduction; a column with more than
  ``chunk_entries`` entries, a hot latent, in chunks summed by separate programs and then added in
  chunk order); ``deterministic=False`` uses float32 atomics instead (faster, run-to-run bits may differ).
- ``sampled_dot``        out[e] = a[rows[e]] . dense[cols[e]]: grad of the decoded values (a = grad_y,
  dense = W_dec): a dense x dense product sampled at the active positions only.

All accumulate in float32 and return the dtype of ``dense``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import configs, fixed, layout_code, prune_oversized, size_bucket

# BLOCK_E: entries whose rows are loaded together (their loads independent, in flight at once) before
# they are added one by one. BLOCK_S = 32 and 16 (segments unrolled) spilled (56-96 B/thread; 16 with
# BLOCK_E = 2: 8-28 B) and are gone: nothing here spills (make gpu-check, 2026-12-05).
_SEGMENT_HOPPER = [
    dict(BLOCK_S=1, BLOCK_D=256, BLOCK_E=8, num_warps=2),
    dict(BLOCK_S=1, BLOCK_D=512, BLOCK_E=8, num_warps=4),
    dict(BLOCK_S=4, BLOCK_D=128, BLOCK_E=8, num_warps=4),
]


@triton.jit
def _entries_sum(idx_ptr, w_ptr, dense_ptr, start, end, cols, col_ok, stride_dense_row, stride_dense_col,
                 v_row, dots_ptr, trash, n_blocks, pid_d,
                 BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, DOTS: tl.constexpr):
    """(sum of w[e] * dense[idx[e], cols] over e in [start, end) [BLOCK_D], sum of w[e]), float32, the
    entries added one by one in their order. They are read BLOCK_E at a time: the BLOCK_E row loads of
    a block depend on nothing but their indices, so they are in flight together, and c entries wait
    on ceil(c / BLOCK_E) rounds of loads, not c. Slots past the end add 0 * 0 = +0.0 (their row is
    not read), which leaves the sum as it is: it starts at +0.0 and so is never -0.0.
    DOTS: also dots[e * n_blocks + pid_d] = dense[idx[e], cols] . v_row (this block's share of the
    entry's dot product with one vector, the decode backward's grad values); a slot past the end
    writes its 0 to dots[trash]."""
    vector = tl.zeros((BLOCK_D,), dtype=tl.float32)
    total = tl.zeros((), dtype=tl.float32)
    for first in range(start, end, BLOCK_E):
        for j in tl.static_range(BLOCK_E):
            live = first + j < end
            e = tl.minimum(first + j, end - 1)  # past the end: the last entry again, weighted 0
            weight = tl.where(live, tl.load(w_ptr + e).to(tl.float32), 0.0)
            row = tl.load(idx_ptr + e)
            read = col_ok & ((cols * 0 + first + j) < end)
            loaded = tl.load(dense_ptr + row * stride_dense_row + cols * stride_dense_col, mask=read,
                             other=0.0).to(tl.float32)
            vector += weight * loaded
            total += weight
            if DOTS:
                tl.store(dots_ptr + tl.where(live, e, trash) * n_blocks + pid_d, tl.sum(loaded * v_row))
    return vector, total


# Each segment is summed entry by entry, in order, whatever BLOCK_E: no config changes the order of a sum.
@triton.autotune(configs=configs(_SEGMENT_HOPPER, dict(BLOCK_S=4, BLOCK_D=16, BLOCK_E=2)),
                 key=["S_BUCKET", "D_BUCKET", "LAYOUT", "OUT_SEG_FASTEST"],
                 prune_configs_by={"early_config_prune": prune_oversized(BLOCK_S="S", BLOCK_D="D")})
@triton.jit
def _segment_sum_kernel(ptr_ptr, idx_ptr, w_ptr, dense_ptr, bias_ptr, out_ptr, sums_ptr, S, D, CAP,
                        stride_dense_row, stride_dense_col, stride_out_seg, stride_out_col, S_BUCKET, D_BUCKET, LAYOUT,
                        OUT_SEG_FASTEST: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE_SUMS: tl.constexpr,
                        BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):
    """out[s, :] = sum_{e in [ptr[s], ptr[s+1])} w[e] * dense[idx[e], :] (+ bias); sums[s] = sum w[e],
    each segment's entries added one by one in order (``_entries_sum``). A segment of more than CAP
    entries is left to the chunked kernels (``_chunk_sum_kernel``, ``_chunk_combine_kernel``), which
    overwrite what this one writes for it."""
    pid_s = tl.program_id(0)
    pid_d = tl.program_id(1)
    lanes = tl.arange(0, BLOCK_S)
    segments = pid_s.to(tl.int64) * BLOCK_S + lanes
    cols = pid_d.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    acc = tl.zeros((BLOCK_S, BLOCK_D), dtype=tl.float32)
    sums = tl.zeros((BLOCK_S,), dtype=tl.float32)
    for i in tl.static_range(BLOCK_S):
        segment = pid_s.to(tl.int64) * BLOCK_S + i
        ok = segment < S
        start = tl.load(ptr_ptr + segment, mask=ok, other=0)
        end = tl.load(ptr_ptr + segment + 1, mask=ok, other=0)
        end = tl.where(end - start > CAP, start, end)
        vector, total = _entries_sum(idx_ptr, w_ptr, dense_ptr, start, end, cols, col_ok, stride_dense_row,
                                     stride_dense_col, 0.0, w_ptr, 0, 0, 0, BLOCK_D, BLOCK_E, False)
        acc = tl.where((lanes == i)[:, None], vector[None, :], acc)
        sums = tl.where(lanes == i, total, sums)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    mask = (segments < S)[:, None] & col_ok[None, :]
    tl.store(out_ptr + segments[:, None] * stride_out_seg + cols[None, :] * stride_out_col,
             acc.to(out_ptr.dtype.element_ty), mask=mask)
    if WRITE_SUMS:
        if pid_d == 0:
            tl.store(sums_ptr + segments, sums.to(sums_ptr.dtype.element_ty), mask=segments < S)


@triton.jit
def _segment_dots_kernel(ptr_ptr, idx_ptr, w_ptr, dense_ptr, v_ptr, out_ptr, dots_ptr, S, D, CAP, trash,
                         stride_dense_row, stride_v, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):
    """The decode backward in one pass by latent (one segment s per program and D block, a fixed
    config: the dots' order must not depend on autotuning): out[s, :] = sum over the segment's
    entries of w[e] * dense[idx[e], :] in order (grad W_dec: w = values, dense = grad_y), and each
    entry's share of dense[idx[e], :] . v[s, :] (grad values: v = W_dec), reading v's row once per
    segment instead of once per entry. Segments longer than CAP are left to the chunk kernels."""
    segment = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    cols = pid_d.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    start = tl.load(ptr_ptr + segment)
    end = tl.load(ptr_ptr + segment + 1)
    end = tl.where(end - start > CAP, start, end)
    v_row = tl.load(v_ptr + segment * stride_v + cols, mask=col_ok & (cols * 0 + end > start),  # unused: unread
                    other=0.0).to(tl.float32)
    vector, total = _entries_sum(idx_ptr, w_ptr, dense_ptr, start, end, cols, col_ok, stride_dense_row, 1,
                                 v_row, dots_ptr, trash, tl.num_programs(1), pid_d, BLOCK_D, BLOCK_E, True)
    tl.store(out_ptr + segment * D + cols, vector.to(out_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _chunk_sum_kernel(start_ptr, end_ptr, idx_ptr, w_ptr, dense_ptr, part_ptr, part_sums_ptr, D,
                      stride_dense_row, stride_dense_col, seg_ptr, v_ptr, dots_ptr, stride_v, trash,
                      BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, DOTS: tl.constexpr):
    """partial[j, :] = the entries [start[j], end[j]) of one chunk of a long segment, summed in order;
    part_sums[j] their weights' sum (DOTS: and each entry's dot with row seg[j] of v, as
    ``_entries_sum``). An unused slot (start = end) writes nothing."""
    slot = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    cols = pid_d.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    start = tl.load(start_ptr + slot)
    end = tl.load(end_ptr + slot)
    if end > start:
        v_row = 0.0
        if DOTS:
            v_row = tl.load(v_ptr + tl.load(seg_ptr + slot) * stride_v + cols, mask=col_ok, other=0.0).to(tl.float32)
        vector, total = _entries_sum(idx_ptr, w_ptr, dense_ptr, start, end, cols, col_ok, stride_dense_row,
                                     stride_dense_col, v_row, dots_ptr, trash, tl.num_programs(1), pid_d,
                                     BLOCK_D, BLOCK_E, DOTS)
        tl.store(part_ptr + slot * D + cols, vector, mask=col_ok)
        if pid_d == 0:
            tl.store(part_sums_ptr + slot, total)


@triton.jit
def _chunk_combine_kernel(out_ptr, bias_ptr, sums_ptr, seg_ptr, count_ptr, part_ptr, part_sums_ptr, D,
                          stride_out_seg, stride_out_col, HAS_BIAS: tl.constexpr, WRITE_SUMS: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    """For the slot holding a long segment's first chunk (count[j] > 0 chunks from j on): out[seg[j]] =
    its chunks' partial sums added in chunk order (+ bias), sums likewise; other slots do nothing."""
    slot = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    count = tl.load(count_ptr + slot)
    if count > 0:
        cols = pid_d.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        vector = tl.zeros((BLOCK_D,), dtype=tl.float32)
        total = tl.zeros((), dtype=tl.float32)
        for c in range(count):
            vector += tl.load(part_ptr + (slot + c) * D + cols, mask=col_ok, other=0.0)
            total += tl.load(part_sums_ptr + slot + c)
        if HAS_BIAS:
            vector += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        segment = tl.load(seg_ptr + slot)
        tl.store(out_ptr + segment * stride_out_seg + cols * stride_out_col, vector.to(out_ptr.dtype.element_ty),
                 mask=col_ok)
        if WRITE_SUMS:
            if pid_d == 0:
                tl.store(sums_ptr + segment, total.to(sums_ptr.dtype.element_ty))


_SCATTER_HOPPER = [
    dict(BLOCK_E=32, BLOCK_D=128, num_warps=4),
    dict(BLOCK_E=64, BLOCK_D=64, num_warps=4),
    dict(BLOCK_E=16, BLOCK_D=256, num_warps=4),
]


@triton.autotune(configs=configs(_SCATTER_HOPPER, dict(BLOCK_E=8, BLOCK_D=16)), key=["E_BUCKET", "D_BUCKET", "LAYOUT"],
                 reset_to_zero=["out_ptr", "sums_ptr"],
                 prune_configs_by={"early_config_prune": prune_oversized(BLOCK_E="E", BLOCK_D="D")})
@triton.jit
def _scatter_add_kernel(seg_ptr, idx_ptr, w_ptr, dense_ptr, out_ptr, sums_ptr, E, D,
                        stride_dense_row, stride_dense_col, stride_out_seg, stride_out_col, E_BUCKET, D_BUCKET, LAYOUT,
                        WRITE_SUMS: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[seg[e], :] += w[e] * dense[idx[e], :] with float32 atomics; sums[seg[e]] += w[e]."""
    pid_e = tl.program_id(0)
    pid_d = tl.program_id(1)
    entries = pid_e.to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)
    cols = pid_d.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    e_ok = entries < E
    col_ok = cols < D
    segment = tl.load(seg_ptr + entries, mask=e_ok, other=0)
    row = tl.load(idx_ptr + entries, mask=e_ok, other=0)
    weight = tl.load(w_ptr + entries, mask=e_ok, other=0.0).to(tl.float32)
    mask = e_ok[:, None] & col_ok[None, :]
    tile = tl.load(dense_ptr + row[:, None] * stride_dense_row + cols[None, :] * stride_dense_col,
                   mask=mask, other=0.0).to(tl.float32)
    # Relaxed: the adds commute and nothing reads out before the kernel ends, so no ordering is needed
    # (the default acq_rel fences every atomic).
    tl.atomic_add(out_ptr + segment[:, None] * stride_out_seg + cols[None, :] * stride_out_col,
                  weight[:, None] * tile, mask=mask, sem="relaxed")
    if WRITE_SUMS:
        if pid_d == 0:
            tl.atomic_add(sums_ptr + segment, weight, mask=e_ok, sem="relaxed")


@triton.jit
def _sampled_dot_kernel(rows_ptr, cols_ptr, a_ptr, dense_ptr, out_ptr, E, D, stride_a, stride_dense,
                        stride_dense_d, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[e] = sum_j a[rows[e], j] * dense[cols[e], j]."""
    entries = tl.program_id(0).to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = entries < E
    row = tl.load(rows_ptr + entries, mask=e_ok, other=0)
    col = tl.load(cols_ptr + entries, mask=e_ok, other=0)
    acc = tl.zeros((BLOCK_E,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        js = d0 + tl.arange(0, BLOCK_D)
        mask = e_ok[:, None] & (js < D)[None, :]
        a = tl.load(a_ptr + row[:, None] * stride_a + js[None, :], mask=mask, other=0.0).to(tl.float32)
        b = tl.load(dense_ptr + col[:, None] * stride_dense + js[None, :] * stride_dense_d, mask=mask,
                    other=0.0).to(tl.float32)
        acc += tl.sum(a * b, axis=1)
    tl.store(out_ptr + entries, acc.to(out_ptr.dtype.element_ty), mask=e_ok)


def segment_pointers(sorted_keys: torch.Tensor, n_segments: int) -> torch.Tensor:
    """[n_segments + 1] offsets: segment s holds entries ptr[s]:ptr[s+1] of the sorted keys."""
    bounds = torch.arange(n_segments + 1, device=sorted_keys.device, dtype=sorted_keys.dtype)
    return torch.searchsorted(sorted_keys, bounds)


# Long segments (a hot latent: one firing on a tenth of the batch has 0.1·B entries where the mean
# is k·B/n) are split into chunks of CHUNK entries summed by separate programs, then the chunks added
# in order: the segment sum's time is no longer the busiest latent's entries one program after the
# other. The partial sums' buffer is sized without a host sync from an upper bound on the chunks
# (E/CHUNK + E/(CHUNK+1) + 1), so CHUNK grows with E·D to keep it within PARTIALS_BYTES.
CHUNK_MIN = 32
PARTIALS_BYTES = 256 * 2**20


def chunk_entries(n_entries: int, width: int) -> int:
    """Entries per chunk of a long segment: CHUNK_MIN, doubled until the partial sums' worst case fits
    PARTIALS_BYTES (float32 rows of ``width``)."""
    chunk = CHUNK_MIN
    while _chunk_slots(n_entries, chunk) * width * 4 > PARTIALS_BYTES:
        chunk *= 2
    return chunk


def _chunk_slots(n_entries: int, chunk: int) -> int:
    """An upper bound on the chunks of the segments longer than chunk: sum of ceil(c / chunk) <= E/chunk + H,
    H (the long segments) <= E/(chunk+1)."""
    return n_entries // chunk + n_entries // (chunk + 1) + 1


def chunk_plan(ptr: torch.Tensor, chunk: int, slots: int) -> tuple[torch.Tensor, ...]:
    """For the segments of ptr [S+1] longer than chunk, their chunks in slot order (segment, then chunk),
    computed on the device without a host sync: (start [slots], end [slots]) entry ranges (empty for
    unused slots), seg [slots] (the slot's segment) and count [slots] (the segment's number of chunks
    at its first chunk's slot, else 0)."""
    counts = ptr[1:] - ptr[:-1]
    n_segments = counts.shape[0]
    chunks = torch.where(counts > chunk, (counts + chunk - 1) // chunk, 0)
    last = torch.cumsum(chunks, 0)  # one past each segment's last slot
    slot = torch.arange(slots, device=ptr.device, dtype=last.dtype)
    seg = torch.searchsorted(last, slot, right=True)
    used = seg < n_segments
    seg = seg.clamp(max=n_segments - 1)
    index = slot - (last[seg] - chunks[seg])
    start = ptr[seg] + index * chunk
    end = torch.minimum(ptr[seg + 1], start + chunk)
    start, end = torch.where(used, start, 0), torch.where(used, end, 0)
    count = torch.where(used & (index == 0), chunks[seg], 0)
    return start, end, seg, count


_CHUNK_META = dict(BLOCK_D=256, BLOCK_E=8, num_warps=2), dict(BLOCK_D=16, BLOCK_E=2, num_warps=1)


def _by_column(values, rows, cols, n_cols):
    """COO entries sorted by column (stable): (ptr [n_cols + 1], their rows, their values, the order)."""
    cols, order = torch.sort(cols, stable=True)
    return segment_pointers(cols, n_cols), rows[order].contiguous(), values[order].contiguous(), order


def _long_segment_cap(chunk: int, n_entries: int, n_segments: int) -> int:
    """The longest segment the one-program kernels sum (longer ones: ``_sum_long_segments``); chunk 0
    (never split) or no segment able to be longer than a chunk: all of them."""
    return chunk if 0 < chunk < n_entries and n_segments else n_entries


def _sum_long_segments(ptr, idx, w, dense, out, sums, bias, stride_seg, stride_col, chunk, meta,
                       v=None, dots=None) -> None:
    """The segments of ptr longer than chunk, chunk by chunk (``chunk_plan``, ``_chunk_sum_kernel``) then
    the chunks in order into out (+ bias) and sums (``_chunk_combine_kernel``); with v and dots, each
    entry's dot share as ``_entries_sum``."""
    n_entries, width = idx.shape[0], dense.shape[1]
    slots = _chunk_slots(n_entries, chunk)
    start, end, seg, count = chunk_plan(ptr, chunk, slots)
    partials = torch.empty((slots, width), dtype=torch.float32, device=dense.device)
    partial_sums = torch.empty(slots, dtype=torch.float32, device=dense.device)
    grid = (slots, triton.cdiv(width, meta["BLOCK_D"]))
    dots_on = v is not None
    _chunk_sum_kernel[grid](start, end, idx, w, dense, partials, partial_sums, width, dense.stride(0), dense.stride(1),
                            seg, v if dots_on else partials, dots if dots_on else partials,
                            v.stride(0) if dots_on else 0, n_entries, DOTS=dots_on, **meta)
    _chunk_combine_kernel[grid](out, bias if bias is not None else out, sums if sums is not None else partial_sums,
                                seg, count, partials, partial_sums, width, stride_seg, stride_col,
                                HAS_BIAS=bias is not None, WRITE_SUMS=sums is not None, BLOCK_D=meta["BLOCK_D"],
                                num_warps=meta["num_warps"])


def _segment_sum(ptr, idx, w, dense, n_segments, transpose_out, bias=None, want_sums=False, chunk=None):
    """out [n_segments, D] (transpose_out: [D, n_segments]) = each segment's sum of w[e] * dense[idx[e]]
    (+ bias), and the weights' sums when want_sums. chunk: entries per chunk of a longer segment
    (None: ``chunk_entries``; 0: never split)."""
    width = dense.shape[1]
    out = torch.empty((width, n_segments) if transpose_out else (n_segments, width), dtype=dense.dtype,
                      device=dense.device)
    sums = torch.empty(n_segments if want_sums else 1, dtype=dense.dtype, device=dense.device)
    stride_seg, stride_col = (1, n_segments) if transpose_out else (width, 1)
    n_entries = idx.shape[0]
    chunk = chunk_entries(n_entries, width) if chunk is None else chunk
    cap = _long_segment_cap(chunk, n_entries, n_segments)

    def grid(meta):
        return (triton.cdiv(n_segments, meta["BLOCK_S"]), triton.cdiv(width, meta["BLOCK_D"]))

    _segment_sum_kernel[grid](ptr, idx, w, dense, bias if bias is not None else out, out, sums, n_segments, width,
                              cap, dense.stride(0), dense.stride(1), stride_seg, stride_col,
                              size_bucket(n_segments), size_bucket(width), layout_code(dense.stride(1) == 1),
                              OUT_SEG_FASTEST=transpose_out, HAS_BIAS=bias is not None, WRITE_SUMS=want_sums)
    if cap < n_entries:
        _sum_long_segments(ptr, idx, w, dense, out, sums if want_sums else None, bias, stride_seg, stride_col, chunk,
                           fixed(*_CHUNK_META))
    return out, (sums if want_sums else None)


def segment_sums_and_dots(values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, dense: torch.Tensor,
                          v: torch.Tensor, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """For COO S [B, n] (values, rows, cols [E]), dense [B, D] and v [n, D]: (S.T @ dense [n, D] in
    dense's dtype, each latent's entries added in order as ``coo_t_times_dense`` (deterministic), and
    dots [E] float32 = dense[rows[e]] . v[cols[e]]). The decode backward's grad W_dec (dense = grad_y)
    and grad values (v = W_dec) in one pass by latent: each row of W_dec read once, not once per entry
    (``sampled_dot``). The dots sum per block of BLOCK_D columns, then the blocks in order: a fixed
    config, not autotuned, so the same bits every run."""
    dense = dense.contiguous()
    v = v if v.stride(1) == 1 else v.contiguous()
    n, width = v.shape
    n_entries = values.shape[0]
    out = torch.zeros((n, width), dtype=dense.dtype, device=dense.device)
    if n_entries == 0:
        return out, torch.zeros(0, dtype=torch.float32, device=dense.device)
    ptr, idx, w, order = _by_column(values, rows, cols, n)
    meta = fixed(*_CHUNK_META)  # the chunk kernels' BLOCK_D too: the dots' blocks must be the same
    n_blocks = triton.cdiv(width, meta["BLOCK_D"])
    dots = torch.empty((n_entries + 1, n_blocks), dtype=torch.float32, device=dense.device)  # + a trash row
    chunk = chunk_entries(n_entries, width) if chunk is None else chunk
    cap = _long_segment_cap(chunk, n_entries, n)
    _segment_dots_kernel[(n, n_blocks)](ptr, idx, w, dense, v, out, dots, n, width, cap, n_entries, dense.stride(0),
                                        v.stride(0), **meta)
    if cap < n_entries:
        _sum_long_segments(ptr, idx, w, dense, out, None, None, width, 1, chunk, meta, v=v, dots=dots)
    result = torch.empty(n_entries, dtype=torch.float32, device=dense.device)
    result[order] = dots[:n_entries].sum(1)
    return out, result


def coo_times_dense(values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, dense: torch.Tensor,
                    n_rows: int, rows_sorted: bool, bias: torch.Tensor | None = None) -> torch.Tensor:
    """S @ dense (+ bias) for COO S [n_rows, m]: dense [m, D] (any strides) -> [n_rows, D].

    Each output row sums its entries in a fixed order (deterministic); unsorted rows are sorted
    first (stable)."""
    if not rows_sorted:
        rows, order = torch.sort(rows, stable=True)
        values, cols = values[order], cols[order]
    ptr = segment_pointers(rows, n_rows)
    # Rows are not split into chunks: a row holds k entries (TopK) or at most n (COO codes), never a
    # hot latent's share of the batch, and splitting every row would double the decode's traffic.
    out, _ = _segment_sum(ptr, cols.contiguous(), values.contiguous(), dense, n_rows, False, bias, chunk=0)
    return out


def coo_t_times_dense(values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, dense: torch.Tensor,
                      n_cols: int, transpose_out: bool, deterministic: bool = True):
    """S.T @ dense for COO S [B, n_cols], dense [B, D] -> ([n_cols, D], or [D, n_cols] when
    transpose_out) and the column sums of S [n_cols]."""
    if deterministic:
        ptr, idx, w, _ = _by_column(values, rows, cols, n_cols)
        return _segment_sum(ptr, idx, w, dense, n_cols, transpose_out, want_sums=True)
    width = dense.shape[1]
    out = torch.zeros((width, n_cols) if transpose_out else (n_cols, width), dtype=torch.float32,
                      device=dense.device)
    sums = torch.zeros(n_cols, dtype=torch.float32, device=dense.device)
    stride_seg, stride_col = (1, n_cols) if transpose_out else (width, 1)
    n_entries = values.shape[0]

    def grid(meta):
        return (triton.cdiv(n_entries, meta["BLOCK_E"]), triton.cdiv(width, meta["BLOCK_D"]))

    if n_entries:
        _scatter_add_kernel[grid](cols.contiguous(), rows.contiguous(), values.contiguous(), dense, out, sums,
                                  n_entries, width, dense.stride(0), dense.stride(1), stride_seg, stride_col,
                                  size_bucket(n_entries), size_bucket(width), layout_code(dense.stride(1) == 1),
                                  WRITE_SUMS=True)
    return out.to(dense.dtype), sums.to(dense.dtype)


def sampled_dot(rows: torch.Tensor, cols: torch.Tensor, a: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """(a @ dense.T)[rows[e], cols[e]] for a [B, D], dense [n, D] (any strides: a transposed view of
    W_enc [D, n] is read in place; entries in column order then read neighbouring addresses) -> [E] in
    a's dtype. The sums' order is BLOCK_D's, whatever the strides."""
    a = a.contiguous()
    n_entries = rows.shape[0]
    out = torch.empty(n_entries, dtype=a.dtype, device=a.device)
    if n_entries == 0:
        return out
    meta = fixed(dict(BLOCK_E=64, BLOCK_D=64, num_warps=4), dict(BLOCK_E=16, BLOCK_D=16, num_warps=1))
    grid = (triton.cdiv(n_entries, meta["BLOCK_E"]),)
    _sampled_dot_kernel[grid](rows.contiguous(), cols.contiguous(), a, dense, out, n_entries, a.shape[1],
                              a.stride(0), dense.stride(0), dense.stride(1), **meta)
    return out
