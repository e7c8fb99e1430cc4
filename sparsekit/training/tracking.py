"""Optional experiment tracking for the trainer: Weights & Biases, beside the JSON-lines log.

``TrainConfig(wandb_project="my-saes", wandb_run_name="l6-topk")`` makes ``sparsekit.train`` log
every metric line it writes to metrics.jsonl (same keys, x-axis ``step``; ``tokens`` is logged
too), the final held-out metrics into the run summary (prefixed ``final/``), and the final plots
(the feature-density histogram) as images. The run's config holds the TrainConfig and the
dictionary's config. wandb is an extra (``pip install 'sparsekit[wandb]'``) imported only when a
project is set; its own environment settings apply (``WANDB_MODE=offline`` logs to files under
``WANDB_DIR`` with no network, ``wandb sync`` uploads them later).

With an output folder, the run id is kept in ``wandb_run_id`` there, so ``train(..., resume=True)``
continues the same W&B run instead of starting a new one.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from .parallel import ranks

RUN_ID_FILE = "wandb_run_id"


class NullTracker:
    """What train() uses when no tracker is configured: every call does nothing."""

    def log(self, record: dict) -> None:
        pass

    def finish(self, metrics: dict, plots: list | tuple = ()) -> None:
        pass


class WandbTracker:
    """One W&B run: ``log`` a metric line, ``finish`` with final metrics and plot files."""

    def __init__(self, project: str, run_name: str | None, config: dict, output_dir: Path | None = None,
                 resume: bool = False):
        from sparsekit._util.extras import require
        wandb = require("wandb", "wandb", what="TrainConfig.wandb_project")
        self._wandb = wandb
        run_id = None
        id_file = Path(output_dir) / RUN_ID_FILE if output_dir is not None else None
        if resume and id_file is not None and id_file.is_file():
            run_id = id_file.read_text().strip() or None
        self.run = wandb.init(project=project, name=run_name, config=config, id=run_id,
                              resume="allow" if run_id else None, reinit="finish_previous")
        if id_file is not None:
            id_file.parent.mkdir(parents=True, exist_ok=True)
            id_file.write_text(self.run.id + "\n")

    def log(self, record: dict) -> None:
        """One metric line (a dict with "step"): logged at that step."""
        self.run.log({key: value for key, value in record.items() if key != "step"}, step=int(record["step"]))

    def finish(self, metrics: dict, plots: list | tuple = ()) -> None:
        """Final held-out metrics into the summary as final/<key>; each existing plot file as an image."""
        self.run.summary.update({f"final/{key}": value for key, value in metrics.items()})
        images = {Path(p).stem: self._wandb.Image(str(p)) for p in plots if Path(p).is_file()}
        if images:
            self.run.log(images, step=int(metrics.get("step", 0)))
        self.run.finish()


def start_tracking(cfg, sae, output_dir: Path | None, resume: bool = False):
    """The tracker train() reports to: a WandbTracker when cfg.wandb_project is set (on rank 0 of a
    distributed run), else a NullTracker."""
    if not cfg.wandb_project or not ranks.speaks():  # rank 0 alone reports
        return NullTracker()
    if not isinstance(cfg.wandb_project, str):
        raise ValueError(f"TrainConfig.wandb_project must be a string or None, got {cfg.wandb_project!r}")
    config = {"train": dataclasses.asdict(cfg), "dictionary": sae.config()}
    return WandbTracker(cfg.wandb_project, cfg.wandb_run_name, config, output_dir, resume)
