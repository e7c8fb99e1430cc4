"""sparse_decode on the Triton path (TopK codes and COO codes alike), as custom ops with autograd.

Forward: y[r] = sum over the entries of row r of values[e] * W_dec[cols[e]] + b_dec, gathering the
kept rows of W_dec (``sparse.coo_times_dense``; COO rows in any order are sorted first, stably).
Backward: grad values[e] = grad_y[rows[e]] . W_dec[cols[e]] and grad W_dec = S.T @ grad_y, by default
in one deterministic pass by latent segments (``sparse.segment_sums_and_dots``: each latent's row of
W_dec read once for all its entries' dot products); with float32 atomics for grad W_dec
(SPARSEKIT_DETERMINISTIC=0), or only one of the two asked for, grad values by ``sparse.sampled_dot``
(dense x dense sampled at the active positions only); grad b_dec = column sums of grad_y.
Fake kernel and saved tensors: ``sparsekit.ops.autograd`` (shared with the C++ backend).
"""
from __future__ import annotations

import torch
from torch import Tensor

from sparsekit.ops.autograd import register_sparse_decode

from .encode import deterministic
from .sparse import coo_t_times_dense, coo_times_dense, sampled_dot, segment_sums_and_dots


@torch.library.custom_op("sparsekit::sparse_decode_triton", mutates_args=())
def sparse_decode_triton(values: Tensor, rows: Tensor, cols: Tensor, W_dec: Tensor, b_dec: Tensor,
                         batch_size: int, rows_sorted: bool) -> Tensor:
    """values, rows, cols [E]; W_dec [n, d_out]; b_dec [d_out] -> [batch_size, d_out]."""
    return coo_times_dense(values, rows, cols, W_dec, batch_size, rows_sorted, bias=b_dec)


@torch.library.custom_op("sparsekit::sparse_decode_backward_triton", mutates_args=())
def sparse_decode_backward_triton(values: Tensor, rows: Tensor, cols: Tensor, grad_y: Tensor, W_dec: Tensor,
                                  need_values: bool, need_W: bool, deterministic: bool) -> tuple[Tensor, Tensor]:
    """(grad values [E], grad W_dec [n, d_out]); an output not asked for is empty."""
    grad_y = grad_y.contiguous()
    if need_values and need_W and deterministic:  # one pass by latent: each row of W_dec read once
        grad_W, grad_values = segment_sums_and_dots(values, rows, cols, grad_y, W_dec)
        return grad_values.to(values.dtype), grad_W
    grad_values = sampled_dot(rows, cols, grad_y, W_dec) if need_values else values.new_empty(0)
    grad_W = values.new_empty(0)
    if need_W:
        grad_W, _ = coo_t_times_dense(values, rows, cols, grad_y, W_dec.shape[0], False, deterministic)
    return grad_values, grad_W


@sparse_decode_backward_triton.register_fake
def _(values, rows, cols, grad_y, W_dec, need_values, need_W, deterministic):
    return (values.new_empty(values.shape) if need_values else values.new_empty(0),
            W_dec.new_empty(W_dec.shape) if need_W else values.new_empty(0))


def _decode_backward(ctx, grad_y):
    values, rows, cols, W_dec = ctx.saved_tensors
    need_values, need_W = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
    grad_values = grad_W = grad_b = None
    if need_values or need_W:
        grad_values, grad_W = sparse_decode_backward_triton(values, rows, cols, grad_y, W_dec, need_values, need_W,
                                                            deterministic())
    if ctx.needs_input_grad[4]:
        grad_b = grad_y.sum(0)
    return (grad_values if need_values else None, None, None, grad_W if need_W else None, grad_b, None, None)


register_sparse_decode(sparse_decode_triton, _decode_backward)
