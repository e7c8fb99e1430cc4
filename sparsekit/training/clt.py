"""Training a cross-layer transcoder (``sparsekit.sae.clt``) on (x [b, L, d_in], y [b, L, d_out]) batches.

    clt = CrossLayerTranscoder(576, 6 * 2048, n_layers=6, k_per_layer=16, first_layer=3)
    result = train_clt(clt, pairs, total_tokens=200_000, eval_pairs=(x_eval, y_eval))
    result["eval"]["fvu"]   # one FVU per covered layer

The step: per-layer normalisation (``init_from_sample`` on the first batch: E||x_l||^2 = d_in,
E||y_l||^2 = d_out, b_in and b_dec from the means), the CLT's forward (one fused TopK encode and
one sparse decode over its stacked decoder per layer, through ``sparsekit.ops``), the objective
sum_l MSE_l, Adam with a linear warm-up and a linear decay to zero over the last 20%, and the
unit-norm decoder's projection and renormalisation. Dead latents (no fire in the last
``dead_window_tokens``) get AuxK (Gao et al. 2024) per layer: layer l's dead latents, top-k_aux of
them per row, reconstruct the residual of all l's targets through l's stacked decoder (the trainer's
``dead_latents.auxk_loss`` on that layer's slice), weighted by aux_coeff (1/32) and summed over layers.

``time_steps`` measures a training step (forward, backward, Adam, decoder constraints) of any
dictionary on one batch: the CLT against a plain transcoder at equal total latents.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import torch
from torch import Tensor

from sparsekit._util.validate import positive_int
from sparsekit.sae.clt import CrossLayerTranscoder

from .dead_latents import auxk_loss


class _LayerSlice:
    """What ``auxk_loss`` reads of a dictionary, for one layer of a CLT: W_enc [d_in, n], the folded
    encoder bias, the stacked decoder W_dec [n, span * d_out] and a zero b_dec."""

    def __init__(self, clt: CrossLayerTranscoder, layer: int):
        n = clt.latents_per_layer
        self.W_enc, self.W_dec = clt.encoder(layer), clt.decoder(layer)
        self.b_enc, self.b_in = clt.b_enc[layer * n:(layer + 1) * n], clt.b_in[layer]
        self.b_dec = clt.W_dec.new_zeros(self.W_dec.shape[1])

    def encoder_bias(self, latents: Tensor) -> Tensor:
        return self.b_enc[latents] - self.b_in @ self.W_enc[:, latents]


def clt_auxk_loss(clt: CrossLayerTranscoder, x: Tensor, residual: Tensor, dead: Tensor, k_aux: int) -> Tensor:
    """Sum over layers of AuxK's normalised MSE: layer l's dead latents (dead: bool [n_latents],
    layer-major) encode x_l - b_in[l] (x [B, L, d_in]) and reconstruct the detached residual
    [B, L, d_out] of l's targets l .. l + span(l) - 1. Zero when nothing is dead."""
    total = x.new_zeros(())
    n = clt.latents_per_layer
    for layer in range(clt.n_layers):
        latents = dead[layer * n:(layer + 1) * n].nonzero().flatten().to(x.device)
        if latents.numel() == 0:
            continue
        span = clt.spans[layer]
        target = residual[:, layer:layer + span].reshape(x.shape[0], span * clt.d_out)
        total = total + auxk_loss(_LayerSlice(clt, layer), x[:, layer], target, latents, k_aux)
    return total


def fvu_per_layer(y_hat: Tensor, y: Tensor) -> Tensor:
    """Fraction of variance unexplained per layer: sum ||y - y_hat||^2 / sum ||y - mean(y)||^2 over the
    batch, for y_hat, y [B, L, d] -> [L] (float64)."""
    y, y_hat = y.double(), y_hat.double()
    residual = (y - y_hat).pow(2).sum((0, 2))
    variance = (y - y.mean(0)).pow(2).sum((0, 2))
    return residual / variance.clamp_min(1e-30)


@torch.no_grad()
def evaluate_clt(clt: CrossLayerTranscoder, x: Tensor, y: Tensor, batch_size: int = 1024) -> dict:
    """Held-out figures on raw x [N, L, d_in], y [N, L, d_out]: per layer FVU and the fraction of its
    latents that never fired here; L0 per layer (k_per_layer for a TopK CLT, fewer when values are 0)."""
    batch_size = positive_int("batch_size", batch_size)
    was_training = clt.training
    clt.eval()
    try:
        squared = torch.zeros(clt.n_layers, dtype=torch.float64)
        sums = torch.zeros(clt.n_layers, clt.d_out, dtype=torch.float64)
        sq_sums = torch.zeros(clt.n_layers, dtype=torch.float64)
        fires = torch.zeros(clt.n_latents, dtype=torch.int64)
        active = torch.zeros(clt.n_layers, dtype=torch.float64)
        for start in range(0, x.shape[0], batch_size):
            xb, yb = clt.scale_batch(x[start:start + batch_size], y[start:start + batch_size])
            out = clt(xb, yb)
            yd = yb.double()
            squared += (yd - out.y_hat.double()).pow(2).sum((0, 2)).cpu()
            sums += yd.sum(0).cpu()
            sq_sums += yd.pow(2).sum((0, 2)).cpu()
            fires += clt.fire_counts(out.codes).cpu()
            active += torch.tensor([float((c.values > 0).sum()) for c in out.codes], dtype=torch.float64)
    finally:
        clt.train(was_training)
    rows = x.shape[0]
    variance = sq_sums - sums.pow(2).sum(-1) / rows
    never = (fires.view(clt.n_layers, clt.latents_per_layer) == 0).double().mean(1)
    return {"layers": clt.layers(), "fvu": (squared / variance.clamp_min(1e-30)).tolist(),
            "l0": (active / rows).tolist(), "never_fired_frac": never.tolist(), "tokens": rows}


def _lr_factor(tokens: int, total: int, warmup: int, decay_fraction: float) -> float:
    factor = min(1.0, (tokens + 1) / warmup) if warmup else 1.0
    decay_start = total * (1 - decay_fraction)
    if decay_fraction > 0 and tokens >= decay_start:
        factor *= max(0.0, (total - tokens) / (total - decay_start))
    return factor


def train_clt(clt: CrossLayerTranscoder, source, total_tokens: int, lr: float = 1e-3, eval_pairs=None,
              lr_warmup_tokens: int | None = None, lr_decay_fraction: float = 0.2, dead_window_tokens: int = 100_000,
              aux_k: int | None = None, aux_coeff: float = 1 / 32, log_every: int = 20, progress: bool = True,
              log: Callable[[dict], None] | None = None) -> dict:
    """Train ``clt`` on ``source`` (an iterable of raw (x [b, L, d_in], y [b, L, d_out]) batches, e.g.
    ``activations.layers.LayerPairSource``) for total_tokens rows; evaluate on eval_pairs (raw
    (x [N, L, d_in], y [N, L, d_out])) at the end. lr_warmup_tokens: default 5% of total_tokens.
    aux_k: AuxK's k_aux (None: d_in // 2); aux_coeff 0 turns AuxK off.
    log: called every log_every steps with {step, tokens, lr, loss, fvu (per layer, this batch)}.
    Returns {"tokens", "steps", "seconds", "tokens_per_s", "dead_frac" (per layer, by the window),
    "history" (the logged dicts), "eval" (evaluate_clt's figures, when eval_pairs is given)}."""
    total_tokens = positive_int("total_tokens", total_tokens)
    if not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and 0 < lr < math.inf):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    warmup = total_tokens // 20 if lr_warmup_tokens is None else lr_warmup_tokens
    k_aux = max(1, clt.d_in // 2) if aux_k is None else positive_int("aux_k", aux_k)
    clt.train()
    optimizer = torch.optim.Adam(clt.parameters(), lr=lr)
    since_fired = torch.zeros(clt.n_latents, dtype=torch.int64)
    history: list[dict] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total_tokens, unit="tok", unit_scale=True, dynamic_ncols=True, desc="train CLT")
    tokens = steps = 0
    started = time.perf_counter()
    initialised = False
    try:
        while tokens < total_tokens:
            before = tokens
            for x, y in source:
                if not initialised:
                    clt.init_from_sample(x, y)
                    initialised = True
                x, y = clt.scale_batch(x[:total_tokens - tokens], y[:total_tokens - tokens])
                for group in optimizer.param_groups:
                    group["lr"] = lr * _lr_factor(tokens, total_tokens, warmup, lr_decay_fraction)
                out = clt(x, y)
                loss = out.losses["mse"]
                dead = since_fired >= dead_window_tokens
                aux = None
                if aux_coeff > 0 and bool(dead.any()):
                    aux = aux_coeff * clt_auxk_loss(clt, x, (y - out.y_hat).detach(), dead, k_aux)
                    loss = loss + aux
                loss.backward()
                clt.remove_parallel_decoder_grad()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                clt.normalize_decoder()
                rows = x.shape[0]
                fired = clt.fire_counts(out.codes).cpu() > 0
                since_fired = torch.where(fired, 0, since_fired + rows)
                tokens += rows
                steps += 1
                if bar is not None:
                    bar.update(rows)
                if steps % log_every == 0 or tokens >= total_tokens:
                    entry = {"step": steps, "tokens": tokens, "lr": optimizer.param_groups[0]["lr"],
                             "loss": float(out.losses["mse"].detach()),
                             "aux_loss": 0.0 if aux is None else float(aux.detach()),
                             "dead_frac": float(dead.double().mean()),
                             "fvu": fvu_per_layer(out.y_hat.detach(), y).tolist()}
                    history.append(entry)
                    if bar is not None:
                        bar.set_postfix(fvu=f"{sum(entry['fvu']) / len(entry['fvu']):.3f}")
                    if log is not None:
                        log(entry)
                if tokens >= total_tokens:
                    break
            if tokens == before:
                raise ValueError("source gave no batches: nothing to train on")
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - started
    dead = (since_fired >= dead_window_tokens).view(clt.n_layers, clt.latents_per_layer).double().mean(1)
    result = {"tokens": tokens, "steps": steps, "seconds": seconds, "tokens_per_s": tokens / seconds,
              "dead_frac": dead.tolist(), "dead_window_tokens": dead_window_tokens, "history": history}
    if eval_pairs is not None:
        result["eval"] = evaluate_clt(clt, *eval_pairs)
    return result


def time_steps(runs: dict, steps: int = 5, warmup: int = 1) -> dict:
    """Median seconds of one training step per entry of ``runs`` ({name: (model, x, y)}: a
    CrossLayerTranscoder or any transcoder SparseDictionary and its normalised batch): forward,
    backward, Adam, the decoder's projection and renormalisation. The models take turns, step by
    step, so a machine whose load changes slows them alike. The models' parameters change (they
    train on their batch). -> {name: seconds}."""
    steps, warmup = positive_int("steps", steps), max(0, int(warmup))
    optimizers = {name: torch.optim.Adam(model.parameters(), lr=1e-4) for name, (model, _, _) in runs.items()}
    times: dict = {name: [] for name in runs}
    for i in range(warmup + steps):
        for name, (model, x, y) in runs.items():
            start = time.perf_counter()
            out = model(x, y)
            sum(out.losses.values()).backward()
            model.remove_parallel_decoder_grad()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            model.normalize_decoder()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}
