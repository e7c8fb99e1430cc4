"""Sparse products over COO codes (values, rows, cols, each [E]): the decoder and every sparse backward.

- ``coo_times_dense``    out[r] = sum over entries of row r of values[e] * dense[cols[e]] (+ bias):
  the decoder forward (dense = W_dec, gathering rows) and grad x of a sparse encoder
  (dense = W_enc.t(), a strided view: no transpose is copied).
- ``coo_t_times_dense``  out[c] = sum over entries of column c of values[e] * dense[rows[e]], plus the
  column sums of values: grad W_dec (dense = grad_y) and grad W_enc / grad b_enc (dense = x, written
  transposed into [d, n]). Deterministic by default: entries are sorted by column (stable) and each
  column is summed in a fixed sequential order (a segment reduction); ``deterministic=False`` uses
  float32 atomics instead (faster, run-to-run bits may differ).
- ``sampled_dot``        out[e] = a[rows[e]] . dense[cols[e]]: grad of the decoded values (a = grad_y,
  dense = W_dec): a dense x dense product sampled at the active positions only.

All accumulate in float32 and return the dtype of ``dense``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import configs, fixed, layout_code, prune_oversized, size_bucket

_SEGMENT_HOPPER = [
    dict(BLOCK_S=1, BLOCK_D=256, num_warps=2),
    dict(BLOCK_S=1, BLOCK_D=512, num_warps=4),
    dict(BLOCK_S=4, BLOCK_D=128, num_warps=4),
    dict(BLOCK_S=16, BLOCK_D=64, num_warps=4),
    dict(BLOCK_S=32, BLOCK_D=32, num_warps=4),
]


# Each segment is summed entry by entry in a loop, so no config changes the order of a sum.
@triton.autotune(configs=configs(_SEGMENT_HOPPER, dict(BLOCK_S=4, BLOCK_D=16)),
                 key=["S_BUCKET", "D_BUCKET", "LAYOUT", "OUT_SEG_FASTEST"],
                 prune_configs_by={"early_config_prune": prune_oversized(BLOCK_S="S", BLOCK_D="D")})
@triton.jit
def _segment_sum_kernel(ptr_ptr, idx_ptr, w_ptr, dense_ptr, bias_ptr, out_ptr, sums_ptr, S, D,
                        stride_dense_row, stride_dense_col, stride_out_seg, stride_out_col, S_BUCKET, D_BUCKET, LAYOUT,
                        OUT_SEG_FASTEST: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE_SUMS: tl.constexpr,
                        BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[s, :] = sum_{e in [ptr[s], ptr[s+1])} w[e] * dense[idx[e], :] (+ bias); sums[s] = sum w[e]."""
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
        vector = tl.zeros((BLOCK_D,), dtype=tl.float32)
        total = tl.zeros((), dtype=tl.float32)
        for e in range(start, end):
            weight = tl.load(w_ptr + e).to(tl.float32)
            row = tl.load(idx_ptr + e)
            vector += weight * tl.load(dense_ptr + row * stride_dense_row + cols * stride_dense_col,
                                       mask=col_ok, other=0.0).to(tl.float32)
            total += weight
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


def _segment_sum(ptr, idx, w, dense, n_segments, transpose_out, bias=None, want_sums=False):
    width = dense.shape[1]
    out = torch.empty((width, n_segments) if transpose_out else (n_segments, width), dtype=dense.dtype,
                      device=dense.device)
    sums = torch.empty(n_segments if want_sums else 1, dtype=dense.dtype, device=dense.device)
    stride_seg, stride_col = (1, n_segments) if transpose_out else (width, 1)

    def grid(meta):
        return (triton.cdiv(n_segments, meta["BLOCK_S"]), triton.cdiv(width, meta["BLOCK_D"]))

    _segment_sum_kernel[grid](ptr, idx, w, dense, bias if bias is not None else out, out, sums, n_segments, width,
                              dense.stride(0), dense.stride(1), stride_seg, stride_col,
                              size_bucket(n_segments), size_bucket(width), layout_code(dense.stride(1) == 1),
                              OUT_SEG_FASTEST=transpose_out, HAS_BIAS=bias is not None, WRITE_SUMS=want_sums)
    return out, (sums if want_sums else None)


def coo_times_dense(values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, dense: torch.Tensor,
                    n_rows: int, rows_sorted: bool, bias: torch.Tensor | None = None) -> torch.Tensor:
    """S @ dense (+ bias) for COO S [n_rows, m]: dense [m, D] (any strides) -> [n_rows, D].

    Each output row sums its entries in a fixed order (deterministic); unsorted rows are sorted
    first (stable)."""
    if not rows_sorted:
        rows, order = torch.sort(rows, stable=True)
        values, cols = values[order], cols[order]
    ptr = segment_pointers(rows, n_rows)
    out, _ = _segment_sum(ptr, cols.contiguous(), values.contiguous(), dense, n_rows, False, bias)
    return out


def coo_t_times_dense(values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, dense: torch.Tensor,
                      n_cols: int, transpose_out: bool, deterministic: bool = True):
    """S.T @ dense for COO S [B, n_cols], dense [B, D] -> ([n_cols, D], or [D, n_cols] when
    transpose_out) and the column sums of S [n_cols]."""
    if deterministic:
        cols, order = torch.sort(cols, stable=True)
        ptr = segment_pointers(cols, n_cols)
        return _segment_sum(ptr, rows[order].contiguous(), values[order].contiguous(), dense, n_cols,
                            transpose_out, want_sums=True)
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
