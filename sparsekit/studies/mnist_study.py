"""The MNIST study, one command: what features sit in a small ReLU MLP's hidden layer?

    python -m sparsekit mnist --scan compact      # the `make demo` job (runs/mnist-compact)
    python -m sparsekit mnist --scan full         # every size x sparsity setting (resumable)

Steps: train (or load the cached) MLP; collect the layer's activations; run the scan of
``sparsekit.studies.mnist_scan`` (resumable, progress bar); test the error curves for elbows
(``sparsekit.analysis.elbow``); compare resampling with ghost grads across sizes; analyse each
method's headline dictionary (largest size, middle sparsity) with
``sparsekit.analysis.mnist_features``; then write report.html (self-contained) and summary.json
and say which of the research note's claims held. The claims are tested with fixed rules, written
in ``evaluate_claims``; nothing is tuned to make them hold.

Everything runs on one thread: the matrices are small, and a second OpenMP thread on a busy
2-core machine made MLP training 50x slower.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from sparsekit._util.atomic import atomic_write_bytes
from sparsekit.analysis.elbow import find_elbow
from sparsekit.toys.mnist_mlp import MLPConfig
from sparsekit.training.metrics import worse_than_trivial

from .mnist_scan import GRIDS, LayerData, ScanGrid, load_cell_dictionary, one_thread, run_scan, zero_ablated_accuracy

# Rules behind the claim verdicts (see evaluate_claims).
LOW_FVU = 0.1              # "low error"
HUGE_DICTIONARY = 8        # "huge": n_latents >= 8 x the layer width
MANY_ACTIVE = 0.25         # "many active features": L0 >= a quarter of the layer width
TEMPLATE_SCORE_HELD = 0.5  # five times chance (0.1)
TEMPLATE_PURITY = 0.7      # median share of a feature's top images with its majority digit
DIGITS_WITH_SEVERAL = 8    # digits (of 10) with at least 2 features


@dataclass
class StudyConfig:
    """The MLP, which hidden layer (-1: the last), the scan grid, where to write, the gallery size."""
    mlp: MLPConfig = field(default_factory=MLPConfig)
    layer: int = -1
    grid: ScanGrid = field(default_factory=lambda: GRIDS["compact"])
    out: str = "runs/mnist-demo"
    top_images: int = 8
    gallery_per_digit: int = 3
    progress: bool = True
    verbose: bool = False
    cache_dir: str | None = None


def layer_data(model, accuracy_clean: float, layer: int, model_key: str, cache_dir=None) -> LayerData:
    from sparsekit.activations.mnist import load_mnist
    from sparsekit.toys.mnist_mlp import hidden_activations

    train_images, _ = load_mnist("train", cache_dir)
    test_images, test_labels = load_mnist("test", cache_dir)
    hook = f"layers.{layer}.act"
    return LayerData(model, layer, model_key, hidden_activations(model, train_images, layer),
                     hidden_activations(model, test_images, layer), test_images, test_labels, accuracy_clean,
                     zero_ablated_accuracy(model, hook, test_images, test_labels))


def _ranks(values: np.ndarray) -> np.ndarray:
    """0-based ranks, tied values sharing their mean rank."""
    order = values.argsort(kind="stable")
    ranks = np.empty(values.size)
    ranks[order] = np.arange(values.size, dtype=float)
    for value in np.unique(values):
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(x, y) -> float | None:
    """Rank correlation of two equal-length sequences (None if fewer than 3 points or a constant)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.size < 3:
        return None
    rx, ry = _ranks(x), _ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def error_curves(rows: list[dict], grid: ScanGrid) -> dict:
    """method -> {"vs_l0": [(l0, fvu)] at the largest size, "vs_size": [(n, fvu)] at the headline sparsity}."""
    largest = max(grid.sizes)
    curves = {}
    for method in grid.methods:
        mine = [r for r in rows if r["method"] == method and r["fvu"] > 0 and r["l0"] > 0]
        curves[method] = {
            "vs_l0": [(r["l0"], r["fvu"]) for r in mine if r["n_latents"] == largest],
            "vs_size": [(r["n_latents"], r["fvu"]) for r in mine if r["sparsity"] == grid.headline(method)]}
    return curves


def elbow_analysis(curves: dict) -> dict:
    """Every curve through find_elbow -> {"found": bool, "testable": bool, "curves": {method: {...}}}."""
    results = {}
    for method, pair in curves.items():
        results[method] = {}
        for name, points in pair.items():
            if len({p[0] for p in points}) >= 2:
                results[method][name] = find_elbow([p[0] for p in points], [p[1] for p in points])
            else:
                results[method][name] = {"elbow": False, "at": None, "testable": False, "points": len(points)}
    found = [(m, c, r["at"]) for m, per in results.items() for c, r in per.items() if r["elbow"]]
    testable = any(r["testable"] for per in results.values() for r in per.values())
    verdict = ("no curve was testable (fewer than 3 points each)" if not testable else
               "no elbow in any curve" if not found else
               "elbow in " + "; ".join(f"{m} FVU {c.replace('_', ' ')} at {at:g}" for m, c, at in found))
    return {"found": bool(found), "testable": testable, "verdict": verdict, "curves": results}


def dead_latent_study(rows: list[dict], grid: ScanGrid) -> dict:
    """Resampling vs ghost grads at the headline L1 coefficient, per size, and FVU at equal alive count."""
    study = {}
    for method in ("relu_resample", "relu_ghost"):
        if method in grid.methods:
            picked = [r for r in rows if r["method"] == method and r["sparsity"] == grid.headline(method)]
            study[method] = sorted(({k: r[k] for k in ("n_latents", "dead_frac", "alive", "fvu", "l0")} for r in picked),
                                   key=lambda r: r["n_latents"])
    out = {"per_size": study}
    resample = study.get("relu_resample", [])
    if resample:
        rho = spearman([r["n_latents"] for r in resample], [r["dead_frac"] for r in resample])
        out["resample_dead_vs_size_spearman"] = rho
        out["resample_dead_grows"] = (None if rho is None else
                                      bool(rho > 0.5 and resample[-1]["dead_frac"] > resample[0]["dead_frac"]))
    if resample and study.get("relu_ghost"):
        out["equal_alive"] = equal_alive_comparison(resample, study["relu_ghost"])
    return out


def equal_alive_comparison(reference: list[dict], other: list[dict]) -> list[dict]:
    """For each `other` row whose alive count lies inside reference's range: reference's FVU there,
    interpolated linearly in (log alive, log FVU). -> [{"alive", "fvu_ghost", "fvu_resample"}]."""
    ref = sorted((r["alive"], r["fvu"]) for r in reference if r["alive"] > 0 and r["fvu"] > 0)
    if len(ref) < 2:
        return []
    xs, ys = np.log([a for a, _ in ref]), np.log([f for _, f in ref])
    out = []
    for row in other:
        if row["alive"] > 0 and xs[0] <= math.log(row["alive"]) <= xs[-1]:
            out.append({"alive": row["alive"], "n_latents": row["n_latents"], "fvu_ghost": row["fvu"],
                        "fvu_resample": float(np.exp(np.interp(math.log(row["alive"]), xs, ys)))})
    return out


def evaluate_claims(hidden: int, rows: list[dict], elbows: dict, dead: dict, features: dict) -> list[dict]:
    """The research note's claims, each with a verdict ("held", "did not hold", "partly", "not
    testable") by the fixed rules at the top of this module, and the evidence."""
    claims = []

    def add(claim, verdict, evidence):
        claims.append({"claim": claim, "verdict": verdict, "evidence": evidence})

    def across(results: dict) -> str:
        if not results:
            return "not testable"
        held = sum(results.values())
        return "held" if held == len(results) else "did not hold" if held == 0 else "partly"

    template_like = {m: bool(f["median_purity"] >= TEMPLATE_PURITY and
                             sum(c >= 2 for c in f["per_digit"]) >= DIGITS_WITH_SEVERAL) for m, f in features.items()}
    add("Features look like digit templates, several per digit",
        across(template_like),
        "; ".join(f"{m}: median purity {f['median_purity']:.2f}, digits with >= 2 features "
                  f"{sum(c >= 2 for c in f['per_digit'])}/10" for m, f in features.items())
        + f" (rule: purity >= {TEMPLATE_PURITY} and >= {DIGITS_WITH_SEVERAL} digits with several features)")
    favour = {m: bool(f["template_score"] is not None and f["template_score"] >= TEMPLATE_SCORE_HELD)
              for m, f in features.items()}
    add("Logit weights favour the digit the feature looks like (template score)", across(favour),
        "; ".join(f"{m}: {f['template_score']:.2f}" if f["template_score"] is not None else f"{m}: no alive features"
                  for m, f in features.items()) + f" (rule: >= {TEMPLATE_SCORE_HELD}; chance 0.1)")
    add("No elbow in reconstruction error vs L0 or vs number of features",
        "not testable" if not elbows["testable"] else "did not hold" if elbows["found"] else "held", elbows["verdict"])
    low = [r for r in rows if r["fvu"] <= LOW_FVU]
    costly = [r for r in low if r["n_latents"] >= HUGE_DICTIONARY * hidden or r["l0"] >= MANY_ACTIVE * hidden]
    add("Low error needs a huge dictionary or many active features",
        "not testable" if not low else "held" if len(costly) == len(low) else "did not hold",
        f"{len(low)} cells reach FVU <= {LOW_FVU}; {len(costly)} of them have n >= {HUGE_DICTIONARY * hidden} or "
        f"L0 >= {MANY_ACTIVE * hidden:g}" + ("; cheapest: " + ", ".join(
            f"{r['method']} n={r['n_latents']} L0={r['l0']:.1f} FVU={r['fvu']:.3f}"
            for r in sorted(low, key=lambda r: (r['n_latents'], r['l0']))[:3]) if low else ""))
    grows = dead.get("resample_dead_grows")
    rho = dead.get("resample_dead_vs_size_spearman")
    per = dead["per_size"].get("relu_resample", [])
    add("Under resampling the dead fraction grows with dictionary size",
        "not testable" if grows is None else "held" if grows else "did not hold",
        ", ".join(f"n={r['n_latents']}: {r['dead_frac']:.2f}" for r in per)
        + (f"; Spearman {rho:.2f} (rule: > 0.5 and largest > smallest)" if rho is not None else ""))
    return claims


def method_features(analysis, out_row: dict) -> dict:
    alive = analysis.alive
    purity = analysis.purity[alive]
    return {"n_latents": out_row["n_latents"], "template_score": analysis.template_score,
            "per_digit": analysis.per_digit, "alive": int(alive.sum()),
            "median_purity": float(purity.median()) if purity.numel() else 0.0}


def gallery(analysis, images: torch.Tensor, per_digit: int, count: int) -> list[dict]:
    """Up to per_digit features per majority digit (most frequent first) with their image strips."""
    from sparsekit.analysis.html_report import array_png
    from sparsekit.analysis.mnist_plots import image_strip

    entries = []
    for digit in range(10):
        chosen = [j for j in analysis.fire_rate.argsort(descending=True).tolist()
                  if analysis.alive[j] and int(analysis.majority[j]) == digit][:per_digit]
        for j in chosen:
            valid = analysis.top_indices[j][analysis.top_indices[j] >= 0][:count]
            weights = analysis.logit_weights[j]
            entries.append({"feature": j, "majority": digit, "purity": float(analysis.purity[j]),
                            "logit_class": int(analysis.logit_class[j]), "fire_rate": float(analysis.fire_rate[j]),
                            "top_logits": ", ".join(f"{int(c)}: {float(weights[c]):+.2f}"
                                                    for c in weights.argsort(descending=True)[:3]),
                            "strip": (strip := image_strip(analysis.mean_images[j], images[valid])),
                            "png": array_png(strip, vmin=0.0, vmax=1.0)})
    return entries


def run_study(config: StudyConfig) -> dict:
    """The whole study -> summary dict (also written to <out>/summary.json with <out>/report.html)."""
    from sparsekit.analysis.mnist_features import analyse_features
    from sparsekit.analysis.mnist_report import write_report
    from sparsekit.toys.mnist_mlp import train_mlp

    start = time.perf_counter()
    with one_thread():
        out = Path(config.out)
        out.mkdir(parents=True, exist_ok=True)
        model, acc = train_mlp(config.mlp, progress=config.progress, cache_dir=config.cache_dir)
        layer = config.layer if config.layer >= 0 else config.mlp.depth + config.layer
        if not 0 <= layer < config.mlp.depth:
            raise ValueError(f"layer={config.layer} is not a hidden layer of a depth-{config.mlp.depth} MLP")
        data = layer_data(model, acc, layer, config.mlp.key(), config.cache_dir)
        grid = config.grid
        if config.progress:
            print(f"mnist study: MLP {config.mlp.hidden}x{config.mlp.depth} test accuracy {acc:.4f}, layer {layer} "
                  f"(zero-ablated {data.acc_zero:.4f}); scan of {len(grid.cells())} cells into {out}/", flush=True)
        rows = run_scan(grid, data, out, progress=config.progress, verbose=config.verbose)
        curves = error_curves(rows, grid)
        elbows = elbow_analysis(curves)
        dead = dead_latent_study(rows, grid)
        largest = max(grid.sizes)
        headline_rows, features, analyses = {}, {}, {}
        for method in grid.methods:
            row = next(r for r in rows if r["method"] == method and r["n_latents"] == largest
                       and r["sparsity"] == grid.headline(method))
            sae = load_cell_dictionary(out, row)
            analyses[method] = analyse_features(model, layer, sae, data.test, data.test_images, data.test_labels,
                                                count=config.top_images + 1)
            headline_rows[method], features[method] = row, method_features(analyses[method], row)
        claims = evaluate_claims(config.mlp.hidden, rows, elbows, dead, features)
        shown = "topk_auxk" if "topk_auxk" in analyses else grid.methods[0]
        summary = {
            "mlp": {"hidden": config.mlp.hidden, "depth": config.mlp.depth, "layer": layer, "epochs": config.mlp.epochs,
                    "seed": config.mlp.seed, "accuracy": acc, "acc_zero_ablated": data.acc_zero},
            "methods": {m: {"n_latents": r["n_latents"], "sparsity_param": r["sparsity_param"], "sparsity": r["sparsity"],
                            "fvu": r["fvu"], "l0": r["l0"], "dead_frac": r["dead_frac"],
                            "acc_recovered": r["acc_recovered"], "template_score": features[m]["template_score"],
                            "features_per_digit": features[m]["per_digit"], "median_purity": features[m]["median_purity"]}
                        for m, r in headline_rows.items()},
            "template_score": features[shown]["template_score"],
            "template_score_method": shown,
            "elbow": elbows,
            "dead_latents": dead,
            "claims": claims,
            "grid": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(grid).items()},
            "cells": len(rows),
        }
        entries = gallery(analyses[shown], data.test_images, config.gallery_per_digit, config.top_images)
        summary["seconds"] = round(time.perf_counter() - start, 1)
        write_report(out / "report.html", summary, rows, curves, {m: f["per_digit"] for m, f in features.items()},
                     analyses[shown], entries, figures_dir=out / "figures")
        summary["seconds"] = round(time.perf_counter() - start, 1)
        atomic_write_bytes(out / "summary.json", json.dumps(summary, indent=1).encode())
        return summary


def print_summary(summary: dict, out) -> None:
    mlp = summary["mlp"]
    print(f"MLP {mlp['hidden']}x{mlp['depth']}: test accuracy {mlp['accuracy']:.4f}")
    for method, m in summary["methods"].items():
        score = "n/a" if m["template_score"] is None else f"{m['template_score']:.2f}"
        print(f"{method:14s} n={m['n_latents']:<5d} {m['sparsity_param']}={m['sparsity']:<5g} fvu {m['fvu']:.4f}  "
              f"l0 {m['l0']:6.2f}  dead {m['dead_frac']:.3f}  acc_recovered {m['acc_recovered']:.4f}  template {score}")
        for line in worse_than_trivial(m):
            print(f"WARNING {method}: {line}")
    print(f"elbow: {summary['elbow']['verdict']}")
    for claim in summary["claims"]:
        print(f"[{claim['verdict']}] {claim['claim']}: {claim['evidence']}")
    print(f"wrote {out}/report.html, summary.json, scan.csv in {summary['seconds']:.0f} s")
