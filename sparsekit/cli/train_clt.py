"""`sparsekit train-clt`: a cross-layer transcoder on SmolLM2-135M, offline, in one command.

    python -m sparsekit train-clt --layers 3-8 --latents-per-layer 2048 --k 16 --train-tokens 1e6 --out runs/clt

Built-in text (--corpus) is tokenised into --context-len contexts (BOS first); the first contexts
giving --eval-tokens rows are held out. Every covered layer's MLP input (blocks.l.ln2.hook_normalized)
and output (blocks.l.hook_mlp_out) are cached once, from one forward per batch of contexts, under
--cache (default RUN/acts; reused by the next run on the same text). The CLT
(``sparsekit.sae.clt``) trains for --epochs passes, then prints and writes each layer's held-out FVU,
L0 and never-fired fraction. --reach 1 trains per-layer transcoders side by side instead (the PLT
baseline at equal L0); --compare-steps N times N training steps of the CLT, of the PLTs and of one
plain TopK transcoder with the same total latents and total L0, on one batch of the cache.

    RUN/clt/            the CLT (sparsekit.load)
    RUN/metrics.json    per-layer FVU, L0, never-fired and dead fractions, throughput, step times
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from .parser import OneLineParser, int64, path_arg

CORPORA = ("shakespeare", "python-docs")
CACHE_DTYPES = ("float32", "bfloat16")


def parse_layer_range(text: str) -> list[int]:
    """"3-8" (inclusive) or "3,4,5" -> consecutive layer numbers."""
    try:
        if "-" in text:
            first, last = (int(part) for part in text.split("-", 1))
            layers = list(range(first, last + 1))
        else:
            layers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a layer range such as 3-8 or 3,4,5, got {text!r}") from None
    if not layers or layers[0] < 0 or layers != list(range(layers[0], layers[0] + len(layers))):
        raise argparse.ArgumentTypeError(f"expected consecutive layers >= 0 such as 3-8, got {text!r}")
    return layers


def count(text: str) -> int:
    """A positive count, written as an int or in e notation (1e6)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive count such as 200000 or 2e5, got {text!r}") from None
    if not (value >= 1 and value == int(value) and value < 2**62):
        raise argparse.ArgumentTypeError(f"expected a positive whole count, got {text!r}")
    return int(value)


def parse(argv) -> argparse.Namespace:
    p = OneLineParser(prog="sparsekit train-clt", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--layers", type=parse_layer_range, default=parse_layer_range("3-8"),
                   help="consecutive layers covered, e.g. 3-8")
    p.add_argument("--latents-per-layer", type=count, default=2048, help="latents in each layer")
    p.add_argument("--k", type=count, default=16, help="active latents per token in each layer (TopK)")
    p.add_argument("--reach", type=count, default=None,
                   help="targets each layer's features write (default: every later covered layer; 1: PLTs)")
    p.add_argument("--train-tokens", type=count, default=200_000, help="cached training rows (tokens)")
    p.add_argument("--eval-tokens", type=count, default=8192, help="held-out rows for the FVU")
    p.add_argument("--epochs", type=count, default=1, help="passes over the cached training rows")
    p.add_argument("--batch-size", type=count, default=1024, help="rows per training step")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (warm-up 5%%, decay over the last 20%%)")
    p.add_argument("--aux-coeff", type=float, default=1 / 32,
                   help="AuxK's weight for latents dead over the last half of training or 100k tokens (0: off)")
    p.add_argument("--context-len", type=count, default=128, help="tokens per context, BOS first")
    p.add_argument("--corpus", choices=CORPORA, default="shakespeare", help="built-in text")
    p.add_argument("--cache", type=path_arg, default=None, help="activation cache folder (default RUN/acts)")
    p.add_argument("--cache-dtype", choices=CACHE_DTYPES, default="float32", help="cached activations' dtype")
    p.add_argument("--compare-steps", type=int64, default=0,
                   help="also time this many steps each of the CLT, the PLTs and a plain transcoder, taking turns (0: skip)")
    p.add_argument("--seed", type=int64, default=0, help="initialisation and shuffle seed")
    p.add_argument("--out", type=path_arg, default="runs/clt", help="run folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.k > args.latents_per_layer:
        p.error(f"--k {args.k} exceeds --latents-per-layer {args.latents_per_layer}")
    if args.context_len < 3:
        p.error(f"--context-len must be >= 3 (BOS, one input, one predicted token), got {args.context_len}")
    if not args.aux_coeff >= 0:
        p.error(f"--aux-coeff must be a number >= 0, got {args.aux_coeff}")
    if not args.lr > 0:
        p.error(f"--lr must be a positive number, got {args.lr}")
    return args


def step_comparison(clt, x, y, steps: int, seed: int) -> dict:
    """Median seconds per training step on one normalised batch: the CLT, per-layer transcoders
    (reach 1) of the same sizes, and one TopK transcoder with the CLT's total latents and total L0."""
    from sparsekit.sae import CrossLayerTranscoder, Transcoder
    from sparsekit.training.clt import time_steps

    L, n, k = clt.n_layers, clt.latents_per_layer, clt.k_per_layer
    plts = CrossLayerTranscoder(clt.d_in, L * n, n_layers=L, k_per_layer=k, reach=1, seed=seed)
    plain = Transcoder(clt.d_in, L * n, clt.d_out, k=L * k, seed=seed)
    copy = CrossLayerTranscoder(clt.d_in, L * n, n_layers=L, k_per_layer=k, reach=clt.reach, seed=seed)
    copy.load_state_dict(clt.state_dict())
    medians = time_steps({"clt_s": (copy, x, y), "plt_s": (plts, x, y),
                          "plain_transcoder_s": (plain, x[:, 0].contiguous(), y[:, 0].contiguous())}, steps)
    figures = {"batch": int(x.shape[0]), "steps": steps, **medians,
               "plain_transcoder": f"TopK transcoder, n_latents={L * n}, k={L * k}, one layer"}
    return figures


def main(argv=None) -> None:
    args = parse(argv or [])
    try:
        run(args)
    except ValueError as error:  # a cache folder holding other activations, a bad setting: one line, no traceback
        raise SystemExit(f"sparsekit train-clt: error: {error}") from None


def run(args) -> None:
    """The command, once its flags parsed (see the module docstring)."""
    from sparsekit.activations.layers import cache_layer_pairs
    from sparsekit.activations.lm import load_lm
    from sparsekit.activations.store import corpus_contexts
    from sparsekit.sae import CrossLayerTranscoder
    from sparsekit.training.clt import train_clt

    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache) if args.cache else out / "acts"
    timings = {}
    started = time.perf_counter()
    model = load_lm()
    if args.layers[-1] >= model.cfg.n_layers:
        raise SystemExit(f"sparsekit train-clt: error: --layers go up to {args.layers[-1]}, but the model has "
                         f"layers 0..{model.cfg.n_layers - 1}")
    per_context = args.context_len - 1
    eval_contexts = -(-args.eval_tokens // per_context)
    train_contexts = -(-args.train_tokens // per_context)
    tokens = corpus_contexts(model, args.corpus, args.context_len, eval_contexts + train_contexts)
    if tokens.shape[0] < eval_contexts + 1:
        raise SystemExit(f"sparsekit train-clt: error: --corpus {args.corpus} gives {tokens.shape[0]} contexts, fewer "
                         f"than the {eval_contexts} held out plus one")
    progress = not args.no_progress
    held_out = cache_layer_pairs(model, tokens[:eval_contexts], args.layers, cache / "eval", dtype=args.cache_dtype,
                                 progress=progress, shuffle=False, epochs=1)
    pairs = cache_layer_pairs(model, tokens[eval_contexts:], args.layers, cache / "train", batch_size=args.batch_size,
                              dtype=args.cache_dtype, progress=progress, seed=args.seed, epochs=args.epochs)
    timings["load_and_cache_s"] = time.perf_counter() - started
    x_eval, y_eval = (torch.cat(parts) for parts in zip(*held_out))
    L = len(args.layers)
    clt = CrossLayerTranscoder(pairs.d_in, L * args.latents_per_layer, pairs.d_out, n_layers=L, k_per_layer=args.k,
                               reach=args.reach, first_layer=args.layers[0], seed=args.seed)
    total = pairs.tokens * args.epochs
    print(f"training a CLT over layers {args.layers[0]}-{args.layers[-1]}: {args.latents_per_layer} latents and k="
          f"{args.k} per layer, reach {args.reach or 'all later layers'}, {total:,} tokens "
          f"({pairs.tokens:,} cached x {args.epochs} epochs), batch {args.batch_size}")
    result = train_clt(clt, pairs, total, lr=args.lr, eval_pairs=(x_eval, y_eval), progress=progress,
                       dead_window_tokens=min(100_000, total // 2), aux_coeff=args.aux_coeff)
    clt.metadata = {"model": "smollm2-135m", "hooks": "blocks.l.ln2.hook_normalized -> blocks.l.hook_mlp_out",
                    "layers": args.layers, "corpus": args.corpus, "context_len": args.context_len,
                    "tokens_trained": result["tokens"],
                    "metrics": {"fvu": result["eval"]["fvu"], "l0": result["eval"]["l0"]}}
    clt.save(out / "clt")
    metrics = {key: value for key, value in result.items() if key != "history"}
    metrics["settings"] = {k: v for k, v in vars(args).items()}
    # The replacement model: the CLT in place of every covered MLP at once, CE/KL on the held-out contexts.
    from sparsekit.analysis.circuits import replacement_ce_kl, replacement_summary
    metrics["replacement"] = replacement_ce_kl(model, clt, tokens[:eval_contexts], progress=progress)
    if args.compare_steps > 0:
        x, y = clt.scale_batch(x_eval[:args.batch_size], y_eval[:args.batch_size])
        metrics["step_comparison"] = step_comparison(clt, x, y, args.compare_steps, args.seed)
    metrics.update(timings)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    ev = result["eval"]
    print(f"{result['tokens']:,} tokens in {result['seconds']:.0f} s ({result['tokens_per_s']:.0f} tok/s); held out: "
          f"{ev['tokens']:,} tokens")
    print("layer   FVU     L0   never fired   dead (window)")
    for layer, fvu, l0, never, dead in zip(ev["layers"], ev["fvu"], ev["l0"], ev["never_fired_frac"],
                                           result["dead_frac"]):
        print(f"{layer:5d}  {fvu:.4f}  {l0:5.1f}  {never:11.3f}   {dead:.3f}")
    if "step_comparison" in metrics:
        c = metrics["step_comparison"]
        print(f"step times on a batch of {c['batch']} (median of {c['steps']}): CLT {c['clt_s']:.3f} s, "
              f"PLTs {c['plt_s']:.3f} s, plain transcoder ({c['plain_transcoder']}) {c['plain_transcoder_s']:.3f} s")
    print(replacement_summary(metrics["replacement"]))
    print(f"saved {out / 'clt'} and {out / 'metrics.json'}")
