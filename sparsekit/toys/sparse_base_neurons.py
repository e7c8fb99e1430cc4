"""Per-neuron evidence for a trained sparse base model: where each MLP neuron fires, its facets, what
disambiguates them, and whether its magnitude codes for different next tokens.

``collect`` runs the model over held-out contexts and keeps, at every non-BOS position p (P of them):
tokens, post = ``blocks.0.mlp.hook_post`` [P, d_mlp], resid_mid = ``blocks.0.hook_resid_mid`` [P, d_model]
(the MLP's input before ln2 and, in the standard variant, what the unembedding sees beside mlp_out),
and probs = softmax(logits) [P, V].

``analyse_neuron`` for neuron i, at the (at most ``max_samples``, a seeded subsample) positions where
post[:, i] > 0, with activations a [M]:
- residual facets: ``facets`` on the residual direction u = (resid_mid - mean resid_mid) / ||...||;
- token facets: ``facets`` on the preceding characters: one-hot(char at p) + 0.5 one-hot(char at p-1)
  + 0.25 one-hot(char at p-2) (all within the context);
- facet agreement: adjusted Rand index of the two facet labelings;
- facet divergence: Jensen-Shannon divergence (bits) of the residual facets' mean next-token
  predictions, weighted by facet size (0 with one facet): do the facets lead to different continuations?
- disambiguation (residual facets, k >= 2): balanced accuracy of ridge classifiers predicting the facet
  from the other d_mlp - 1 neurons' activations, and from the neuron's own magnitude (one-hot of its
  activation decile), beside chance = 1 / k;
- magnitude code: ``magnitude_code_score`` on the model's predictions (``magnitude_code``) and on the
  neuron's own effect (``magnitude_code_effect``): the distribution relu(p - p_ablated) / sum, where
  p_ablated are the predictions with post[:, i] set to 0 (recomputed by ``logits_from_mlp``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from sparsekit._util.seeding import derive_seed

from .sparse_base_analysis import (
    adjusted_rand_index,
    facet_predictability,
    facets,
    jensen_shannon,
    magnitude_bands,
    magnitude_code_score,
)
from .sparse_base_model import HOOK_POST, SparseBaseModel, decode

HOOK_RESID_MID = "blocks.0.hook_resid_mid"
TOKEN_WEIGHTS = (1.0, 0.5, 0.25)  # the character at the firing position, then the one or two before it


@torch.no_grad()
def collect(trained: SparseBaseModel, max_contexts: int = 600, batch_size: int = 64) -> dict:
    """Run the held-out contexts (the first max_contexts) -> {"contexts" [N, T], "post" [P, d_mlp],
    "resid_mid" [P, d_model], "probs" [P, V], "context" [P], "position" [P]} over non-BOS positions."""
    contexts = trained.held_out[:max_contexts]
    posts, resids, probs = [], [], []
    for i in range(0, contexts.shape[0], batch_size):
        logits, cache = trained.model.run_with_cache(contexts[i:i + batch_size],
                                                     names_filter=lambda name: name in (HOOK_POST, HOOK_RESID_MID))
        posts.append(cache[HOOK_POST][:, 1:].reshape(-1, cache[HOOK_POST].shape[-1]))
        resids.append(cache[HOOK_RESID_MID][:, 1:].reshape(-1, cache[HOOK_RESID_MID].shape[-1]))
        probs.append(logits[:, 1:].softmax(-1).reshape(-1, logits.shape[-1]))
    N, T = contexts.shape
    return {"contexts": contexts, "post": torch.cat(posts), "resid_mid": torch.cat(resids), "probs": torch.cat(probs),
            "context": torch.arange(N).repeat_interleave(T - 1), "position": torch.arange(1, T).repeat(N)}


@torch.no_grad()
def logits_from_mlp(trained: SparseBaseModel, resid_mid: Tensor, post: Tensor) -> Tensor:
    """Logits [M, V] from the MLP activations post [M, d_mlp] and resid_mid [M, d_model], positionwise:
    unembed(ln_final(r)) with r = resid_mid + post @ W_out + b_out (standard) or post @ W_out + b_out (cut)."""
    model = trained.model
    mlp_out = post @ model.blocks[0].mlp.W_out + model.blocks[0].mlp.b_out
    resid = mlp_out if trained.config.variant == "cut" else resid_mid + mlp_out
    return model.unembed(model.ln_final(resid[None]))[0]


def token_features(data: dict, rows: Tensor, vocab_size: int) -> Tensor:
    """[M, 3 * V]: weighted one-hots of the characters at, one before and two before each position."""
    parts = []
    for back, weight in enumerate(TOKEN_WEIGHTS):
        position = (data["position"][rows] - back).clamp(min=0)
        chars = data["contexts"][data["context"][rows], position]
        parts.append(weight * torch.nn.functional.one_hot(chars, vocab_size).float())
    return torch.cat(parts, 1)


def snippet(trained: SparseBaseModel, data: dict, row: int, width: int = 16) -> str:
    """The (at most) width characters ending at position row, BOS shown as '⟨'."""
    context, position = int(data["context"][row]), int(data["position"][row])
    return decode(data["contexts"][context, max(0, position - width + 1):position + 1], trained.vocabulary)


def top_tokens(distribution: Tensor, vocabulary: list, n: int = 3) -> list[tuple[str, float]]:
    """The n most probable tokens of distribution [V] as (character, probability)."""
    values, ids = distribution.topk(n)
    return [(vocabulary[int(i)], float(v)) for v, i in zip(values, ids)]


def _facet_table(trained, data, rows, labels, activations, k) -> list[dict]:
    table = []
    chars = data["contexts"][data["context"][rows], data["position"][rows]]
    for f in range(k):
        members = (labels == f).nonzero().flatten()
        counts = torch.bincount(chars[members], minlength=len(trained.vocabulary))
        order = members[activations[members].argsort(descending=True)]
        table.append({
            "count": int(members.numel()), "mean_activation": float(activations[members].mean()),
            "top_chars": [(trained.vocabulary[int(c)], int(counts[c]) / members.numel())
                          for c in counts.topk(3).indices if counts[c] > 0],
            "examples": [snippet(trained, data, int(rows[j])) for j in order[:3]],
            "predicts": top_tokens(data["probs"][rows[members]].mean(0), trained.vocabulary)})
    return table


def analyse_neuron(trained: SparseBaseModel, data: dict, neuron: int, max_samples: int = 1000, k_max: int = 4,
                   n_bands: int = 3, seed: int = 0) -> dict:
    """The evidence for one neuron (module docstring); None-free dict of floats, ints, lists and strings."""
    post = data["post"]
    firing = (post[:, neuron] > 0).nonzero().flatten()
    density = firing.numel() / post.shape[0]
    gen = torch.Generator().manual_seed(derive_seed(seed, neuron))
    rows = firing[torch.randperm(firing.numel(), generator=gen)[:max_samples]] if firing.numel() > max_samples else firing
    a = post[rows, neuron]
    resid = data["resid_mid"][rows] - data["resid_mid"].mean(0)
    directions = resid / resid.norm(dim=1, keepdim=True).clamp(min=1e-8)
    by_residual = facets(directions, k_max, seed=seed)
    by_tokens = facets(token_features(data, rows, len(trained.vocabulary)), k_max, seed=seed)
    labels, k = by_residual["labels"], by_residual["k"]
    probs = data["probs"][rows]
    sizes = torch.bincount(labels, minlength=k).double()
    facet_means = torch.stack([probs[labels == f].double().mean(0) for f in range(k)])
    result = {
        "neuron": neuron, "fires": int(firing.numel()), "density": density, "samples": int(rows.numel()),
        "mean_activation": float(a.mean()), "max_activation": float(a.max()),
        "residual_facets": k, "residual_silhouette": by_residual["silhouette"],
        "token_facets": by_tokens["k"], "token_silhouette": by_tokens["silhouette"],
        "facet_agreement_ari": adjusted_rand_index(labels, by_tokens["labels"]),
        "facet_divergence_bits": jensen_shannon(facet_means, sizes) if k > 1 else 0.0,
        "chance": 1.0 / k,
        "facets": _facet_table(trained, data, rows, labels, a, k),
        "token_facet_table": _facet_table(trained, data, rows, by_tokens["labels"], a, by_tokens["k"]),
    }
    if k > 1:
        others = torch.cat([post[rows, :neuron], post[rows, neuron + 1:]], 1)
        deciles = torch.nn.functional.one_hot(magnitude_bands(a, min(10, a.numel())), min(10, a.numel())).float()
        result["other_neurons_accuracy"] = facet_predictability(others, labels)
        result["magnitude_accuracy"] = facet_predictability(deciles, labels)
    else:
        result["other_neurons_accuracy"] = result["magnitude_accuracy"] = None
    predicted = magnitude_code_score(a, probs, n_bands, seed=seed)
    ablated_post = post[rows].clone()
    ablated_post[:, neuron] = 0
    ablated = logits_from_mlp(trained, data["resid_mid"][rows], ablated_post).softmax(-1)
    promoted = (probs - ablated).clamp(min=0)
    promoted = promoted / promoted.sum(1, keepdim=True).clamp(min=1e-12)
    effect = magnitude_code_score(a, promoted, n_bands, seed=seed)
    result["magnitude_code"] = predicted["score"]
    result["magnitude_code_effect"] = effect["score"]
    result["top_token_disagreement"] = predicted["top_token_disagreement"]
    result["top_token_disagreement_effect"] = effect["top_token_disagreement"]
    result["bands"] = [{**band, "predicts": top_tokens(predicted["band_means"][b], trained.vocabulary),
                        "promotes": top_tokens(effect["band_means"][b], trained.vocabulary)}
                       for b, band in enumerate(predicted["bands"])]
    result["band_means"] = predicted["band_means"].float()  # [n_bands, V]; tensors are dropped from summary.json
    result["facet_means"] = facet_means.float()  # [k, V]
    return result


def analyse_model(trained: SparseBaseModel, data: dict, min_fires: int = 50, progress: bool = True, **options) -> list[dict]:
    """analyse_neuron for every neuron that fires at >= min_fires collected positions, by neuron index."""
    from tqdm import tqdm

    fires = (data["post"] > 0).sum(0)
    alive = [int(i) for i in (fires >= min_fires).nonzero().flatten()]
    return [analyse_neuron(trained, data, i, **options)
            for i in tqdm(alive, desc="neurons", disable=not progress, leave=False)]
