"""Validating an attribution graph's edges by intervention (Ameisen et al. 2025, "Circuit Tracing",
transformer-circuits.pub, "Validating attribution graphs"): does removing a feature's strongest
upstream node change that feature as the edge weight predicts?

A sample of the graph's active features (``n_edges`` of them, drawn with ``seed``) are the targets t;
each one's source s is its strongest upstream node (largest |A[t, s]|: a feature, an error node or a
token embedding). Removing s means zeroing it: a feature's activation, an error node's vector, a
token's embedding. Then

    predicted = -A[t, s]                         (the linear model of the graph: its direct effect, removed)
    measured  = pre_t(s zeroed) - pre_t          (t's pre-activation, in each of three forwards)

- ``frozen_linear``: the frozen replacement with every other feature held at its value: the graph's
  own linear model, so measured equals predicted up to rounding (a check of the intervention's and
  the attribution's signs, not of the graph).
- ``frozen``: the frozen replacement (attention patterns and norm scales put back, error nodes
  constant) with every covered layer's features re-encoded (TopK) from its own residual stream, s
  held at zero: paths through the features between s and t, and TopK's choices, now count.
- ``unfrozen``: the real model with s's contribution taken out of the residual stream (a feature's
  decoder outputs at its position, an error vector, an embedding); attention, norms and MLPs run as
  they do, t's pre-activation read by the CLT's encoder from the real MLP input.

For each forward: Pearson and Spearman correlation of measured with predicted, the least-squares
slope of measured on predicted, and the count; also per source kind. These are measurements (an
undertrained CLT with large error nodes may well score low), reported, never thresholds.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor

from sparsekit._util.atomic import atomic_write_bytes
from sparsekit._util.validate import positive_int
from sparsekit.activations.layers import mlp_hooks
from sparsekit.sae.clt import CrossLayerTranscoder

from .attribution import Graph
from .pruning import node_id
from .replacement import Replacement, clt_pass, decode_layer, encode_layer, mlp_out_hook, record_prompt

MODES = ("frozen_linear", "frozen", "unfrozen")
MODE_TITLES = {"frozen_linear": "frozen replacement, other features held (the graph's linear model)",
               "frozen": "frozen replacement, features re-encoded",
               "unfrozen": "real model (attention, norms, MLPs recomputed)"}


SOURCE_KINDS = ("feature", "error", "embedding")


def sample_edges(graph: Graph, n_edges: int, seed: int = 0, source_kinds=SOURCE_KINDS) -> tuple[Tensor, Tensor]:
    """Up to n_edges feature targets with an incoming edge from a node of source_kinds, drawn without
    replacement with seed, and each one's strongest such upstream node -> (targets [E], sources [E])
    graph node indices, by target."""
    n_edges = positive_int("n_edges", n_edges)
    kinds = (source_kinds,) if isinstance(source_kinds, str) else tuple(source_kinds)
    if not kinds or not set(kinds) <= set(SOURCE_KINDS):
        raise ValueError(f"source_kinds must be some of {SOURCE_KINDS}, got {source_kinds!r}")
    features = graph.kind_indices("feature")
    allowed = torch.tensor([node["kind"] in kinds for node in graph.nodes])
    weights = graph.adjacency[features].abs() * allowed
    candidates = features[weights.sum(1) > 0]
    order = torch.randperm(candidates.numel(), generator=torch.Generator().manual_seed(seed))[:n_edges]
    targets = candidates[order].sort().values
    return targets, (graph.adjacency[targets].abs() * allowed).argmax(1)


def _check_graph_matches(graph: Graph, rep: Replacement) -> None:
    feats = rep.features
    F = feats.layer.shape[0]
    first = rep.clt.first_layer
    mine = [(n["layer"] - first, n["position"], n["latent"]) for n in graph.nodes[:F] if n["kind"] == "feature"]
    theirs = list(zip(feats.layer.tolist(), feats.position.tolist(), feats.latent.tolist()))
    if mine != theirs or len(graph.kind_indices("feature")) != F:
        raise ValueError("graph was not attributed on this prompt with this clt (its feature nodes differ): pass the "
                         "full graph `attribute` returned, not a pruned one")


class _Ablations:
    """B copies of the prompt's sources, copy b with sources[b] zeroed (no sources: one untouched
    copy): acts [B, F], errors [B, M, T, d], resid0 [B, T, d], and the zeroed features as (copy, CLT
    layer, position, latent) rows."""

    def __init__(self, rep: Replacement, graph: Graph, sources: Tensor):
        acts, errors, resid0 = rep.activations, rep.errors(), rep.record.resid0
        F = acts.shape[0]
        B = max(1, sources.shape[0])
        self.acts = acts.expand(B, F).clone()
        self.errors = errors.expand(B, *errors.shape).clone()
        self.resid0 = resid0.expand(B, *resid0.shape).clone()
        self.zeroed = []
        for b, s in enumerate(sources.tolist()):
            node = graph.nodes[s]
            if node["kind"] == "feature":
                self.acts[b, s] = 0
                self.zeroed.append((b, node["layer"] - rep.clt.first_layer, node["position"], node["latent"]))
            elif node["kind"] == "error":
                self.errors[b, node["layer"], node["position"]] = 0
            elif node["kind"] == "embedding":
                self.resid0[b, node["position"]] = 0
            else:
                raise ValueError(f"edge source {node_id(node)} is a logit, not an upstream node")


def _frozen_recomputed(rep: Replacement, ab: _Ablations, stop: int | None) -> dict:
    """The frozen replacement with each covered layer's features re-encoded from its own MLP input
    (TopK; the copies' zeroed features held at 0), errors ab.errors, embeddings ab.resid0 ->
    {CLT layer: MLP input [B, T, d_in]}."""
    clt, model = rep.clt, rep.model
    B, T = ab.resid0.shape[:2]
    keep = rep.keep[None]                                                      # [1, T, 1]
    frozen = rep.record.frozen
    captured, pending = {}, {}
    hooks = [(name, lambda act, hook: frozen[hook.name].expand(act.shape)) for name in frozen]

    def encode(act, hook, layer):
        captured[layer] = act
        codes = encode_layer(clt, act.reshape(B * T, -1), layer)
        values = codes.values.clone()
        for b, zeroed_layer, position, latent in ab.zeroed:
            if zeroed_layer == layer:
                row = b * T + position
                values[row] = torch.where(codes.indices[row] == latent, torch.zeros_like(values[row]), values[row])
        written = decode_layer(clt, values, codes.indices, layer).view(B, T, -1, clt.d_out)
        for offset in range(clt.spans[layer]):
            pending[layer + offset] = pending.get(layer + offset, 0) + written[:, :, offset]

    def write(act, hook, m):
        target = m - clt.first_layer
        if not 0 <= target < clt.n_layers:
            return ab.errors[:, m]
        scale = clt.layer_output_scale[target] * clt.output_scale
        recon = ((clt.b_dec[target] + pending.pop(target)) / scale).to(act.dtype)
        return keep * recon + ab.errors[:, m]

    for m in range(model.cfg.n_layers):
        hooks.append((mlp_out_hook(m), lambda act, hook, m=m: write(act, hook, m)))
    for layer, m in enumerate(clt.layers()):
        hooks.append((mlp_hooks(m)[0], lambda act, hook, layer=layer: encode(act, hook, layer)))
    model.run_with_hooks(ab.resid0, start_at_layer=0, stop_at_layer=stop, fwd_hooks=hooks)
    return captured


def _unfrozen(rep: Replacement, ab: _Ablations, stop: int | None) -> dict:
    """The real model from embeddings ab.resid0, each MLP output shifted by the copy's zeroed feature
    contributions and error vectors -> {CLT layer: MLP input [B, T, d_in]}."""
    clt, model = rep.clt, rep.model
    acts = rep.activations[None]
    errors = rep.errors()
    captured = {}

    def shift(act, hook, m):
        delta = ab.errors[:, m] - errors[m]
        recon, real = rep.reconstruction(m, ab.acts), rep.reconstruction(m, acts)
        return act + delta if recon is None else act + delta + (recon - real)

    def capture(act, hook, layer):
        captured[layer] = act

    hooks = [(mlp_out_hook(m), lambda act, hook, m=m: shift(act, hook, m)) for m in range(model.cfg.n_layers)]
    hooks += [(mlp_hooks(m)[0], lambda act, hook, layer=layer: capture(act, hook, layer))
              for layer, m in enumerate(clt.layers())]
    model.run_with_hooks(ab.resid0, start_at_layer=0, stop_at_layer=stop, fwd_hooks=hooks)
    return captured


def _measure(mode: str, rep: Replacement, ab: _Ablations, stop: int | None) -> dict:
    if mode == "frozen_linear":
        return rep.forward(ab.acts, ab.errors, ab.resid0, stop_at_layer=stop)[1]
    if mode == "frozen":
        return _frozen_recomputed(rep, ab, stop)
    return _unfrozen(rep, ab, stop)


def average_ranks(x: Tensor) -> Tensor:
    """Ranks 0..n-1 of x [n], ties given their mean rank (as Spearman's correlation needs)."""
    ranks = torch.empty(x.shape[0], dtype=torch.float64)
    ranks[x.argsort()] = torch.arange(x.shape[0], dtype=torch.float64)
    _, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    sums = torch.zeros(counts.shape[0], dtype=torch.float64).index_add_(0, inverse, ranks)
    return (sums / counts)[inverse]


def agreement(predicted: Tensor, measured: Tensor) -> dict:
    """{"pearson", "spearman", "slope" (least squares, measured on predicted, with intercept),
    "count"} of two [n] tensors; nan where undefined (n < 2, or no spread)."""
    p, m = predicted.double(), measured.double()
    n = p.shape[0]
    nan = float("nan")
    if n < 2:
        return {"pearson": nan, "spearman": nan, "slope": nan, "count": n}

    def pearson(a, b):
        a, b = a - a.mean(), b - b.mean()
        denominator = float(a.norm() * b.norm())
        return float(a @ b) / denominator if denominator > 0 else nan

    pc = p - p.mean()
    variance = float(pc @ pc)
    slope = float(pc @ (m - m.mean())) / variance if variance > 0 else nan
    return {"pearson": pearson(p, m), "spearman": pearson(average_ranks(p), average_ranks(m)), "slope": slope,
            "count": n}


def validate_edges(model, clt: CrossLayerTranscoder, prompt, graph: Graph, n_edges: int = 50, seed: int = 0,
                   source_kinds=SOURCE_KINDS, batch_size: int = 32, unfrozen: bool = True, special_ids="tokenizer",
                   progress: bool = True) -> dict:
    """Measure n_edges of graph's edges by intervention (module docstring). graph: the full graph
    ``attribute(model, clt, prompt, special_ids=special_ids)`` returned (not a pruned one);
    source_kinds: the kinds of upstream node a target's strongest source is chosen among (("feature",):
    feature-to-feature edges only).

    -> {"edges": [{target, source, source_kind, weight, predicted, <mode>: measured change}],
    "figures": {mode: agreement}, "by_source_kind": {mode: {kind: agreement}}, "settings"}."""
    batch_size = positive_int("batch_size", batch_size)
    if not isinstance(graph, Graph):
        raise ValueError(f"graph must be the Graph attribute() returned, got {type(graph).__name__}")
    record = record_prompt(model, clt, prompt, special_ids)
    rep = Replacement(model, clt, record)
    _check_graph_matches(graph, rep)
    targets, sources = sample_edges(graph, n_edges, seed, source_kinds)
    modes = MODES if unfrozen else MODES[:2]
    feats, M = rep.features, model.cfg.n_layers
    measured = {mode: torch.zeros(targets.shape[0], dtype=torch.float64) for mode in modes}
    with clt_pass(clt, progress, targets.shape[0] * len(modes), "edge", "edge validation") as advance, torch.no_grad():
        for first in range(0, targets.shape[0], batch_size):
            t, s = targets[first:first + batch_size], sources[first:first + batch_size]
            layer, position, latent = feats.layer[t], feats.position[t], feats.latent[t]
            stop = clt.first_layer + int(layer.max()) + 1
            stop = stop if stop < M else None
            ablated = _Ablations(rep, graph, s)
            clean = _Ablations(rep, graph, torch.zeros(0, dtype=torch.int64))
            for mode in modes:
                after = rep.preactivation(_measure(mode, rep, ablated, stop), layer, position, latent)
                base = {k: v.expand(t.shape[0], *v.shape[1:]) for k, v in _measure(mode, rep, clean, stop).items()}
                before = rep.preactivation(base, layer, position, latent)
                measured[mode][first:first + t.shape[0]] = (after - before).double().cpu()
                advance(t.shape[0])
    weights = graph.adjacency[targets, sources]
    predicted = -weights
    kinds = [graph.nodes[s]["kind"] for s in sources.tolist()]
    edges = [{"target": node_id(graph.nodes[ti]), "source": node_id(graph.nodes[si]), "source_kind": kind,
              "weight": float(w), "predicted": float(p), **{mode: float(measured[mode][i]) for mode in modes}}
             for i, (ti, si, kind, w, p) in enumerate(zip(targets.tolist(), sources.tolist(), kinds, weights, predicted))]
    by_kind = {}
    for mode in modes:
        by_kind[mode] = {}
        for kind in sorted(set(kinds)):
            mine = torch.tensor([k == kind for k in kinds])
            by_kind[mode][kind] = agreement(predicted[mine], measured[mode][mine])
    return {"edges": edges, "figures": {mode: agreement(predicted, measured[mode]) for mode in modes},
            "by_source_kind": by_kind,
            "settings": {"n_edges": n_edges, "seed": seed, "features": int(graph.kind_indices("feature").numel()),
                         "sampled": int(targets.shape[0]), "tokens": graph.tokens,
                         "source_kinds": list((source_kinds,) if isinstance(source_kinds, str) else source_kinds),
                         "rule": "each sampled active feature's strongest upstream node of source_kinds (largest "
                                 "|edge weight|), zeroed"}}


def _fmt(value: float) -> str:
    return "nan" if not math.isfinite(value) else f"{value:.3f}"


def validation_summary(result: dict) -> str:
    """The figures as lines for a command to print."""
    kinds = [edge["source_kind"] for edge in result["edges"]]
    counts = ", ".join(f"{kinds.count(k)} {k}" for k in sorted(set(kinds)))
    s = result["settings"]
    among = "" if set(s["source_kinds"]) == set(SOURCE_KINDS) else f" among {' and '.join(s['source_kinds'])} nodes"
    lines = [f"edge validation: {s['sampled']} edges (each of {s['sampled']} sampled active features, of "
             f"{s['features']}, from its strongest upstream node{among}: {counts or 'none'}); predicted change = "
             f"-edge weight"]
    for mode, f in result["figures"].items():
        lines.append(f"  {MODE_TITLES[mode]}: Pearson {_fmt(f['pearson'])}, Spearman {_fmt(f['spearman'])}, "
                     f"slope {_fmt(f['slope'])} (n={f['count']})")
    return "\n".join(lines)


def _finite(value):
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_validation(result: dict, folder) -> tuple[Path, Path]:
    """folder/validation.json (nan written as null) and folder/validation.png (``validation_plot``),
    atomically -> their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    json_path, png_path = folder / "validation.json", folder / "validation.png"
    atomic_write_bytes(json_path, (json.dumps(_finite(result), indent=1) + "\n").encode())
    validation_plot(result, png_path)
    return json_path, png_path


KIND_COLOURS = {"feature": "#d08b00", "error": "#777777", "embedding": "#2e9e4f"}


def validation_plot(result: dict, path) -> Path:
    """One panel per forward: measured change against predicted (-edge weight), by source kind, with
    the line measured = predicted; drawn on a Figure (no pyplot)."""
    import io

    from matplotlib.figure import Figure  # no pyplot: the caller's backend is left as it is

    modes = list(result["figures"])
    figure = Figure(figsize=(4.2 * len(modes), 4.0))
    axes = figure.subplots(1, len(modes), squeeze=False)[0]
    edges = result["edges"]
    for ax, mode in zip(axes, modes):
        predicted = [e["predicted"] for e in edges]
        values = [e[mode] for e in edges]
        for kind, colour in KIND_COLOURS.items():
            mine = [i for i, e in enumerate(edges) if e["source_kind"] == kind]
            if mine:
                ax.scatter([predicted[i] for i in mine], [values[i] for i in mine], s=14, c=colour, label=kind)
        if predicted:
            lo = min(min(predicted), min(values))
            hi = max(max(predicted), max(values))
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="measured = predicted")
        f = result["figures"][mode]
        ax.set_title(f"{mode}: r={_fmt(f['pearson'])}, slope={_fmt(f['slope'])}", fontsize=10)
        ax.set_xlabel("predicted change (-edge weight)")
        ax.set_ylabel("measured change of the target's pre-activation")
        ax.legend(fontsize=7)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)
