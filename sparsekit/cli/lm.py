"""`python -m sparsekit lm-demo`: the language-model demo's command line (sparsekit.studies.lm_demo)."""
from __future__ import annotations

import argparse

import torch

from sparsekit.activations.lm import LM_DTYPES
from sparsekit.studies import lm_demo
from sparsekit.studies.lm_demo import TRANSCODERS, run

from .parser import OneLineParser, int64


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after every help text; the epilog (the hooks table) kept as written."""


def parse_layers(text: str) -> list[int]:
    try:
        layers = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers must be comma-separated layer numbers, got {text!r}") from None
    if not layers or layers[0] < 0:
        raise argparse.ArgumentTypeError(f"--layers must list layers >= 0, got {text!r}")
    return layers


def parse(argv) -> argparse.Namespace:
    summary, rest = lm_demo.__doc__.split("\n\n", 1)
    p = OneLineParser(prog="sparsekit lm-demo", description=summary, epilog=rest.split("\n\n")[0] + "\n\n"
                                + rest.split("\n\n")[1], formatter_class=_Formatter)
    p.add_argument("--out", default="runs/lm-demo", help="run folder")
    p.add_argument("--dtype", choices=LM_DTYPES, default="float32",
                   help="the model's dtype (bfloat16: opt-in, about 2x faster on CPUs with native bf16)")
    p.add_argument("--layer", type=int64, default=3, help="the block L the SAE and the transcoder read")
    p.add_argument("--transcoder", choices=TRANSCODERS, default="mlp",
                   help="what the transcoder maps: mlp = MLP input -> MLP output, resid = resid_pre(L) -> "
                        "resid_pre(L+m), attn = heads' values -> attention output (the hooks are listed below)")
    p.add_argument("--resid-offset", type=int64, default=1, help="m for --transcoder resid")
    p.add_argument("--layers", type=parse_layers, default=None, help="also one SAE per listed layer, e.g. 0,2,4")
    p.add_argument("--layer-site", default="hook_resid_post", help="per-layer SAEs read blocks.l.<site>")
    p.add_argument("--layer-tokens", type=int64, default=None, help="cached tokens per layer (None: as many as --train-tokens)")
    p.add_argument("--context-len", type=int64, default=128, help="tokens per context, BOS first")
    p.add_argument("--train-tokens", type=int64, default=300_000, help="activations cached for training")
    p.add_argument("--epochs", type=int64, default=1, help="passes over the cached activations")
    p.add_argument("--eval-tokens", type=int64, default=8192, help="held-out tokens for CE/KL and the features")
    p.add_argument("--n-latents", type=int64, default=2048, help="latents per dictionary")
    p.add_argument("--k", type=int64, default=32, help="active latents per token (TopK)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--batch-size", type=int64, default=1024, help="tokens per training step and per caching pass")
    p.add_argument("--features", type=int64, default=100, help="features shown per dictionary")
    p.add_argument("--corpus", default="shakespeare", help="built-in text: shakespeare or python-docs")
    return p.parse_args(argv)


def main(argv=None) -> None:
    torch.manual_seed(0)
    run(parse(argv or []))
