"""A training run's state between two steps (``RunState``): exactly what a checkpoint holds.

A checkpoint (``checkpoint.write``: the folder, its files and checksum) holds the state in two parts:

- tensors (state.safetensors): ``sae.<name>`` (the dictionary's parameters and buffers),
  ``opt.<i>.<key>`` (Adam's state of the i-th parameter; a 0-d value stored as [1]),
  ``tokens_since_fired`` and ``window_counts`` ([n] int64, n the latents this rank counts; the
  whole dictionary's in the file), ``eval.x`` / ``eval.y`` (the held-out split) and ``carry.x`` /
  ``carry.y`` (rows read but not yet trained on), the last four only when present;
- state.json: tokens, config (the TrainConfig), sae_config, input_scale, output_scale,
  source_state, generator (resampling's generator), optimizer_groups, log_window (the metric
  window's attributes), and from ``checkpoint.write`` step, tensors_sha256, format and
  state_sha256 (the checksum of the other fields); ``checkpoint.STATE_SCHEMA`` checks each field's
  type before a resume uses it.

``write_checkpoint(state, context)`` writes one (every rank calls it); ``RunState.restore`` loads
one back into a run started with the same dictionary and settings. ``RunState.initial`` refuses
(SymlinkRefused) a checkpoint or output folder holding a symbolic link, before the run writes
anything there.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import Tensor

from sparsekit._util.atomic import refuse_symlinks
from sparsekit.sae.base import SparseDictionary

from . import checkpoint as ckpt
from .batches import Batches
from .config import TrainConfig
from .dead_latents import DeadLatentTracker
from .metrics import MetricWindow
from .optimizer import adam
from .parallel.single import SingleProcess

SCALES = ("input_scale", "output_scale")  # sae_config entries a run sets itself: not compared on resume


@dataclasses.dataclass
class RunState:
    """Everything a training run carries from one step to the next; a checkpoint holds all of it."""
    config: TrainConfig
    sae: SparseDictionary               # (or a latent shard)
    optimizer: torch.optim.Optimizer
    source: object                      # the ActivationSource; its state_dict() is checkpointed
    batches: Batches                    # its re-chunking, with the rows carried between batches
    tracker: DeadLatentTracker          # tokens since each latent fired [n] int64
    window_counts: Tensor               # fires per latent since the last metric line [n] int64
    window: MetricWindow                # running sums since the last metric line
    generator: torch.Generator          # resampling's draws
    step: int = 0                       # optimizer updates done
    tokens: int = 0                     # training tokens consumed: step * batch_size
    eval_x: Tensor | None = None        # the held-out split [eval_tokens, d_in], as read (not normalised)
    eval_y: Tensor | None = None        # its targets [eval_tokens, d_out] (a transcoder), else None

    @classmethod
    def initial(cls, sae: SparseDictionary, source, config: TrainConfig, tracked_latents: int) -> "RunState":
        """The state before the first step: nothing read, Adam fresh, every counter zero.
        tracked_latents: how many latents this rank counts (the parallel context's tracked_latents).
        SymlinkRefused if config's checkpoint_dir or output_dir holds a symbolic link."""
        for folder in (config.checkpoint_dir, config.output_dir):
            if folder is not None:
                refuse_symlinks(folder)
        from sparsekit.activations import as_source  # here: `import sparsekit` leaves the sources unloaded

        src = as_source(source, batch_size=config.batch_size)
        batches = Batches(src, config.batch_size, sae.d_in, sae.d_out, sae.transcoder, dtype=sae.W_enc.dtype)
        optimizer = adam(sae, config)
        tracker = DeadLatentTracker(tracked_latents, config.dead_window_tokens)
        generator = torch.Generator().manual_seed(config.seed)
        window_counts = torch.zeros(tracked_latents, dtype=torch.int64)
        return cls(config, sae, optimizer, src, batches, tracker, window_counts, MetricWindow(), generator)

    def checkpoint_tensors(self) -> dict:
        """The checkpoint's tensors, this rank's part (see the module docstring)."""
        tensors = {f"sae.{name}": t for name, t in self.sae.state_dict().items()}
        tensors.update(optimizer_tensors(self.optimizer, self.sae))
        tensors["tokens_since_fired"] = self.tracker.tokens_since_fired
        tensors["window_counts"] = self.window_counts
        for name, t in (("eval.x", self.eval_x), ("eval.y", self.eval_y),
                        ("carry.x", self.batches.carry_x), ("carry.y", self.batches.carry_y)):
            if t is not None:
                tensors[name] = t
        return tensors

    def checkpoint_json(self) -> dict:
        """The checkpoint's state.json entries but step and the checksum (``checkpoint.write`` adds them)."""
        groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
                  for g in self.optimizer.param_groups]
        return {"tokens": self.tokens, "config": dataclasses.asdict(self.config), "sae_config": self.sae.config(),
                "input_scale": self.sae.input_scale, "output_scale": self.sae.output_scale,
                "source_state": self.source.state_dict(), "generator": ckpt.generator_state(self.generator),
                "optimizer_groups": groups, "log_window": vars(self.window)}

    def restore(self, path: Path, tensors: dict, saved: dict, context: SingleProcess) -> None:
        """Load checkpoint `path` (its tensors and state.json `saved`, as ``checkpoint.latest`` reads
        them) into this fresh state; ValueError if it was written for another dictionary."""
        tensors = context.local_checkpoint(self.sae, tensors)  # a latent shard's slice of the full dictionary's
        self.step, self.tokens = saved["step"], saved["tokens"]
        _check_same_dictionary(path, saved["sae_config"], self.sae.config())
        device = self.sae.W_enc.device
        self.sae.load_state_dict({k[4:]: v.to(device) for k, v in tensors.items() if k.startswith("sae.")})
        self.sae.input_scale, self.sae.output_scale = saved["input_scale"], saved["output_scale"]
        load_optimizer(self.optimizer, self.sae, tensors, saved["optimizer_groups"], device)
        self.tracker.tokens_since_fired = tensors["tokens_since_fired"].clone()
        self.window_counts = tensors["window_counts"].clone()
        self.eval_x, self.eval_y = tensors.get("eval.x"), tensors.get("eval.y")
        self.batches.carry_x, self.batches.carry_y = tensors.get("carry.x"), tensors.get("carry.y")
        self.source.load_state_dict(saved["source_state"])
        ckpt.set_generator_state(self.generator, saved["generator"])
        vars(self.window).update(saved["log_window"])


def _check_same_dictionary(path: Path, saved: dict, now: dict) -> None:
    saved = {k: v for k, v in saved.items() if k not in SCALES}
    now = {k: v for k, v in now.items() if k not in SCALES}
    if saved != now:
        raise ValueError(f"checkpoint {path} was written for {saved}, not {now}")


def write_checkpoint(state: RunState, context: SingleProcess | None = None) -> None:
    """Write `state` as checkpoint ``step_<state.step>`` in its config's checkpoint_dir. Rank 0 writes
    (a latent-sharded dictionary's shards are gathered to it first: every rank calls this).
    context: the run's parallel context (None: one process)."""
    context = SingleProcess() if context is None else context
    if not (context.is_writer or getattr(state.sae, "latent_sharded", False)):
        return
    tensors = context.checkpoint_tensors(state.sae, state.checkpoint_tensors())
    if not context.is_writer:
        return
    ckpt.write(state.config.checkpoint_dir, state.step, tensors, state.checkpoint_json())


def optimizer_tensors(optimizer: torch.optim.Optimizer, sae) -> dict:
    """Adam's state as checkpoint tensors {"opt.<i>.<key>": value}, i the parameter's index in
    sae.parameters(); a 0-d value (the step count) as [1]."""
    index = {id(p): i for i, p in enumerate(sae.parameters())}
    tensors = {}
    for parameter, state in optimizer.state.items():
        for key, value in state.items():
            tensors[f"opt.{index[id(parameter)]}.{key}"] = value if value.dim() else value.reshape(1)
    return tensors


def load_optimizer(optimizer: torch.optim.Optimizer, sae, tensors: dict, groups: list, device) -> None:
    """The inverse of ``optimizer_tensors``, with the param groups saved in state.json."""
    state = {}
    for name, value in tensors.items():
        if name.startswith("opt."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value.to(device) if key != "step" else value.reshape(())
    param_groups = [{**g, "params": list(range(len(list(sae.parameters()))))} for g in groups]
    for g in param_groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})
