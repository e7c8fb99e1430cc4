"""`python -m sparsekit demo`: the compact MNIST study (what `make demo` runs), or with --synthetic a
TopK dictionary trained on planted features (sparsekit.studies.synthetic)."""
from __future__ import annotations

import argparse
import sys

from sparsekit.studies import synthetic
from sparsekit.studies.synthetic import run_synthetic

from .mnist import main as mnist_main
from .parser import OneLineParser, int64

MNIST_OUT = "runs/mnist-demo"


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--synthetic" in argv:
        synthetic_main([a for a in argv if a != "--synthetic"])
        return
    mnist_main(argv, prog="sparsekit demo", default_out=MNIST_OUT)


def synthetic_main(argv) -> None:
    parser = OneLineParser(prog="sparsekit demo --synthetic", description=synthetic.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int64, default=6_000_000,
                        help="training tokens (default 6,000,000: about a minute on 2 cores)")
    parser.add_argument("--seed", type=int64, default=0)
    parser.add_argument("--output-dir", default="demo-output", help="metrics.jsonl and feature_density.png go here")
    args = parser.parse_args(argv)
    if args.tokens < 1024:
        parser.error(f"--tokens must be at least one batch (1024), got {args.tokens}")
    metrics = run_synthetic(total_tokens=args.tokens, seed=args.seed, output_dir=args.output_dir)
    print(f"final (held out): fvu {metrics['fvu']:.4f}, l0 {metrics['l0']:.2f}, dead {metrics['dead_frac']:.3f}; "
          f"planted directions recovered (cos > 0.9): {metrics['recovered']}/{metrics['n_true']}, "
          f"mean max cosine {metrics['recovery']:.3f}; plots and metrics in {args.output_dir}/")
