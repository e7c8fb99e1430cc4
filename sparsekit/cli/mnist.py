"""`python -m sparsekit mnist`: the MNIST study's command line (the study is sparsekit.studies.mnist_study)."""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from sparsekit.studies import mnist_study
from sparsekit.studies.mnist_scan import GRIDS
from sparsekit.studies.mnist_study import StudyConfig, print_summary, run_study
from sparsekit.toys.mnist_mlp import MLPConfig

from .parser import OneLineParser, int64, positive


def parser(prog: str = "sparsekit mnist", default_out: str | None = None) -> argparse.ArgumentParser:
    p = OneLineParser(prog=prog, description=mnist_study.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scan", choices=sorted(GRIDS), default="compact",
                   help="compact: sizes 16..512, 4 sparsity settings, 400 steps per cell (the demo); "
                        "full: 8 sizes 16..2048, 6-7 settings, 2000 steps")
    p.add_argument("--out", default=default_out, help="output folder (default runs/mnist-<scan>)")
    p.add_argument("--hidden", type=positive, default=64, help="MLP width (default 64)")
    p.add_argument("--depth", type=positive, default=1, help="MLP hidden layers (default 1)")
    p.add_argument("--layer", type=int64, default=-1, help="hidden layer to decompose, 0-based; -1 = last (default)")
    p.add_argument("--epochs", type=positive, default=10, help="MLP training epochs (default 10)")
    p.add_argument("--steps", type=positive, default=None, help="training steps per dictionary (default: the grid's)")
    p.add_argument("--seed", type=int64, default=0, help="seed of the MLP and the dictionaries (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--verbose", action="store_true", help="a progress bar per dictionary too")
    return p


def config_from_args(args, p: argparse.ArgumentParser) -> StudyConfig:
    if args.seed < 0:
        p.error(f"argument --seed: expected a non-negative int, got {args.seed}")
    if not -args.depth <= args.layer < args.depth:
        p.error(f"argument --layer: {args.layer} is not a hidden layer of a depth-{args.depth} MLP "
                f"(use 0..{args.depth - 1} or -1)")
    grid = GRIDS[args.scan]
    grid = replace(grid, seed=args.seed, **({"steps": args.steps} if args.steps else {}))
    return StudyConfig(mlp=MLPConfig(hidden=args.hidden, depth=args.depth, epochs=args.epochs, seed=args.seed),
                       layer=args.layer, grid=grid, out=args.out or f"runs/mnist-{args.scan}",
                       progress=not args.quiet, verbose=args.verbose)


def main(argv=None, prog: str = "sparsekit mnist", default_out: str | None = None) -> dict:
    p = parser(prog, default_out)
    args = p.parse_args(sys.argv[1:] if argv is None else list(argv))
    config = config_from_args(args, p)
    summary = run_study(config)
    print_summary(summary, config.out)
    return summary
