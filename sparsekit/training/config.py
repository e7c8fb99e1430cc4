"""What a training run is asked to do (``TrainConfig``) and what it hands back (``TrainResult``).

Each TrainConfig field carries its help text as dataclass metadata; ``field_help(name)`` reads it
(for the command line's --help and the docs). Nothing here runs a step: this module imports no
other part of the trainer.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import field
from pathlib import Path
from typing import NamedTuple

from sparsekit._util.validate import is_int
from sparsekit.ops import checks
from sparsekit.sae.base import SparseDictionary

from .dead_latents import STRATEGIES


@dataclasses.dataclass
class TrainConfig:
    """Training settings; every count is in tokens (rows of activations), never steps.

    Defaults follow the recipes in docs/design.md: Adam (betas 0.9/0.999), LR decayed linearly to zero
    over the last 20% of training (Anthropic, April 2024), AuxK with k_aux = d_in / 2 and
    coefficient 1/32 (Gao et al. 2024), resampling at 2.5/5/7.5/10% of the run (Towards
    Monosemanticity's 25k-100k of ~1M steps), dead after 10M tokens without firing.
    """
    batch_size: int = field(default=4096, metadata={
        "help": "tokens per optimizer step; under torchrun the global batch, split evenly over the ranks"})
    lr: float = field(default=3e-4, metadata={"help": "Adam's learning rate after warm-up, before the decay"})
    total_tokens: int = field(default=10_000_000, metadata={
        "help": "tokens to train on: total_tokens // batch_size steps"})
    lr_warmup_tokens: int = field(default=0, metadata={
        "help": "tokens over which the learning rate rises linearly from zero (0: no warm-up)"})
    lr_decay_fraction: float = field(default=0.2, metadata={
        "help": "the last fraction of the run, over which the learning rate decays linearly to zero"})
    l1_warmup_tokens: int = field(default=0, metadata={
        "help": "tokens over which the sparsity penalty (L1, L0) rises linearly to its full weight (0: none)"})
    adam_betas: tuple = field(default=(0.9, 0.999), metadata={"help": "Adam's beta1 and beta2"})
    adam_eps: float = field(default=1e-8, metadata={"help": "Adam's epsilon"})
    grad_clip_norm: float | None = field(default=1.0, metadata={
        "help": "clip the gradient's norm (over every parameter) to this; None: no clipping"})
    normalize_inputs: bool = field(default=True, metadata={
        "help": "scale inputs (and a transcoder's targets) so that E||x||^2 = their width, measured on the "
                "held-out split (or the first batch)"})
    b_dec_init: str | None = field(default=None, metadata={
        "help": "geometric_median, mean, zeros or keep; None: geometric median (SAE), target mean (transcoder)"})
    eval_tokens: int = field(default=8192, metadata={"help": "held out from the start of the stream"})
    dead_window_tokens: int = field(default=10_000_000, metadata={
        "help": "a latent that fired on none of the last this many tokens is dead"})
    dead_strategy: str = field(default="none", metadata={
        "help": "none, resample, ghost, auxk, or a combination such as resample+ghost"})
    aux_k: int | None = field(default=None, metadata={"help": "AuxK's k_aux; None: d_in // 2"})
    aux_coeff: float = field(default=1 / 32, metadata={"help": "AuxK's loss coefficient"})
    resample_at_tokens: tuple | None = field(default=None, metadata={
        "help": "token counts at which dead latents are resampled; None: every dead_window_tokens (1, 2, 3 "
                "and 4 windows) up to half of total_tokens, since no latent can count as dead before one window"})
    seed: int = field(default=0, metadata={
        "help": "seed of resampling's draws (the command line also seeds the dictionary and the data order "
                "with it)"})
    log_every: int = field(default=100, metadata={"help": "steps between metric lines"})
    output_dir: str | None = field(default=None, metadata={
        "help": "metrics.jsonl and plots; default: checkpoint_dir"})
    checkpoint_dir: str | None = field(default=None, metadata={
        "help": "folder for checkpoints, from which resume=True continues; None: no checkpoints"})
    checkpoint_every_tokens: int | None = field(default=None, metadata={
        "help": "write a checkpoint every this many tokens (and at the end); needs checkpoint_dir"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    wandb_project: str | None = field(default=None, metadata={
        "help": "also log to Weights & Biases (sparsekit.training.tracking; the wandb extra)"})
    wandb_run_name: str | None = field(default=None, metadata={"help": "the Weights & Biases run's name"})

    def strategies(self) -> tuple[str, ...]:
        names = tuple(s.strip() for s in str(self.dead_strategy).split("+"))
        for name in names:
            if name not in STRATEGIES:
                raise ValueError(f"dead_strategy {self.dead_strategy!r}: {name!r} is not one of {', '.join(STRATEGIES)}")
        if "none" in names and len(names) > 1:
            raise ValueError(f"dead_strategy {self.dead_strategy!r}: 'none' cannot be combined")
        return names

    def validate(self) -> None:
        checks.train_config_types(self)
        def positive_int(name, allow_zero=False, allow_none=False):
            value = getattr(self, name)
            if value is None and allow_none:
                return
            if not is_int(value) or value < (0 if allow_zero else 1):
                raise ValueError(f"TrainConfig.{name} must be a {'non-negative' if allow_zero else 'positive'} int, "
                                 f"got {value!r}")

        for name in ("batch_size", "total_tokens", "dead_window_tokens", "log_every"):
            positive_int(name)
        for name in ("lr_warmup_tokens", "l1_warmup_tokens", "eval_tokens"):
            positive_int(name, allow_zero=True)
        positive_int("checkpoint_every_tokens", allow_none=True)
        positive_int("aux_k", allow_none=True)
        if not isinstance(self.lr, (int, float)) or not math.isfinite(self.lr) or self.lr <= 0:
            raise ValueError(f"TrainConfig.lr must be a positive finite number, got {self.lr!r}")
        if not 0 <= self.lr_decay_fraction <= 1:
            raise ValueError(f"TrainConfig.lr_decay_fraction must be in [0, 1], got {self.lr_decay_fraction!r}")
        if self.grad_clip_norm is not None and not self.grad_clip_norm > 0:
            raise ValueError(f"TrainConfig.grad_clip_norm must be positive or None, got {self.grad_clip_norm!r}")
        if self.b_dec_init not in (None, "geometric_median", "mean", "zeros", "keep"):
            raise ValueError(f"TrainConfig.b_dec_init must be geometric_median, mean, zeros or keep, "
                             f"got {self.b_dec_init!r}")
        if self.total_tokens < self.batch_size:
            raise ValueError(f"TrainConfig.total_tokens={self.total_tokens} is less than one batch "
                             f"(batch_size={self.batch_size})")
        if self.checkpoint_every_tokens is not None and self.checkpoint_dir is None:
            raise ValueError("TrainConfig.checkpoint_every_tokens needs a checkpoint_dir")
        self.strategies()

    def resample_schedule(self) -> list[int]:
        """Token counts at which dead latents are resampled: resample_at_tokens, or by default 1, 2, 3 and 4
        dead windows, those up to half of total_tokens (a latent counts as dead only after a whole window
        without firing, so an earlier point could never resample anything; empty when one window is more
        than half the run)."""
        if self.resample_at_tokens is not None:
            return sorted(int(t) for t in self.resample_at_tokens)
        window = self.dead_window_tokens
        return [window * i for i in (1, 2, 3, 4) if window * i <= self.total_tokens // 2]

    def resample_warning(self) -> str | None:
        """Why resampling, if asked for, cannot resample everything it might (None when it can): points
        before the first whole dead window, or no point at all inside the run."""
        if "resample" not in self.strategies():
            return None
        schedule = self.resample_schedule()
        inside = [t for t in schedule if t <= self.total_tokens]
        if not inside:
            return (f"dead_strategy includes resample, but no resampling point falls inside the run "
                    f"(total_tokens={self.total_tokens:,}; dead_window_tokens={self.dead_window_tokens:,}, and "
                    f"by default resampling starts after one window and stops at half the run): nothing will "
                    f"be resampled; lower dead_window_tokens or set resample_at_tokens")
        early = [t for t in inside if t < self.dead_window_tokens]
        if early:
            return (f"resample_at_tokens {early} come before one dead window (dead_window_tokens="
                    f"{self.dead_window_tokens:,}): no latent can count as dead there, so those points "
                    f"resample nothing")
        return None


def field_help(name: str) -> str:
    """The help text of TrainConfig field `name` (ValueError naming the fields if there is none)."""
    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(TrainConfig)}
    if name not in helps:
        raise ValueError(f"TrainConfig has no field {name!r}; its fields: {', '.join(helps)}")
    return helps[name]


def fields_table() -> str:
    """Every TrainConfig field as a Markdown table (field, default, help): docs/training.md prints it,
    tests/package/test_docs.py keeps the two equal."""
    rows = ["| field | default | what it sets |", "| --- | --- | --- |"]
    for setting in dataclasses.fields(TrainConfig):
        help_text = setting.metadata["help"].replace("|", "\\|")
        rows.append(f"| `{setting.name}` | `{setting.default!r}` | {help_text} |")
    return "\n".join(rows)


class TrainResult(NamedTuple):
    """The trained dictionary, final held-out metrics, the logged metric lines, the output folder."""
    sae: SparseDictionary
    metrics: dict
    history: list
    output_dir: Path | None
