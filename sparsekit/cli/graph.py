"""`sparsekit graph PROMPT --run RUN`: the attribution graph of a prompt under a cross-layer transcoder
trained by `sparsekit train-clt` on SmolLM2-135M, pruned, as JSON and a static HTML view.

    python -m sparsekit graph "The capital of France is" --run runs/clt

Reads RUN/clt (``sparsekit.load``), runs the frozen replacement model on the prompt (BOS first),
computes every direct effect into the active features and the most likely next tokens' logits
(``sparsekit.analysis.circuits.attribute``), prunes by influence (``prune``: features ranked apart
from error and embedding nodes, each kind to --node-threshold 0.8 of its influence, features first
within at most --max-nodes 100; --rank together: the published single ranking; edges to
--edge-threshold 0.98) and writes OUT/graph.json and OUT/graph.html (OUT defaults to
RUN/graphs/<prompt, shortened>). A pruned graph without feature nodes is written, then the command
fails (status 1) saying why: it explains nothing about the CLT. A feature's details in the view hold its logit effects
and its top activating contexts from one pass over the first --context-tokens tokens of the run's
corpus (held-out contexts first), cached in RUN/top_contexts.json. --validate-edges N measures N
edges by intervention (``circuits.validation``) into OUT/validation.json and OUT/validation.png.
--replacement-eval also measures CE/KL when the CLT replaces all its MLPs at once on the run's
held-out contexts (its metrics.json's corpus, context_len and eval_tokens), written to
OUT/replacement.json. --screenshot PNG saves the page in headless Chromium with the most
influential feature (or --select NODE_ID) selected.
"""
from __future__ import annotations

import argparse
import json
import re
import warnings
from pathlib import Path

from sparsekit._util.atomic import atomic_write_bytes

from .parser import OneLineParser, int64, path_arg


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}")
    return value


def parse(argv) -> argparse.Namespace:
    p = OneLineParser(prog="sparsekit graph", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("prompt", help="the text to attribute (BOS is prepended)")
    p.add_argument("--run", type=path_arg, default="runs/clt", help="a train-clt run folder (holds clt/)")
    p.add_argument("--out", type=path_arg, default=None, help="output folder (default RUN/graphs/<prompt>)")
    p.add_argument("--max-nodes", type=int64, default=100, help="nodes kept after pruning, logits included")
    p.add_argument("--node-threshold", type=fraction, default=0.8, help="share of logit influence the kept nodes cover")
    p.add_argument("--edge-threshold", type=fraction, default=0.98, help="share of edge score the kept edges cover")
    p.add_argument("--rank", choices=("by-kind", "together"), default="by-kind",
                   help="by-kind: features ranked apart from error/embedding nodes, features first; together: one "
                        "ranking of all nodes (the published rule)")
    p.add_argument("--max-logits", type=int64, default=10, help="most next-token logits attributed")
    p.add_argument("--logit-prob", type=fraction, default=0.95, help="attribute the likeliest tokens up to this probability")
    p.add_argument("--batch-size", type=int64, default=32, help="targets per backward pass")
    p.add_argument("--replacement-eval", action="store_true",
                   help="also CE/KL of the CLT replacing all its MLPs at once, on the run's held-out contexts")
    p.add_argument("--context-tokens", type=int64, default=4096,
                   help="tokens of the run's corpus searched for each feature's top contexts (0: none)")
    p.add_argument("--examples", type=int64, default=5, help="top contexts shown per feature")
    p.add_argument("--validate-edges", type=int64, default=0, metavar="N",
                   help="measure N edges by intervention (each sampled feature's strongest upstream node zeroed)")
    p.add_argument("--validate-sources", choices=("any", "feature"), default="any",
                   help="the upstream node of a validated edge: the strongest of any kind, or the strongest feature")
    p.add_argument("--seed", type=int64, default=0, help="seed of the edge sample")
    p.add_argument("--screenshot", type=path_arg, default=None, metavar="PNG",
                   help="save graph.html in headless Chromium, the most influential feature selected")
    p.add_argument("--select", default=None, metavar="NODE_ID",
                   help="the node --screenshot shows selected (an id from graph.json, e.g. f:L3:p1:#54)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if not args.prompt.strip():
        p.error("the prompt is empty")
    for name in ("max_nodes", "max_logits", "batch_size", "examples"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("context_tokens", "validate_edges"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.select is not None and args.screenshot is None:
        p.error("--select names the node --screenshot shows selected: pass --screenshot PNG too")
    if args.max_nodes <= args.max_logits:
        p.error(f"--max-nodes {args.max_nodes} must exceed --max-logits {args.max_logits}")
    return args


def slug(prompt: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", prompt).strip("-")[:40].lower() or "prompt"


def build_graph(model, clt, prompt, out: Path, node_threshold: float = 0.8, edge_threshold: float = 0.98,
                max_nodes: int = 100, max_logits: int = 10, logit_prob: float = 0.95, batch_size: int = 32,
                progress: bool = True, special_ids="tokenizer", contexts=None, validate_edges: int = 0,
                seed: int = 0, validate_sources: str = "any", rank: str = "by_kind") -> dict:
    """Attribute, prune (``rank``: "by_kind" or "together", ``circuits.prune``), write out/graph.json and
    out/graph.html, print what was kept -> the JSON; SystemExit (after writing) when no feature node
    was kept.
    contexts: a ``circuits.contexts.ContextTable`` whose windows the features' details show;
    validate_edges > 0: that many edges measured by intervention (sources: "any" kind or "feature"
    only), written to out/validation.json and out/validation.png, the figures printed."""
    from sparsekit.analysis.circuits import attribute, graph_to_json, prune
    from sparsekit.analysis.circuits.pruning import NoFeaturesKept, no_features_reason
    from sparsekit.analysis.circuits.view import write_graph_html

    graph = attribute(model, clt, prompt, max_logits=max_logits, logit_prob=logit_prob, batch_size=batch_size,
                      special_ids=special_ids, progress=progress)
    with warnings.catch_warnings():  # said below, as the command's error
        warnings.simplefilter("ignore", NoFeaturesKept)
        pruned = prune(graph, node_threshold=node_threshold, edge_threshold=edge_threshold, max_nodes=max_nodes,
                       rank=rank)
    data = graph_to_json(pruned)
    if contexts is not None:
        from sparsekit.analysis.circuits.contexts import context_windows
        for node in data["nodes"]:
            if node["kind"] == "feature":
                node["contexts"] = context_windows(contexts, model, node["layer"] - clt.first_layer, node["latent"])
        data["settings"]["contexts"] = {"contexts": contexts.tokens.shape[0], "context_len": contexts.tokens.shape[1]}
    out.mkdir(parents=True, exist_ok=True)
    # atomically: a killed run leaves no half-written graph
    atomic_write_bytes(out / "graph.json", (json.dumps(data, indent=1) + "\n").encode())
    write_graph_html(data, out / "graph.html", title=f"attribution graph: {''.join(graph.tokens)}")
    s = pruned.settings
    kinds = [node["kind"] for node in data["nodes"]]
    print(f"prompt tokens: {graph.tokens}")
    print(f"graph: {s['nodes_before']} nodes ({len(graph.kind_indices('feature'))} active features), "
          f"{s['edges_before']} nonzero edges; pruned (nodes to {s['node_threshold']:.0%} of logit influence, "
          f"edges to {s['edge_threshold']:.0%} of edge score, at most {s['max_nodes']} nodes): {s['nodes_kept']} nodes "
          f"({kinds.count('feature')} features, {kinds.count('error')} errors, {kinds.count('embedding')} embeddings, "
          f"{kinds.count('logit')} logits), {s['edges_kept']} edges, {s['influence_kept']:.1%} of the influence kept "
          f"(rank {s['rank']})")
    share = s["influence_share"]
    print(f"logit influence by kind: features {share['feature']:.1%}, error nodes {share['error']:.1%}, "
          f"embeddings {share['embedding']:.1%}")
    print("logits: " + ", ".join(f"{n['token']!r} {n['probability']:.3f}" for n in data["nodes"] if n["kind"] == "logit"))
    print(f"wrote {out / 'graph.json'} and {out / 'graph.html'}")
    if s["features_kept"] == 0:
        raise SystemExit(f"sparsekit graph: error: the pruned graph has no feature node ({no_features_reason(s)}); "
                         f"{out / 'graph.json'} shows only error, embedding and logit nodes")
    if validate_edges > 0:
        from sparsekit.analysis.circuits.validation import SOURCE_KINDS, validation_summary, write_validation
        from sparsekit.analysis.circuits.validation import validate_edges as validate
        kinds = SOURCE_KINDS if validate_sources == "any" else ("feature",)
        result = validate(model, clt, prompt, graph, validate_edges, seed=seed, source_kinds=kinds,
                          batch_size=batch_size, special_ids=special_ids, progress=progress)
        paths = write_validation(result, out)
        print(validation_summary(result))
        print(f"wrote {paths[0]} and {paths[1]}")
    return data


def corpus_head(model, run: Path, tokens: int):
    """The first contexts of the run's corpus holding at least ``tokens`` tokens past BOS (its held-out
    contexts come first), cut as train-clt cut them (its metrics.json settings)."""
    from sparsekit.activations.store import corpus_contexts
    settings = json.loads((run / "metrics.json").read_text())["settings"]
    count = -(-tokens // (settings["context_len"] - 1))
    return corpus_contexts(model, settings["corpus"], settings["context_len"], count)


def screenshot(data: dict, page: Path, png: Path, select: str | None = None) -> str | None:
    """page in headless Chromium with node ``select`` (default: the most influential feature) selected,
    saved to png -> that node's id."""
    from urllib.parse import quote

    from sparsekit.analysis.dashboard import save_screenshot
    features = [n for n in data["nodes"] if n["kind"] == "feature"]
    chosen = max(features, key=lambda n: n.get("influence") or 0.0)["id"] if features else None
    if select is not None:
        if select not in {n["id"] for n in data["nodes"]}:
            raise SystemExit(f"sparsekit graph: error: --select {select!r} is not a node of the pruned graph "
                             f"(see the ids in graph.json)")
        chosen = select
    width = min(2400, max(1280, 60 + 150 * len(data["tokens"]) + 20 + 360))
    save_screenshot(page, png, fragment=quote(chosen, safe="") if chosen else "", window=(width, 900))
    return chosen


def held_out_contexts(model, run: Path):
    """The run's held-out contexts, as train-clt cut them (its metrics.json settings)."""
    from sparsekit.activations.store import corpus_contexts
    settings = json.loads((run / "metrics.json").read_text())["settings"]
    per_context = settings["context_len"] - 1
    count = -(-settings["eval_tokens"] // per_context)
    return corpus_contexts(model, settings["corpus"], settings["context_len"], count)


def main(argv=None) -> None:
    args = parse(argv or [])
    run = Path(args.run)
    if not (run / "clt").is_dir():
        raise SystemExit(f"sparsekit graph: error: {run / 'clt'} does not exist: train one with `sparsekit train-clt "
                         f"--out {run}`")
    from sparsekit.activations.lm import load_lm
    from sparsekit.sae import CrossLayerTranscoder
    from sparsekit.sae.persistence import load

    clt = load(run / "clt")
    if not isinstance(clt, CrossLayerTranscoder):
        raise SystemExit(f"sparsekit graph: error: {run / 'clt'} holds a {type(clt).__name__}, not a cross-layer "
                         f"transcoder")
    if args.context_tokens > 0 and not (run / "metrics.json").is_file():
        raise SystemExit(f"sparsekit graph: error: {run / 'metrics.json'} does not exist (the run's corpus "
                         f"settings): pass --context-tokens 0 for a graph without top contexts")
    model = load_lm()
    out = Path(args.out) if args.out else run / "graphs" / slug(args.prompt)
    progress = not args.no_progress
    contexts = None
    if args.context_tokens > 0:
        from sparsekit.analysis.circuits.contexts import cached_top_contexts
        tokens = corpus_head(model, run, args.context_tokens)
        contexts, cached = cached_top_contexts(model, clt, tokens, run / "top_contexts.json", args.examples,
                                               progress=progress)
        print(f"top contexts: {tokens.shape[0]} contexts x {tokens.shape[1]} tokens of the run's corpus "
              f"({'read from' if cached else 'computed, cached in'} {run / 'top_contexts.json'})")
    data = build_graph(model, clt, args.prompt, out, args.node_threshold, args.edge_threshold, args.max_nodes,
                       args.max_logits, args.logit_prob, args.batch_size, progress=progress, contexts=contexts,
                       validate_edges=args.validate_edges, seed=args.seed, validate_sources=args.validate_sources,
                       rank=args.rank.replace("-", "_"))
    if args.replacement_eval:
        from sparsekit.analysis.circuits import replacement_ce_kl, replacement_summary
        figures = replacement_ce_kl(model, clt, held_out_contexts(model, run), progress=progress)
        atomic_write_bytes(out / "replacement.json", (json.dumps(figures, indent=1) + "\n").encode())
        print(replacement_summary(figures))
    if args.screenshot:
        chosen = screenshot(data, out / "graph.html", Path(args.screenshot), args.select)
        print(f"wrote {args.screenshot} (graph.html in headless Chromium, {chosen or 'no feature'} selected)")
