"""The replacement model of a cross-layer transcoder (``sparsekit.sae.clt``) on a TransformerLens model
(Ameisen et al. 2025, "Circuit Tracing", transformer-circuits.pub, section "Building a replacement model").

**Frozen, on one prompt** (``record_prompt`` then ``Replacement``): the real model runs once and records
every attention pattern (``blocks.l.attn.hook_pattern``), every norm's scale (each ``hook_scale``), the
embeddings (``blocks.0.hook_resid_pre``), each covered layer's MLP input (``blocks.l.ln2.hook_normalized``)
and every block's MLP output (``blocks.l.hook_mlp_out``). The replacement forward then puts back the
recorded patterns and scales, and writes each block's MLP output as

    mlp_out_m = recon_m(a) + e_m          recon_m = (b_dec[t] + sum_f a_f W_dec_{l_f -> t}[i_f]) / s_out[t]

(t = m - first_layer; f runs over the prompt's active features of layers l_f <= t that reach t), with
the error node e_m = true MLP output - recon_m(real activations), a constant. An MLP the CLT does not
cover, and every position the CLT was not trained on (BOS, special tokens), has recon 0: its whole
output is the error node. With the real activations the replacement reproduces the real logits (up
to rounding); with patterns and scales frozen, everything from (embeddings, feature activations,
errors) to any later pre-activation or logit is affine: the graph's linear model.

**Unfrozen, on held-out text** (``replacement_ce_kl``): the CLT replaces every covered MLP at once, no
error terms, each layer's features read the replacement's own residual stream; CE and KL against the
clean model and against zero-ablating the same MLPs.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor

from sparsekit import ops
from sparsekit.activations.layers import mlp_hooks
from sparsekit.activations.store import check_contexts, resolve_special_ids
from sparsekit.activations.text import kept_positions
from sparsekit.analysis.splice import loss_recovered
from sparsekit.sae.clt import CrossLayerTranscoder

FROZEN_HOOK = re.compile(r"(^blocks\.\d+\.attn\.hook_pattern|hook_scale)$")
RESID0 = "blocks.0.hook_resid_pre"


def mlp_out_hook(layer: int) -> str:
    return mlp_hooks(layer)[1]


def check_model_and_clt(model, clt) -> None:
    """One line naming the argument when the CLT does not fit the model."""
    if not isinstance(clt, CrossLayerTranscoder):
        raise ValueError(f"clt must be a CrossLayerTranscoder (sparsekit.load of a train-clt run), got "
                         f"{type(clt).__name__}")
    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(model, "run_with_hooks"):
        raise ValueError(f"model must be a TransformerLens HookedTransformer, got {type(model).__name__}")
    if clt.layers()[-1] >= cfg.n_layers:
        raise ValueError(f"clt covers layers {clt.layers()[0]}-{clt.layers()[-1]}, but the model has layers "
                         f"0..{cfg.n_layers - 1}")
    if (clt.d_in, clt.d_out) != (cfg.d_model, cfg.d_model):
        raise ValueError(f"clt reads {clt.d_in} and writes {clt.d_out} features, the model's d_model is {cfg.d_model}")
    if getattr(cfg, "positional_embedding_type", "") == "shortformer" or getattr(cfg, "parallel_attn_mlp", False):
        raise ValueError("model: shortformer and parallel attention/MLP blocks are not supported by the replacement")


class PromptRecord(NamedTuple):
    """The real forward on one prompt. tokens [T]; frozen: {hook name: [1, ...]} attention patterns and
    norm scales; resid0 [T, d_model]; mlp_in [L, T, d_in] (covered layers); mlp_out [M, T, d_model]
    (every block); logits [T, vocab]; keep [T] bool: the positions the CLT covers."""
    tokens: Tensor
    frozen: dict
    resid0: Tensor
    mlp_in: Tensor
    mlp_out: Tensor
    logits: Tensor
    keep: Tensor


def prompt_tokens(model, prompt) -> Tensor:
    """A string (tokenised with BOS first) or token ids [T] / [1, T] -> int64 [T]."""
    if isinstance(prompt, str):
        if getattr(model, "tokenizer", None) is None:
            raise ValueError("prompt is text but the model has no tokenizer: pass token ids [T]")
        return model.to_tokens(prompt, prepend_bos=True)[0].cpu()
    tokens = check_contexts(prompt[None] if isinstance(prompt, Tensor) and prompt.dim() == 1 else prompt)
    if tokens.shape[0] != 1:
        raise ValueError(f"prompt must be one context, got {tokens.shape[0]}")
    return tokens[0].cpu()


@torch.no_grad()
def record_prompt(model, clt: CrossLayerTranscoder, prompt, special_ids="tokenizer") -> PromptRecord:
    """Run the real model once on prompt (text or token ids [T], BOS first) and record what the
    replacement freezes and reads (see the module docstring). special_ids: as in
    ``sparsekit.activations.store``: those positions and position 0 are left to error nodes."""
    check_model_and_clt(model, clt)
    tokens = prompt_tokens(model, prompt)
    M = model.cfg.n_layers
    seen: dict = {}

    def record(act, hook):
        seen[hook.name] = act.detach().clone()

    names = [name for name in model.hook_dict if FROZEN_HOOK.search(name)]
    names += [RESID0] + [mlp_out_hook(m) for m in range(M)] + [mlp_hooks(m)[0] for m in clt.layers()]
    logits = model.run_with_hooks(tokens[None].to(model.cfg.device), fwd_hooks=[(n, record) for n in set(names)])
    keep = kept_positions(tokens[None], resolve_special_ids(model, special_ids))[0]
    return PromptRecord(tokens, {n: seen[n] for n in names if FROZEN_HOOK.search(n)}, seen[RESID0][0],
                        torch.stack([seen[mlp_hooks(m)[0]][0] for m in clt.layers()]),
                        torch.stack([seen[mlp_out_hook(m)][0] for m in range(M)]), logits[0].detach(), keep)


class Features(NamedTuple):
    """The prompt's active features, sorted by (layer, position, latent): layer [F] (the CLT's layer
    index; the model layer is clt.first_layer + layer), position [F], latent [F] (within the layer),
    activation [F] (> 0; the TopK value, equal to the pre-activation)."""
    layer: Tensor
    position: Tensor
    latent: Tensor
    activation: Tensor


def scaled_inputs(clt: CrossLayerTranscoder, x: Tensor, layer: int) -> Tensor:
    """Layer ``layer``'s raw MLP inputs x [..., d_in] -> the CLT's normalised inputs (its dtype)."""
    return (x.to(clt.W_enc.dtype) * clt.layer_input_scale[layer] * clt.input_scale)


def encode_layer(clt: CrossLayerTranscoder, x: Tensor, layer: int) -> ops.TopKCodes:
    """Layer ``layer``'s raw MLP inputs x [B, d_in] -> its TopK codes (values [B, k], indices [B, k]
    within the layer)."""
    n = clt.latents_per_layer
    return ops.topk_encode(scaled_inputs(clt, x, layer), clt.encoder(layer), clt.b_enc[layer * n:(layer + 1) * n],
                           clt.k_per_layer, pre_bias=clt.b_in[layer])


def decode_layer(clt: CrossLayerTranscoder, values: Tensor, indices: Tensor, layer: int) -> Tensor:
    """Layer ``layer``'s codes (values, indices [B, k]) -> what they write, no bias, in the CLT's
    normalised scale: [B, span, d_out], span the later layers it reaches (``clt.spans[layer]``)."""
    span = clt.spans[layer]
    written = ops.sparse_decode(values, indices, clt.decoder(layer), clt.W_dec.new_zeros(span * clt.d_out))
    return written.view(-1, span, clt.d_out)


@contextmanager
def clt_pass(clt: CrossLayerTranscoder, progress: bool, total: int, unit: str, desc: str, unit_scale: bool = False):
    """The CLT in eval mode (given back in its mode) and a progress bar of total units when progress
    -> a function advancing the bar by n (a no-op without one)."""
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, unit=unit, unit_scale=unit_scale, dynamic_ncols=True, desc=desc)
    was_training = clt.training
    clt.eval()
    try:
        yield (lambda n: None) if bar is None else bar.update
    finally:
        clt.train(was_training)
        if bar is not None:
            bar.close()


@torch.no_grad()
def active_features(clt: CrossLayerTranscoder, record: PromptRecord) -> Features:
    """Every (layer, position, latent) with a positive TopK value at a covered position of the prompt."""
    found = []
    positions = record.keep.nonzero().flatten()
    for layer in range(clt.n_layers):
        codes = encode_layer(clt, record.mlp_in[layer][positions.to(record.mlp_in.device)], layer)
        rows, slots = (codes.values > 0).nonzero(as_tuple=True)
        for row, slot in zip(rows.tolist(), slots.tolist()):
            found.append((layer, int(positions[row]), int(codes.indices[row, slot]), float(codes.values[row, slot])))
    found.sort()
    columns = list(zip(*found)) if found else [(), (), (), ()]
    return Features(*(torch.tensor(c, dtype=torch.int64) for c in columns[:3]),
                    torch.tensor(columns[3], dtype=torch.float64))


class Replacement:
    """The frozen replacement of ``model`` on one recorded prompt (see the module docstring).

    ``forward(acts [B, F], errors [B, M, T, d], resid0 [B, T, d])`` runs B copies at once (attribution
    uses one copy per target); ``errors()`` are the error nodes' values [M, T, d];
    ``preactivation(captured, layer, position, latent)`` the targets' pre-activations [B]."""

    def __init__(self, model, clt: CrossLayerTranscoder, record: PromptRecord, features: Features | None = None):
        check_model_and_clt(model, clt)
        self.model, self.clt, self.record = model, clt, record
        self.features = active_features(clt, record) if features is None else features
        self.dtype = record.resid0.dtype
        self.device = record.resid0.device
        T, F = record.tokens.shape[0], self.features.layer.shape[0]
        factory = dict(dtype=self.dtype, device=self.device)
        self.onehot = torch.zeros(T, F, **factory)
        self.onehot[self.features.position.to(self.device), torch.arange(F, device=self.device)] = 1.0
        self.keep = record.keep.to(device=self.device, dtype=self.dtype)[:, None]
        self.writes, self.biases = [], []
        with torch.no_grad():
            for target in range(clt.n_layers):
                scale = clt.layer_output_scale[target] * clt.output_scale
                rows = torch.zeros(F, clt.d_out, **factory)
                for layer in range(target + 1):
                    if target - layer >= clt.spans[layer]:
                        continue
                    mine = (self.features.layer == layer).nonzero().flatten()
                    if mine.numel():
                        block = clt.decoder_to(layer, target)[self.features.latent[mine].to(clt.W_dec.device)]
                        rows[mine.to(self.device)] = (block / scale).to(**factory)
                self.writes.append(rows)
                self.biases.append((clt.b_dec[target] / scale).to(**factory))

    @property
    def activations(self) -> Tensor:
        """The real feature activations [F] in the model's dtype."""
        return self.features.activation.to(dtype=self.dtype, device=self.device)

    def reconstruction(self, model_layer: int, acts: Tensor) -> Tensor | None:
        """acts [B, F] -> block ``model_layer``'s reconstructed MLP output [B, T, d] (None: uncovered)."""
        target = model_layer - self.clt.first_layer
        if not 0 <= target < self.clt.n_layers:
            return None
        return (acts[:, None, :] * self.onehot) @ self.writes[target] + self.keep * self.biases[target]

    @torch.no_grad()
    def errors(self) -> Tensor:
        """The error nodes [M, T, d]: true MLP output minus the reconstruction from the real activations."""
        errors = self.record.mlp_out.clone()
        acts = self.activations[None]
        for m in range(errors.shape[0]):
            recon = self.reconstruction(m, acts)
            if recon is not None:
                errors[m] -= recon[0]
        return errors

    def forward(self, acts: Tensor, errors: Tensor, resid0: Tensor, stop_at_layer: int | None = None):
        """B copies of the frozen replacement -> (logits [B, T, vocab], or the residual stream at
        stop_at_layer, and {CLT layer: its MLP input [B, T, d_in]} for the covered layers it ran)."""
        captured: dict = {}
        frozen = self.record.frozen
        M = self.model.cfg.n_layers
        hooks = [(name, lambda act, hook: frozen[hook.name].expand(act.shape)) for name in frozen]
        for m in range(M):
            def write(act, hook, m=m):
                recon = self.reconstruction(m, acts)
                return errors[:, m] if recon is None else recon + errors[:, m]
            hooks.append((mlp_out_hook(m), write))
        for layer, m in enumerate(self.clt.layers()):
            def capture(act, hook, layer=layer):
                captured[layer] = act
            hooks.append((mlp_hooks(m)[0], capture))
        out = self.model.run_with_hooks(resid0, start_at_layer=0, stop_at_layer=stop_at_layer, fwd_hooks=hooks)
        return out, captured

    def preactivation(self, captured: dict, layer: Tensor, position: Tensor, latent: Tensor) -> Tensor:
        """Copy b's target (layer[b], position[b], latent[b]) -> its pre-activation [B] from its MLP input."""
        clt, n = self.clt, self.clt.latents_per_layer
        out = torch.zeros(layer.shape[0], dtype=self.dtype, device=self.device)
        for value in layer.unique().tolist():
            rows = (layer == value).nonzero().flatten()
            x = captured[value][rows.to(self.device), position[rows].to(self.device)]
            columns = value * n + latent[rows]
            W = clt.W_enc[:, columns].to(self.dtype)
            pre = ((scaled_inputs(clt, x, value).to(self.dtype) - clt.b_in[value].to(self.dtype)) * W.T).sum(-1)
            out = out.index_put((rows.to(self.device),), pre + clt.b_enc[columns].to(self.dtype))
        return out


def _next_token_ce(log_probs: Tensor, tokens: Tensor) -> Tensor:
    """log_probs [b, T-2, vocab] (predictions at positions 1..T-2) -> summed CE of tokens 2..T-1."""
    return -log_probs.gather(-1, tokens[:, 2:, None]).sum()


@torch.no_grad()
def replacement_ce_kl(model, clt: CrossLayerTranscoder, tokens: Tensor, batch_contexts: int = 8,
                      special_ids="tokenizer", progress: bool = False) -> dict:
    """CE and KL when the CLT replaces every covered MLP at once (no error terms, nothing frozen) on
    held-out contexts tokens [N, T] (BOS first, T >= 3), as ``lm_metrics.evaluate_splices`` counts
    them: predictions at positions 1..T-2, position 0 and special tokens left clean.
    -> {"ce_clean", "ce_replacement", "ce_zero" (the covered MLPs zero-ablated), "ce_recovered",
    "kl" (clean || replacement, nats per token), "kl_zero", "tokens", "layers"}."""
    check_model_and_clt(model, clt)
    tokens = check_contexts(tokens)
    if tokens.shape[1] < 3:
        raise ValueError(f"tokens must have >= 3 positions (BOS, one replaced input, one target), got {tokens.shape[1]}")
    if not isinstance(batch_contexts, int) or batch_contexts < 1:
        raise ValueError(f"batch_contexts must be a positive int, got {batch_contexts!r}")
    special = resolve_special_ids(model, special_ids)
    layers = clt.layers()
    totals = {"clean": 0.0, "replacement": 0.0, "zero": 0.0, "kl": 0.0, "kl_zero": 0.0}
    count = 0
    with clt_pass(clt, progress, tokens.numel(), "tok", "replacement CE/KL", unit_scale=True) as advance:
        for first in range(0, tokens.shape[0], batch_contexts):
            batch = tokens[first:first + batch_contexts].to(model.cfg.device)
            keep = kept_positions(batch, special).to(batch.device)[..., None]
            pending: dict = {}

            def encode(act, hook, layer):
                rows = act.reshape(-1, act.shape[-1])
                codes = encode_layer(clt, rows, layer)
                written = decode_layer(clt, codes.values, codes.indices, layer)
                for offset in range(clt.spans[layer]):
                    pending[layer + offset] = pending.get(layer + offset, 0) + written[:, offset]

            def replace(act, hook, layer):
                scale = clt.layer_output_scale[layer] * clt.output_scale
                new = ((clt.b_dec[layer] + pending.pop(layer)) / scale).to(act.dtype).view(act.shape)
                return torch.where(keep, new, act)

            def zero(act, hook):
                return torch.where(keep, torch.zeros_like(act), act)

            clean_lp = model(batch)[:, 1:-1].log_softmax(-1)
            hooks = []
            for layer, m in enumerate(layers):
                hooks.append((mlp_hooks(m)[0], lambda act, hook, layer=layer: encode(act, hook, layer)))
                hooks.append((mlp_out_hook(m), lambda act, hook, layer=layer: replace(act, hook, layer)))
            replaced_lp = model.run_with_hooks(batch, fwd_hooks=hooks)[:, 1:-1].log_softmax(-1)
            zero_lp = model.run_with_hooks(batch, fwd_hooks=[(mlp_out_hook(m), zero) for m in layers])[:, 1:-1]
            zero_lp = zero_lp.log_softmax(-1)
            clean_p = clean_lp.exp()
            totals["clean"] += float(_next_token_ce(clean_lp, batch))
            totals["replacement"] += float(_next_token_ce(replaced_lp, batch))
            totals["zero"] += float(_next_token_ce(zero_lp, batch))
            totals["kl"] += float((clean_p * (clean_lp - replaced_lp)).sum())
            totals["kl_zero"] += float((clean_p * (clean_lp - zero_lp)).sum())
            count += batch.shape[0] * (batch.shape[1] - 2)
            advance(batch.numel())
    clean, replaced, zeroed = (totals[key] / count for key in ("clean", "replacement", "zero"))
    return {"ce_clean": clean, "ce_replacement": replaced, "ce_zero": zeroed,
            "ce_recovered": loss_recovered(clean, replaced, zeroed), "kl": totals["kl"] / count,
            "kl_zero": totals["kl_zero"] / count, "tokens": count, "layers": layers}


def replacement_forward(model, clt: CrossLayerTranscoder, prompt, special_ids="tokenizer") -> Tensor:
    """The frozen replacement with its error nodes on prompt (text or ids [T]) -> logits [T, vocab]
    (equal to the real model's, up to rounding)."""
    replacement = Replacement(model, clt, record_prompt(model, clt, prompt, special_ids))
    with torch.no_grad():
        logits, _ = replacement.forward(replacement.activations[None], replacement.errors()[None],
                                        replacement.record.resid0[None])
    return logits[0]


def replacement_summary(figures: dict) -> str:
    """One line saying what ``replacement_ce_kl`` measured (its dict), for the command lines."""
    layers = figures["layers"]
    return (f"replacement (CLT on layers {layers[0]}-{layers[-1]} at once, no error terms) on {figures['tokens']:,} "
            f"held-out tokens: CE {figures['ce_replacement']:.4f} (clean {figures['ce_clean']:.4f}, those MLPs "
            f"zero-ablated {figures['ce_zero']:.4f}; recovered {figures['ce_recovered']:.3f}), KL {figures['kl']:.4f} "
            f"nats (zero-ablated {figures['kl_zero']:.4f})")
