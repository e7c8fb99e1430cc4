"""`python -m sparsekit lm-study dead-latents|depth`: the LM studies of the research note's claims
(sparsekit.studies.dead_latents_lm, sparsekit.studies.features_by_depth; docs/studies.md)."""
from __future__ import annotations

import argparse

import torch

from sparsekit.studies.dead_latents_lm import REMEDIES, DeadLatentPlan, run_scan
from sparsekit.studies.features_by_depth import SITES, DepthPlan

from .parser import OneLineParser, int64

STUDIES = {"dead-latents": "dead fraction, FVU and CE/KL vs dictionary size under each dead-latent remedy",
           "depth": "one SAE per layer; single-token, context-dependence, logit coherence and density vs depth"}


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after every help text."""


def _int_list(text: str) -> tuple:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one integer, got {text!r}")
    return values


def _remedies(text: str) -> tuple:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [n for n in names if n not in REMEDIES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"--remedies must be among {', '.join(REMEDIES)}, got {text!r}")
    return names


def parse_dead_latents(argv) -> argparse.Namespace:
    from sparsekit.studies import dead_latents_lm
    summary, rest = dead_latents_lm.__doc__.split("\n\n", 1)
    defaults = DeadLatentPlan()
    p = OneLineParser(prog="sparsekit lm-study dead-latents", description=summary, epilog=rest,
                      formatter_class=_Formatter)
    p.add_argument("--out", default="runs/dead-latents", help="scan folder (a second run resumes it)")
    p.add_argument("--layer", type=int64, default=3, help="the block whose residual stream (hook_resid_pre) is read")
    p.add_argument("--sizes", type=_int_list, default=defaults.sizes, help="dictionary sizes, comma-separated")
    p.add_argument("--remedies", type=_remedies, default=defaults.remedies, help="dead-latent remedies, comma-separated")
    p.add_argument("--k", type=int64, default=defaults.k, help="active latents per token (TopK)")
    p.add_argument("--train-tokens", type=int64, default=defaults.train_tokens, help="tokens cached and trained on per cell")
    p.add_argument("--eval-tokens", type=int64, default=defaults.eval_tokens, help="held-out tokens for FVU and CE/KL")
    p.add_argument("--batch-size", type=int64, default=defaults.batch_size, help="tokens per step")
    p.add_argument("--lr", type=float, default=defaults.lr, help="Adam learning rate")
    p.add_argument("--dead-window-tokens", type=int64, default=defaults.dead_window_tokens,
                   help="a latent that fired on none of the last this many training tokens is dead")
    p.add_argument("--corpus", default=defaults.corpus, help="built-in text: shakespeare or python-docs")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run in minutes: sizes 256,512,1024, 65,536 tokens, 2,048 held out")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.train_tokens, args.eval_tokens, args.dead_window_tokens = (256, 512, 1024), 65_536, 2048, 32_768
        args.batch_size = min(args.batch_size, 2048)
    return args


def plan_from(args) -> DeadLatentPlan:
    return DeadLatentPlan(hook=f"blocks.{args.layer}.hook_resid_pre", sizes=tuple(args.sizes),
                          remedies=tuple(args.remedies), k=args.k, train_tokens=args.train_tokens,
                          eval_tokens=args.eval_tokens, batch_size=args.batch_size, lr=args.lr,
                          dead_window_tokens=args.dead_window_tokens, corpus=args.corpus)


def parse_depth(argv) -> argparse.Namespace:
    from sparsekit.studies import features_by_depth
    summary, rest = features_by_depth.__doc__.split("\n\n", 1)
    defaults = DepthPlan()
    p = OneLineParser(prog="sparsekit lm-study depth", description=summary, epilog=rest, formatter_class=_Formatter)
    p.add_argument("--out", default="runs/features-by-depth", help="study folder (a second run resumes it)")
    p.add_argument("--layers", type=_int_list, default=defaults.layers, help="blocks to read, comma-separated")
    p.add_argument("--site", choices=SITES, default=defaults.site, help="the hook read in each block")
    p.add_argument("--n-latents", type=int64, default=defaults.n_latents, help="dictionary width (every layer)")
    p.add_argument("--k", type=int64, default=defaults.k, help="active latents per token (TopK)")
    p.add_argument("--train-tokens", type=int64, default=defaults.train_tokens, help="tokens cached and trained on per layer")
    p.add_argument("--eval-tokens", type=int64, default=defaults.eval_tokens, help="held-out tokens for the census")
    p.add_argument("--batch-size", type=int64, default=defaults.batch_size, help="tokens per step")
    p.add_argument("--lr", type=float, default=defaults.lr, help="Adam learning rate")
    p.add_argument("--corpus", default=defaults.corpus, help="built-in text: shakespeare or python-docs")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run in minutes: n=1024, k=16, 32,768 training and 8,192 census tokens")
    args = p.parse_args(argv)
    if args.quick:
        args.n_latents, args.k, args.train_tokens, args.eval_tokens = 1024, 16, 32_768, 8192
        args.batch_size = min(args.batch_size, 1024)
    return args


def depth_plan_from(args) -> DepthPlan:
    return DepthPlan(layers=tuple(args.layers), site=args.site, n_latents=args.n_latents, k=args.k,
                     train_tokens=args.train_tokens, eval_tokens=args.eval_tokens, batch_size=args.batch_size,
                     lr=args.lr, corpus=args.corpus, dashboard_contexts=16 if args.quick else DepthPlan.dashboard_contexts)


def main(argv=None) -> None:
    argv = list(argv or [])
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in STUDIES:
        listing = "\n".join(f"  {name:14s} {text}" for name, text in STUDIES.items())
        print(f"usage: python -m sparsekit lm-study <study> [options]\n\nstudies:\n{listing}")
        if argv and argv[0] not in ("-h", "--help"):
            raise SystemExit(f"sparsekit lm-study: unknown study {argv[0]!r}; choose one of {', '.join(STUDIES)}")
        return
    from sparsekit.activations.lm import SMOLLM2, SMOLLM2_CONFIG, load_lm
    if argv[0] == "depth":
        from sparsekit.studies.features_by_depth import run_study
        args = parse_depth(argv[1:])
        plan = depth_plan_from(args)
        checks, run = (lambda: plan.check(SMOLLM2_CONFIG["n_layers"])), (lambda model: run_study(plan, model, args.out))
    else:
        args = parse_dead_latents(argv[1:])
        plan = plan_from(args)
        checks, run = plan.check, (lambda model: run_scan(plan, model, args.out))
    try:
        checks()
    except ValueError as error:
        raise SystemExit(f"sparsekit lm-study {argv[0]}: {error}") from None
    torch.manual_seed(0)
    run(load_lm(SMOLLM2))
