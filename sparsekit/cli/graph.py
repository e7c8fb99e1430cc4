"""`sparsekit graph PROMPT --run RUN`: the attribution graph of a prompt under a cross-layer transcoder
trained by `sparsekit train-clt` on SmolLM2-135M, pruned, as JSON and a static HTML view.

    python -m sparsekit graph "The capital of France is" --run runs/clt

Reads RUN/clt (``sparsekit.load``), runs the frozen replacement model on the prompt (BOS first),
computes every direct effect into the active features and the most likely next tokens' logits
(``sparsekit.analysis.circuits.attribute``), prunes by influence (``prune``: --node-threshold 0.8,
--edge-threshold 0.98, at most --max-nodes 100) and writes OUT/graph.json and OUT/graph.html (OUT
defaults to RUN/graphs/<prompt, shortened>). --replacement-eval also measures CE/KL when the CLT
replaces all its MLPs at once on the run's held-out contexts (its metrics.json's corpus,
context_len and eval_tokens), written to OUT/replacement.json.
"""
from __future__ import annotations

import argparse
import json
import re
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
    p.add_argument("--max-logits", type=int64, default=10, help="most next-token logits attributed")
    p.add_argument("--logit-prob", type=fraction, default=0.95, help="attribute the likeliest tokens up to this probability")
    p.add_argument("--batch-size", type=int64, default=32, help="targets per backward pass")
    p.add_argument("--replacement-eval", action="store_true",
                   help="also CE/KL of the CLT replacing all its MLPs at once, on the run's held-out contexts")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if not args.prompt.strip():
        p.error("the prompt is empty")
    for name in ("max_nodes", "max_logits", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_nodes <= args.max_logits:
        p.error(f"--max-nodes {args.max_nodes} must exceed --max-logits {args.max_logits}")
    return args


def slug(prompt: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", prompt).strip("-")[:40].lower() or "prompt"


def build_graph(model, clt, prompt, out: Path, node_threshold: float = 0.8, edge_threshold: float = 0.98,
                max_nodes: int = 100, max_logits: int = 10, logit_prob: float = 0.95, batch_size: int = 32,
                progress: bool = True, special_ids="tokenizer") -> dict:
    """Attribute, prune, write out/graph.json and out/graph.html, print what was kept -> the JSON."""
    from sparsekit.analysis.circuits import attribute, graph_to_json, prune, write_graph_json
    from sparsekit.analysis.circuits.view import write_graph_html

    graph = attribute(model, clt, prompt, max_logits=max_logits, logit_prob=logit_prob, batch_size=batch_size,
                      special_ids=special_ids, progress=progress)
    pruned = prune(graph, node_threshold=node_threshold, edge_threshold=edge_threshold, max_nodes=max_nodes)
    data = graph_to_json(pruned)
    out.mkdir(parents=True, exist_ok=True)
    write_graph_json(pruned, out / "graph.json")  # atomically: a killed run leaves no half-written graph
    write_graph_html(data, out / "graph.html", title=f"attribution graph: {''.join(graph.tokens)}")
    s = pruned.settings
    kinds = [node["kind"] for node in data["nodes"]]
    print(f"prompt tokens: {graph.tokens}")
    print(f"graph: {s['nodes_before']} nodes ({len(graph.kind_indices('feature'))} active features), "
          f"{s['edges_before']} nonzero edges; pruned (nodes to {s['node_threshold']:.0%} of logit influence, "
          f"edges to {s['edge_threshold']:.0%} of edge score, at most {s['max_nodes']} nodes): {s['nodes_kept']} nodes "
          f"({kinds.count('feature')} features, {kinds.count('error')} errors, {kinds.count('embedding')} embeddings, "
          f"{kinds.count('logit')} logits), {s['edges_kept']} edges, {s['influence_kept']:.1%} of the influence kept")
    print("logits: " + ", ".join(f"{n['token']!r} {n['probability']:.3f}" for n in data["nodes"] if n["kind"] == "logit"))
    print(f"wrote {out / 'graph.json'} and {out / 'graph.html'}")
    return data


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
    model = load_lm()
    out = Path(args.out) if args.out else run / "graphs" / slug(args.prompt)
    build_graph(model, clt, args.prompt, out, args.node_threshold, args.edge_threshold, args.max_nodes,
                args.max_logits, args.logit_prob, args.batch_size, progress=not args.no_progress)
    if args.replacement_eval:
        from sparsekit.analysis.circuits import replacement_ce_kl, replacement_summary
        figures = replacement_ce_kl(model, clt, held_out_contexts(model, run), progress=not args.no_progress)
        atomic_write_bytes(out / "replacement.json", (json.dumps(figures, indent=1) + "\n").encode())
        print(replacement_summary(figures))
