"""ghost_grad_loss on the C++ path: the ghost-grads term over dead latents D only, as torch.library
custom ops (namespace ``sparsekit``), as ``sparsekit.kernels.ghost`` is on the Triton path.

Forward: GEMMs on the gathered columns, the per-row rescale and squared error fused in C++; every
intermediate is [B, |D|] or [B, d], never [B, n]. The fake kernels and the autograd that scatters
the dead columns' gradients into full-size ones are ``sparsekit.ops.autograd.register_ghost``'s
(shared with the Triton backend). Inputs are assumed checked by ``sparsekit.ops``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from sparsekit.ops.autograd import register_ghost
from sparsekit.ops.backend import _C

from .gemm import empty_output, matmul, numpy_view


@torch.library.custom_op("sparsekit::ghost_grad_loss_cpu", mutates_args=())
def ghost_grad_loss_cpu(x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, dead_idx: Tensor,
                        residual: Tensor, mse_main: Tensor,
                        eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The ghost-grads term over dead latents D only (see reference.ghost_grad_loss): GEMMs on the
    gathered columns, the per-row rescale and squared error fused in C++. Every intermediate is
    [B, |D|] or [B, d], never [B, n]; dead_idx must be non-empty.

    Returns (loss, the unscaled loss L, exp(pre_D) [B, |D|], the rescaled ghost g [B, d], the
    per-row scale [B]): the public op keeps the first, the backward reuses the rest.
    """
    exp_pre = matmul(x, W_enc.index_select(1, dead_idx)).add_(b_enc.index_select(0, dead_idx)).exp_()
    ghost = matmul(exp_pre, W_dec.index_select(0, dead_idx))
    scale, row_error = x.new_empty(x.shape[0]), x.new_empty(x.shape[0])
    _C.ghost_rescale(numpy_view(ghost), numpy_view(residual.contiguous()), eps, numpy_view(scale),
                     numpy_view(row_error))
    raw_loss = row_error.mean()
    return raw_loss * (mse_main / (raw_loss + eps)), raw_loss, exp_pre, ghost, scale


@torch.library.custom_op("sparsekit::ghost_grad_loss_backward_cpu", mutates_args=())
def ghost_grad_loss_backward_cpu(grad: Tensor, x: Tensor, W_enc: Tensor, W_dec: Tensor, dead_idx: Tensor,
                                 residual: Tensor, mse_main: Tensor, raw_loss: Tensor, exp_pre: Tensor,
                                 ghost: Tensor, scale: Tensor, eps: float, need_grad_x: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(grad x [B, d] (empty [0, d] unless need_grad_x), grad W_enc[:, D] [d, |D|], grad b_enc[D]
    [|D|]) from the forward's saved terms; the scale and the loss factor are constants, as in the
    reference."""
    coefficient = float(grad * mse_main / (raw_loss + eps)) * 2 / x.shape[0]
    grad_ghost = torch.empty_like(ghost)
    _C.ghost_rescale_backward(numpy_view(ghost), numpy_view(residual.contiguous()), numpy_view(scale), coefficient,
                              numpy_view(grad_ghost))
    grad_pre = matmul(grad_ghost, W_dec.index_select(0, dead_idx).t()).mul_(exp_pre)
    grad_x = matmul(grad_pre, W_enc.index_select(1, dead_idx).t()) if need_grad_x else x.new_empty(0, x.shape[1])
    return grad_x, matmul(x.t(), grad_pre), grad_pre.sum(0)


register_ghost(ghost_grad_loss_cpu, ghost_grad_loss_backward_cpu)


# --- the ghost term from the dead latents' pre-activations (the encoder's pass computed them) -----

@torch.library.custom_op("sparsekit::ghost_from_pre_cpu", mutates_args=())
def ghost_from_pre_cpu(pre_dead: Tensor, W_dec_dead: Tensor, residual: Tensor, mse_main: Tensor,
                       eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """ghost_grad_loss_cpu given pre_dead = pre[:, D] [B, |D|] and W_dec_dead = W_dec[D] [|D|, d]
    (detached): no encoder GEMM. Returns (loss, L, exp(pre_dead), the rescaled ghost g, the scale)."""
    exp_pre = torch.exp(pre_dead, out=empty_output(tuple(pre_dead.shape), pre_dead.dtype))  # recycled pages
    ghost = matmul(exp_pre, W_dec_dead)
    scale, row_error = pre_dead.new_empty(pre_dead.shape[0]), pre_dead.new_empty(pre_dead.shape[0])
    _C.ghost_rescale(numpy_view(ghost), numpy_view(residual.contiguous()), eps, numpy_view(scale),
                     numpy_view(row_error))
    raw_loss = row_error.mean()
    return raw_loss * (mse_main / (raw_loss + eps)), raw_loss, exp_pre, ghost, scale


@ghost_from_pre_cpu.register_fake
def _(pre_dead, W_dec_dead, residual, mse_main, eps):
    batch = pre_dead.shape[0]
    scalar = pre_dead.new_empty(())
    return scalar, scalar.clone(), pre_dead.new_empty(pre_dead.shape), residual.new_empty(residual.shape), \
        pre_dead.new_empty(batch)


def _ghost_from_pre_setup(ctx, inputs, output):
    _, W_dec_dead, residual, mse_main, eps = inputs
    _, raw_loss, exp_pre, ghost, scale = output
    ctx.eps = eps
    ctx.set_materialize_grads(False)  # outputs 2-5 are private: no [B, |D|] of zeros for their gradients
    ctx.save_for_backward(W_dec_dead, residual, mse_main, raw_loss, exp_pre, ghost, scale)


def _ghost_from_pre_backward(ctx, grad, grad_raw, grad_exp, grad_ghost_out, grad_scale):
    """grad pre_dead = ((coefficient * scale * (g - r)) @ W_dec_dead^T) * exp(pre_dead), the scale
    and the loss factor constants, as in the reference; the row epilogue in C++."""
    W_dec_dead, residual, mse_main, raw_loss, exp_pre, ghost, scale = ctx.saved_tensors
    if grad is None:
        return None, None, None, None, None
    coefficient = float(grad * mse_main / (raw_loss + ctx.eps)) * 2 / exp_pre.shape[0]
    grad_ghost = torch.empty_like(ghost)
    _C.ghost_rescale_backward(numpy_view(ghost), numpy_view(residual.contiguous()), numpy_view(scale), coefficient,
                              numpy_view(grad_ghost))
    return matmul(grad_ghost, W_dec_dead.t()).mul_(exp_pre), None, None, None, None


ghost_from_pre_cpu.register_autograd(_ghost_from_pre_backward, setup_context=_ghost_from_pre_setup)
