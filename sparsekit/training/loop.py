"""Train a sparse dictionary: ``sparsekit.train(sae, source, TrainConfig(...))``.

One loop for every architecture: batches of exactly ``batch_size`` rows (whatever the source's
chunking), inputs normalised so that E||x||^2 = d_in, Adam with LR warm-up and a final linear
decay, L1/L0 warm-up, gradient clipping, unit-norm decoder rows where the architecture asks, a
held-out split for evaluation, dead latents counted exactly in tokens with an optional remedy
(resampling, ghost grads, AuxK), metrics to JSON lines and a progress bar, and checkpoints from
which a killed run resumes to exactly the parameters of a run that never stopped.
"""
from __future__ import annotations

import dataclasses
import json
import math
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from . import checkpoint as ckpt
from sparsekit.ops import checks
from . import guards as reliability
from .parallel import data as distributed
from sparsekit.errors import SourceExhausted
from .dead_latents import STRATEGIES, DeadLatentTracker, resample
from sparsekit.sae.base import SparseDictionary

METRICS_FILE = "metrics.jsonl"
DENSITY_PLOT = "feature_density.png"
DENSE_THRESHOLD = 0.1  # a latent firing on more than 10% of tokens counts as dense


@dataclasses.dataclass
class TrainConfig:
    """Training settings; every count is in tokens (rows of activations), never steps.

    Defaults follow the recipes in docs/design.md: Adam (betas 0.9/0.999), LR decayed linearly to zero
    over the last 20% of training (Anthropic, April 2024), AuxK with k_aux = d_in / 2 and
    coefficient 1/32 (Gao et al. 2024), resampling at 2.5/5/7.5/10% of the run (Towards
    Monosemanticity's 25k-100k of ~1M steps), dead after 10M tokens without firing.
    """
    batch_size: int = 4096
    lr: float = 3e-4
    total_tokens: int = 10_000_000
    lr_warmup_tokens: int = 0
    lr_decay_fraction: float = 0.2
    l1_warmup_tokens: int = 0
    adam_betas: tuple = (0.9, 0.999)
    adam_eps: float = 1e-8
    grad_clip_norm: float | None = 1.0
    normalize_inputs: bool = True
    b_dec_init: str | None = None             # "geometric_median" | "mean" | "zeros" | "keep";
                                              # None: geometric median (SAE), target mean (transcoder)
    eval_tokens: int = 8192                   # held out from the start of the stream
    dead_window_tokens: int = 10_000_000
    dead_strategy: str = "none"               # "none" | "resample" | "ghost" | "auxk", or "a+b"
    aux_k: int | None = None                  # AuxK's k_aux; None: d_in // 2
    aux_coeff: float = 1 / 32
    resample_at_tokens: tuple | None = None   # None: 2.5%, 5%, 7.5%, 10% of total_tokens
    seed: int = 0
    log_every: int = 100                      # steps between metric lines
    output_dir: str | None = None             # metrics.jsonl and plots; default: checkpoint_dir
    checkpoint_dir: str | None = None
    checkpoint_every_tokens: int | None = None
    progress: bool = True
    wandb_project: str | None = None          # also log to Weights & Biases (sparsekit.training.tracking; the wandb extra)
    wandb_run_name: str | None = None

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
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
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
        if self.resample_at_tokens is not None:
            return sorted(int(t) for t in self.resample_at_tokens)
        return [int(self.total_tokens * f) for f in (0.025, 0.05, 0.075, 0.1)]


class TrainResult(NamedTuple):
    """The trained dictionary, final held-out metrics, the logged metric lines, the output folder."""
    sae: SparseDictionary
    metrics: dict
    history: list
    output_dir: Path | None


class _Batches:
    """Re-chunks a source's batches (any size) into batches of exactly batch_size rows; the
    rows left over between chunks are part of the checkpointed state."""

    def __init__(self, source, batch_size: int, d_in: int, d_out: int | None, needs_target: bool):
        self.source, self.batch_size = source, batch_size
        self.d_in, self.d_out, self.needs_target = d_in, d_out, needs_target
        self.carry_x: Tensor | None = None
        self.carry_y: Tensor | None = None
        self.iterator = None
        self.chunks_read = 0

    def _next_chunk(self):
        if self.iterator is None:
            self.iterator = iter(self.source)
        try:
            chunk = next(self.iterator)
        except StopIteration:
            raise SourceExhausted(reliability.exhausted_message(self.chunks_read)) from None
        self.chunks_read += 1
        x, y = (chunk if isinstance(chunk, (tuple, list)) else (chunk, None))
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != self.d_in or not x.is_floating_point():
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"source batch {self.chunks_read}: x must be a float tensor [rows, d_in={self.d_in}], "
                             f"got {shape}")
        if self.needs_target:
            if y is None:
                raise ValueError(f"source batch {self.chunks_read}: a transcoder needs (x, y) batches")
            if not isinstance(y, Tensor) or y.shape != (x.shape[0], self.d_out):
                shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
                raise ValueError(f"source batch {self.chunks_read}: y must be [rows={x.shape[0]}, d_out={self.d_out}], "
                                 f"got {shape}")
        if not checks.all_finite(x.contiguous()) or (y is not None and not checks.all_finite(y.contiguous())):
            raise ValueError(f"source batch {self.chunks_read} contains NaN or Inf")
        return x, (y if self.needs_target else None)

    def take(self, rows: int) -> tuple[Tensor, Tensor | None]:
        xs = [] if self.carry_x is None else [self.carry_x]
        ys = [] if self.carry_y is None else [self.carry_y]
        have = 0 if self.carry_x is None else self.carry_x.shape[0]
        while have < rows:
            x, y = self._next_chunk()
            xs.append(x)
            if y is not None:
                ys.append(y)
            have += x.shape[0]
        x = torch.cat(xs) if len(xs) > 1 else xs[0]
        y = (torch.cat(ys) if len(ys) > 1 else ys[0]) if ys else None
        self.carry_x = x[rows:] if x.shape[0] > rows else None
        self.carry_y = y[rows:] if y is not None and y.shape[0] > rows else None
        return x[:rows], (y[:rows] if y is not None else None)


def _lr_factor(cfg: TrainConfig, tokens: int) -> float:
    factor = 1.0
    if cfg.lr_warmup_tokens:
        factor *= min(1.0, (tokens + cfg.batch_size) / cfg.lr_warmup_tokens)
    decay_start = cfg.total_tokens * (1 - cfg.lr_decay_fraction)
    if cfg.lr_decay_fraction > 0 and tokens >= decay_start:
        factor *= max(0.0, (cfg.total_tokens - tokens) / (cfg.total_tokens - decay_start))
    return factor


def _scale_for(sample: Tensor) -> float:
    """The factor that makes E||x||^2 = width on this sample."""
    mean_sq = float(sample.double().pow(2).sum(-1).mean())
    return math.sqrt(sample.shape[1] / mean_sq) if mean_sq > 0 else 1.0


@torch.no_grad()
def evaluate(sae: SparseDictionary, x: Tensor, y: Tensor | None = None, batch_size: int = 4096) -> dict:
    """Held-out metrics on normalised inputs: mse, fvu, l0 and per-latent fire counts."""
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
        x_hat = sae.decode(codes)
        sq_err += float((x_hat - tb).pow(2).sum())
        variance += float((tb - mean).pow(2).sum())
        fire = sae.fire_counts(codes).cpu()
        counts += fire
        l0 += float(fire.sum())
    sae.train(was_training)
    rows = x.shape[0]
    return {"mse": sq_err / rows, "fvu": sq_err / max(variance, 1e-30), "l0": l0 / rows, "fire_counts": counts}


@reliability.guard_run  # memory check before allocating; one run per checkpoint_dir (a lock)
def train(sae: SparseDictionary, source, config: TrainConfig | None = None, resume: bool = False) -> TrainResult:
    """Train ``sae`` in place on ``source`` and return a TrainResult.

    source: an ActivationSource, a tensor [N, d_in] (or an (x, y) pair of tensors for a
    transcoder), or any re-iterable / zero-argument callable yielding x or (x, y) batches.
    With ``resume=True`` and ``config.checkpoint_dir`` set, training continues from the newest
    complete checkpoint there (a fresh start if there is none) and ends exactly where an
    uninterrupted run ends. Under torchrun, an error on one rank stops every rank with it.
    """
    with distributed.failures_propagated():
        return _train(sae, source, config, resume)


def _train(sae, source, config: TrainConfig | None, resume: bool) -> TrainResult:
    from sparsekit.activations import as_source
    from .tracking import start_tracking

    cfg = config or TrainConfig()
    if not isinstance(cfg, TrainConfig):
        raise ValueError(f"config must be a TrainConfig, got {type(cfg).__name__}")
    cfg.validate()
    if not isinstance(sae, SparseDictionary) and not getattr(sae, "latent_sharded", False):
        raise ValueError(f"sae must be a sparsekit dictionary, got {type(sae).__name__}")
    strategies = cfg.strategies()
    if "auxk" in strategies and sae.architecture not in ("topk", "batchtopk"):
        raise ValueError(f"dead_strategy 'auxk' needs a topk or batchtopk dictionary, not {sae.architecture!r}")
    if resume and cfg.checkpoint_dir is None:
        raise ValueError("resume=True needs TrainConfig.checkpoint_dir")

    device = sae.W_enc.device
    # Data parallel under torchrun, or a latent-sharded dictionary (rank 0 writes); nothing extra otherwise.
    dp = distributed.training_context(sae, cfg, repr((dataclasses.asdict(cfg), sae.config(), resume)))
    src = as_source(source, batch_size=cfg.batch_size)
    batches = _Batches(src, cfg.batch_size, sae.d_in, sae.d_out, sae.transcoder)
    optimizer = _adam(sae, cfg)
    tracker = DeadLatentTracker(dp.tracked_latents(sae), cfg.dead_window_tokens)
    generator = torch.Generator().manual_seed(cfg.seed)
    window_counts = torch.zeros(dp.tracked_latents(sae), dtype=torch.int64)
    output_dir = Path(cfg.output_dir or cfg.checkpoint_dir) if (cfg.output_dir or cfg.checkpoint_dir) else None
    if not dp.is_writer:
        output_dir = None
    history: list[dict] = []
    step = tokens = 0
    eval_x = eval_y = None

    restored = ckpt.latest(cfg.checkpoint_dir) if resume else None
    if restored is not None:
        path, tensors, state = restored
        tensors = dp.local_checkpoint(sae, tensors)  # a latent shard's slice of the full dictionary's
        step, tokens = state["step"], state["tokens"]
        saved_cfg = {k: v for k, v in state["sae_config"].items() if k not in ("input_scale", "output_scale")}
        now_cfg = {k: v for k, v in sae.config().items() if k not in ("input_scale", "output_scale")}
        if saved_cfg != now_cfg:
            raise ValueError(f"checkpoint {path} was written for {saved_cfg}, not {now_cfg}")
        sae.load_state_dict({k[4:]: v.to(device) for k, v in tensors.items() if k.startswith("sae.")})
        sae.input_scale, sae.output_scale = state["input_scale"], state["output_scale"]
        _load_optimizer(optimizer, sae, tensors, state["optimizer_groups"], device)
        tracker.tokens_since_fired = tensors["tokens_since_fired"].clone()
        window_counts = tensors["window_counts"].clone()
        eval_x = tensors.get("eval.x")
        eval_y = tensors.get("eval.y")
        batches.carry_x, batches.carry_y = tensors.get("carry.x"), tensors.get("carry.y")
        src.load_state_dict(state["source_state"])
        ckpt.set_generator_state(generator, state["generator"])
        history = _restore_history(output_dir, step)
        restored_window = state["log_window"]
        print(f"sparsekit: resumed from {path} (step {step}, {tokens:,} tokens)")
    else:
        if cfg.eval_tokens:
            eval_x, eval_y = batches.take(cfg.eval_tokens)
        first_x, first_y = (eval_x, eval_y) if eval_x is not None else batches.take(cfg.batch_size)
        if eval_x is None:  # no held-out split: the sample is the first training batch
            batches.carry_x = first_x if batches.carry_x is None else torch.cat([first_x, batches.carry_x])
            if first_y is not None:
                batches.carry_y = first_y if batches.carry_y is None else torch.cat([first_y, batches.carry_y])
        if cfg.normalize_inputs:
            sae.input_scale = _scale_for(first_x)
            sae.output_scale = _scale_for(first_y) if sae.transcoder else sae.input_scale
        b_dec_init = cfg.b_dec_init or ("mean" if sae.transcoder else "geometric_median")
        if b_dec_init != "keep":
            sample_x = first_x[:4096].to(device) * sae.input_scale
            sample_y = first_y[:4096].to(device) * sae.output_scale if first_y is not None else None
            sae.init_decoder_bias(sample_x, b_dec_init, y=sample_y)
        if output_dir is not None:
            output_dir.mkdir(parents=True, exist_ok=True)
            (output_dir / METRICS_FILE).write_text("")

    total_steps = cfg.total_tokens // cfg.batch_size
    resample_schedule = cfg.resample_schedule()
    k_aux = cfg.aux_k or max(1, sae.d_in // 2)
    params = list(sae.parameters())
    window = _Window()
    if restored is not None:
        vars(window).update(restored_window)
    progress = _progress_bar(dataclasses.replace(cfg, progress=cfg.progress and dp.is_writer), total_steps, step)
    tracking = start_tracking(cfg, sae, output_dir, resume=restored is not None)
    dp.broadcast_module(sae)
    sae.train()

    while step < total_steps:
        try:
            x, y = batches.take(cfg.batch_size)
        except SourceExhausted:
            raise SourceExhausted(f"the source ran out after {tokens:,} training tokens; TrainConfig.total_tokens="
                                  f"{cfg.total_tokens:,}: lower total_tokens or let the source repeat") from None
        x, y = dp.local_rows(x), dp.local_rows(y)
        x = x.to(device) * sae.input_scale
        y = y.to(device) * sae.output_scale if y is not None else None
        target = y if sae.transcoder else x
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * _lr_factor(cfg, tokens)
        if hasattr(sae, "sparsity_weight"):
            sae.sparsity_weight = min(1.0, (tokens + cfg.batch_size) / cfg.l1_warmup_tokens) if cfg.l1_warmup_tokens else 1.0

        out = dp.forward(sae, x, y)
        losses = dict(out.losses)
        residual = target - out.x_hat
        dead = tracker.dead_indices(device)
        if dp.any_dead(dead):
            if "auxk" in strategies:
                losses["aux_loss"] = cfg.aux_coeff * dp.auxk_loss(sae, x, residual, dead, k_aux)
            if "ghost" in strategies:
                losses["aux_loss"] = losses.get("aux_loss", 0) + dp.ghost_loss(sae, x, residual, dead, losses["mse"])
        loss = sum(losses.values())
        dp.check_loss(step, loss, losses, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        dp.average_gradients(params)
        sae.remove_parallel_decoder_grad()
        if cfg.grad_clip_norm is not None:
            dp.clip_grad_norm(sae, params, cfg.grad_clip_norm)
        optimizer.step()
        sae.normalize_decoder()
        reliability.check_parameters(step, sae, cfg)

        with torch.no_grad():
            counts = dp.sum(sae.fire_counts(out.codes)).cpu()
        tracker.update(counts, cfg.batch_size)
        window_counts += counts
        step += 1
        tokens += cfg.batch_size
        dp.add_to_window(window, losses, target, out.x_hat, counts, cfg.batch_size)

        if "resample" in strategies and any(tokens - cfg.batch_size < t <= tokens for t in resample_schedule):
            dead_now = tracker.dead_indices(device)
            per_input = residual.detach().pow(2).sum(-1)
            resample(sae, optimizer, dead_now, x, per_input, generator)
            dp.broadcast_module(sae)  # rank 0's draw (each rank drew from its own rows)
            tracker.revive(dead_now)
            window.resampled += dead_now.numel()

        if step % cfg.log_every == 0 or step == total_steps:
            record = window.summary(step, tokens, dp.whole_tracker(tracker), dp.whole(window_counts),
                                    optimizer.param_groups[0]["lr"])
            window_counts.zero_()
            window = _Window()
            history.append(record)
            tracking.log(record)
            if output_dir is not None:
                with open(output_dir / METRICS_FILE, "a") as handle:
                    handle.write(json.dumps(record) + "\n")
            progress.set_postfix(fvu=f"{record['fvu']:.3f}", l0=f"{record['l0']:.1f}", dead=f"{record['dead_frac']:.3f}")
        progress.update(1)

        if cfg.checkpoint_every_tokens and (tokens // cfg.checkpoint_every_tokens
                                            > (tokens - cfg.batch_size) // cfg.checkpoint_every_tokens
                                            or step == total_steps):
            _write_checkpoint(cfg, sae, optimizer, src, batches, tracker, window_counts, window, generator,
                              step, tokens, eval_x, eval_y, dp)
    progress.close()

    metrics = {"step": step, "tokens": tokens, "dead_frac": float(dp.whole_tracker(tracker).dead_mask().float().mean())}
    if eval_x is not None:
        ev = dp.evaluate(sae, eval_x.to(device) * sae.input_scale,
                      eval_y.to(device) * sae.output_scale if eval_y is not None else None, cfg.batch_size)
        density = ev.pop("fire_counts").double() / eval_x.shape[0]
        metrics.update(ev, dense_frac=float((density > DENSE_THRESHOLD).float().mean()))
        if output_dir is not None:
            _density_plot(density, output_dir / DENSITY_PLOT, sae)
    tracking.finish(metrics, [output_dir / DENSITY_PLOT] if output_dir is not None else [])
    return TrainResult(sae, metrics, history, output_dir)


class _Window:
    """Running sums of the metrics between two log lines."""

    def __init__(self):
        self.steps = 0
        self.sums: dict[str, float] = {}
        self.sq_err = self.variance = self.active = 0.0
        self.rows = 0
        self.resampled = 0

    @torch.no_grad()
    def add(self, losses, target, x_hat, counts, rows) -> None:
        self.steps += 1
        for name, value in losses.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value)
        self.sq_err += float((x_hat - target).pow(2).sum())
        self.variance += float((target - target.mean(0)).pow(2).sum())
        self.active += float(counts.sum())
        self.rows += rows

    def summary(self, step, tokens, tracker, window_counts, lr) -> dict:
        record = {"step": step, "tokens": tokens,
                  "mse": self.sq_err / self.rows, "fvu": self.sq_err / max(self.variance, 1e-30),
                  "l0": self.active / self.rows,
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


def _adam(sae: SparseDictionary, cfg: TrainConfig) -> torch.optim.Adam:
    """Adam with torch's fused kernel (one pass per tensor; ~7x faster than the for-each kernel on
    the CPU) when every parameter is contiguous, else the for-each kernel. On torch 2.13 the fused
    CPU update of a non-contiguous parameter is wrong (0.6 apart from for-each on a transposed
    16 x 64 parameter after 3 steps; 1e-7 when contiguous): dictionaries are built contiguous,
    and a test pins the trainer's update to a plain for-each loop."""
    params = list(sae.parameters())
    fused = all(p.is_contiguous() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
                            **({"fused": True} if fused else {"foreach": True}))


def _progress_bar(cfg: TrainConfig, total: int, initial: int):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, disable=not cfg.progress, unit="step", dynamic_ncols=True,
                desc="sparsekit train")


def _write_checkpoint(cfg, sae, optimizer, src, batches, tracker, window_counts, window, generator, step, tokens,
                      eval_x, eval_y, dp=distributed.SingleProcess()) -> None:
    """Rank 0 writes (a latent-sharded dictionary's shards are gathered to it first: every rank calls this)."""
    if not (dp.is_writer or getattr(sae, "latent_sharded", False)):
        return
    tensors = {f"sae.{name}": t for name, t in sae.state_dict().items()}
    index = {id(p): i for i, p in enumerate(sae.parameters())}
    for parameter, state in optimizer.state.items():
        for key, value in state.items():
            tensors[f"opt.{index[id(parameter)]}.{key}"] = value if value.dim() else value.reshape(1)
    tensors["tokens_since_fired"] = tracker.tokens_since_fired
    tensors["window_counts"] = window_counts
    for name, t in (("eval.x", eval_x), ("eval.y", eval_y), ("carry.x", batches.carry_x), ("carry.y", batches.carry_y)):
        if t is not None:
            tensors[name] = t
    tensors = dp.checkpoint_tensors(sae, tensors)
    if not dp.is_writer:
        return
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
              for g in optimizer.param_groups]
    state = {"tokens": tokens, "config": dataclasses.asdict(cfg), "sae_config": sae.config(),
             "input_scale": sae.input_scale, "output_scale": sae.output_scale,
             "source_state": src.state_dict(), "generator": ckpt.generator_state(generator),
             "optimizer_groups": groups, "log_window": vars(window)}
    ckpt.write(cfg.checkpoint_dir, step, tensors, state)


def _load_optimizer(optimizer, sae, tensors, groups, device) -> None:
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


def _restore_history(output_dir: Path | None, step: int) -> list[dict]:
    """Metric lines up to the checkpoint's step; later ones (written before the crash) are dropped."""
    if output_dir is None or not (output_dir / METRICS_FILE).is_file():
        return []
    kept = []
    for line in (output_dir / METRICS_FILE).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by the crash
        if record.get("step", 0) <= step:
            kept.append(record)
    (output_dir / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in kept))
    return kept


def _density_plot(density: Tensor, path: Path, sae: SparseDictionary) -> None:
    """Histogram of log10 feature density on the held-out split (dead latents counted apart)."""
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
    ax.set_title(f"{sae.architecture}: {sae.n_latents} latents, {dead} never fired on the held-out split")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
