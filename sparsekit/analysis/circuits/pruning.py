"""Pruning an attribution graph by influence on the logits, and its JSON (Ameisen et al. 2025,
"Circuit Tracing", transformer-circuits.pub, appendix "Graph pruning").

    A_n = |A| with each row (a target's incoming edges) scaled to sum to 1
    B   = A_n + A_n^2 + ... = (I - A_n)^-1 - I        (the graph is acyclic: the series is finite)
    influence = w B                                   w: each logit node's probability, 0 elsewhere

A node's influence is its total weight over all paths into the logits, weighted by the logits'
probabilities. ``prune`` keeps the logits, then the fewest other nodes (features, errors, embeddings
alike) whose influence sums to ``node_threshold`` (0.8) of the total, at most ``max_nodes`` (100) in
all; then the edges among them, by edge score A_n[t, s] * (influence[t] + w[t]), whose scores sum to
``edge_threshold`` (0.98) of the kept edges' total; then drops nodes left without an edge.
"""
from __future__ import annotations

import json
import math
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


def prune(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98, max_nodes: int = 100) -> Graph:
    """The readable part of graph (module docstring) -> a Graph over the kept nodes, whose adjacency
    holds the kept edges' direct effects (zero elsewhere); each node gains "influence"; settings gain
    the thresholds and what was kept."""
    node_threshold = _check_fraction("node_threshold", node_threshold)
    edge_threshold = _check_fraction("edge_threshold", edge_threshold)
    max_nodes = positive_int("max_nodes", max_nodes)
    logits = graph.kind_indices("logit")
    if max_nodes <= logits.numel():
        raise ValueError(f"max_nodes={max_nodes} leaves no room beside the {logits.numel()} logit nodes")
    scores = influence(graph.adjacency, graph.logit_weights)
    others = torch.tensor([i for i, node in enumerate(graph.nodes) if node["kind"] != "logit"], dtype=torch.int64)
    order = others[scores[others].argsort(descending=True)]
    count = _threshold_count(scores[order].clamp_min(0), node_threshold)
    count = min(count, max_nodes - logits.numel())
    kept = torch.cat([order[:count], logits]).sort().values
    A_n = normalized_adjacency(graph.adjacency)
    edge_scores = (A_n * (scores + graph.logit_weights.double())[:, None])[kept][:, kept]
    flat = edge_scores.flatten()
    ranked = flat.argsort(descending=True)
    n_edges = _threshold_count(flat[ranked], edge_threshold)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[ranked[:n_edges]] = True
    mask = mask.view_as(edge_scores) & (graph.adjacency[kept][:, kept] != 0)
    connected = mask.any(0) | mask.any(1) | torch.isin(kept, logits)
    kept, mask = kept[connected], mask[connected][:, connected]
    adjacency = torch.where(mask, graph.adjacency[kept][:, kept], torch.zeros((), dtype=torch.float64))
    nodes = [dict(graph.nodes[i], influence=float(scores[i])) for i in kept.tolist()]
    total = float(scores[others].clamp_min(0).sum())
    kept_others = kept[~torch.isin(kept, logits)]
    settings = {**graph.settings, "node_threshold": node_threshold, "edge_threshold": edge_threshold,
                "max_nodes": max_nodes, "nodes_before": len(graph.nodes), "edges_before": int((graph.adjacency != 0).sum()),
                "nodes_kept": len(nodes), "edges_kept": int(mask.sum()),
                "influence_kept": float(scores[kept_others].clamp_min(0).sum()) / total if total > 0 else float("nan")}
    return Graph(adjacency, nodes, graph.values[kept], graph.logit_weights[kept], graph.tokens, graph.directions,
                 graph.unembed, graph.token_text, settings)


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
