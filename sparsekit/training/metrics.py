"""What a training run measures: held-out metrics (``evaluate``), the running sums between two
metric lines (``MetricWindow``), the JSON-lines log (``METRICS_FILE``) and the feature-density plot.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from torch import Tensor

from sparsekit._util.atomic import open_nofollow
from sparsekit.sae.base import SparseDictionary

METRICS_FILE = "metrics.jsonl"
DENSITY_PLOT = "feature_density.png"
DENSE_THRESHOLD = 0.1  # a latent firing on more than 10% of tokens counts as dense


@torch.no_grad()
def evaluate(sae: SparseDictionary, x: Tensor, y: Tensor | None = None, batch_size: int = 4096) -> dict:
    """Held-out metrics on normalised inputs: mse, fvu (and explained_variance = 1 - fvu, the
    ecosystem's name), l0 and per-latent fire counts [n]."""
    was_training = sae.training
    sae.eval()
    sq_err = variance = l0 = 0.0
    counts = torch.zeros(sae.n_latents, dtype=torch.int64)
    target_all = y if sae.transcoder else x
    mean = target_all.mean(0)
    for start in range(0, x.shape[0], batch_size):
        xb = x[start:start + batch_size]
        tb = target_all[start:start + batch_size]
        codes = sae.encode(xb)
        x_hat = sae.output(codes, xb)
        sq_err += float((x_hat - tb).pow(2).sum())
        variance += float((tb - mean).pow(2).sum())
        fire = sae.fire_counts(codes).cpu()
        counts += fire
        l0 += float(fire.sum())
    sae.train(was_training)
    rows = x.shape[0]
    fvu = sq_err / max(variance, 1e-30)
    return {"mse": sq_err / rows, "fvu": fvu, "explained_variance": 1.0 - fvu, "l0": l0 / rows, "fire_counts": counts}


class MetricWindow:
    """Running sums of the metrics between two log lines. A checkpoint holds its attributes
    (``vars(window)``, as state.json's "log_window"): their names are part of the file format."""

    def __init__(self):
        self.steps = 0
        self.sums: dict[str, float] = {}
        self.sq_err = self.variance = self.active = 0.0
        self.rows = 0
        self.resampled = 0

    @torch.no_grad()
    def add(self, losses, target, x_hat, counts, rows) -> None:
        """One batch: loss terms (0-d), target and x_hat [B, d_out], fire counts [n], rows = B."""
        self.steps += 1
        for name, value in losses.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value)
        self.sq_err += float((x_hat - target).pow(2).sum())
        self.variance += float((target - target.mean(0)).pow(2).sum())
        self.active += float(counts.sum())
        self.rows += rows

    def summary(self, step, tokens, tracker, window_counts, lr) -> dict:
        """The metric line: tracker over every latent, window_counts [n] fires since the last line."""
        fvu = self.sq_err / max(self.variance, 1e-30)
        record = {"step": step, "tokens": tokens, "mse": self.sq_err / self.rows, "fvu": fvu,
                  "explained_variance": 1.0 - fvu, "l0": self.active / self.rows,
                  "dead_frac": float(tracker.dead_mask().float().mean()),
                  "dense_frac": float((window_counts.double() / self.rows > DENSE_THRESHOLD).float().mean()),
                  "lr": lr}
        for name, total in self.sums.items():
            if name != "mse":
                record[name] = total / self.steps
        record.setdefault("aux_loss", 0.0)
        if self.resampled:
            record["resampled"] = self.resampled
        return record


def start_metrics_file(output_dir: Path) -> None:
    """An empty METRICS_FILE in output_dir (created if needed): a fresh run's log."""
    output_dir.mkdir(parents=True, exist_ok=True)
    os.close(open_nofollow(output_dir / METRICS_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC))


def append_metrics(output_dir: Path, record: dict) -> None:
    """One metric line at the end of output_dir's METRICS_FILE."""
    fd = open_nofollow(output_dir / METRICS_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND)  # never through a link
    with os.fdopen(fd, "w") as handle:
        handle.write(json.dumps(record) + "\n")


def restore_history(output_dir: Path | None, step: int) -> list[dict]:
    """Metric lines up to the checkpoint's step; later ones (written before the crash) are dropped."""
    if output_dir is None or not (output_dir / METRICS_FILE).is_file():
        return []
    kept = []
    with open(output_dir / METRICS_FILE, encoding="utf-8", errors="replace") as lines:
        for line in lines:
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                continue  # a line cut short by the crash, or not ours
            step_of_record = record.get("step", 0) if isinstance(record, dict) else None
            if isinstance(step_of_record, (int, float)) and not isinstance(step_of_record, bool) \
                    and step_of_record <= step:
                kept.append(record)
    fd = open_nofollow(output_dir / METRICS_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    with os.fdopen(fd, "w") as handle:
        handle.write("".join(json.dumps(r) + "\n" for r in kept))
    return kept


def density_plot(density: Tensor, path: Path, sae: SparseDictionary, dead_in_training: int | None = None) -> None:
    """Histogram of log10 feature density [n] on the held-out split; the title counts the latents that
    never fired there and, given dead_in_training, those dead by the training window (two different
    counts over different tokens, each labelled)."""
    try:
        from matplotlib.figure import Figure  # no pyplot: the caller's backend (a notebook's) is left as it is
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        warnings.warn("matplotlib is missing: no feature density plot")
        return
    alive = density[density > 0]
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    if alive.numel():
        ax.hist(torch.log10(alive).numpy(), bins=50, color="#3b6ea5")
    ax.set_xlabel("log10 feature density (fraction of held-out tokens)")
    ax.set_ylabel("latents")
    dead = int((density == 0).sum())
    title = f"{sae.architecture}: {sae.n_latents} latents, {dead} never fired on the held-out split"
    if dead_in_training is not None:
        title += f"\n{dead_in_training} dead by the training window (no fire in its last dead_window_tokens)"
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def worse_than_trivial(metrics: dict) -> list[str]:
    """One warning line per result worse than a trivial baseline, [] when none: FVU >= 1 (no better
    than predicting the mean), CE loss recovered < 0 (splicing the dictionary in hurts next-token loss
    more than zero-ablating the activation). metrics: any dict holding "fvu" and/or "ce_recovered"."""
    lines = []
    fvu = metrics.get("fvu")
    if isinstance(fvu, (int, float)) and not fvu < 1:  # NaN is flagged too
        lines.append(f"FVU {fvu:.3f} >= 1: the reconstruction is no better than predicting the mean")
    recovered = metrics.get("ce_recovered")
    if isinstance(recovered, (int, float)) and not recovered >= 0:
        lines.append(f"CE loss recovered {recovered:.3f} < 0: splicing the dictionary in hurts the model more "
                     f"than zero-ablating the activation")
    return lines
