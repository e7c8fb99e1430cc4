"""`python -m sparsekit lm-demo`: the language-model demo's command line (sparsekit.studies.lm_demo)."""
from __future__ import annotations

import argparse

import torch

from sparsekit.studies import lm_demo
from sparsekit.studies.lm_demo import TRANSCODERS, run


def parse_layers(text: str) -> list[int]:
    try:
        layers = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers must be comma-separated layer numbers, got {text!r}") from None
    if not layers or layers[0] < 0:
        raise argparse.ArgumentTypeError(f"--layers must list layers >= 0, got {text!r}")
    return layers


def parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sparsekit lm-demo", description=lm_demo.__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/lm-demo", help="run folder")
    p.add_argument("--layer", type=int, default=3)
    p.add_argument("--transcoder", choices=TRANSCODERS, default="mlp", help="what the transcoder maps (see above)")
    p.add_argument("--resid-offset", type=int, default=1, help="m for --transcoder resid")
    p.add_argument("--layers", type=parse_layers, default=None, help="also per-layer SAEs, e.g. 0,2,4")
    p.add_argument("--layer-site", default="hook_resid_post", help="per-layer SAEs read blocks.l.<site>")
    p.add_argument("--layer-tokens", type=int, default=None, help="cached tokens per layer (default --train-tokens)")
    p.add_argument("--context-len", type=int, default=128)
    p.add_argument("--train-tokens", type=int, default=300_000, help="activations cached for training")
    p.add_argument("--epochs", type=int, default=1, help="passes over the cached activations")
    p.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens for CE/KL and the features")
    p.add_argument("--n-latents", type=int, default=2048)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--features", type=int, default=100, help="features shown per dictionary")
    p.add_argument("--corpus", default="shakespeare")
    return p.parse_args(argv)


def main(argv=None) -> None:
    torch.manual_seed(0)
    run(parse(argv or []))
