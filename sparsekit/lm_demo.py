"""`sparsekit lm-demo` (`make demo-lm`): dictionaries on a real LM, offline, on 2 CPU cores.

SmolLM2-135M-Instruct (``load_lm``), Shakespeare contexts of 128 tokens (BOS first, excluded from
the activations). One pass up to block L (``stop_at_layer=L+1``, a fraction of the model's cost)
caches (MLP input, MLP output) pairs at layer L as shards; from that one cache it trains a TopK SAE
on the MLP output and a TopK transcoder MLP input -> MLP output, evaluates both on held-out contexts
(CE loss recovered, KL, FVU, L0, dead/dense), writes feature reports and the dashboard:

    RUN_DIR/acts/               cached activations (reused by the next run)
    RUN_DIR/{sae,transcoder}/   the dictionaries (sparsekit.load)
    RUN_DIR/metrics.json        evaluation figures
    RUN_DIR/*_features.json, RUN_DIR/dashboard.html

The defaults are sized for a loaded 2-core machine (40k cached tokens, 3 epochs, 1,024 evaluation
tokens, ~20 min there under a load average of ~13); the evaluation's three full-model passes per
dictionary dominate, so raise --eval-tokens (and --train-tokens) where there is time.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sparsekit lm-demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/lm-demo", help="run folder")
    p.add_argument("--layer", type=int, default=3)
    p.add_argument("--context-len", type=int, default=128)
    p.add_argument("--train-tokens", type=int, default=40_000, help="activations cached for training")
    p.add_argument("--epochs", type=int, default=3, help="passes over the cached activations")
    p.add_argument("--eval-tokens", type=int, default=1024, help="held-out tokens for CE/KL and the features")
    p.add_argument("--n-latents", type=int, default=2048)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--features", type=int, default=100, help="features shown per dictionary")
    p.add_argument("--corpus", default="shakespeare")
    return p.parse_args(argv)


def run(args) -> dict:
    import sparsekit
    from .activations.lm import load_lm
    from .activations.lm_metrics import lm_splice_metrics
    from .activations.shards import ShardSource
    from .activations.source import IterableSource
    from .activations.store import cache_activations, corpus_contexts
    from .analysis.dashboard import dashboard_from_run, save_report
    from .analysis.lm_features import feature_report

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    timings = {}

    def lap(name):
        timings[name] = round(time.time() - started - sum(timings.values()), 1)
        print(f"[lm-demo] {name}: {timings[name]} s", flush=True)

    model = load_lm("smollm2-135m")
    lap("load model")
    per_context = args.context_len - 1
    n_train = -(-args.train_tokens // per_context)
    n_eval = -(-args.eval_tokens // per_context)
    contexts = corpus_contexts(model, args.corpus, args.context_len, max_contexts=n_train + n_eval)
    if contexts.shape[0] < n_train + n_eval:
        raise SystemExit(f"the corpus gives {contexts.shape[0]} contexts; {n_train + n_eval} needed")
    train_tokens, eval_tokens = contexts[:n_train], contexts[n_train:]
    lap("tokenise")

    L = args.layer
    mlp_in, mlp_out = f"blocks.{L}.ln2.hook_normalized", f"blocks.{L}.hook_mlp_out"
    shards = cache_activations(model, train_tokens, (mlp_in, mlp_out), out / "acts", batch_size=args.batch_size)
    lap(f"cache activations ({shards.tokens:,} tokens, layer {L})")
    total = (args.epochs * shards.tokens) // args.batch_size * args.batch_size

    def config(name):
        return sparsekit.TrainConfig(batch_size=args.batch_size, lr=args.lr, total_tokens=total, eval_tokens=4096,
                                     dead_strategy="auxk", dead_window_tokens=min(100_000, total // 2),
                                     log_every=10, output_dir=str(out / name), seed=0)

    def pairs():
        return ShardSource(out / "acts", batch_size=args.batch_size, epochs=None)

    sae = sparsekit.TopKSAE(model.cfg.d_model, args.n_latents, args.k)
    sparsekit.train(sae, IterableSource(lambda: (y for _, y in pairs())), config("sae"))  # the MLP outputs
    sae.save(out / "sae")
    lap("train SAE")
    transcoder = sparsekit.Transcoder(model.cfg.d_model, args.n_latents, model.cfg.d_model, args.k)
    sparsekit.train(transcoder, pairs(), config("transcoder"))
    transcoder.save(out / "transcoder")
    lap("train transcoder")

    metrics = {"model": "smollm2-135m", "layer": L, "train_tokens": shards.tokens, "trained_tokens": total,
               "sae": lm_splice_metrics(model, eval_tokens, mlp_out, sae),
               "transcoder": lm_splice_metrics(model, eval_tokens, mlp_out, transcoder, input_hook=mlp_in)}
    lap("evaluate CE/KL")
    save_report(feature_report(model, sae, eval_tokens, mlp_out, max_features=args.features), out, "sae")
    save_report(feature_report(model, transcoder, eval_tokens, mlp_in, output_hook=mlp_out,
                               max_features=args.features), out, "transcoder")
    page = dashboard_from_run(out)
    lap("features + dashboard")
    metrics["seconds"] = timings
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    for name in ("sae", "transcoder"):
        m = metrics[name]
        print(f"{name:10s} ce_clean {m['ce_clean']:.4f} ce_splice {m['ce_splice']:.4f} ce_zero {m['ce_zero']:.4f} "
              f"ce_recovered {m['ce_recovered']:.3f} kl {m['kl']:.4f} fvu {m['fvu']:.3f} l0 {m['l0']:.1f} "
              f"dead {m['dead_frac']:.3f} dense {m['dense_frac']:.3f} ({m['tokens']} tokens)")
    print(f"dashboard: {page}; total {sum(timings.values()):.0f} s")
    return metrics


def main(argv=None) -> None:
    torch.manual_seed(0)
    run(parse(argv or []))
