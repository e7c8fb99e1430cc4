"""The encoders on the Triton path, as torch.library custom ops with autograd (namespace ``sparsekit``).

- ``topk_encode_triton``:      the GEMM with the per-row top-k fused into its epilogue (fused_topk.py;
  SPARSEKIT_GPU_TOPK), or GEMM + bias (gemm.py), then per-row radix top-k (select.py), ReLU.
- ``batchtopk_encode_triton``: GEMM + bias, global radix selection of the B*k largest relu(pre).
  Both, in float32, may instead take the bf16 screen (``screen.py``, SPARSEKIT_GPU_BF16_SCREEN):
  the same codes from a tensor-core GEMM and an exact float32 recompute of a few candidates.
- ``relu_encode_triton`` / ``jumprelu_encode_triton``: GEMM with the activation fused in its epilogue.

Backward: the sparse encoders go through the B*k kept entries only (``sparse_encoder_backward_triton``:
grad x = S @ W_enc.T by row segments, grad W_enc = x.T @ S and grad b_enc by column segments, or
atomics when SPARSEKIT_DETERMINISTIC=0); the dense encoders mask the incoming gradient in one
column-strip kernel (which also sums grad b_enc and the JumpReLU threshold gradient) and run two GEMMs.
Each forward and backward kernel is its own custom op (a backward registered with
``register_autograd`` may not touch data pointers), as in ``sparsekit.ops.cpu.encode``; the fake kernels,
saved tensors and the sparse encoders' backward formula are ``sparsekit.ops.autograd``'s,
shared with the C++ backend.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from sparsekit.ops.autograd import register_batchtopk, register_jumprelu, register_relu, register_topk

from . import fused_topk, screen
from ._config import fixed
from .gemm import gemm
from .select import batch_topk, topk_rows
from .sparse import coo_t_times_dense, coo_times_dense


def deterministic() -> bool:
    """Deterministic sparse gradients (sorted segment sums) unless SPARSEKIT_DETERMINISTIC=0 (atomics)."""
    return os.environ.get("SPARSEKIT_DETERMINISTIC", "1").strip() != "0"


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


# --- the sparse encoders' backward --------------------------------------------------------------

@torch.library.custom_op("sparsekit::sparse_encoder_backward_triton", mutates_args=())
def sparse_encoder_backward_triton(grad_kept: Tensor, rows: Tensor, cols: Tensor, x: Tensor, W_enc: Tensor,
                                   need_x: bool, need_weights: bool,
                                   deterministic: bool) -> tuple[Tensor, Tensor, Tensor]:
    """From the gradient of the kept pre-activations [E] at (rows, cols), rows sorted:
    (grad x [B, d] = S @ W_enc.T, grad W_enc [d, n] = x.T @ S, grad b_enc [n] = column sums of S);
    an output not asked for is empty."""
    grad_x = grad_W = grad_b = _empty(x)
    if need_x:
        # Each kept entry gathers a row of W_enc.T: a column of W_enc, n elements apart along d when read
        # in place (one 32-byte sector per element: 8-16x the bytes). One transposed copy, [n, d]
        # contiguous, costs two passes over W_enc and makes every gather coalesced; the sums and their
        # order are unchanged (the segment sum adds entry by entry).
        W_rows = W_enc.t() if W_enc.stride(0) == 1 else W_enc.t().contiguous()
        grad_x = coo_times_dense(grad_kept, rows, cols, W_rows, x.shape[0], rows_sorted=True)
    if need_weights:
        grad_W, grad_b = coo_t_times_dense(grad_kept, rows, cols, x, W_enc.shape[1], True, deterministic)
    return grad_x, grad_W, grad_b


@sparse_encoder_backward_triton.register_fake
def _(grad_kept, rows, cols, x, W_enc, need_x, need_weights, deterministic):
    empty = x.new_empty(0)
    return (x.new_empty(x.shape) if need_x else empty, W_enc.new_empty(W_enc.shape) if need_weights else empty,
            W_enc.new_empty(W_enc.shape[1]) if need_weights else empty)


def _sparse_backward(ctx, grad_kept: Tensor, rows: Tensor, cols: Tensor, x: Tensor, W_enc: Tensor):
    need_x = ctx.needs_input_grad[0]
    need_weights = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    grad_x, grad_W, grad_b = sparse_encoder_backward_triton(grad_kept, rows, cols, x, W_enc, need_x, need_weights,
                                                            deterministic())
    return (grad_x if need_x else None, grad_W if ctx.needs_input_grad[1] else None,
            grad_b if ctx.needs_input_grad[2] else None)


# --- topk_encode ------------------------------------------------------------------------------

@torch.library.custom_op("sparsekit::topk_encode_triton", mutates_args=())
def topk_encode_triton(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """x [B, d], W_enc [d, n], b_enc [n] -> values [B, k] (descending), indices [B, k] int64."""
    if screen.use_screen(x, W_enc, k):
        screened = screen.topk_encode_screened(x, W_enc, b_enc, k)
        if screened is not None:
            return screened
    if fused_topk.use_fused(x, W_enc, k):
        return fused_topk.topk_encode_fused(x, W_enc, b_enc, k)
    return topk_rows(gemm(x, W_enc, b_enc), k)


register_topk(topk_encode_triton, _sparse_backward)


# --- batchtopk_encode -------------------------------------------------------------------------

@torch.library.custom_op("sparsekit::batchtopk_encode_triton", mutates_args=())
def batchtopk_encode_triton(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """-> values, rows, cols, each [B*k], flat (row-major) order; ties: lower flat index."""
    if screen.use_screen(x, W_enc, k):
        screened = screen.batchtopk_encode_screened(x, W_enc, b_enc, k)
        if screened is not None:
            return screened
    return batch_topk(gemm(x, W_enc, b_enc), x.shape[0] * k)


register_batchtopk(batchtopk_encode_triton, _sparse_backward)


# --- dense encoders ---------------------------------------------------------------------------

@triton.jit
def _dense_grad_kernel(grad_out_ptr, saved_ptr, threshold_ptr, grad_pre_ptr, part_bias_ptr, part_window_ptr,
                       B, N, bandwidth, ROWS, JUMP: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per strip of BLOCK_N columns and ROWS rows, walking down its rows in a fixed order:
    grad_pre = grad_out where the unit is on (ReLU: out > 0; JumpReLU: pre > threshold), and the
    strip's partial column sums [row group, N] of grad_pre (for grad b_enc) and, for JumpReLU, of
    grad_out inside the rectangle kernel's window (|pre - theta| < bandwidth / 2)."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    group = tl.program_id(1).to(tl.int64)
    col_ok = cols < N
    if JUMP:
        theta = tl.load(threshold_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    bias_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    window_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    first = group * ROWS
    last = tl.minimum(first + ROWS, B)
    for b0 in range(first, last, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B).to(tl.int64)
        mask = (rows < last)[:, None] & col_ok[None, :]
        offsets = rows[:, None] * N + cols[None, :]
        grad = tl.load(grad_out_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        saved = tl.load(saved_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        if JUMP:
            on = saved > theta[None, :]
            in_window = tl.abs(saved - theta[None, :]) < bandwidth / 2
            window_sum += tl.sum(tl.where(in_window & mask, grad, 0.0), axis=0)
        else:
            on = saved > 0
        grad_pre = tl.where(on, grad, 0.0)
        tl.store(grad_pre_ptr + offsets, grad_pre.to(grad_pre_ptr.dtype.element_ty), mask=mask)
        bias_sum += tl.sum(grad_pre, axis=0)
    tl.store(part_bias_ptr + group * N + cols, bias_sum, mask=col_ok)
    if JUMP:
        tl.store(part_window_ptr + group * N + cols, window_sum, mask=col_ok)


# Rows per program of _dense_grad_kernel: a fixed number, so the column sums' order depends on the
# shapes only. One program per column strip walking all B rows launched n / 128 programs (~2 per SM
# at n = 32k on an H100: too few loads in flight for a pass that only moves memory); with row groups
# of 1,024 there are B / 1,024 times more, and torch adds the groups' partial sums (run to run the same).
DENSE_GRAD_ROWS = 1024


@torch.library.custom_op("sparsekit::dense_encoder_backward_triton", mutates_args=())
def dense_encoder_backward_triton(grad_out: Tensor, x: Tensor, W_enc: Tensor, saved: Tensor, threshold: Tensor,
                                  bandwidth: float, jump: bool, need_x: bool,
                                  need_W: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(grad x, grad W_enc, grad b_enc, grad log_threshold, grad pre) of relu_encode (saved = out)
    or jumprelu_encode (saved = pre, threshold = exp(log_threshold)); unrequested GEMMs are skipped
    (their outputs empty)."""
    grad_out = grad_out.contiguous()
    batch, n = saved.shape
    grad_pre = torch.empty_like(saved)
    # 16 rows a step: with 32 the row groups' bounds made JumpReLU's bodies spill 4-8 B/thread (fp16 on
    # sm_90 with 4 warps, ragged fp32 on sm_80 with 8); at 16 no variant spills (make gpu-check)
    meta = fixed(dict(BLOCK_B=16, BLOCK_N=128, num_warps=4), dict(BLOCK_B=8, BLOCK_N=16, num_warps=1))
    rows = fixed(dict(rows=DENSE_GRAD_ROWS), dict(rows=16))["rows"]
    groups = max(1, triton.cdiv(batch, rows))
    part_bias = torch.empty((groups, n), dtype=torch.float32, device=saved.device)
    part_window = torch.empty((groups, n) if jump else (1, 1), dtype=torch.float32, device=saved.device)
    _dense_grad_kernel[(triton.cdiv(n, meta["BLOCK_N"]), groups)](
        grad_out, saved, threshold if jump else saved, grad_pre, part_bias, part_window, batch, n, bandwidth, rows,
        JUMP=jump, **meta)
    grad_b = part_bias.sum(0).to(saved.dtype)  # torch's reduction over the groups: deterministic
    if jump:
        grad_threshold = (-part_window.sum(0) * threshold.float() * threshold.float() / bandwidth).to(saved.dtype)
    else:
        grad_threshold = saved.new_empty(0)
    grad_x = gemm(grad_pre, W_enc.t()) if need_x else _empty(x)
    grad_W = gemm(x.t(), grad_pre) if need_W else _empty(x)
    return grad_x, grad_W, grad_b, grad_threshold, grad_pre


@dense_encoder_backward_triton.register_fake
def _(grad_out, x, W_enc, saved, threshold, bandwidth, jump, need_x, need_W):
    n = saved.shape[1]
    return (x.new_empty(x.shape) if need_x else x.new_empty(0), W_enc.new_empty(W_enc.shape) if need_W
            else x.new_empty(0), saved.new_empty(n), saved.new_empty(n if jump else 0), torch.empty_like(saved))


@torch.library.custom_op("sparsekit::relu_encode_triton", mutates_args=())
def relu_encode_triton(x: Tensor, W_enc: Tensor, b_enc: Tensor) -> Tensor:
    """relu(x @ W_enc + b_enc) [B, n], the ReLU fused in the GEMM epilogue."""
    return gemm(x, W_enc, b_enc, "relu")


def _relu_backward(ctx, grad_out):
    x, W_enc, out = ctx.saved_tensors
    grad_x, grad_W, grad_b, _, _ = dense_encoder_backward_triton(
        grad_out, x, W_enc, out, out, 1.0, False, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
    return (grad_x if ctx.needs_input_grad[0] else None, grad_W if ctx.needs_input_grad[1] else None,
            grad_b if ctx.needs_input_grad[2] else None)


register_relu(relu_encode_triton, _relu_backward)


@torch.library.custom_op("sparsekit::jumprelu_encode_triton", mutates_args=())
def jumprelu_encode_triton(x: Tensor, W_enc: Tensor, b_enc: Tensor, log_threshold: Tensor,
                           bandwidth: float) -> tuple[Tensor, Tensor]:
    """(pre * (pre > exp(log_threshold)), pre), both [B, n] from one GEMM (the public op keeps the
    first; the threshold's gradient needs pre)."""
    return gemm(x, W_enc, b_enc, "jumprelu", threshold=torch.exp(log_threshold))


def _jumprelu_backward(ctx, grad_out, grad_pre_out):
    x, W_enc, log_threshold, pre = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(pre)
    need_x, need_W = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    extra = grad_pre_out is not None
    grad_x, grad_W, grad_b, grad_threshold, grad_pre = dense_encoder_backward_triton(
        grad_out, x, W_enc, pre, torch.exp(log_threshold), ctx.bandwidth, True,
        need_x and not extra, need_W and not extra)
    if extra:  # the private pre output received a gradient too: it passes straight to pre
        grad_pre = grad_pre + grad_pre_out
        grad_b = grad_b + grad_pre_out.sum(0)
        grad_x = gemm_backward_x(grad_pre, W_enc) if need_x else None
        grad_W = gemm_backward_W(x, grad_pre) if need_W else None
    return (grad_x if need_x else None, grad_W if need_W else None, grad_b if ctx.needs_input_grad[2] else None,
            grad_threshold if ctx.needs_input_grad[3] else None, None)


register_jumprelu(jumprelu_encode_triton, _jumprelu_backward)


@torch.library.custom_op("sparsekit::matmul_triton", mutates_args=())
def matmul_triton(a: Tensor, b: Tensor) -> Tensor:
    """a @ b on the Triton GEMM (any strided views) -> contiguous [M, N]."""
    return gemm(a, b)


@matmul_triton.register_fake
def _(a, b):
    return a.new_empty(a.shape[0], b.shape[1])


def gemm_backward_x(grad_pre: Tensor, W_enc: Tensor) -> Tensor:
    return matmul_triton(grad_pre, W_enc.t())


def gemm_backward_W(x: Tensor, grad_pre: Tensor) -> Tensor:
    return matmul_triton(x.t(), grad_pre)
