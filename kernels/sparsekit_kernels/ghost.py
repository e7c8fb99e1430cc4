"""ghost_grad_loss on the Triton path: the ghost-grads term over dead latents D only.

Forward: exp(pre_D) = exp(x @ W_enc[:, D] + b_enc[D]) by the GEMM with ``exp`` fused, then
g = exp(pre_D) @ W_dec[D]; one program per row computes ||r||, ||g||, the (detached) rescale
||r|| / (2 ||g|| + eps) and the row's squared error. Nothing is [B, n]: every intermediate is
[B, |D|] or [B, d], so the cost grows with |D| (padded to a multiple of 64: ``padded_dead``).
Backward: grad g = c * (g * scale - r) * scale per row (c = 2 * grad * mse_main / (L + eps) / B, kept
on the device: no host sync), grad pre_D = (grad g @ W_dec[D].T) * exp(pre_D) (the ``mul`` epilogue),
then grad x, grad W_enc[:, D] and grad b_enc[D], scattered into full-size gradients by
``sparsekit.ops.autograd.register_ghost`` (shared with the C++ backend).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from sparsekit.ops.autograd import register_ghost

from ._config import fixed
from .gemm import gemm


@triton.jit
def _ghost_rows_kernel(ghost_ptr, residual_ptr, scale_ptr, error_ptr, D, eps, BLOCK_D: tl.constexpr):
    """Per row: scale = ||r|| / (2 ||g|| + eps), error = ||g * scale - r||^2."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    g2 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    r2 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ok = d0 + offs < D
        g = tl.load(ghost_ptr + row * D + d0 + offs, mask=ok, other=0.0).to(tl.float32)
        r = tl.load(residual_ptr + row * D + d0 + offs, mask=ok, other=0.0).to(tl.float32)
        g2 += g * g
        r2 += r * r
    scale = tl.sqrt(tl.sum(r2)) / (2 * tl.sqrt(tl.sum(g2)) + eps)
    err = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ok = d0 + offs < D
        g = tl.load(ghost_ptr + row * D + d0 + offs, mask=ok, other=0.0).to(tl.float32)
        r = tl.load(residual_ptr + row * D + d0 + offs, mask=ok, other=0.0).to(tl.float32)
        diff = g * scale - r
        err += diff * diff
    tl.store(scale_ptr + row, scale)
    tl.store(error_ptr + row, tl.sum(err))


@triton.jit
def _ghost_rows_backward_kernel(ghost_ptr, residual_ptr, scale_ptr, coefficient_ptr, out_ptr, D,
                                BLOCK_D: tl.constexpr):
    """grad g = coefficient * (g * scale - r) * scale, per row."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    scale = tl.load(scale_ptr + row)
    coefficient = tl.load(coefficient_ptr).to(tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ok = d0 + offs < D
        g = tl.load(ghost_ptr + row * D + d0 + offs, mask=ok, other=0.0).to(tl.float32)
        r = tl.load(residual_ptr + row * D + d0 + offs, mask=ok, other=0.0).to(tl.float32)
        grad = coefficient * (g * scale - r) * scale
        tl.store(out_ptr + row * D + d0 + offs, grad.to(out_ptr.dtype.element_ty), mask=ok)


_ROWS = dict(BLOCK_D=1024, num_warps=4), dict(BLOCK_D=16, num_warps=1)

# The dead columns are padded to a multiple of DEAD_MULTIPLE: a ragged count (|D| = 37) made every
# GEMM here ragged (leading strides not a multiple of 16: no vectorised, pipelined loads, and every
# config spilled, up to 3.7 KB per thread for bf16 on sm_90; bench/aot_compile.py). Padding columns
# have W_enc = 0 and b_enc = -inf, so exp(pre) = 0 there, and W_dec rows of 0: the products over
# the real columns are the same sums (a masked K tail loads zeros too), the padding's share is 0.
DEAD_MULTIPLE = 64


def padded_dead(W_enc: Tensor, b_enc: Tensor | None, W_dec: Tensor, dead_idx: Tensor) -> tuple:
    """(W_enc[:, D] [d, P], b_enc[D] [P] (-inf in the padding) or None, W_dec[D] [P, d]), P = |D| rounded
    up to DEAD_MULTIPLE, the padding zero."""
    n_dead = dead_idx.shape[0]
    width = -(-n_dead // DEAD_MULTIPLE) * DEAD_MULTIPLE
    enc = W_enc.new_zeros(W_enc.shape[0], width)
    enc[:, :n_dead] = W_enc.index_select(1, dead_idx)
    dec = W_dec.new_zeros(width, W_dec.shape[1])
    dec[:n_dead] = W_dec.index_select(0, dead_idx)
    bias = None
    if b_enc is not None:
        bias = b_enc.new_full((width,), float("-inf"))
        bias[:n_dead] = b_enc.index_select(0, dead_idx)
    return enc, bias, dec


@torch.library.custom_op("sparsekit::ghost_grad_loss_triton", mutates_args=())
def ghost_grad_loss_triton(x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, dead_idx: Tensor,
                           residual: Tensor, mse_main: Tensor,
                           eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, the unscaled loss L, exp(pre_D) [B, P] (|D| padded to P, zeros there), g [B, d], scale [B]
    float32); dead_idx non-empty."""
    enc, bias, dec = padded_dead(W_enc, b_enc, W_dec, dead_idx)
    exp_pre = gemm(x, enc, bias, "exp")
    ghost = gemm(exp_pre, dec)
    residual = residual.contiguous()
    batch, width = ghost.shape
    scale = torch.empty(batch, dtype=torch.float32, device=x.device)
    row_error = torch.empty(batch, dtype=torch.float32, device=x.device)
    _ghost_rows_kernel[(batch,)](ghost, residual, scale, row_error, width, eps, **fixed(*_ROWS))
    raw_loss = row_error.mean().to(x.dtype)
    return raw_loss * (mse_main / (raw_loss + eps)), raw_loss, exp_pre, ghost, scale


@torch.library.custom_op("sparsekit::ghost_grad_loss_backward_triton", mutates_args=())
def ghost_grad_loss_backward_triton(grad: Tensor, x: Tensor, W_enc: Tensor, W_dec: Tensor, dead_idx: Tensor,
                                    residual: Tensor, mse_main: Tensor, raw_loss: Tensor, exp_pre: Tensor,
                                    ghost: Tensor, scale: Tensor, eps: float,
                                    need_grad_x: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(grad x [B, d] (empty [0, d] unless need_grad_x), grad W_enc[:, D] [d, |D|], grad b_enc[D]
    [|D|]); scale and loss factor constant."""
    coefficient = (grad * mse_main / (raw_loss + eps) * (2.0 / x.shape[0])).float().reshape(1)
    grad_ghost = torch.empty_like(ghost)
    batch, width = ghost.shape
    _ghost_rows_backward_kernel[(batch,)](ghost, residual.contiguous(), scale, coefficient, grad_ghost, width,
                                          **fixed(*_ROWS))
    enc, _, dec = padded_dead(W_enc, None, W_dec, dead_idx)
    grad_pre = gemm(grad_ghost, dec.t(), epilogue="mul", aux=exp_pre)  # [B, P]: 0 in the padding
    grad_x = gemm(grad_pre, enc.t()) if need_grad_x else x.new_empty(0, x.shape[1])
    n_dead = dead_idx.shape[0]
    return grad_x, gemm(x.t(), grad_pre)[:, :n_dead].contiguous(), grad_pre.sum(0)[:n_dead].contiguous()


register_ghost(ghost_grad_loss_triton, ghost_grad_loss_backward_triton, scale_dtype=torch.float32,
               dead_multiple=DEAD_MULTIPLE)
