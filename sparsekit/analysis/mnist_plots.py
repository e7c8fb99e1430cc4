"""Figures of the MNIST study, as PNG bytes: error curves, the dead-latent study, feature images.

Scan rows are the dicts of ``sparsekit.studies.mnist_scan`` (method, n_latents, sparsity, fvu, l0, ...).
matplotlib is imported inside each function (``import sparsekit`` stays fast). Each figure is a
``matplotlib.figure.Figure`` drawn straight to PNG: no pyplot, and the caller's backend is left as it is.
"""
from __future__ import annotations

import io

import numpy as np
import torch

from .html_report import array_png

COLORS = {"relu_resample": "#3b6ea5", "relu_ghost": "#9a4fb0", "topk_auxk": "#d0692a", "batchtopk": "#2a9d5c"}


def _axes(ncols: int = 1, width: float = 5.0):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width * ncols, 3.6))
    axes = fig.subplots(1, ncols, squeeze=False)
    return fig, axes[0]


def figure_png(fig, dpi: int = 100) -> bytes:
    """A matplotlib Figure -> PNG bytes (rendered by Agg for this call only; no pyplot)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _log_x(ax, ticks=None) -> None:
    """Log x axis without crowded minor labels; ticks (e.g. the dictionary sizes) labelled plainly."""
    from matplotlib.ticker import NullFormatter
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    if ticks:
        ax.set_xticks(sorted(set(ticks)), [f"{t:g}" for t in sorted(set(ticks))])


def _curve(ax, points: list[tuple[float, float]], method: str, label: str | None = None) -> None:
    points = sorted(points)
    ax.plot([p[0] for p in points], [p[1] for p in points], "o-", color=COLORS.get(method), label=label or method)


def error_curves_png(curves: dict, x_label: str, title: str, integer_x: bool = False) -> bytes:
    """curves: method -> [(x, fvu), ...] -> log-log plot of FVU against x (integer_x: label each x)."""
    fig, (ax,) = _axes()
    for method, points in curves.items():
        if points:
            _curve(ax, points, method)
    _log_x(ax, sorted({p[0] for points in curves.values() for p in points}) if integer_x else None)
    ax.set_yscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel("FVU (test)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    _legend(ax)
    fig.tight_layout()
    return figure_png(fig)


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def dead_study_png(study: dict) -> bytes:
    """study: method -> [{"n_latents", "dead_frac", "alive", "fvu"}, ...] -> dead fraction vs size and
    FVU vs alive latents, side by side."""
    fig, (left, right) = _axes(2)
    for method, rows in study.items():
        _curve(left, [(r["n_latents"], r["dead_frac"]) for r in rows], method)
        _curve(right, [(max(r["alive"], 1), r["fvu"]) for r in rows], method)
    _log_x(left, [r["n_latents"] for rows in study.values() for r in rows])
    left.set_xlabel("dictionary size")
    left.set_ylabel("dead fraction (no firing on test images)")
    _log_x(right)
    right.set_yscale("log")
    right.set_xlabel("alive latents")
    right.set_ylabel("FVU (test)")
    for ax in (left, right):
        ax.grid(True, which="both", alpha=0.3)
        _legend(ax)
    fig.tight_layout()
    return figure_png(fig)


def per_digit_png(per_digit: dict) -> bytes:
    """per_digit: method -> [10] alive features per majority digit -> grouped bar chart."""
    fig, (ax,) = _axes(width=7.0)
    width = 0.8 / max(len(per_digit), 1)
    for i, (method, counts) in enumerate(per_digit.items()):
        ax.bar(np.arange(10) + i * width, counts, width, color=COLORS.get(method), label=method)
    ax.set_xticks(np.arange(10) + 0.4 - width / 2, [str(d) for d in range(10)])
    ax.set_xlabel("digit (majority label of the feature's top images)")
    ax.set_ylabel("alive features")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return figure_png(fig)


def logit_heatmap_png(weights: torch.Tensor, feature_ids: list[int], majority: list[int]) -> bytes:
    """Logit weights [m, 10] of the listed features, each row scaled to max |w| = 1."""
    fig, (ax,) = _axes(width=5.0)
    rows = weights / weights.abs().amax(1, keepdim=True).clamp_min(1e-12)
    fig.set_size_inches(5.0, 0.8 + 0.22 * len(feature_ids))
    ax.imshow(rows.numpy(), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
    ax.set_xticks(range(10), [str(d) for d in range(10)])
    ax.set_yticks(range(len(feature_ids)), [f"#{j} ({m})" for j, m in zip(feature_ids, majority)], fontsize=7)
    ax.set_xlabel("logit class")
    ax.set_title("logit weights (row max = 1); label: majority digit", fontsize=9)
    fig.tight_layout()
    return figure_png(fig)


def image_strip(mean_image: torch.Tensor, top_images: torch.Tensor, gap: int = 2) -> np.ndarray:
    """mean image [784] then top images [m, 784] side by side, 28-pixel tiles with a gap -> [28, W].
    The mean image is scaled to its own max so faint templates stay visible."""
    tiles = [mean_image.reshape(28, 28) / mean_image.max().clamp_min(1e-12)]
    tiles += [img.reshape(28, 28) for img in top_images]
    width = 28 * len(tiles) + gap * (len(tiles) - 1)
    strip = np.full((28, width), 0.5, dtype=np.float32)
    for i, tile in enumerate(tiles):
        strip[:, i * (28 + gap):i * (28 + gap) + 28] = tile.numpy()
    return strip


def image_strip_png(mean_image: torch.Tensor, top_images: torch.Tensor) -> bytes:
    return array_png(image_strip(mean_image, top_images), vmin=0.0, vmax=1.0)


def gallery_png(strips: list[np.ndarray], gap: int = 4) -> bytes:
    """Image strips [28, W_i] stacked top to bottom (padded to the widest) -> one PNG."""
    if not strips:
        raise ValueError("strips must hold at least one image strip")
    width = max(s.shape[1] for s in strips)
    canvas = np.full((len(strips) * (28 + gap) - gap, width), 1.0, dtype=np.float32)
    for i, strip in enumerate(strips):
        canvas[i * (28 + gap):i * (28 + gap) + 28, :strip.shape[1]] = strip
    return array_png(canvas, vmin=0.0, vmax=1.0)
