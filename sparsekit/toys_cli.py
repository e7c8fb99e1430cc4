"""`python -m sparsekit toys attention [...]`: the attention-head superposition toy, one run or a sweep.

One run writes m_columns.png (the columns of the learned mixing matrix M) and summary.json (M, losses,
column norms, the features represented and the angles between them). --sweep trains --seeds seeds at
each OV density and adds sweep.csv and sweep.png (features represented vs OV density).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TOYS = {"attention": "mix n_true attention heads into n_heads with one matrix M (sparsekit.toys.attention_superposition)"}


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text}")
    return value


def _densities(text: str) -> tuple[float, ...]:
    return tuple(_fraction(part) for part in text.split(","))


def attention_main(argv) -> None:
    import torch

    from .toys.attention_superposition import (SWEEP_DENSITIES, AttentionToyConfig, plot_columns, sweep,
                                               train_mixing, write_sweep)

    defaults = AttentionToyConfig()
    parser = _OneLineParser(prog="sparsekit toys attention", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ov-density", type=_fraction, default=defaults.ov_density,
                        help=f"fraction of nonzero OV entries (default {defaults.ov_density})")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--steps", type=_positive, default=defaults.steps)
    parser.add_argument("--out", default="runs/toys/attention", help="output folder (default runs/toys/attention)")
    parser.add_argument("--sweep", action="store_true", help="sweep OV density over --densities and --seeds seeds")
    parser.add_argument("--seeds", type=_positive, default=3, help="seeds per density in --sweep (default 3)")
    parser.add_argument("--densities", type=_densities, default=SWEEP_DENSITIES,
                        help=f"comma-separated OV densities for --sweep (default {','.join(map(str, SWEEP_DENSITIES))})")
    parser.add_argument("--p-active", type=_fraction, default=defaults.p_active,
                        help=f"probability a query row of a true pattern attends at all (default {defaults.p_active})")
    parser.add_argument("--n-true", type=_positive, default=defaults.n_true)
    parser.add_argument("--n-heads", type=_positive, default=defaults.n_heads)
    parser.add_argument("--threshold", type=float, default=defaults.threshold,
                        help=f"column norm above which a feature counts as represented (default {defaults.threshold})")
    args = parser.parse_args(argv)
    if args.seed < 0:
        parser.error(f"argument --seed: expected a non-negative int, got {args.seed}")
    try:
        cfg = AttentionToyConfig(ov_density=args.ov_density, seed=args.seed, steps=args.steps, p_active=args.p_active,
                                 n_true=args.n_true, n_heads=args.n_heads, threshold=args.threshold)
    except ValueError as error:
        parser.error(str(error))
    # The tensors are tiny: a second intra-op thread only adds contention (10x slower on a busy 2-core box).
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    result = train_mixing(cfg)
    plot_columns(result, out / "m_columns.png")
    summary = {"run": result}
    angles = ", ".join(f"{pair}: {angle:.0f}°" for pair, angle in result["angles_deg"].items()) or "none"
    print(f"ov_density={cfg.ov_density:g} seed={cfg.seed}: {result['n_represented']}/{cfg.n_true} features "
          f"represented (norm > {cfg.threshold:g}); norms {' '.join(f'{n:.2f}' for n in result['norms'])}; "
          f"angles {angles}; loss {result['loss']:.4f} (M = 0: {result['loss_M_zero']:.4f})")
    if args.sweep:
        rows = sweep(cfg, densities=args.densities, seeds=args.seeds)
        summary["sweep"] = write_sweep(rows, out / "sweep.csv", out / "sweep.png", cfg.n_true)
        for s in summary["sweep"]:
            print(f"ov_density={s['ov_density']:g}: features represented mean {s['mean']:.2f} "
                  f"(min {s['min']}, max {s['max']}, {s['seeds']} seeds)")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {', '.join(sorted(p.name for p in out.iterdir() if p.name in ('m_columns.png', 'summary.json', 'sweep.csv', 'sweep.png')))} to {out}/")


def main(argv=None) -> None:
    from .cli import list_commands_if_asked
    argv = sys.argv[1:] if argv is None else list(argv)
    list_commands_if_asked(argv, "python -m sparsekit toys <toy> [options]", "toys", TOYS)
    if argv[0] == "attention":
        attention_main(argv[1:])
    else:
        print(f"sparsekit toys: unknown toy {argv[0]!r}; choose one of {', '.join(TOYS)}", file=sys.stderr)
        raise SystemExit(2)
