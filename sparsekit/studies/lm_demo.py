"""`sparsekit lm-demo` (`make demo-lm`): dictionaries on a real LM, offline, on 2 CPU cores.

SmolLM2-135M-Instruct (``load_lm``), Shakespeare contexts of 128 tokens (BOS first, excluded from
the activations). One pass up to the last block needed (``stop_at_layer``, a fraction of the
model's cost) caches (transcoder input, target) pairs at layer L as shards; from that one cache it
trains a TopK SAE on the target and a TopK transcoder input -> target, evaluates both on held-out
contexts (CE loss recovered, KL, FVU, L0, dead/dense; the clean and zero-ablated passes shared by
both, every intervened pass restarting at the hook's block), writes feature reports and the dashboard.

    --transcoder mlp     blocks.L.ln2.hook_normalized -> blocks.L.hook_mlp_out  (MLP input -> output)
    --transcoder resid   blocks.L.hook_resid_pre -> blocks.(L+m).hook_resid_pre (--resid-offset m)
    --transcoder attn    blocks.L.attn.hook_z -> blocks.L.hook_attn_out         (heads' values -> output)
    --layers 0,2,4       also one SAE per listed layer on blocks.l.<--layer-site> from one more
                         collection pass (``cache_layer_activations``), with a per-layer summary

    RUN_DIR/acts/                       cached activations (reused by the next run)
    RUN_DIR/{sae,transcoder,layerN}/    the dictionaries (sparsekit.load)
    RUN_DIR/metrics.json                evaluation figures and the seconds each stage took
    RUN_DIR/*_features.json, RUN_DIR/dashboard.html

The defaults are the issue's sizes: ~300k cached tokens shared by the SAE and the transcoder (one
epoch each), CE/KL on ~8k held-out tokens. ``--dtype bfloat16`` runs the model in bfloat16 (opt-in;
about twice as fast on CPUs with native bf16; dictionaries still train in float32). Results worse than
trivial (FVU >= 1, CE loss recovered < 0) are printed as WARNING lines.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from sparsekit.sae import TopKSAE, Transcoder
from sparsekit.training.loop import TrainConfig, train
from sparsekit.training.metrics import worse_than_trivial

TRANSCODERS = ("mlp", "resid", "attn")


def transcoder_hooks(kind: str, layer: int, offset: int = 1) -> tuple[str, str]:
    """(input hook, target hook) of the transcoder kind at layer (see the module docstring)."""
    if kind == "mlp":
        return f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out"
    if kind == "resid":
        if offset < 1:
            raise ValueError(f"resid_offset must be >= 1, got {offset}")
        return f"blocks.{layer}.hook_resid_pre", f"blocks.{layer + offset}.hook_resid_pre"
    if kind == "attn":
        return f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.hook_attn_out"
    raise ValueError(f"transcoder must be one of {', '.join(TRANSCODERS)}, got {kind!r}")


def train_on_cache(dictionary, source, total_tokens: int, out: Path, name: str, args):
    """Train dictionary on source (a ShardSource or IterableSource) for total_tokens; save it to out/name.
    Returns what the dashboard shows as "dead at end of training": {dead_frac, step, tokens, dead_window_tokens}."""
    cfg = TrainConfig(batch_size=args.batch_size, lr=args.lr, total_tokens=total_tokens, eval_tokens=4096,
                      dead_strategy="auxk", dead_window_tokens=min(100_000, total_tokens // 2),
                      log_every=10, output_dir=str(out / name), seed=0)
    result = train(dictionary, source, cfg)
    dictionary.save(out / name)
    return {key: result.metrics[key] for key in ("dead_frac", "step", "tokens")} | \
        {"dead_window_tokens": cfg.dead_window_tokens}


def run(args, model=None, contexts=None) -> dict:
    """The demo. model: a HookedTransformer to use instead of SmolLM2, contexts [N, T] (BOS first) instead
    of the corpus's (tests pass a tiny random model and random tokens)."""
    from sparsekit.activations.lm import SMOLLM2, load_lm
    from sparsekit.activations.shards import ShardSource
    from sparsekit.activations.source import IterableSource
    from sparsekit.activations.store import cache_activations, cache_layer_activations, corpus_contexts, model_name
    from sparsekit.analysis.dashboard import dashboard_from_run, save_report
    from sparsekit.analysis.lm_features import feature_report
    from sparsekit.analysis.lm_metrics import Splice, evaluate_splices

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    timings = {}

    def lap(name):
        timings[name] = round(time.time() - started - sum(timings.values()), 1)
        print(f"[lm-demo] {name}: {timings[name]} s", flush=True)

    dtype = getattr(args, "dtype", "float32")
    model = load_lm(SMOLLM2, dtype=dtype) if model is None else model
    lap(f"load model ({dtype})")
    per_context = args.context_len - 1
    n_train = -(-max(args.train_tokens, args.layer_tokens or 0) // per_context)
    n_eval = -(-args.eval_tokens // per_context)
    if contexts is None:
        contexts = corpus_contexts(model, args.corpus, args.context_len, max_contexts=n_train + n_eval)
    elif contexts.shape[1] != args.context_len:
        raise ValueError(f"contexts must be [N, {args.context_len}] (--context-len), got {tuple(contexts.shape)}")
    if contexts.shape[0] < n_train + n_eval:
        raise SystemExit(f"the corpus gives {contexts.shape[0]} contexts; {n_train + n_eval} needed")
    train_tokens, eval_tokens = contexts[:n_train], contexts[n_train:n_train + n_eval]
    train_tokens = train_tokens[:-(-args.train_tokens // per_context)]
    lap("tokenise")

    L = args.layer
    in_hook, out_hook = transcoder_hooks(args.transcoder, L, args.resid_offset)
    shards = cache_activations(model, train_tokens, (in_hook, out_hook), out / "acts" / f"{in_hook}--{out_hook}",
                               batch_size=args.batch_size)
    lap(f"cache activations ({shards.tokens:,} tokens, {in_hook} -> {out_hook})")
    total = (args.epochs * shards.tokens) // args.batch_size * args.batch_size

    def pairs():
        return ShardSource(shards.directory, batch_size=args.batch_size, epochs=None)

    d_in, d_out = shards.d, shards.d_out
    sae = TopKSAE(d_out, args.n_latents, args.k)
    training = {"sae": train_on_cache(sae, IterableSource(lambda: (y for _, y in pairs())), total, out, "sae",
                                      args)}  # the targets
    lap("train SAE")
    transcoder = Transcoder(d_in, args.n_latents, d_out, args.k)
    training["transcoder"] = train_on_cache(transcoder, pairs(), total, out, "transcoder", args)
    lap("train transcoder")

    splices = {"sae": Splice(sae, out_hook), "transcoder": Splice(transcoder, out_hook, in_hook)}
    reports = {"sae": (out_hook, None), "transcoder": (in_hook, out_hook)}
    layer_hooks = {}
    if args.layers:
        layer_hooks = {f"layer{l}": f"blocks.{l}.{args.layer_site}" for l in args.layers}
        layer_contexts = contexts[:-(-(args.layer_tokens or args.train_tokens) // per_context)]
        layer_shards = cache_layer_activations(model, layer_contexts, list(layer_hooks.values()),
                                               out / "acts" / "layers", batch_size=args.batch_size)
        lap(f"cache per-layer activations ({len(layer_hooks)} hooks, one pass)")
        for name, hook in layer_hooks.items():
            source = layer_shards[hook]
            layer_sae = TopKSAE(source.d, args.n_latents, args.k)
            layer_total = (args.epochs * source.tokens) // args.batch_size * args.batch_size
            training[name] = train_on_cache(layer_sae, ShardSource(source.directory, batch_size=args.batch_size,
                                                                   epochs=None), layer_total, out, name, args)
            splices[name] = Splice(layer_sae, hook)
            reports[name] = (hook, None)
        lap(f"train per-layer SAEs ({', '.join(layer_hooks)})")

    evaluated = evaluate_splices(model, eval_tokens, splices, progress=True)
    lap("evaluate CE/KL")
    for name, (hook, output_hook) in reports.items():
        report = feature_report(model, splices[name].sae, eval_tokens, hook, output_hook=output_hook,
                                max_features=args.features)
        report["metrics"] = evaluated[name]
        report["training"] = training[name]
        evaluated[name]["census"] = report["census"]
        save_report(report, out, name)
    page = dashboard_from_run(out)
    lap("features + dashboard")
    metrics = {"model": model_name(model), "model_dtype": str(next(model.parameters()).dtype).split(".")[-1],
               "layer": L, "transcoder": args.transcoder, "hooks": [in_hook, out_hook],
               "train_tokens": shards.tokens, "trained_tokens": total, "eval_tokens": evaluated["sae"]["tokens"],
               "dictionaries": evaluated, "per_layer_hooks": layer_hooks, "seconds": timings,
               "torch_threads": torch.get_num_threads()}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    for name, m in evaluated.items():
        census = m["census"]
        print(f"{name:10s} ce_clean {m['ce_clean']:.4f} ce_splice {m['ce_splice']:.4f} ce_zero {m['ce_zero']:.4f} "
              f"ce_recovered {m['ce_recovered']:.3f} kl {m['kl']:.4f} fvu {m['fvu']:.3f} l0 {m['l0']:.1f} "
              f"dead {m['dead_frac']:.3f} dense {m['dense_frac']:.3f} single-token {census['single_token']}/"
              f"{census['reported']} ({m['tokens']} tokens)")
        for line in worse_than_trivial(m):
            print(f"WARNING {name}: {line}")
    print(f"dashboard: {page}; total {sum(timings.values()):.0f} s")
    return metrics
