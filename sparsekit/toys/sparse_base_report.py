"""The report of a sparse base model: rankings, aggregates, plots, report.md and summary.json.

Rankings, over *sparse* neurons (density = fraction of analysed positions where the neuron fires,
at most ``max_density``):
- polysemantic: neurons with >= 2 residual facets, by facet divergence (bits; see sparse_base_neurons);
- magnitude-coded: by ``magnitude_code`` (predictions per magnitude band).
Aggregates are medians over the sparse neurons. report.md is Markdown; every string taken from the
data (characters, snippets) is HTML-escaped, with '|' and '`' as entities, newlines shown as '⏎'.
"""
from __future__ import annotations

import html
import json
import statistics
from pathlib import Path

import torch

from .sparse_base_model import SparseBaseModel

SHOWN = {"\n": "⏎", " ": "␣", "\t": "⇥"}
FILES = ("overview.png", "facets.png", "magnitude.png", "report.md", "summary.json")


def shown(text: str) -> str:
    """Text from the data made safe and visible in Markdown: whitespace marks, HTML-escaped, no '|' or '`'."""
    text = "".join(SHOWN.get(c, c) for c in text) if len(text) == 1 else text.replace("\n", "⏎")
    return html.escape(text, quote=False).replace("|", "&#124;").replace("`", "&#96;")


def _tokens(pairs) -> str:
    return ", ".join(f"{shown(c)} {p:.2f}" for c, p in pairs)


def rankings(neurons: list[dict], max_density: float, top: int) -> dict:
    """{"polysemantic": [...], "magnitude": [...]} (at most top each) among neurons with density <= max_density."""
    sparse = [n for n in neurons if n["density"] <= max_density]
    poly = sorted((n for n in sparse if n["residual_facets"] > 1), key=lambda n: -n["facet_divergence_bits"])
    return {"polysemantic": poly[:top], "magnitude": sorted(sparse, key=lambda n: -n["magnitude_code"])[:top]}


def aggregates(neurons: list[dict], max_density: float) -> dict:
    """Counts and medians over the sparse neurons (None where no neuron qualifies)."""
    sparse = [n for n in neurons if n["density"] <= max_density]
    multi = [n for n in sparse if n["residual_facets"] > 1]

    def median(rows, key):
        values = [r[key] for r in rows if r[key] is not None]
        return statistics.median(values) if values else None

    return {"analysed": len(neurons), "sparse": len(sparse), "sparse_with_facets": len(multi),
            "median_density": median(sparse, "density"),
            "median_facet_divergence_bits": median(multi, "facet_divergence_bits"),
            "median_facet_agreement_ari": median(multi, "facet_agreement_ari"),
            "median_other_neurons_accuracy": median(multi, "other_neurons_accuracy"),
            "median_magnitude_accuracy": median(multi, "magnitude_accuracy"),
            "median_chance": median(multi, "chance"),
            "median_magnitude_code": median(sparse, "magnitude_code"),
            "median_magnitude_code_effect": median(sparse, "magnitude_code_effect"),
            "sparse_magnitude_code_above_0.2": sum(n["magnitude_code"] > 0.2 for n in sparse),
            "sparse_effect_top_token_changes": sum(n["top_token_disagreement_effect"] > 0 for n in sparse)}


def _heatmap(ax, means: torch.Tensor, row_labels: list[str], vocabulary: list, title: str) -> None:
    columns = []
    for row in means:
        columns += [int(i) for i in row.topk(3).indices if int(i) not in columns]
    columns = columns[:10]
    values = means[:, columns].numpy()
    ax.imshow(values, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(columns)), ["".join(SHOWN.get(c, c) for c in vocabulary[i]) for i in columns], fontsize=8)
    ax.set_yticks(range(len(row_labels)), row_labels, fontsize=7)
    for r in range(values.shape[0]):
        for c in range(values.shape[1]):
            if values[r, c] >= 0.05:
                ax.text(c, r, f"{values[r, c]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if values[r, c] > 0.6 else "black")
    ax.set_title(title, fontsize=8)


def _facet_label(facet: dict) -> str:
    chars = "".join(SHOWN.get(c, c) for c, _ in facet["top_chars"])
    return f"n={facet['count']} [{chars}]"


def plot_report(trained: SparseBaseModel, neurons: list[dict], ranked: dict, out: Path, max_density: float) -> None:
    """overview.png (training CE, facet divergence and magnitude code vs density), facets.png and
    magnitude.png (mean next-token predictions per facet / per magnitude band of the top 4 neurons)."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend is left as it is

    cfg, history = trained.config, trained.record["history"]
    fig = Figure(figsize=(11, 3.2))
    axes = fig.subplots(1, 3)
    axes[0].plot(history["step"], history["ce"], lw=1)
    axes[0].set(xlabel="step", ylabel="train CE (nats/char)", title=f"{cfg.variant}, l1={cfg.l1:g}")
    density = [n["density"] for n in neurons]
    for ax, key, label in ((axes[1], "facet_divergence_bits", "facet divergence (bits)"),
                           (axes[2], "magnitude_code", "magnitude code")):
        points = ax.scatter(density, [n[key] for n in neurons], c=[n["residual_facets"] for n in neurons], s=8,
                            cmap="viridis", vmin=1, vmax=4)
        ax.axvline(max_density, color="0.6", ls="--", lw=0.8)
        ax.set(xscale="log", xlabel="firing density", ylabel=label)
    fig.colorbar(points, ax=axes[2], label="residual facets")
    for ax in axes:
        ax.title.set_fontsize(9)
    fig.tight_layout()
    fig.savefig(out / "overview.png", dpi=80)

    for name, rows, means_key, labels in (
            ("facets.png", ranked["polysemantic"][:4], "facet_means", lambda n: [_facet_label(f) for f in n["facets"]]),
            ("magnitude.png", ranked["magnitude"][:4], "band_means",
             lambda n: [f"a∈[{b['low']:.2f}, {b['high']:.2f}]" for b in n["bands"]])):
        fig = Figure(figsize=(3.3 * max(1, len(rows)), 2.6))
        axes = fig.subplots(1, max(1, len(rows)), squeeze=False)
        for ax, n in zip(axes[0], rows):
            score = (f"{n['facet_divergence_bits']:.2f} bits" if means_key == "facet_means"
                     else f"code {n['magnitude_code']:.2f}")
            _heatmap(ax, n[means_key], labels(n), trained.vocabulary,
                     f"neuron {n['neuron']} (density {n['density']:.3f}, {score})")
        if not rows:
            axes[0][0].text(0.5, 0.5, "no neuron qualifies", ha="center")
            axes[0][0].axis("off")
        fig.suptitle(f"{cfg.variant}: mean next-token prediction per "
                     f"{'residual facet' if means_key == 'facet_means' else 'magnitude band'}", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / name, dpi=80)


def _markdown(trained: SparseBaseModel, ranked: dict, summary: dict) -> str:
    cfg, held = trained.config, trained.record["held_out"]
    agg = summary["aggregates"]
    fmt = lambda v, spec=".2f": "–" if v is None else format(v, spec)  # noqa: E731
    lines = [f"# Sparse base model: {cfg.variant}, l1 = {cfg.l1:g}", "",
             f"1 layer, d_model {cfg.d_model}, {cfg.n_heads} heads, d_mlp {cfg.d_mlp}, n_ctx {cfg.n_ctx}, "
             f"{len(trained.vocabulary)} character tokens, {cfg.steps * cfg.batch_size * cfg.n_ctx} training tokens "
             f"({cfg.steps} steps, {trained.record['train_seconds']:.0f} s). Held-out CE {held['ce']:.3f} nats/char, "
             f"L1 {held['l1']:.2f} and L0 {held['l0']:.1f} of `{'blocks.0.mlp.hook_post'}` per token.", "",
             f"Analysed {summary['positions']} held-out positions; {agg['analysed']} neurons fire at >= "
             f"{summary['min_fires']} of them, {agg['sparse']} of those are sparse (density <= {summary['max_density']:g}), "
             f"{agg['sparse_with_facets']} with >= 2 residual facets.", "",
             "| aggregate over sparse neurons | median |", "| --- | --- |",
             f"| facet divergence (bits) | {fmt(agg['median_facet_divergence_bits'])} |",
             f"| facet agreement, residual vs tokens (ARI) | {fmt(agg['median_facet_agreement_ari'])} |",
             f"| facet predicted from other neurons (balanced acc.) | {fmt(agg['median_other_neurons_accuracy'])} |",
             f"| facet predicted from own magnitude (balanced acc.) | {fmt(agg['median_magnitude_accuracy'])} |",
             f"| chance | {fmt(agg['median_chance'])} |",
             f"| magnitude code (predictions) | {fmt(agg['median_magnitude_code'], '.3f')} |",
             f"| magnitude code (own effect) | {fmt(agg['median_magnitude_code_effect'], '.3f')} |", "",
             f"{agg['sparse_magnitude_code_above_0.2']} sparse neurons have a magnitude code above 0.2; in "
             f"{agg['sparse_effect_top_token_changes']} the token the neuron promotes most changes between bands.", "",
             "## Most polysemantic sparse neurons", "",
             "Facets: k-means on the residual direction at the firing position (k by silhouette). Divergence: JSD of "
             "the facets' mean next-token predictions. Accuracies: ridge classifiers for the facet, held out.", "",
             "| neuron | density | facets (resid / tokens) | silhouette | ARI | divergence (bits) | other neurons acc. "
             "| own magnitude acc. | chance |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for n in ranked["polysemantic"]:
        lines.append(f"| {n['neuron']} | {n['density']:.4f} | {n['residual_facets']} / {n['token_facets']} | "
                     f"{fmt(n['residual_silhouette'])} | {n['facet_agreement_ari']:.2f} | {n['facet_divergence_bits']:.2f} | "
                     f"{fmt(n['other_neurons_accuracy'])} | {fmt(n['magnitude_accuracy'])} | {n['chance']:.2f} |")
    for n in ranked["polysemantic"]:
        lines += ["", f"**Neuron {n['neuron']}** (fires at {n['fires']} positions):", ""]
        for i, f in enumerate(n["facets"]):
            examples = " · ".join(f"«{shown(e)}»" for e in f["examples"])
            chars = ", ".join(f"{shown(c)} {p:.0%}" for c, p in f["top_chars"])
            lines.append(f"- facet {i}: n={f['count']}, mean activation {f['mean_activation']:.2f}; at {chars}; "
                         f"e.g. {examples}; predicts {_tokens(f['predicts'])}")
    lines += ["", "## Magnitude-coded sparse neurons", "",
              "Bands: equal-count thirds of the neuron's activations where it fires. Code: JSD between the bands' mean "
              "predictions minus its value under shuffled bands, over log2(3). Own effect: the same on the "
              "probability the neuron adds (predictions minus predictions with it zeroed).", "",
              "| neuron | density | magnitude code | own effect | top token differs (pred. / effect) |",
              "| --- | --- | --- | --- | --- |"]
    for n in ranked["magnitude"]:
        lines.append(f"| {n['neuron']} | {n['density']:.4f} | {n['magnitude_code']:.3f} | {n['magnitude_code_effect']:.3f} "
                     f"| {n['top_token_disagreement']:.2f} / {n['top_token_disagreement_effect']:.2f} |")
    for n in ranked["magnitude"]:
        lines += ["", f"**Neuron {n['neuron']}**:", ""]
        for b in n["bands"]:
            lines.append(f"- a in [{b['low']:.2f}, {b['high']:.2f}] (n={b['count']}): predicts {_tokens(b['predicts'])}; "
                         f"promotes {_tokens(b['promotes'])}")
    lines += ["", "Plots: overview.png, facets.png, magnitude.png.", ""]
    return "\n".join(lines)


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if not isinstance(v, torch.Tensor)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def write_report(trained: SparseBaseModel, neurons: list[dict], out, positions: int, min_fires: int,
                 max_density: float = 0.05, top: int = 8) -> dict:
    """Write FILES into out; returns the summary (what summary.json holds)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ranked = rankings(neurons, max_density, top)
    summary = {"config": trained.record["config"], "held_out": trained.record["held_out"],
               "train_seconds": trained.record["train_seconds"], "positions": positions, "min_fires": min_fires,
               "max_density": max_density, "aggregates": aggregates(neurons, max_density),
               "polysemantic": [n["neuron"] for n in ranked["polysemantic"]],
               "magnitude_coded": [n["neuron"] for n in ranked["magnitude"]], "neurons": _plain(neurons)}
    plot_report(trained, neurons, ranked, out, max_density)
    (out / "report.md").write_text(_markdown(trained, ranked, summary))
    (out / "summary.json").write_text(json.dumps(summary, ensure_ascii=False))
    return summary
