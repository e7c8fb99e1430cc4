"""What a dictionary's features mean on a language model: top-activating contexts, activation
histograms, density, logit effects, a per-layer census, and a search over prompts.

    report = feature_report(model, sae, eval_tokens, "blocks.3.hook_resid_post")   # a JSON-able dict
    hits = find_features(model, sae, "blocks.3.hook_resid_post", ["Paris is in France", "Paris est en France"])

A feature's activation on a token is its code value for that token's activation (the dictionary's
own input scaling applied; BOS positions excluded). Logit effects read the feature's decoder
direction through what writes it into the residual stream (identity for residual/MLP-out/attention-
out hooks, ``W_out`` for ``mlp.hook_post``, ``W_O`` for ``attn.hook_z``; on a Hugging Face model the
linear layer whose input the path names) and then the unembedding (``W_U``, the final norm's scale
folded in; its per-token normalisation is ignored, as usual for direct logit attribution).

``model`` is a TransformerLens ``HookedTransformer`` (hooks: hook names) or a Hugging Face causal LM
seen as ``lm_models.HFModel(model, tokenizer)`` (hooks: module paths, ``:input`` allowed); every
function reads it only through ``lm_models`` (activations at a hook, directions to logits, token
strings), so the report and the dashboard are the same for both.

The census asks, per feature, how much its firing is about one token:
its token share is the fraction of its total activation (over the evaluation tokens) that falls on
its single most-activating token id; a share of at least 0.5 counts the feature as single-token,
below as context-dependent. The report also keeps the older probe, the activation on [BOS, its top
token] over the activation in its top context (``single_token_ratio``), but on SmolLM2 it reads ~0
for most features because the position after BOS is atypical (its MLP-output norm at layer 3 is ~5
against 13-27 elsewhere), so the census does not use it.

``feature_report`` streams: codes come batch by batch (``codes_by_batch``: sparse entries, see
``top_examples``), so its memory grows with n_latents * examples, not with the number of tokens;
``feature_activations`` (every activation in one [N, T, n_latents] tensor) is for small inputs and
is the reference the tests compare the stream with.
"""
from __future__ import annotations

import torch
from torch import Tensor

from sparsekit._util.validate import is_int
from sparsekit.activations.store import check_contexts, resolve_special_ids
from sparsekit.activations.text import kept_positions
from sparsekit.analysis.lm_models import as_lm
from sparsekit.analysis.top_examples import Histograms, LatentStats, TokenSums, TopContexts, positive_codes
from sparsekit.sae.base import SparseDictionary

SINGLE_TOKEN_SHARE = 0.5


@torch.no_grad()
def feature_activations(model, sae: SparseDictionary, tokens: Tensor, hook: str, batch_contexts: int = 16) -> Tensor:
    """Every feature's activation on every token: [N, T, n_latents] float32 (position 0, BOS, is 0).

    hook: the dictionary's input (an SAE's activation, a transcoder's input hook). Memory is
    N * T * n_latents floats: pass as many contexts as that allows.
    """
    tokens = check_contexts(tokens)
    lm = as_lm(model)
    lm.check_hook(hook)
    out = torch.zeros(tokens.shape[0], tokens.shape[1], sae.n_latents)
    was_training = sae.training
    sae.eval()
    try:
        for start in range(0, tokens.shape[0], batch_contexts):
            batch = tokens[start:start + batch_contexts]
            x = lm.activations(batch, hook)
            codes = sae.dense_codes(sae.encode(x.to(sae.W_enc.dtype) * sae.input_scale)).float().cpu()
            out[start:start + batch.shape[0], 1:] = codes.reshape(batch.shape[0], tokens.shape[1] - 1, -1)
    finally:
        sae.train(was_training)
    return out


def residual_directions(model, hook: str, directions: Tensor) -> Tensor | None:
    """Decoder directions [m, d_out] as they enter the residual stream [m, d_model], or None when
    hook's output is not written there by a known matrix (``lm_models``: LensModel, HFModel)."""
    return as_lm(model).residual_directions(hook, directions)


@torch.no_grad()
def logit_effects(model, sae: SparseDictionary, hook: str, features, top: int = 10) -> dict | None:
    """Per feature: the `top` tokens its decoder direction promotes and suppresses most through the
    unembedding, {feature: {"promoted": [(token, value)], "suppressed": [(token, value)]}} (None: not a
    residual writer). hook: where the dictionary writes (an SAE's hook, a transcoder's output hook)."""
    lm = as_lm(model)
    features = [int(f) for f in features]
    directions = lm.residual_directions(hook, sae.W_dec.detach()[features].float())
    if directions is None or not features:
        return None
    logits = lm.unembed(directions)
    values_up, ids_up = logits.topk(top, dim=1)
    values_down, ids_down = (-logits).topk(top, dim=1)
    result = {}
    for row, feature in enumerate(features):
        result[feature] = {
            "promoted": [(lm.token_string(int(i)), float(v)) for i, v in zip(ids_up[row], values_up[row])],
            "suppressed": [(lm.token_string(int(i)), -float(v)) for i, v in zip(ids_down[row], values_down[row])]}
    return result


def token_string(model, token_id: int) -> str:
    return as_lm(model).token_string(token_id)


def token_shares(acts: Tensor, tokens: Tensor) -> Tensor:
    """acts [N, T, m] (features' activations, >= 0), tokens [N, T] -> per feature the fraction of its
    total activation that falls on its most-activating token id [m] (0 for a feature that never fires)."""
    flat = acts.reshape(-1, acts.shape[-1]).double()
    ids = tokens.reshape(-1).long()
    per_token = torch.zeros(int(ids.max()) + 1, flat.shape[1], dtype=torch.float64).index_add_(0, ids, flat)
    total = per_token.sum(0)
    return torch.where(total > 0, per_token.max(0).values / total.clamp_min(1e-300), torch.zeros_like(total))


def codes_by_batch(model, sae: SparseDictionary, tokens: Tensor, hook: str, batch_contexts: int = 16,
                   special_ids=()):
    """The dictionary's positive codes on tokens [N, T], batch_contexts contexts at a time: yields
    (first context of the batch, values [E] float32, rows [E], latents [E] int64), a row being a token
    of the batch at positions 1..T-1 in context-major order (row r: context first + r // (T - 1),
    position 1 + r % (T - 1)). Memory per batch: the entries and one [rows, n_latents] code block
    (``top_examples.positive_codes``), never [N, T, n_latents]. Entries at positions holding one of
    ``special_ids`` (resolved as in ``sparsekit.activations.store``: "tokenizer" for the model's
    tokenizer's) are left out; the row numbering is unchanged. The dictionary is in eval mode
    throughout and given back in its mode."""
    if not isinstance(batch_contexts, int) or isinstance(batch_contexts, bool) or batch_contexts < 1:
        raise ValueError(f"batch_contexts must be a positive int, got {batch_contexts!r}")
    lm = as_lm(model)
    lm.check_hook(hook)
    special = resolve_special_ids(lm, special_ids)
    was_training = sae.training
    sae.eval()
    try:
        for start in range(0, tokens.shape[0], batch_contexts):
            batch = tokens[start:start + batch_contexts]
            x = lm.activations(batch, hook)
            values, rows, latents = positive_codes(sae, x.to(device=sae.W_enc.device, dtype=sae.W_enc.dtype) * sae.input_scale)
            if special:
                kept_rows = kept_positions(batch, special)[:, 1:].reshape(-1).to(rows.device)
                mine = kept_rows[rows]
                values, rows, latents = values[mine], rows[mine], latents[mine]
            yield start, values, rows, latents
    finally:
        sae.train(was_training)


@torch.no_grad()
def single_token_ratios(model, sae: SparseDictionary, hook: str, token_ids: Tensor, features: Tensor,
                        in_context: Tensor, bos_id: int, batch_contexts: int = 256) -> Tensor:
    """Per feature: activation on [BOS, its top token] alone / activation in its top context [m].
    token_ids, features, in_context: [m]; batch_contexts pairs per forward pass."""
    pairs = torch.stack([torch.full_like(token_ids, bos_id), token_ids], 1)
    alone = torch.zeros(pairs.shape[0], dtype=torch.float32)
    for start, values, rows, latents in codes_by_batch(model, sae, pairs, hook, batch_contexts):
        mine = latents == features[start + rows]  # row r is pair start + r (one position each)
        alone[start + rows[mine]] = values[mine]
    return alone / in_context.clamp_min(1e-12)


@torch.no_grad()
def feature_report(model, sae: SparseDictionary, tokens: Tensor, hook: str, output_hook: str | None = None,
                   max_features: int | None = 200, examples: int = 8, window: int = 12, logit_top: int = 8,
                   bins: int = 20, batch_contexts: int = 16, special_ids="tokenizer") -> dict:
    """Everything the dashboard shows, as a JSON-able dict.

    model: a HookedTransformer, or ``lm_models.HFModel(model, tokenizer)`` for a transformers causal
    LM (a bare transformers model works too, its tokens then shown as ``<id>``).
    tokens [N, T]: held-out contexts (BOS first). hook: the dictionary's input hook; output_hook:
    where it writes (default hook; a transcoder's target). Features: the alive ones, densest first
    (ties: lower id), at most max_features. Per feature: density (fraction of tokens where it fires),
    max activation, histogram of its non-zero activations (``bins`` equal bins over [0, max]), its
    `examples` top contexts (each context's first position with its largest activation; contexts by
    that activation, ties to the lower context; the `window` tokens on each side, every token with
    its activation), logit effects, its token share (which sets its census kind) and the
    [BOS, token] ratio. Census: single-token vs context-dependent counts among the reported features,
    and dead = latents that never fired on these tokens ("dead_over" says so). Tokens: positions 1..T-1
    except those holding a special token (``special_ids``, default "tokenizer": the model's tokenizer's
    BOS, EOS, pad, ...; None: only position 0 is left out), as in training.

    Streamed in two passes over batches of batch_contexts contexts (``codes_by_batch``), never a
    [N, T, n_latents] tensor: the first counts fires, sums, maxima and keeps each latent's top
    contexts (memory O(n_latents * examples)); the second, for the chosen features only, bins their
    activations over [0, the maximum of the first pass] (the edges are exact, no rescaling), sums
    them per token id (the token share) and reads their example windows (memory O(m * bins) +
    O(m * examples * window) + one entry per (token id, feature) pair that occurs).
    """
    tokens = check_contexts(tokens)
    for name, value in (("examples", examples), ("bins", bins), ("logit_top", logit_top)):
        if not is_int(value) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not is_int(window) or window < 0:
        raise ValueError(f"window must be a non-negative int, got {window!r}")
    if max_features is not None and (not is_int(max_features) or max_features < 0):
        raise ValueError(f"max_features must be None or a non-negative int, got {max_features!r}")
    model = as_lm(model)
    n_contexts, length = tokens.shape
    per_context = length - 1
    special = resolve_special_ids(model, special_ids)
    n_tokens = int(kept_positions(tokens, special).sum())
    stats, top = LatentStats(sae.n_latents), TopContexts(sae.n_latents, examples)
    for start, values, rows, latents in codes_by_batch(model, sae, tokens, hook, batch_contexts, special):
        stats.add(values, latents)
        top.add(values, latents, start + rows // per_context, 1 + rows % per_context)
    fires = stats.fires
    density = fires.double() / n_tokens
    alive = torch.nonzero(fires > 0)[:, 0]
    order = alive[torch.argsort(density[alive], descending=True, stable=True)]
    chosen = order if max_features is None else order[:max_features]
    hist, shares, windows = _second_pass(model, sae, tokens, hook, chosen, stats, top, window, bins, batch_contexts,
                                         special)
    logits = logit_effects(model, sae, output_hook or hook, chosen.tolist(), logit_top) or {}
    bos_id = int(tokens[0, 0])
    features = []
    top_token_ids, top_values = [], []
    for slot, feature in enumerate(chosen.tolist()):
        rows = []
        for j in range(examples):
            context, position = int(top.contexts[feature, j]), int(top.positions[feature, j])
            if context < 0:
                break
            lo, hi = max(1, position - window), min(length, position + window + 1)
            rows.append({"context": context, "max_position": position - lo, "max_act": float(top.values[feature, j]),
                         "tokens": [model.token_string(int(t)) for t in tokens[context, lo:hi]],
                         "acts": [round(float(a), 4) for a in windows[slot, j, :hi - lo]]})
        top_token_ids.append(int(tokens[int(top.contexts[feature, 0]), int(top.positions[feature, 0])]))
        top_values.append(rows[0]["max_act"])
        features.append({"id": feature, "density": float(density[feature]), "max_act": float(stats.maxima[feature]),
                         "mean_act": float(stats.sums[feature] / fires[feature]),
                         "histogram": {"edges": hist.edges(slot), "counts": hist.counts[slot].tolist()},
                         "examples": rows, "logits": logits.get(feature)})
    if features:
        ratios = single_token_ratios(model, sae, hook, torch.tensor(top_token_ids), chosen, torch.tensor(top_values),
                                     bos_id, batch_contexts * per_context)  # as many rows per pass
        for entry, ratio, share in zip(features, ratios.tolist(), shares.tolist()):
            entry["single_token_ratio"] = round(ratio, 4)
            entry["token_share"] = round(share, 4)
            entry["kind"] = "single-token" if share >= SINGLE_TOKEN_SHARE else "context"
    census = {"features": sae.n_latents, "dead": int((fires == 0).sum()),
              "dead_over": f"never fired on these {n_tokens} evaluation tokens", "reported": len(features),
              "single_token": sum(f["kind"] == "single-token" for f in features),
              "context": sum(f["kind"] == "context" for f in features)}
    return {"model": model.name, "hook": hook, "output_hook": output_hook or hook,
            "architecture": sae.architecture, "n_latents": sae.n_latents, "tokens": n_tokens,
            "contexts": n_contexts, "context_len": length, "census": census, "features": features}


def _second_pass(model, sae, tokens, hook, chosen, stats, top, window, bins, batch_contexts, special):
    """The chosen features' histograms, token shares [m] and example windows [m, examples, 2 * window + 1]
    (activation at window offset o of example j: position lo + o, lo = max(1, max position - window))."""
    m, examples, per_context = chosen.numel(), top.values.shape[1], tokens.shape[1] - 1
    hist, sums = Histograms(stats.maxima[chosen], bins), TokenSums(max(m, 1))
    windows = torch.zeros(m, examples, 2 * window + 1)
    if m == 0:
        return hist, torch.zeros(0, dtype=torch.float64), windows
    slot_of = torch.full((sae.n_latents,), -1, dtype=torch.int64)
    slot_of[chosen] = torch.arange(m)
    example_contexts = top.contexts[chosen]                                   # [m, examples]
    starts = (top.positions[chosen] - window).clamp_min(1)                   # [m, examples]
    shown = torch.zeros(tokens.shape[0] + 1, dtype=torch.bool)
    shown[example_contexts.reshape(-1)] = True                               # -1 (empty) lands on the spare end
    for start, values, rows, latents in codes_by_batch(model, sae, tokens, hook, batch_contexts, special):
        slots = slot_of[latents]
        mine = slots >= 0
        values, rows, slots = values[mine], rows[mine], slots[mine]
        contexts, positions = start + rows // per_context, 1 + rows % per_context
        hist.add(values, slots)
        sums.add(values, slots, tokens[contexts, positions])
        near = shown[contexts]
        values, slots, contexts, positions = values[near], slots[near], contexts[near], positions[near]
        for j in range(examples):  # one example slot at a time: [E] masks, not [E, examples]
            offset = positions - starts[slots, j]
            inside = (example_contexts[slots, j] == contexts) & (offset >= 0) & (offset < windows.shape[2])
            windows[slots[inside], j, offset[inside]] = values[inside]
    return hist, sums.shares(), windows


@torch.no_grad()
def find_features(model, sae: SparseDictionary, hook: str, texts, threshold: float = 0.0, top: int = 20) -> list[dict]:
    """Features active (max activation over a text's tokens > threshold) in every one of `texts` —
    e.g. one concept in several phrasings or languages. Returns up to `top` features, strongest
    first by their weakest text: [{"id", "min_act", "acts": [max activation per text]}].
    hook: the dictionary's input hook."""
    if isinstance(texts, str) or not texts or not all((isinstance(t, str) and t) or isinstance(t, Tensor) for t in texts):
        raise ValueError("texts must be a non-empty list of non-empty strings (or 1-D token tensors, BOS first)")
    model = as_lm(model)
    maxima = []
    for text in texts:
        tokens = model.to_tokens(text) if isinstance(text, str) else text.reshape(1, -1).long()
        if tokens.shape[1] < 2:
            raise ValueError(f"texts: {text!r} tokenises to nothing")
        stats = LatentStats(sae.n_latents)
        for _, values, _, latents in codes_by_batch(model, sae, tokens, hook):
            stats.add(values, latents)
        maxima.append(stats.maxima)
    stacked = torch.stack(maxima)                                            # [texts, n]
    weakest = stacked.min(0).values
    candidates = torch.nonzero(weakest > threshold)[:, 0]
    candidates = candidates[torch.argsort(weakest[candidates], descending=True, stable=True)][:top]
    return [{"id": int(f), "min_act": float(weakest[f]), "acts": [float(v) for v in stacked[:, f]]}
            for f in candidates]
