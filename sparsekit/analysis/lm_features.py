"""What a dictionary's features mean on a language model: top-activating contexts, activation
histograms, density, logit effects, a per-layer census, and a search over prompts.

    report = feature_report(model, sae, eval_tokens, "blocks.3.hook_resid_post")   # a JSON-able dict
    hits = find_features(model, sae, "blocks.3.hook_resid_post", ["Paris is in France", "Paris est en France"])

A feature's activation on a token is its code value for that token's activation (the dictionary's
own input scaling applied; BOS positions excluded). Logit effects read the feature's decoder
direction through what writes it into the residual stream (identity for residual/MLP-out/attention-
out hooks, ``W_out`` for ``mlp.hook_post``, ``W_O`` for ``attn.hook_z``) and then ``W_U`` (the final
norm's scale is folded into W_U by fold_ln; its per-token normalisation is ignored, as usual for
direct logit attribution). The census asks, per feature, how much its firing is about one token:
its token share is the fraction of its total activation (over the evaluation tokens) that falls on
its single most-activating token id; a share of at least 0.5 counts the feature as single-token,
below as context-dependent. The report also keeps the older probe, the activation on [BOS, its top
token] over the activation in its top context (``single_token_ratio``), but on SmolLM2 it reads ~0
for most features because the position after BOS is atypical (its MLP-output norm at layer 3 is ~5
against 13-27 elsewhere), so the census does not use it.
"""
from __future__ import annotations

import re

import torch
from torch import Tensor

from sparsekit.activations.store import check_contexts, check_hooks, hook_activations, stop_layer
from sparsekit.sae.base import SparseDictionary

SINGLE_TOKEN_SHARE = 0.5
_MLP_POST = re.compile(r"^blocks\.(\d+)\.mlp\.hook_post$")
_HOOK_Z = re.compile(r"^blocks\.(\d+)\.attn\.hook_z$")


@torch.no_grad()
def feature_activations(model, sae: SparseDictionary, tokens: Tensor, hook: str, batch_contexts: int = 16) -> Tensor:
    """Every feature's activation on every token: [N, T, n_latents] float32 (position 0, BOS, is 0).

    hook: the dictionary's input (an SAE's activation, a transcoder's input hook). Memory is
    N * T * n_latents floats: pass as many contexts as that allows.
    """
    tokens = check_contexts(tokens)
    names = check_hooks(model, hook)
    stop = stop_layer(model, names)
    out = torch.zeros(tokens.shape[0], tokens.shape[1], sae.n_latents)
    was_training = sae.training
    sae.eval()
    try:
        for start in range(0, tokens.shape[0], batch_contexts):
            batch = tokens[start:start + batch_contexts]
            x = hook_activations(model, batch, names, stop)[0]
            codes = sae.dense_codes(sae.encode(x.to(sae.W_enc.dtype) * sae.input_scale)).float().cpu()
            out[start:start + batch.shape[0], 1:] = codes.reshape(batch.shape[0], tokens.shape[1] - 1, -1)
    finally:
        sae.train(was_training)
    return out


def residual_directions(model, hook: str, directions: Tensor) -> Tensor | None:
    """Decoder directions [m, d_out] as they enter the residual stream [m, d_model], or None when
    hook's output is not written there by a known matrix."""
    d_model = model.cfg.d_model
    mlp, z = _MLP_POST.match(hook), _HOOK_Z.match(hook)
    if mlp:
        return directions @ model.blocks[int(mlp.group(1))].mlp.W_out.detach()
    if z:
        W_O = model.blocks[int(z.group(1))].attn.W_O.detach()  # [heads, d_head, d_model]
        return directions @ W_O.reshape(-1, d_model)
    if directions.shape[1] == d_model:
        return directions
    return None


@torch.no_grad()
def logit_effects(model, sae: SparseDictionary, hook: str, features, top: int = 10) -> dict | None:
    """Per feature: the `top` tokens its decoder direction promotes and suppresses most through W_U,
    {feature: {"promoted": [(token, value)], "suppressed": [(token, value)]}} (None: not a residual writer).
    hook: where the dictionary writes (an SAE's hook, a transcoder's output hook)."""
    features = [int(f) for f in features]
    directions = residual_directions(model, hook, sae.W_dec.detach()[features].float())
    if directions is None or not features:
        return None
    logits = directions @ model.W_U.detach().float()
    values_up, ids_up = logits.topk(top, dim=1)
    values_down, ids_down = (-logits).topk(top, dim=1)
    result = {}
    for row, feature in enumerate(features):
        result[feature] = {
            "promoted": [(token_string(model, int(i)), float(v)) for i, v in zip(ids_up[row], values_up[row])],
            "suppressed": [(token_string(model, int(i)), -float(v)) for i, v in zip(ids_down[row], values_down[row])]}
    return result


def token_string(model, token_id: int) -> str:
    tokenizer = getattr(model, "tokenizer", None)
    return tokenizer.decode([token_id]) if tokenizer is not None else f"<{token_id}>"


def _histogram(values: Tensor, bins: int = 20) -> dict:
    if values.numel() == 0:
        return {"edges": [], "counts": []}
    high = float(values.max())
    edges = torch.linspace(0.0, high if high > 0 else 1.0, bins + 1)
    counts = torch.histc(values, bins=bins, min=0.0, max=float(edges[-1]))
    return {"edges": [round(float(e), 5) for e in edges], "counts": [int(c) for c in counts]}


def token_shares(acts: Tensor, tokens: Tensor) -> Tensor:
    """acts [N, T, m] (features' activations, >= 0), tokens [N, T] -> per feature the fraction of its
    total activation that falls on its most-activating token id [m] (0 for a feature that never fires)."""
    flat = acts.reshape(-1, acts.shape[-1]).double()
    ids = tokens.reshape(-1).long()
    per_token = torch.zeros(int(ids.max()) + 1, flat.shape[1], dtype=torch.float64).index_add_(0, ids, flat)
    total = per_token.sum(0)
    return torch.where(total > 0, per_token.max(0).values / total.clamp_min(1e-300), torch.zeros_like(total))


@torch.no_grad()
def single_token_ratios(model, sae: SparseDictionary, hook: str, token_ids: Tensor, features: Tensor,
                        in_context: Tensor, bos_id: int) -> Tensor:
    """Per feature: activation on [BOS, its top token] alone / activation in its top context [m]."""
    pairs = torch.stack([torch.full_like(token_ids, bos_id), token_ids], 1)
    alone = feature_activations(model, sae, pairs, hook, batch_contexts=256)[:, 1]  # [m, n]
    alone = alone.gather(1, features[:, None])[:, 0]
    return alone / in_context.clamp_min(1e-12)


@torch.no_grad()
def feature_report(model, sae: SparseDictionary, tokens: Tensor, hook: str, output_hook: str | None = None,
                   max_features: int | None = 200, examples: int = 8, window: int = 12, logit_top: int = 8,
                   bins: int = 20) -> dict:
    """Everything the dashboard shows, as a JSON-able dict.

    tokens [N, T]: held-out contexts (BOS first). hook: the dictionary's input hook; output_hook:
    where it writes (default hook; a transcoder's target). Features: the alive ones, densest first,
    at most max_features. Per feature: density (fraction of tokens where it fires), max activation,
    histogram of its non-zero activations, its `examples` top contexts (the `window` tokens on each
    side of the max, every token with its activation), logit effects, its token share (which sets its
    census kind) and the [BOS, token] ratio.
    Census: single-token vs context-dependent counts among the reported features, and dead count.
    """
    tokens = check_contexts(tokens)
    acts = feature_activations(model, sae, tokens, hook)                     # [N, T, n]
    n_tokens = tokens.shape[0] * (tokens.shape[1] - 1)
    fires = (acts > 0).sum((0, 1))
    density = fires.double() / n_tokens
    alive = torch.nonzero(fires > 0)[:, 0]
    order = alive[torch.argsort(density[alive], descending=True, stable=True)]
    chosen = order if max_features is None else order[:max_features]
    per_context_max, per_context_pos = acts.max(1)                          # [N, n]
    logits = logit_effects(model, sae, output_hook or hook, chosen.tolist(), logit_top) or {}
    bos_id = int(tokens[0, 0])
    features = []
    top_token_ids, top_values = [], []
    for feature in chosen.tolist():
        values, contexts = per_context_max[:, feature].topk(min(examples, tokens.shape[0]))
        rows = []
        for value, context in zip(values.tolist(), contexts.tolist()):
            if value <= 0:
                break
            position = int(per_context_pos[context, feature])
            lo, hi = max(1, position - window), min(tokens.shape[1], position + window + 1)
            rows.append({"context": context, "max_position": position - lo, "max_act": value,
                         "tokens": [token_string(model, int(t)) for t in tokens[context, lo:hi]],
                         "acts": [round(float(a), 4) for a in acts[context, lo:hi, feature]]})
        best_context = rows[0]["context"]
        top_token_ids.append(int(tokens[best_context, per_context_pos[best_context, feature]]))
        top_values.append(rows[0]["max_act"])
        nonzero = acts[..., feature][acts[..., feature] > 0]
        features.append({"id": feature, "density": float(density[feature]), "max_act": float(nonzero.max()),
                         "mean_act": float(nonzero.mean()), "histogram": _histogram(nonzero, bins),
                         "examples": rows, "logits": logits.get(feature)})
    if features:
        ratios = single_token_ratios(model, sae, hook, torch.tensor(top_token_ids), chosen, torch.tensor(top_values),
                                     bos_id)
        shares = token_shares(acts[:, 1:, chosen], tokens[:, 1:])
        for entry, ratio, share in zip(features, ratios.tolist(), shares.tolist()):
            entry["single_token_ratio"] = round(ratio, 4)
            entry["token_share"] = round(share, 4)
            entry["kind"] = "single-token" if share >= SINGLE_TOKEN_SHARE else "context"
    census = {"features": sae.n_latents, "dead": int((fires == 0).sum()), "reported": len(features),
              "single_token": sum(f["kind"] == "single-token" for f in features),
              "context": sum(f["kind"] == "context" for f in features)}
    return {"model": str(getattr(model.cfg, "model_name", "")), "hook": hook, "output_hook": output_hook or hook,
            "architecture": sae.architecture, "n_latents": sae.n_latents, "tokens": n_tokens, "census": census,
            "features": features}


@torch.no_grad()
def find_features(model, sae: SparseDictionary, hook: str, texts, threshold: float = 0.0, top: int = 20) -> list[dict]:
    """Features active (max activation over a text's tokens > threshold) in every one of `texts` —
    e.g. one concept in several phrasings or languages. Returns up to `top` features, strongest
    first by their weakest text: [{"id", "min_act", "acts": [max activation per text]}].
    hook: the dictionary's input hook."""
    if isinstance(texts, str) or not texts or not all((isinstance(t, str) and t) or isinstance(t, Tensor) for t in texts):
        raise ValueError("texts must be a non-empty list of non-empty strings (or 1-D token tensors, BOS first)")
    maxima = []
    for text in texts:
        tokens = model.to_tokens(text, prepend_bos=True) if isinstance(text, str) else text.reshape(1, -1).long()
        if tokens.shape[1] < 2:
            raise ValueError(f"texts: {text!r} tokenises to nothing")
        maxima.append(feature_activations(model, sae, tokens, hook)[0, 1:].max(0).values)
    stacked = torch.stack(maxima)                                            # [texts, n]
    weakest = stacked.min(0).values
    candidates = torch.nonzero(weakest > threshold)[:, 0]
    candidates = candidates[torch.argsort(weakest[candidates], descending=True, stable=True)][:top]
    return [{"id": int(f), "min_act": float(weakest[f]), "acts": [float(v) for v in stacked[:, f]]}
            for f in candidates]
