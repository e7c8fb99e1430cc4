"""The spec: every sparsekit op in plain, readable PyTorch.

Each fast path (C++ in ``csrc/``, Triton in ``kernels/``) must compute what these functions
compute, forward and backward; the tests compare them. These functions assume valid input (the
checks live in ``sparsekit.ops``) and differentiate through ordinary autograd, except JumpReLU,
whose threshold gradient is a pseudo-derivative defined here.

Shapes: x [B, d_in], W_enc [d_in, n], b_enc [n], W_dec [n, d_out], b_dec [d_out].
Selection ties go to the lower index (lower flat index for BatchTopK).
"""
from __future__ import annotations

import torch
from torch import Tensor


def pre_activations(x: Tensor, W_enc: Tensor, b_enc: Tensor) -> Tensor:
    """pre = x @ W_enc + b_enc: [B, d_in] -> [B, n]."""
    return x @ W_enc + b_enc


def topk_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Keep the k largest pre-activations per row, then ReLU them.

    Returns values [B, k] (sorted descending; ties: lower index first) and indices [B, k] int64.
    Gradients reach x, W_enc and b_enc through the kept entries that are positive.
    """
    pre = pre_activations(x, W_enc, b_enc)
    # A stable descending sort keeps equal values in index order: the lower index wins.
    indices = torch.sort(pre.detach(), dim=-1, descending=True, stable=True).indices[:, :k]
    values = torch.relu(pre.gather(-1, indices))
    return values, indices


def topk_positions(pre: Tensor, k: int) -> Tensor:
    """The columns of the k largest entries of each row of pre [B, m], largest first (ties: lower
    column first): [B, k] int64. A selection, not differentiable."""
    return torch.sort(pre.detach(), dim=-1, descending=True, stable=True).indices[:, :k]


def topk_encode_with_latents(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, latents: Tensor,
                             k_latents: int) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """topk_encode's codes and, from the same pre-activations, what the dead-latent remedies read of
    the latents L = ``latents`` [m] (distinct, any order):

    - k_latents == 0: pre[:, L] [B, m], those latents' pre-activations (differentiable);
    - k_latents > 0: the k_latents largest of pre[:, L] per row, ReLU'd, sorted descending (ties:
      the lower latent index first), as (values [B, k_latents], indices [B, k_latents] in [0, n)).

    Returns (values, indices, pre[:, L] or None, latent values or None, latent indices or None).
    """
    pre = pre_activations(x, W_enc, b_enc)
    indices = topk_positions(pre, k)
    values = torch.relu(pre.gather(-1, indices))
    if k_latents == 0:
        return values, indices, pre[:, latents], None, None
    ordered = latents.sort().values
    latent_indices = ordered[topk_positions(pre[:, ordered], k_latents)]
    return values, indices, None, torch.relu(pre.gather(-1, latent_indices)), latent_indices


def batchtopk_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Keep the B*k largest entries of relu(pre) over the whole batch (Bussmann et al. 2024).

    Returns flat COO codes of fixed size B*k: values, rows, cols, each [B*k], in flat (row-major)
    order. Ties go to the lower flat index.
    """
    batch, n = x.shape[0], W_enc.shape[1]
    acts = torch.relu(pre_activations(x, W_enc, b_enc)).reshape(-1)
    order = torch.sort(acts.detach(), descending=True, stable=True).indices[: batch * k]
    flat = torch.sort(order).values
    return acts[flat], flat // n, flat % n


def relu_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor) -> Tensor:
    """relu(x @ W_enc + b_enc): [B, n], dense."""
    return torch.relu(pre_activations(x, W_enc, b_enc))


class _JumpReLU(torch.autograd.Function):
    """out = pre * (pre > theta), theta = exp(log_threshold).

    Backward (Rajamanoharan et al. 2024, "Jumping Ahead"): d out / d pre = (pre > theta);
    d out / d theta = -(theta / bandwidth) * K((pre - theta) / bandwidth) with the rectangle kernel
    K(u) = 1 if |u| < 1/2 else 0; chained through theta = exp(log_threshold).
    """

    @staticmethod
    def forward(ctx, pre: Tensor, log_threshold: Tensor, bandwidth: float) -> Tensor:
        theta = torch.exp(log_threshold)
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        pre, theta = ctx.saved_tensors
        grad_pre = grad_out * (pre > theta)
        in_window = ((pre - theta).abs() < ctx.bandwidth / 2).to(pre.dtype)
        d_theta = -(theta / ctx.bandwidth) * in_window
        grad_log_threshold = (grad_out * d_theta).sum(0) * theta
        return grad_pre, grad_log_threshold, None


class _HeavisideStep(torch.autograd.Function):
    """out = (pre > theta) as 0/1, theta = exp(log_threshold).

    Backward (Rajamanoharan et al. 2024): no gradient to pre; d out / d theta =
    -(1 / bandwidth) * K((pre - theta) / bandwidth), chained through theta = exp(log_threshold).
    Summed over latents it is the L0 penalty of a JumpReLU SAE.
    """

    @staticmethod
    def forward(ctx, pre: Tensor, log_threshold: Tensor, bandwidth: float) -> Tensor:
        theta = torch.exp(log_threshold)
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        pre, theta = ctx.saved_tensors
        in_window = ((pre - theta).abs() < ctx.bandwidth / 2).to(pre.dtype)
        grad_log_threshold = (grad_out * in_window).sum(0) * (-theta / ctx.bandwidth)
        return None, grad_log_threshold, None


def jumprelu(pre: Tensor, log_threshold: Tensor, bandwidth: float) -> Tensor:
    """pre * (pre > exp(log_threshold)) elementwise: [B, n], log_threshold [n]."""
    return _JumpReLU.apply(pre, log_threshold, bandwidth)


def heaviside_step(pre: Tensor, log_threshold: Tensor, bandwidth: float) -> Tensor:
    """(pre > exp(log_threshold)) as 0/1 with the threshold's pseudo-derivative: [B, n]."""
    return _HeavisideStep.apply(pre, log_threshold, bandwidth)


def jumprelu_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, log_threshold: Tensor, bandwidth: float) -> Tensor:
    """pre * (pre > exp(log_threshold)): [B, n], dense; log_threshold [n]."""
    return jumprelu(pre_activations(x, W_enc, b_enc), log_threshold, bandwidth)


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    """y[b] = sum_j values[b, j] * W_dec[indices[b, j]] + b_dec: [B, k] codes -> [B, d_out]."""
    return (values.unsqueeze(-1) * W_dec[indices]).sum(1) + b_dec


def sparse_decode_coo(values: Tensor, rows: Tensor, cols: Tensor, W_dec: Tensor, b_dec: Tensor,
                      batch_size: int) -> Tensor:
    """y[rows[e]] += values[e] * W_dec[cols[e]], plus b_dec: COO codes [E] -> [batch_size, d_out]."""
    y = torch.zeros(batch_size, W_dec.shape[1], dtype=W_dec.dtype, device=W_dec.device)
    return y.index_add(0, rows, values.unsqueeze(-1) * W_dec[cols]) + b_dec


def squared_error(a: Tensor, b: Tensor) -> Tensor:
    """Mean over the batch of the squared error summed over features: [B, d] x2 -> scalar."""
    return (a - b).pow(2).sum(-1).mean()


def ghost_grad_loss(x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, dead_idx: Tensor,
                    residual: Tensor, mse_main: Tensor, eps: float = 1e-8) -> Tensor:
    """The ghost-grads term (Anthropic, Circuits Updates, January 2024), over dead latents D only.

    pre_D = x @ W_enc[:, D] + b_enc[D]; g = exp(pre_D) @ W_dec[D]; with r = residual (detached),
    g <- g * ||r|| / (2 ||g|| + eps) per row (the ratio detached);
    L = squared_error(g, r); returns L * (mse_main / (L + eps)), the factor detached, so the value
    matches mse_main and the gradient reaches x, W_enc[:, D] and b_enc[D] through pre_D only.
    Zero (with no gradient) when D is empty.
    """
    if dead_idx.numel() == 0:
        return torch.zeros((), dtype=x.dtype, device=x.device)
    pre_dead = x @ W_enc[:, dead_idx] + b_enc[dead_idx]
    ghost = torch.exp(pre_dead) @ W_dec[dead_idx].detach()
    r = residual.detach()
    scale = (r.norm(dim=-1, keepdim=True) / (2 * ghost.norm(dim=-1, keepdim=True) + eps)).detach()
    loss = squared_error(ghost * scale, r)
    return loss * (mse_main.detach() / (loss.detach() + eps))


def ghost_grad_loss_from_pre(pre_dead: Tensor, W_dec: Tensor, dead_idx: Tensor, residual: Tensor,
                             mse_main: Tensor, eps: float = 1e-8) -> Tensor:
    """ghost_grad_loss given the dead latents' pre-activations pre_dead = pre[:, D] [B, |D|] (the
    encoder's own pass computed them); the gradient reaches pre_dead only."""
    ghost = torch.exp(pre_dead) @ W_dec[dead_idx].detach()
    r = residual.detach()
    scale = (r.norm(dim=-1, keepdim=True) / (2 * ghost.norm(dim=-1, keepdim=True) + eps)).detach()
    loss = squared_error(ghost * scale, r)
    return loss * (mse_main.detach() / (loss.detach() + eps))


def dense_decode(codes: Tensor, W_dec: Tensor, latents: Tensor) -> Tensor:
    """The dense codes [B, m] of the latents L = ``latents`` [m] decoded: codes @ W_dec[L] -> [B, d_out]
    (no bias). Gradients reach codes and W_dec's rows L."""
    return codes @ W_dec[latents]


def remove_parallel_rows(grad: Tensor, W: Tensor) -> Tensor:
    """Each row of grad [n, d] minus its component along the same row of W [n, d] (the
    unit-norm decoder's gradient projection): grad - (grad . w_hat) w_hat, w_hat = w / max(||w||, 1e-12)."""
    rows = torch.nn.functional.normalize(W, dim=-1)
    return grad - (grad * rows).sum(-1, keepdim=True) * rows


def normalize_rows(W: Tensor) -> Tensor:
    """Each row of W [n, d] divided by max(its norm, 1e-12)."""
    return W / W.norm(dim=-1, keepdim=True).clamp_min(1e-12)
