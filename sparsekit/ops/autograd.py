"""Autograd wiring shared by the backends' custom ops: what each op saves, its fake kernel, its backward.

Both fast backends (C++ in ``sparsekit.ops.cpu``, Triton in ``sparsekit.kernels``) define every
forward and backward kernel as a ``torch.library`` custom op; what differs between them is only the
kernels. Each backend registers its forward ops here, passing the backend's own backward kernels:

- ``register_topk(op, sparse_encoder_backward)``, ``register_batchtopk(op, sparse_encoder_backward)``:
  the sparse encoders' fake kernels and autograd. Backward takes the gradient of the kept entries
  (ReLU after selection: only positive kept values pass it) and hands it, as COO [E] with its
  rows and cols, to ``sparse_encoder_backward(ctx, grad_kept, rows, cols, x, W_enc)``, which returns
  (grad x [B, d], grad W_enc [d, n], grad b_enc [n]), None where ``ctx.needs_input_grad`` says so.
- ``register_relu(op, backward)``, ``register_jumprelu(op, backward)``,
  ``register_sparse_decode(op, backward)``: fake kernel and saved tensors (``ctx.saved_tensors``
  as listed in each); the backward, which each backend fuses its own way, is the backend's.
- ``register_ghost(op, backward_op, scale_dtype)``: ghost_grad_loss's fake kernels (forward and
  backward op) and its autograd, the backward op giving gradients for the dead latents' columns
  only, which are scattered into full-size W_enc / b_enc gradients here.

Op signatures (each backend's forward ops take these arguments, in this order):
topk/batchtopk (x, W_enc, b_enc, k); relu (x, W_enc, b_enc); jumprelu (x, W_enc, b_enc,
log_threshold, bandwidth) -> (out, pre); sparse_decode (values, rows, cols, W_dec, b_dec,
batch_size, *backend flags); ghost (x, W_enc, b_enc, W_dec, dead_idx, residual, mse_main, eps)
-> (loss, raw loss, exp(pre_D) [B, |D|] (Triton: |D| padded to a multiple of 64), ghost [B, d],
scale [B]).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

# sparse_encoder_backward(ctx, grad_kept [E], rows [E], cols [E], x, W_enc) -> (grad x, grad W_enc, grad b_enc)
SparseEncoderBackward = Callable[..., tuple]


def kept_rows(batch_size: int, k: int, device=None) -> Tensor:
    """The row of each entry of [B, k] TopK codes flattened to COO: [B*k] int64."""
    return torch.arange(batch_size, device=device).repeat_interleave(k)


# --- sparse encoders ------------------------------------------------------------------------------

def _topk_fake(x, W_enc, b_enc, k):
    return x.new_empty(x.shape[0], k), x.new_empty(x.shape[0], k, dtype=torch.int64)


def _topk_setup(ctx, inputs, output):
    x, W_enc, _, _ = inputs
    values, indices = output
    ctx.save_for_backward(x, W_enc, values, indices)


def register_topk(op, sparse_encoder_backward: SparseEncoderBackward) -> None:
    """op(x, W_enc, b_enc, k) -> (values [B, k], indices [B, k] int64)."""

    def backward(ctx, grad_values, grad_indices):
        x, W_enc, values, indices = ctx.saved_tensors
        grad_kept = (grad_values * (values > 0)).reshape(-1)  # ReLU after selection
        rows = kept_rows(x.shape[0], values.shape[1], x.device)
        return (*sparse_encoder_backward(ctx, grad_kept, rows, indices.reshape(-1), x, W_enc), None)

    op.register_fake(_topk_fake)
    op.register_autograd(backward, setup_context=_topk_setup)


def _batchtopk_fake(x, W_enc, b_enc, k):
    m = x.shape[0] * k
    return x.new_empty(m), x.new_empty(m, dtype=torch.int64), x.new_empty(m, dtype=torch.int64)


def _batchtopk_setup(ctx, inputs, output):
    x, W_enc, _, _ = inputs
    values, rows, cols = output
    ctx.save_for_backward(x, W_enc, values, rows, cols)


def register_batchtopk(op, sparse_encoder_backward: SparseEncoderBackward) -> None:
    """op(x, W_enc, b_enc, k) -> (values, rows, cols), each [B*k] (rows, cols int64)."""

    def backward(ctx, grad_values, grad_rows, grad_cols):
        x, W_enc, values, rows, cols = ctx.saved_tensors
        return (*sparse_encoder_backward(ctx, grad_values * (values > 0), rows, cols, x, W_enc), None)

    op.register_fake(_batchtopk_fake)
    op.register_autograd(backward, setup_context=_batchtopk_setup)


# --- dense encoders -------------------------------------------------------------------------------

def _relu_fake(x, W_enc, b_enc):
    return x.new_empty(x.shape[0], W_enc.shape[1])


def _relu_setup(ctx, inputs, output):
    x, W_enc, _ = inputs
    ctx.save_for_backward(x, W_enc, output)


def register_relu(op, backward: Callable) -> None:
    """op(x, W_enc, b_enc) -> [B, n]; backward(ctx, grad_out) finds (x, W_enc, out) saved."""
    op.register_fake(_relu_fake)
    op.register_autograd(backward, setup_context=_relu_setup)


def _jumprelu_fake(x, W_enc, b_enc, log_threshold, bandwidth):
    shape = (x.shape[0], W_enc.shape[1])
    return x.new_empty(shape), x.new_empty(shape)


def _jumprelu_setup(ctx, inputs, output):
    x, W_enc, _, log_threshold, bandwidth = inputs
    ctx.bandwidth = bandwidth
    ctx.set_materialize_grads(False)  # the second output (pre) is private: usually no gradient
    ctx.save_for_backward(x, W_enc, log_threshold, output[1])


def register_jumprelu(op, backward: Callable) -> None:
    """op(x, W_enc, b_enc, log_threshold, bandwidth) -> (out, pre), both [B, n]; backward(ctx,
    grad_out, grad_pre) finds (x, W_enc, log_threshold, pre) saved and ctx.bandwidth; either
    gradient may be None (grads are not materialised)."""
    op.register_fake(_jumprelu_fake)
    op.register_autograd(backward, setup_context=_jumprelu_setup)


# --- sparse_decode --------------------------------------------------------------------------------

def _decode_fake(values, rows, cols, W_dec, b_dec, batch_size, *backend_flags):
    return W_dec.new_empty(batch_size, W_dec.shape[1])


def _decode_setup(ctx, inputs, output):
    values, rows, cols, W_dec = inputs[:4]
    ctx.save_for_backward(values, rows, cols, W_dec)


def register_sparse_decode(op, backward: Callable) -> None:
    """op(values, rows, cols, W_dec, b_dec, batch_size, *backend flags) -> [batch_size, d_out];
    backward(ctx, grad_y) finds (values, rows, cols, W_dec) saved."""
    op.register_fake(_decode_fake)
    op.register_autograd(backward, setup_context=_decode_setup)


# --- ghost_grad_loss ------------------------------------------------------------------------------

def _ghost_backward_fake(grad, x, W_enc, W_dec, dead_idx, residual, mse_main, raw_loss, exp_pre, ghost, scale, eps,
                         need_grad_x):
    n_dead = dead_idx.shape[0]
    grad_x = x.new_empty(x.shape) if need_grad_x else x.new_empty(0, x.shape[1])
    return grad_x, x.new_empty(x.shape[1], n_dead), x.new_empty(n_dead)


def _ghost_setup(ctx, inputs, output):
    x, W_enc, _, W_dec, dead_idx, residual, mse_main, eps = inputs
    _, raw_loss, exp_pre, ghost, scale = output
    ctx.eps = eps
    ctx.save_for_backward(x, W_enc, W_dec, dead_idx, residual, mse_main, raw_loss, exp_pre, ghost, scale)


def register_ghost(op, backward_op, scale_dtype: torch.dtype | None = None, dead_multiple: int = 1) -> None:
    """op as in the module docstring (``scale`` in ``scale_dtype``, or x's dtype when None; exp(pre_D)
    [B, |D| rounded up to a multiple of ``dead_multiple``]: a backend may pad the dead columns);
    backward_op(grad, x, W_enc, W_dec, dead_idx, residual, mse_main, raw_loss, exp_pre, ghost,
    scale, eps, need_grad_x) -> (grad x [B, d], or [0, d] when not need_grad_x (a training step's
    x needs none: one [B, |D|] x [|D|, d] GEMM saved), grad W_enc[:, D] [d, |D|], grad b_enc[D] [|D|])."""

    def fake(x, W_enc, b_enc, W_dec, dead_idx, residual, mse_main, eps):
        batch = x.shape[0]
        width = -(-dead_idx.shape[0] // dead_multiple) * dead_multiple
        return (x.new_empty(()), x.new_empty(()), x.new_empty(batch, width), x.new_empty(residual.shape),
                x.new_empty(batch, dtype=scale_dtype or x.dtype))

    def backward(ctx, grad, *unused_grads):
        x, W_enc, W_dec, dead_idx, residual, mse_main, raw_loss, exp_pre, ghost, scale = ctx.saved_tensors
        grad_x, grad_dead_cols, grad_dead_bias = backward_op(
            grad, x, W_enc, W_dec, dead_idx, residual, mse_main, raw_loss, exp_pre, ghost, scale, ctx.eps,
            ctx.needs_input_grad[0])
        grad_W_enc = grad_b_enc = None  # full-size zeros only when asked for: the rest of W_enc gets none
        if ctx.needs_input_grad[1]:
            grad_W_enc = torch.zeros_like(W_enc).index_copy_(1, dead_idx, grad_dead_cols)
        if ctx.needs_input_grad[2]:
            grad_b_enc = torch.zeros_like(W_enc[0]).index_copy_(0, dead_idx, grad_dead_bias)
        return (grad_x if ctx.needs_input_grad[0] else None, grad_W_enc, grad_b_enc,
                None, None, None, None, None)

    op.register_fake(fake)
    backward_op.register_fake(_ghost_backward_fake)
    op.register_autograd(backward, setup_context=_ghost_setup)


class _BiasCarryingPreBias(torch.autograd.Function):
    """b_enc unchanged in value; its gradient g also gives pre_bias -W_enc @ g (see centered_input)."""

    @staticmethod
    def forward(ctx, b_enc: Tensor, pre_bias: Tensor, W_enc: Tensor) -> Tensor:
        ctx.save_for_backward(W_enc)
        return b_enc.view_as(b_enc)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (W_enc,) = ctx.saved_tensors
        grad_pre_bias = -(W_enc @ grad) if ctx.needs_input_grad[1] else None
        return grad, grad_pre_bias, None


def centered_input(x: Tensor, W_enc: Tensor, b_enc: Tensor, pre_bias: Tensor) -> tuple[Tensor, Tensor]:
    """(x - pre_bias, b_enc) for an encoder of x - pre_bias, with pre_bias's gradient carried by the
    bias: pre = (x - p) @ W + b, so dL/dp = -sum over rows of dL/d(x - p) = -W @ (dL/db), one
    matrix-vector product over W_enc. The other ways cost more on a GPU: folding p into the bias,
    b - p @ W, gives W_enc a dense [d, n] outer-product gradient (-p ⊗ dL/db, written and added to
    the sparse one: ~4 passes over [d, n]); differentiating through x - p needs grad x, a gathered
    S @ W.T over a transposed copy of W_enc. Here W_enc's gradient is the encoder's own (x - p)^T S
    and x's is the encoder's grad x (asked for only when x requires grad) [B, d] -> ([B, d], [n])."""
    return x - pre_bias.detach(), _BiasCarryingPreBias.apply(b_enc, pre_bias, W_enc.detach())
