"""report.html of the MNIST study: claims, headline numbers, elbows, dead latents, feature gallery.

Self-contained (every figure an inline base64 PNG) and built only from ``html_report``'s escaping
builders. Inputs are what ``sparsekit.studies.mnist_study.run_study`` computes.
"""
from __future__ import annotations

from pathlib import Path

from sparsekit._util.atomic import atomic_write_bytes
from sparsekit.training.metrics import worse_than_trivial

from . import html_report as h
from .mnist_plots import dead_study_png, error_curves_png, gallery_png, logit_heatmap_png, per_digit_png

VERDICT_CLASS = {"held": "held", "did not hold": "not-held", "partly": "undecided", "not testable": "undecided"}
SCAN_COLUMNS = ("method", "n_latents", "sparsity_param", "sparsity", "fvu", "l0", "dead_frac", "alive",
                "acc_recovered", "template_score", "digits_covered", "train_seconds")


def _claims(summary: dict) -> list[str]:
    rows = [[c["claim"], c["verdict"], c["evidence"]] for c in summary["claims"]]
    return [h.heading("What the research note claimed, and what this run found"),
            h.paragraph("Each claim is judged by a fixed rule written in sparsekit/studies/mnist_study.py (evaluate_claims); "
                        "nothing was tuned to make a claim hold."),
            h.table(["claim", "verdict", "evidence"], rows, VERDICT_CLASS)]


def _headline(summary: dict) -> list[str]:
    mlp = summary["mlp"]
    facts = (f"MLP: {mlp['hidden']} hidden units x {mlp['depth']} layer(s), {mlp['epochs']} epochs, seed {mlp['seed']}; "
             f"test accuracy {mlp['accuracy']:.4f} (layer {mlp['layer']} zero-ablated: {mlp['acc_zero_ablated']:.4f}). "
             f"Scan: {summary['cells']} dictionaries, {summary['grid']['steps']} steps of {summary['grid']['batch_size']} "
             f"activations each; study time {summary['seconds']:.0f} s.")
    rows = [[m, v["n_latents"], f"{v['sparsity_param']}={v['sparsity']:g}", v["fvu"], v["l0"], v["dead_frac"],
             v["acc_recovered"], v["template_score"], v["median_purity"], trivial_flag(v)]
            for m, v in summary["methods"].items()]
    return [h.paragraph(facts), h.heading("Headline dictionaries (largest size, middle sparsity)"),
            h.table(["method", "n", "sparsity", "fvu", "l0", "dead_frac", "acc_recovered", "template_score",
                     "median purity", "flag"], rows, {h.text(row[-1]): "not-held" for row in rows if row[-1]})]


def _elbows(summary: dict, curves: dict, figures: dict) -> list[str]:
    rows = []
    for method, per in summary["elbow"]["curves"].items():
        for name, result in per.items():
            change = result.get("max_slope_change")
            rows.append([method, name.replace("_", " "), result["points"],
                         "n/a" if change is None else change,
                         "yes" if result["elbow"] else "no", "" if result["at"] is None else result["at"]])
    vs_l0 = {m: c["vs_l0"] for m, c in curves.items()}
    vs_size = {m: c["vs_size"] for m, c in curves.items()}
    largest = max(summary["grid"]["sizes"])
    return [h.heading("Elbows"),
            h.paragraph("Test (sparsekit/analysis/elbow.py): on log-log axes, an interior point is an elbow when the "
                        "slope rises by at least 0.5 there and the descent at least halves. Verdict: "
                        + summary["elbow"]["verdict"] + "."),
            h.image(figures.setdefault("fvu_vs_l0", error_curves_png(
                vs_l0, "L0 (mean active latents per test image)", f"FVU vs L0 at n = {largest}")),
                "FVU against L0 (sparsity sweep)"),
            h.image(figures.setdefault("fvu_vs_size", error_curves_png(
                vs_size, "dictionary size", "FVU vs dictionary size at the middle sparsity", integer_x=True)),
                "FVU against dictionary size (size sweep)"),
            h.table(["method", "curve", "points", "max slope change", "elbow", "at"], rows)]


def _dead(summary: dict, figures: dict) -> list[str]:
    dead = summary["dead_latents"]
    if not dead["per_size"]:
        return []
    rows = [[m, r["n_latents"], r["dead_frac"], r["alive"], r["fvu"], r["l0"]]
            for m, per in dead["per_size"].items() for r in per]
    parts = [h.heading("Dead latents: resampling vs ghost grads"),
             h.paragraph("ReLU+L1 at the middle L1 coefficient; dead = fires on none of the 10,000 test images."),
             h.image(figures.setdefault("dead_latents", dead_study_png(dead["per_size"])),
                     "dead fraction against size; FVU against alive latents"),
             h.table(["method", "n", "dead_frac", "alive", "fvu", "l0"], rows)]
    if dead.get("equal_alive"):
        parts += [h.paragraph("FVU at equal alive count (resampling's FVU interpolated in log-log at ghost grads' "
                              "alive counts):"),
                  h.table(["alive", "ghost n", "fvu ghost grads", "fvu resampling"],
                          [[r["alive"], r["n_latents"], r["fvu_ghost"], r["fvu_resample"]] for r in dead["equal_alive"]])]
    return parts


def _features(summary: dict, per_digit: dict, analysis, entries: list[dict], figures: dict) -> list[str]:
    method = summary["template_score_method"]
    parts = [h.heading("Features"),
             h.paragraph("Majority digit: the most common label among a feature's top test images; purity: the share "
                         "of them with that label; logit weights: decoder direction times the readout (the last "
                         "hidden layer) or the mean change in logits when the direction is added at the layer; "
                         "template score: the share of alive features whose top logit class is their majority digit."),
             h.image(figures.setdefault("features_per_digit", per_digit_png(per_digit)),
                     "alive features per majority digit, each method's headline dictionary")]
    if entries:
        ids = [e["feature"] for e in entries]
        parts.append(h.image(logit_heatmap_png(analysis.logit_weights[ids], ids, [e["majority"] for e in entries]),
                             f"logit weights of the gallery features ({method})"))
        rows = "".join(
            f"<tr><td>{h.text(e['feature'])}</td><td>{h.text(e['majority'])}</td><td>{h.text(e['purity'])}</td>"
            f"<td>{h.text(e['logit_class'])}</td><td>{h.text(e['top_logits'])}</td><td>{h.text(e['fire_rate'])}</td>"
            f"<td><img src=\"{h.png_data_uri(e['png'])}\" alt=\"feature {h.text(e['feature'])}\" width=\"420\"></td></tr>"
            for e in entries)
        head = "".join(f"<th>{h.text(c)}</th>" for c in ("feature", "majority digit", "purity", "top logit class",
                                                         "top logits", "fire rate", "mean image | top test images"))
        parts += [h.heading(f"Gallery: {method}, up to 3 features per digit", 3),
                  f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"]
    return parts


def trivial_flag(row: dict) -> str:
    """'' for a cell better than trivial, else its reasons, e.g. 'FVU 1.020 >= 1' (worse_than_trivial)."""
    return "; ".join(line.split(":")[0] for line in worse_than_trivial(row))


def _scan_table(rows: list[dict]) -> list[str]:
    flags = [trivial_flag(r) for r in rows]
    flagged = sum(1 for f in flags if f)
    note = (f"{flagged} of {len(rows)} cells are worse than trivial (FVU >= 1: no better than predicting the mean "
            f"activation), flagged in the last column." if flagged else
            f"Every one of the {len(rows)} cells beats the trivial reconstruction (FVU < 1).")
    table = h.table(list(SCAN_COLUMNS) + ["flag"], [[r.get(c) for c in SCAN_COLUMNS] + [f] for r, f in zip(rows, flags)],
                    {h.text(f): "not-held" for f in flags if f})
    return [h.heading("Every cell of the scan"), h.paragraph(note), table]


def write_report(path, summary: dict, rows: list[dict], curves: dict, per_digit: dict, analysis,
                 entries: list[dict], figures_dir=None) -> Path:
    """Write the study's report.html to path; with figures_dir, also its main figures as PNG files
    (fvu_vs_l0.png, fvu_vs_size.png, dead_latents.png, features_per_digit.png, gallery.png)."""
    figures: dict[str, bytes] = {}
    sections = (_claims(summary) + _headline(summary) + _elbows(summary, curves, figures) + _dead(summary, figures)
                + _features(summary, per_digit, analysis, entries, figures) + _scan_table(rows))
    document = h.page("sparsekit: dictionary learning on an MNIST MLP", sections)
    atomic_write_bytes(path, document.encode("utf-8"))
    if figures_dir is not None:
        Path(figures_dir).mkdir(parents=True, exist_ok=True)
        if entries:
            figures["gallery"] = gallery_png([e["strip"] for e in entries])
        for name, png in figures.items():
            atomic_write_bytes(Path(figures_dir) / f"{name}.png", png)
    return Path(path)
