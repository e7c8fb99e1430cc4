"""Pruning an attribution graph by influence on the logits, and its JSON (Ameisen et al. 2025,
"Circuit Tracing", transformer-circuits.pub, appendix "Graph pruning").

    A_n = |A| with each row (a target's incoming edges) scaled to sum to 1
    B   = A_n + A_n^2 + ... = (I - A_n)^-1 - I        (the graph is acyclic: the series is finite)
    influence = w B                                   w: each logit node's probability, 0 elsewhere

A node's influence is its total weight over all paths into the logits, weighted by the logits'
probabilities. The paper's pruning (and circuit-tracer's ``prune_graph``, its released code) ranks all
nodes together by influence and keeps those covering 80% of the total (node threshold; circuit-tracer
then keeps every embedding and logit whatever its rank), then the edges covering 98% of the edge
score, with no cap on the node count. That assumes the transcoder covers every layer, so that error
nodes carry a minor share. A CLT over a few layers of a deep model leaves every uncovered MLP's
output at every position as an error node: on SmolLM2 with a CLT on layers 3-5 (512 latents per
layer, 40k tokens) those carried 94% of the influence, the 80% were reached after 53 error nodes
and the most influential feature ranked 81st, so the published rule kept no feature at all.

``prune`` therefore ranks by kind (``rank="by_kind"``, the default): the logits are kept; then the
fewest features covering ``node_threshold`` of the *features'* influence, at most the node budget
(``max_nodes`` less the logits) less a reserve of a quarter of it; then the fewest error and
embedding nodes covering ``node_threshold`` of *their* influence, in what the features left of the
budget. Then the edges among the kept nodes by edge score A_n[t, s] * (influence[t] + w[t]): those
whose scores sum to ``edge_threshold`` (0.98) of the total, the features' outgoing edges ranked apart
from the other sources' (with errors dominating every row of A_n, one ranking would cut every
feature's edges, and with them the features). ``rank="together"`` is the published rule: one node
ranking capped at ``max_nodes``, one edge ranking. In both, nodes left without an edge are dropped.
Settings record each kind's share of the influence (``influence_share``) and what was kept; a pruned
graph without features warns (``NoFeaturesKept``): it explains nothing about the CLT.
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch
from torch import Tensor

from sparsekit._util.atomic import atomic_write_bytes
from sparsekit._util.validate import positive_int

from .attribution import Graph


def normalized_adjacency(adjacency: Tensor) -> Tensor:
    """|A| [N, N] with each nonzero row scaled to sum to 1."""
    weights = adjacency.abs().double()
    totals = weights.sum(1, keepdim=True)
    return torch.where(totals > 0, weights / totals.clamp_min(1e-300), torch.zeros_like(weights))


def influence(adjacency: Tensor, logit_weights: Tensor) -> Tensor:
    """Each node's influence on the weighted logits [N] (module docstring): y solves (I - A_n)^T y = w,
    influence = y - w."""
    A = normalized_adjacency(adjacency)
    w = logit_weights.double()
    y = torch.linalg.solve(torch.eye(A.shape[0], dtype=A.dtype) - A.T, w)
    return y - w


def _threshold_count(scores: Tensor, fraction: float) -> int:
    """How many of scores (sorted descending) it takes for their sum to reach fraction of the total."""
    total = float(scores.sum())
    if total <= 0:
        return 0
    cumulative = scores.cumsum(0) / total
    return min(int((cumulative < fraction).sum()) + 1, scores.numel())


def _check_fraction(name: str, value) -> float:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1):
        raise ValueError(f"{name} must be a fraction in (0, 1], got {value!r}")
    return float(value)


RANKS = ("by_kind", "together")
FEATURE_SHARE = 0.75  # of the node budget, at most, when error and embedding nodes want the rest


class NoFeaturesKept(UserWarning):
    """A pruned attribution graph holds no feature node."""


def _keep_by_threshold(candidates: Tensor, scores: Tensor, fraction: float, cap: int) -> Tensor:
    """The fewest of candidates, most influential first, whose (positive) influence reaches fraction
    of theirs, at most cap."""
    if candidates.numel() == 0 or cap <= 0:
        return candidates[:0]
    order = candidates[scores[candidates].argsort(descending=True)]
    return order[:min(_threshold_count(scores[order].clamp_min(0), fraction), cap)]


def _kept_nodes(graph: Graph, scores: Tensor, node_threshold: float, max_nodes: int, rank: str) -> Tensor:
    logits = graph.kind_indices("logit")
    budget = max_nodes - logits.numel()
    if rank == "together":
        others = torch.tensor([i for i, node in enumerate(graph.nodes) if node["kind"] != "logit"], dtype=torch.int64)
        return torch.cat([_keep_by_threshold(others, scores, node_threshold, budget), logits])
    features = graph.kind_indices("feature")
    sources = torch.tensor([i for i, node in enumerate(graph.nodes) if node["kind"] in ("error", "embedding")],
                           dtype=torch.int64)
    wanted_sources = _keep_by_threshold(sources, scores, node_threshold, budget)
    reserve = min(wanted_sources.numel(), budget - int(FEATURE_SHARE * budget))
    kept_features = _keep_by_threshold(features, scores, node_threshold, budget - reserve)
    kept_sources = wanted_sources[:budget - kept_features.numel()]
    return torch.cat([kept_features, kept_sources, logits])


def influence_share(graph: Graph, scores: Tensor) -> dict:
    """Each source kind's share of the positive influence of all non-logit nodes: {"feature", "error",
    "embedding"} (NaN when there is none)."""
    positive = scores.clamp_min(0)
    totals = {kind: float(positive[graph.kind_indices(kind)].sum()) for kind in ("feature", "error", "embedding")}
    total = sum(totals.values())
    return {kind: value / total if total > 0 else float("nan") for kind, value in totals.items()}


def prune(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98, max_nodes: int = 100,
          rank: str = "by_kind") -> Graph:
    """The readable part of graph (module docstring) -> a Graph over the kept nodes, whose adjacency
    holds the kept edges' direct effects (zero elsewhere); each node gains "influence"; settings gain
    the thresholds, the rank, each kind's influence share and what was kept. Warns ``NoFeaturesKept``
    when no feature survives."""
    node_threshold = _check_fraction("node_threshold", node_threshold)
    edge_threshold = _check_fraction("edge_threshold", edge_threshold)
    max_nodes = positive_int("max_nodes", max_nodes)
    if rank not in RANKS:
        raise ValueError(f"rank must be one of {RANKS}, got {rank!r}")
    logits = graph.kind_indices("logit")
    if max_nodes <= logits.numel():
        raise ValueError(f"max_nodes={max_nodes} leaves no room beside the {logits.numel()} logit nodes")
    scores = influence(graph.adjacency, graph.logit_weights)
    others = torch.tensor([i for i, node in enumerate(graph.nodes) if node["kind"] != "logit"], dtype=torch.int64)
    kept = _kept_nodes(graph, scores, node_threshold, max_nodes, rank).sort().values
    A_n = normalized_adjacency(graph.adjacency)
    edge_scores = (A_n * (scores + graph.logit_weights.double())[:, None])[kept][:, kept]
    from_feature = torch.tensor([graph.nodes[i]["kind"] == "feature" for i in kept.tolist()], dtype=torch.bool)
    groups = [from_feature, ~from_feature] if rank == "by_kind" else [torch.ones_like(from_feature)]
    mask = torch.zeros_like(edge_scores, dtype=torch.bool)
    for sources in groups:  # by kind: features' outgoing edges ranked apart from the rest's
        group = torch.zeros_like(mask)
        group[:, sources] = True
        flat = torch.where(group, edge_scores, torch.zeros((), dtype=edge_scores.dtype)).flatten()
        ranked = flat.argsort(descending=True)
        mask.view(-1)[ranked[:_threshold_count(flat[ranked], edge_threshold)]] = True
    mask &= graph.adjacency[kept][:, kept] != 0
    connected = mask.any(0) | mask.any(1) | torch.isin(kept, logits)
    kept, mask = kept[connected], mask[connected][:, connected]
    adjacency = torch.where(mask, graph.adjacency[kept][:, kept], torch.zeros((), dtype=torch.float64))
    nodes = [dict(graph.nodes[i], influence=float(scores[i])) for i in kept.tolist()]
    total = float(scores[others].clamp_min(0).sum())
    kept_others = kept[~torch.isin(kept, logits)]
    features = graph.kind_indices("feature")
    share = influence_share(graph, scores)
    settings = {**graph.settings, "node_threshold": node_threshold, "edge_threshold": edge_threshold,
                "max_nodes": max_nodes, "rank": rank, "nodes_before": len(graph.nodes),
                "edges_before": int((graph.adjacency != 0).sum()), "features_before": int(features.numel()),
                "nodes_kept": len(nodes), "edges_kept": int(mask.sum()),
                "features_kept": sum(node["kind"] == "feature" for node in nodes),
                "influence_kept": float(scores[kept_others].clamp_min(0).sum()) / total if total > 0 else float("nan"),
                "influence_share": share}
    if settings["features_kept"] == 0:
        warnings.warn(f"the pruned graph keeps no feature node ({no_features_reason(settings)})", NoFeaturesKept,
                      stacklevel=2)
    return Graph(adjacency, nodes, graph.values[kept], graph.logit_weights[kept], graph.tokens, graph.directions,
                 graph.unembed, graph.token_text, settings)


def no_features_reason(settings: dict) -> str:
    """Why a pruned graph (its settings) may hold no feature, in one clause."""
    if settings["features_before"] == 0:
        return "no feature of the CLT is active on the prompt's positions"
    share = settings["influence_share"]
    return (f"{settings['features_before']} active features carry {share['feature']:.1%} of the logit influence, "
            f"error nodes {share['error']:.1%}, embeddings {share['embedding']:.1%}; rank={settings['rank']!r}, "
            f"max_nodes={settings['max_nodes']}, node_threshold={settings['node_threshold']}")


def node_id(node: dict) -> str:
    """A stable, readable id: f:L{layer}:p{pos}:#{latent}, e:L{layer}:p{pos}, x:p{pos}, y:{token id}."""
    kind = node["kind"]
    if kind == "feature":
        return f"f:L{node['layer']}:p{node['position']}:#{node['latent']}"
    if kind == "error":
        return f"e:L{node['layer']}:p{node['position']}"
    if kind == "embedding":
        return f"x:p{node['position']}"
    return f"y:{node['token_id']}"


@torch.no_grad()
def logit_effects(graph: Graph, feature: int, k: int = 5) -> dict:
    """A feature's summed decoder output through the unembedding directly (W_U, the final norm's scale
    folded in; its per-token normalisation left out) -> {"promoted": [[token, effect]] (k largest),
    "suppressed": [[token, effect]] (k smallest)}; empty lists without directions or an unembedding."""
    if graph.directions is None or graph.unembed is None:
        return {"promoted": [], "suppressed": []}
    W_U = graph.unembed
    effect = graph.directions[feature].to(W_U.dtype) @ W_U
    k = min(k, effect.numel())
    tokenizer = graph.token_text

    def named(ids, values):
        return [[tokenizer.decode([i]) if tokenizer is not None else f"#{i}", float(v)] for i, v in zip(ids, values)]

    up, down = effect.topk(k), effect.topk(k, largest=False)
    return {"promoted": named(up.indices.tolist(), up.values.tolist()),
            "suppressed": named(down.indices.tolist(), down.values.tolist())}


def _finite(value):
    """value with NaN and infinities (also inside a dict) as None: JSON.parse takes no NaN."""
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    return value if not isinstance(value, float) or math.isfinite(value) else None


def graph_to_json(graph: Graph, top_k: int = 3, logit_k: int = 5) -> dict:
    """{"tokens", "nodes": [{id, kind, layer, position, token, latent, activation, influence,
    top_tokens (top_k), promoted and suppressed (logit_k: ``logit_effects``), ...}],
    "edges": [{source, target, weight}] (strongest first), "settings"}."""
    ids = [node_id(node) for node in graph.nodes]
    nodes = []
    for node, nid in zip(graph.nodes, ids):
        entry = {"id": nid, **{key: _finite(value) for key, value in node.items() if key != "feature"}}
        if node["kind"] == "feature":
            effects = logit_effects(graph, node["feature"], max(top_k, logit_k))
            entry["top_tokens"] = [token for token, _ in effects["promoted"][:top_k]]
            entry["promoted"], entry["suppressed"] = effects["promoted"][:logit_k], effects["suppressed"][:logit_k]
        nodes.append(entry)
    targets, sources = graph.adjacency.nonzero(as_tuple=True)
    edges = [{"source": ids[s], "target": ids[t], "weight": float(graph.adjacency[t, s])}
             for t, s in zip(targets.tolist(), sources.tolist())]
    edges.sort(key=lambda edge: -abs(edge["weight"]))
    return {"tokens": graph.tokens, "nodes": nodes, "edges": edges,
            "settings": {key: _finite(value) for key, value in graph.settings.items()}}


def write_graph_json(graph: Graph, path) -> Path:
    """graph_to_json written atomically to path -> the path."""
    path = Path(path)
    atomic_write_bytes(path, (json.dumps(graph_to_json(graph), indent=1) + "\n").encode())
    return path
