"""Dead latents: counting them exactly, and the three remedies the trainer offers.

Dead = did not fire on any of the last ``dead_window_tokens`` tokens (tokens, never steps).

- AuxK (Gao et al. 2024): the k_aux largest dead pre-activations reconstruct the main residual;
  loss = coefficient * normalised MSE (MSE over the residual's variance).
- Ghost grads (Anthropic, January 2024): ``ops.ghost_grad_loss`` over the dead latents.

The shared pass (``shared_pass_k``): a TopK dictionary trained on one process reads the dead
latents' pre-activations from its own encoder pass (``TopKSAE.forward_with_latents``,
``ops.topk_encode_with_latents``) instead of a second GEMM over the dead columns. AuxK takes them
as sparse codes (the top k_aux per row; decode and backward are sparse passes, the backward one
pass with the main codes') when it keeps at most 1/AUXK_DENSE_MIN_SHARE of the dead latents,
else dense [B, |D|] (two GEMMs then cost less than sparse passes over B*k_aux entries); ghost
grads always dense (exp of every dead pre-activation). Without it (other dictionaries, data-parallel
and sharded runs) each remedy computes the dead pre-activations itself, as before.
- Resampling (Towards Monosemanticity): at scheduled token counts, dead latents are re-initialised
  toward inputs drawn with probability proportional to their squared reconstruction loss, and
  their Adam moments are zeroed.
"""
from __future__ import annotations

import torch
from torch import Tensor

from sparsekit import ops
from sparsekit.sae.base import SparseDictionary

STRATEGIES = ("none", "resample", "ghost", "auxk")


class DeadLatentTracker:
    """Tokens since each latent last fired: [n] int64; dead when >= window."""

    def __init__(self, n_latents: int, window_tokens: int):
        self.window_tokens = window_tokens
        self.tokens_since_fired = torch.zeros(n_latents, dtype=torch.int64)

    def update(self, fire_counts: Tensor, batch_tokens: int) -> None:
        fired = fire_counts.cpu() > 0
        self.tokens_since_fired = torch.where(fired, 0, self.tokens_since_fired + batch_tokens)

    def dead_mask(self) -> Tensor:
        return self.tokens_since_fired >= self.window_tokens

    def dead_indices(self, device=None) -> Tensor:
        return self.dead_mask().nonzero().flatten().to(device)

    def revive(self, latents: Tensor) -> None:
        self.tokens_since_fired[latents.cpu()] = 0


# AuxK keeps its aux codes dense when it keeps at least 1/8 of the dead latents: two dense
# [B, |D|] GEMMs then cost less than the sparse kernels over B * k_aux entries (measured 15x at
# |D| = 1% of n; on the 2-core AVX2 EPYC at B=4096, d=512, k_aux=256: at |D| = 1638 a dense GEMM
# took 0.26 s against 0.9 s for the sparse decode backward and 0.66 s for the sparse encoder
# backward; at |D| = 8192, 1.07 s against 0.93 s and 0.72 s).
AUXK_DENSE_MIN_SHARE = 8


def auxk_keeps_dense(n_dead: int, k_aux: int) -> bool:
    """Whether AuxK's aux codes are dense [B, |D|] (most dead latents kept) rather than sparse."""
    return AUXK_DENSE_MIN_SHARE * min(k_aux, n_dead) >= n_dead


def shared_pass_k(sae, strategies, dead: Tensor, k_aux: int) -> int | None:
    """k_latents for ``sae.forward_with_latents(x, y, dead, k_latents)``: 0 = the dead latents'
    pre-activations (ghost grads, or AuxK keeping most of them), k_aux = AuxK's sparse codes; None
    when no remedy reads them or the dictionary cannot share its encoder pass."""
    wants = [name for name in ("auxk", "ghost") if name in strategies]
    if not wants or dead.numel() == 0 or not hasattr(sae, "forward_with_latents"):
        return None
    if "ghost" in wants or auxk_keeps_dense(dead.numel(), k_aux):
        return 0
    return min(k_aux, dead.numel())


def auxk_loss(sae: SparseDictionary, x: Tensor, residual: Tensor, dead: Tensor, k_aux: int,
              variance: Tensor | None = None, shared: ops.LatentPass | None = None) -> Tensor:
    """Normalised MSE of the dead latents' top-k_aux reconstruction of the detached residual.

    x [B, d_in] (normalised input), residual [B, d_out] = target - x_hat, dead [|D|] int64.
    variance: the normaliser, 0-d; None: this batch's residual variance (data parallel passes the
    global batch's). shared: what the encoder's pass read of the dead latents
    (``TopKSAE.forward_with_latents(..., dead, shared_pass_k(...))``); None: computed here, by a
    GEMM over the dead columns (gathered, so every cost stays in |D|, not n).
    """
    residual = residual.detach()
    k = min(k_aux, dead.numel())
    if shared is not None and shared.codes is not None:  # sparse aux codes from the encoder's pass
        reconstruction = ops.sparse_decode(shared.codes.values, shared.codes.indices, sae.W_dec,
                                           torch.zeros_like(sae.b_dec))
    elif shared is not None or auxk_keeps_dense(dead.numel(), k_aux):
        # Most dead latents are kept (k_aux = d_in / 2 often exceeds |D|): dense [B, |D|] GEMMs.
        pre = shared.pre if shared is not None else torch.addmm(sae.encoder_bias(dead), x, sae.W_enc[:, dead])
        if k < dead.numel():  # the kept entries scattered into zeros: [B, k] work, not masks over [B, |D|]
            positions = ops.topk_positions(pre, k)
            acts = torch.zeros_like(pre).scatter_(1, positions, torch.relu(pre.gather(1, positions)))
        else:
            acts = torch.relu(pre)
        reconstruction = ops.dense_decode(acts, sae.W_dec, dead)
    else:
        codes = ops.topk_encode(x, sae.W_enc[:, dead], sae.encoder_bias(dead), k)
        reconstruction = ops.sparse_decode(codes.values, codes.indices, sae.W_dec[dead], torch.zeros_like(sae.b_dec))
    mse = (reconstruction - residual).pow(2).sum(-1).mean()
    if variance is None:
        variance = (residual - residual.mean(0)).pow(2).sum(-1).mean()
    return mse / variance.clamp_min(1e-12)


def ghost_loss(sae: SparseDictionary, x: Tensor, residual: Tensor, dead: Tensor, mse_main: Tensor,
               shared: ops.LatentPass | None = None) -> Tensor:
    """The ghost-grads term over dead latents (see ops.ghost_grad_loss); shared: the dead latents'
    pre-activations from the encoder's pass (``shared.pre``), else computed here."""
    if shared is not None and shared.pre is not None:
        return ops.ghost_grad_loss_from_pre(shared.pre, sae.W_dec, dead, residual.detach(), mse_main.detach())
    return ops.ghost_grad_loss(x, sae.W_enc, sae.encoder_bias(), sae.W_dec, dead,
                               residual.detach(), mse_main.detach())


@torch.no_grad()
def resample(sae: SparseDictionary, optimizer: torch.optim.Optimizer, dead: Tensor, x: Tensor,
             per_input_loss: Tensor, generator: torch.Generator) -> None:
    """Re-initialise dead latents toward high-loss inputs (Towards Monosemanticity).

    x [B, d_in] candidate inputs (normalised), per_input_loss [B]. Each dead latent i gets an input
    v drawn with probability ∝ loss²: W_dec[i] = v / ||v|| (an SAE's input minus b_dec), W_enc[:, i] =
    that direction * 0.2 * mean norm of the alive encoder columns, b_enc[i] = 0; Adam moments of
    those entries are zeroed.
    """
    if dead.numel() == 0:
        return
    weights = per_input_loss.double().pow(2)
    if not torch.isfinite(weights).all() or weights.sum() <= 0:
        weights = torch.ones_like(weights)
    picks = torch.multinomial(weights.cpu(), dead.numel(), replacement=True, generator=generator).to(x.device)
    inputs = sae.encoder_input(x)[picks]
    directions = torch.nn.functional.normalize(inputs, dim=-1)
    alive = torch.ones(sae.n_latents, dtype=torch.bool, device=dead.device)
    alive[dead] = False
    encoder_norm = sae.W_enc[:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(1.0)
    if sae.d_out == sae.d_in:
        sae.W_dec[dead] = directions.to(sae.W_dec.dtype)
    sae.W_enc[:, dead] = (directions * 0.2 * encoder_norm).t().to(sae.W_enc.dtype)
    sae.b_enc[dead] = 0
    for parameter, index in ((sae.W_dec, (dead,)), (sae.W_enc, (slice(None), dead)), (sae.b_enc, (dead,))):
        state = optimizer.state.get(parameter, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][index] = 0
