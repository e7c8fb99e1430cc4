"""sparse_decode on the C++ path (TopK codes and COO codes alike), as torch.library custom ops
(namespace ``sparsekit``) with autograd, as ``sparsekit.kernels.decode`` is on the Triton path.

Forward: y = S @ W_dec + b_dec for COO codes S, gathering the kept rows of W_dec. Backward: grad
values and grad W_dec in one pass over the latents when both are needed (``sparse_decode_backward_cpu``),
else one of the sparse products (``sparse``); grad b_dec = column sums of grad_y. Fake kernel and
saved tensors: ``sparsekit.ops.autograd`` (shared with the Triton backend). Inputs are assumed
checked by ``sparsekit.ops``; outputs are allocated here and handed to ``sparsekit._C`` as
zero-copy NumPy views.
"""
from __future__ import annotations

import torch
from torch import Tensor

from sparsekit.ops.autograd import register_sparse_decode
from sparsekit.ops.backend import _C

from .gemm import empty_output, matmul, numpy_view
from .sparse import coo_t_times_dense_cpu, sampled_dense_dot_cpu


@torch.library.custom_op("sparsekit::sparse_decode_backward_cpu", mutates_args=())
def sparse_decode_backward_cpu(values: Tensor, rows: Tensor, cols: Tensor, grad_y: Tensor,
                               W_dec: Tensor) -> tuple[Tensor, Tensor]:
    """Both decode gradients in one pass over the latents: grad values [E] (the dot products of
    sampled_dense_dot_cpu) and grad W_dec [n, d] (coo_t_times_dense_cpu's sum, same order)."""
    grad_values = values.new_empty(values.shape[0])
    grad_W_dec = empty_output(tuple(W_dec.shape), W_dec.dtype)
    _C.decode_backward(numpy_view(values.contiguous()), numpy_view(rows.contiguous()), numpy_view(cols.contiguous()),
                       numpy_view(grad_y.contiguous()), numpy_view(W_dec.contiguous()), numpy_view(grad_values),
                       numpy_view(grad_W_dec))
    return grad_values, grad_W_dec


@sparse_decode_backward_cpu.register_fake
def _(values, rows, cols, grad_y, W_dec):
    return values.new_empty(values.shape[0]), W_dec.new_empty(W_dec.shape)


@torch.library.custom_op("sparsekit::sparse_decode_cpu", mutates_args=())
def sparse_decode_cpu(values: Tensor, rows: Tensor, cols: Tensor, W_dec: Tensor, b_dec: Tensor,
                      batch_size: int) -> Tensor:
    """y = S @ W_dec + b_dec for COO codes S [batch_size, n]: gathers the kept rows of W_dec, one
    pass writing each output row once (the bias added as the row is written). Codes in row order
    (TopK's, BatchTopK's, the sparse ReLU's) are read in place; others are first bucketed by row."""
    out = empty_output((batch_size, W_dec.shape[1]), W_dec.dtype)
    _C.coo_times_dense(numpy_view(values.contiguous()), numpy_view(rows.contiguous()), numpy_view(cols.contiguous()),
                       numpy_view(W_dec.contiguous()), numpy_view(out), numpy_view(b_dec.contiguous()))
    return out


def _decode_backward(ctx, grad_y):
    values, rows, cols, W_dec = ctx.saved_tensors
    grad_values = grad_W_dec = grad_b_dec = None
    if ctx.needs_input_grad[0] and ctx.needs_input_grad[3]:
        grad_values, grad_W_dec = sparse_decode_backward_cpu(values, rows, cols, grad_y, W_dec)
    elif ctx.needs_input_grad[0]:
        grad_values = sampled_dense_dot_cpu(rows, cols, grad_y, W_dec)
    elif ctx.needs_input_grad[3]:
        grad_W_dec, _ = coo_t_times_dense_cpu(values, rows, cols, grad_y, W_dec.shape[0], False)
    if ctx.needs_input_grad[4]:
        grad_b_dec = grad_y.sum(0)
    return grad_values, None, None, grad_W_dec, grad_b_dec, None


register_sparse_decode(sparse_decode_cpu, _decode_backward)


# --- dense codes of a few latents (AuxK keeping most dead latents) --------------------------------

@torch.library.custom_op("sparsekit::dense_decode_cpu", mutates_args=())
def dense_decode_cpu(codes: Tensor, W_dec: Tensor, latents: Tensor) -> Tensor:
    """codes [B, m] @ W_dec[latents] [m, d] -> [B, d], through ``gemm.matmul`` (OpenBLAS on the
    pool for large products)."""
    return matmul(codes, W_dec.index_select(0, latents))


@dense_decode_cpu.register_fake
def _(codes, W_dec, latents):
    return codes.new_empty(codes.shape[0], W_dec.shape[1])


def _dense_decode_setup(ctx, inputs, output):
    codes, W_dec, latents = inputs
    ctx.save_for_backward(codes, W_dec, latents)


def _dense_decode_backward(ctx, grad_y):
    """grad codes = grad_y @ W_dec[L]^T [B, m]; grad W_dec: codes^T @ grad_y [m, d] in rows L of a
    zero [n, d] (a weight gradient, so from the recycled pool of ``empty_output``)."""
    codes, W_dec, latents = ctx.saved_tensors
    grad_codes = grad_W_dec = None
    if ctx.needs_input_grad[0]:
        grad_codes = matmul(grad_y, W_dec.index_select(0, latents).t())
    if ctx.needs_input_grad[1]:
        grad_W_dec = empty_output(tuple(W_dec.shape), W_dec.dtype).zero_()
        grad_W_dec.index_copy_(0, latents, matmul(codes.t(), grad_y))
    return grad_codes, grad_W_dec, None


dense_decode_cpu.register_autograd(_dense_decode_backward, setup_context=_dense_decode_setup)
