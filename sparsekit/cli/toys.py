"""`python -m sparsekit toys attention|sparse-base [...]`: the toy studies.

attention: the attention-head superposition toy, one run or a sweep. One run writes m_columns.png (the
columns of the learned mixing matrix M) and summary.json (M, losses,
column norms, the features represented and the angles between them). --sweep trains --seeds seeds at
each OV density and adds sweep.csv and sweep.png (features represented vs OV density). --phase runs the
phase scan instead (sparsekit.studies.attention_phase: heads per learned head, true-head activity,
pattern sparsity, importance, resid, d_model and T, at sparse and dense OV, then a refinement with a
longer cosine schedule; resumable) and writes phase.jsonl, phase.csv, phase.png, phase_summary.json and
the verdict; --quick is a seconds-long version of it.

sparse-base: trains (or loads from the cache) a 1-layer character-level transformer with an L1 penalty
on its MLP activations, standard or cut residual, analyses every neuron that fires on held-out text and
writes overview.png, facets.png, magnitude.png, report.md and summary.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .parser import OneLineParser, fraction, int64, list_commands_if_asked, non_negative, positive

TOYS = {"attention": "mix n_true attention heads into n_heads with one matrix M (sparsekit.toys.attention_superposition)",
        "sparse-base": "1-layer char transformer with L1 on its MLP: facets and magnitude codes (sparsekit.toys.sparse_base_*)"}


def _densities(text: str) -> tuple[float, ...]:
    return tuple(fraction(part) for part in text.split(","))


def attention_main(argv) -> None:
    import torch

    from sparsekit.toys.attention_superposition import (
        SWEEP_DENSITIES,
        AttentionToyConfig,
        plot_columns,
        sweep,
        train_mixing,
        write_sweep,
    )

    defaults = AttentionToyConfig()
    parser = OneLineParser(prog="sparsekit toys attention", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ov-density", type=fraction, default=defaults.ov_density,
                        help=f"fraction of nonzero OV entries (default {defaults.ov_density})")
    parser.add_argument("--seed", type=int64, default=defaults.seed)
    parser.add_argument("--steps", type=positive, default=defaults.steps)
    parser.add_argument("--out", default="runs/toys/attention", help="output folder (default runs/toys/attention)")
    parser.add_argument("--sweep", action="store_true", help="sweep OV density over --densities and --seeds seeds")
    parser.add_argument("--seeds", type=positive, default=None,
                        help="seeds per density in --sweep and per OV density in --phase (default 3)")
    parser.add_argument("--densities", type=_densities, default=SWEEP_DENSITIES,
                        help=f"comma-separated OV densities for --sweep (default {','.join(map(str, SWEEP_DENSITIES))})")
    parser.add_argument("--p-active", type=fraction, default=defaults.p_active,
                        help=f"probability a query row of a true pattern attends at all (default {defaults.p_active})")
    parser.add_argument("--n-true", type=positive, default=defaults.n_true)
    parser.add_argument("--n-heads", type=positive, default=defaults.n_heads)
    parser.add_argument("--threshold", type=float, default=defaults.threshold,
                        help=f"column norm above which a feature counts as represented (default {defaults.threshold})")
    parser.add_argument("--phase", action="store_true",
                        help="the phase scan (8.5 min measured on 2 idle AVX2 cores; resumes from --out/phase.jsonl)")
    parser.add_argument("--quick", action="store_true", help="with --phase: a tiny design that runs in seconds")
    parser.add_argument("--workers", type=positive, default=2,
                        help="with --phase: processes running toy runs side by side (default 2)")
    parser.add_argument("--cells", type=positive, default=None,
                        help="with --phase: coarse cells (default 50; a prefix of the same cells, so runs are reused)")
    parser.add_argument("--refine", type=int64, default=None,
                        help="with --phase: cells refined for being closest to the note's picture (default 3)")
    parser.add_argument("--refine-opposite", type=int64, default=None,
                        help="with --phase: cells refined for the strongest opposite trend (default 1)")
    args = parser.parse_args(argv)
    if args.seed < 0:
        parser.error(f"argument --seed: expected a non-negative int, got {args.seed}")
    phase_only = {"--quick": args.quick, "--cells": args.cells, "--refine": args.refine,
                  "--refine-opposite": args.refine_opposite}
    for flag, value in phase_only.items():
        if value not in (None, False) and not args.phase:
            parser.error(f"argument {flag}: only with --phase")
    if args.phase:
        return phase_main(args, parser)
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
        rows = sweep(cfg, densities=args.densities, seeds=args.seeds or 3)
        summary["sweep"] = write_sweep(rows, out / "sweep.csv", out / "sweep.png", cfg.n_true)
        for s in summary["sweep"]:
            print(f"ov_density={s['ov_density']:g}: features represented mean {s['mean']:.2f} "
                  f"(min {s['min']}, max {s['max']}, {s['seeds']} seeds)")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    written = ('m_columns.png', 'summary.json', 'sweep.csv', 'sweep.png')
    print(f"wrote {', '.join(sorted(p.name for p in out.iterdir() if p.name in written))} to {out}/")


def phase_main(args, parser) -> None:
    from dataclasses import replace

    from sparsekit.studies.attention_phase import DESIGNS, run_phase, verdict_lines

    design = DESIGNS["quick" if args.quick else "full"]
    changes = {"coarse_cells": args.cells, "seeds": args.seeds, "refine_closest": args.refine,
               "refine_opposite": args.refine_opposite}
    try:
        design = replace(design, **{k: v for k, v in changes.items() if v is not None})
    except ValueError as error:
        parser.error(str(error))
    out = Path(args.out)
    summary = run_phase(out, design, workers=args.workers)
    for line in verdict_lines(summary):
        print(line)
    print(f"{summary['runs']} runs ({summary['run_seconds']:.0f} s of run time) in {summary['wall_seconds']:.0f} s "
          f"wall with {args.workers} worker(s); refined: {'; '.join(summary['refined'])}")
    print(f"wrote phase.jsonl, phase.csv, phase.png, phase_summary.json to {out}/")


def sparse_base_main(argv) -> None:
    import torch

    from sparsekit.toys.sparse_base_model import VARIANTS, SparseBaseConfig, train_sparse_base
    from sparsekit.toys.sparse_base_neurons import analyse_model, collect
    from sparsekit.toys.sparse_base_report import FILES, write_report

    defaults = SparseBaseConfig()
    parser = OneLineParser(prog="sparsekit toys sparse-base", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=VARIANTS, default=defaults.variant,
                        help="standard: resid_post = resid_mid + mlp_out; cut: resid_post = mlp_out")
    parser.add_argument("--l1", type=non_negative, default=defaults.l1,
                        help=f"L1 coefficient on blocks.0.mlp.hook_post (default {defaults.l1:g})")
    parser.add_argument("--tokens", type=positive, default=defaults.tokens,
                        help=f"training tokens (default {defaults.tokens})")
    parser.add_argument("--d-mlp", type=positive, default=defaults.d_mlp)
    parser.add_argument("--d-model", type=positive, default=defaults.d_model)
    parser.add_argument("--seed", type=int64, default=defaults.seed)
    parser.add_argument("--contexts", type=positive, default=600,
                        help="held-out contexts to analyse (default 600, 63 positions each)")
    parser.add_argument("--min-fires", type=positive, default=50,
                        help="analyse neurons firing at >= this many positions (default 50)")
    parser.add_argument("--max-density", type=fraction, default=0.05,
                        help="neurons firing at most this often count as sparse (default 0.05)")
    parser.add_argument("--top", type=positive, default=8, help="neurons per ranking in the report (default 8)")
    parser.add_argument("--cache-dir", default=None, help="trained-model cache (default: sparsekit's cache dir)")
    parser.add_argument("--out", default=None, help="output folder (default runs/toys/sparse_base/<variant>)")
    args = parser.parse_args(argv)
    if args.seed < 0:
        parser.error(f"argument --seed: expected a non-negative int, got {args.seed}")
    try:
        cfg = SparseBaseConfig(variant=args.variant, l1=args.l1, tokens=args.tokens, d_mlp=args.d_mlp,
                               d_model=args.d_model, seed=args.seed)
    except ValueError as error:
        parser.error(str(error))
    out = Path(args.out or f"runs/toys/sparse_base/{cfg.variant}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: a second thread only adds contention on a shared machine
    try:
        trained = train_sparse_base(cfg, cache_dir=args.cache_dir)
        held = trained.record["held_out"]
        print(f"{cfg.variant}, l1={cfg.l1:g}: held-out CE {held['ce']:.3f} nats/char, L0 {held['l0']:.1f}, "
              f"L1 {held['l1']:.2f} per token (trained in {trained.record['train_seconds']:.0f} s)")
        data = collect(trained, args.contexts)
        neurons = analyse_model(trained, data, min_fires=args.min_fires)
        summary = write_report(trained, neurons, out, positions=data["post"].shape[0], min_fires=args.min_fires,
                               max_density=args.max_density, top=args.top)
    finally:
        torch.set_num_threads(threads)
    agg = summary["aggregates"]
    print(f"{agg['analysed']} neurons fire >= {args.min_fires} times on {summary['positions']} positions; "
          f"{agg['sparse']} sparse (density <= {args.max_density:g}), {agg['sparse_with_facets']} with >= 2 facets")
    print(f"most polysemantic sparse neurons: {summary['polysemantic']}; most magnitude-coded: {summary['magnitude_coded']}")
    print(f"wrote {', '.join(FILES)} to {out}/")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    list_commands_if_asked(argv, "python -m sparsekit toys <toy> [options]", "toys", TOYS)
    if argv[0] == "attention":
        attention_main(argv[1:])
    elif argv[0] == "sparse-base":
        sparse_base_main(argv[1:])
    else:
        print(f"sparsekit toys: unknown toy {argv[0]!r}; choose one of {', '.join(TOYS)}", file=sys.stderr)
        raise SystemExit(2)
