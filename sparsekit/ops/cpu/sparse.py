"""Sparse products over COO codes (values, rows, cols, each [E]) as torch.library custom ops
(namespace ``sparsekit``): the C++ kernels behind every sparse backward (the encoders' in
``encode``, the decoder's in ``decode``), as ``sparsekit.kernels.sparse`` is on the Triton path.

Each op has a fake (meta) kernel, makes its tensor inputs contiguous (a no-op when they are:
``sparsekit.ops`` checked them; the C++ side refuses to copy) and hands them and its preallocated
outputs to ``sparsekit._C`` as zero-copy NumPy views.
"""
from __future__ import annotations

import torch
from torch import Tensor

from sparsekit.ops.backend import _C

from .gemm import empty_output, numpy_view


@torch.library.custom_op("sparsekit::coo_times_dense_t_cpu", mutates_args=())
def coo_times_dense_t_cpu(values: Tensor, rows: Tensor, cols: Tensor, dense: Tensor, n_rows: int) -> Tensor:
    """S @ dense.T for COO S [n_rows, n], dense [d, n] -> [n_rows, d] (grad x of a sparse encoder)."""
    out = empty_output((n_rows, dense.shape[0]), dense.dtype)
    _C.coo_times_dense_t(numpy_view(values.contiguous()), numpy_view(rows.contiguous()),
                         numpy_view(cols.contiguous()), numpy_view(dense.contiguous()), numpy_view(out))
    return out


@coo_times_dense_t_cpu.register_fake
def _(values, rows, cols, dense, n_rows):
    return dense.new_empty(n_rows, dense.shape[0])


@torch.library.custom_op("sparsekit::coo_t_times_dense_cpu", mutates_args=())
def coo_t_times_dense_cpu(values: Tensor, rows: Tensor, cols: Tensor, dense: Tensor, n_cols: int,
                          transpose_out: bool) -> tuple[Tensor, Tensor]:
    """S.T @ dense for COO S [B, n_cols], dense [B, d] -> ([n_cols, d], or [d, n_cols] when
    transpose_out) and the column sums of S [n_cols]; deterministic (fixed summation order)."""
    d = dense.shape[1]
    out = empty_output((d, n_cols) if transpose_out else (n_cols, d), dense.dtype)
    col_sums = dense.new_empty(n_cols)
    _C.coo_t_times_dense(numpy_view(values.contiguous()), numpy_view(rows.contiguous()),
                         numpy_view(cols.contiguous()), numpy_view(dense.contiguous()), transpose_out,
                         numpy_view(out), numpy_view(col_sums))
    return out, col_sums


@coo_t_times_dense_cpu.register_fake
def _(values, rows, cols, dense, n_cols, transpose_out):
    d = dense.shape[1]
    return dense.new_empty((d, n_cols) if transpose_out else (n_cols, d)), dense.new_empty(n_cols)


@torch.library.custom_op("sparsekit::sampled_dense_dot_cpu", mutates_args=())
def sampled_dense_dot_cpu(rows: Tensor, cols: Tensor, a: Tensor, dense: Tensor) -> Tensor:
    """(a @ dense.T)[rows[e], cols[e]] for a [B, d], dense [n, d] -> [E] (grad of decoded values)."""
    out = a.new_empty(rows.shape[0])
    _C.sampled_dense_dot(numpy_view(rows.contiguous()), numpy_view(cols.contiguous()), numpy_view(a.contiguous()),
                         numpy_view(dense.contiguous()), numpy_view(out))
    return out


@sampled_dense_dot_cpu.register_fake
def _(rows, cols, a, dense):
    return a.new_empty(rows.shape[0])
