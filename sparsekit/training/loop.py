"""Train a sparse dictionary: ``sparsekit.train(sae, source, TrainConfig(...))``.

One loop for every architecture: batches of exactly ``batch_size`` rows (whatever the source's
chunking), inputs normalised so that E||x||^2 = d_in, Adam with LR warm-up and a final linear
decay, L1/L0 warm-up, gradient clipping, unit-norm decoder rows where the architecture asks, a
held-out split for evaluation, dead latents counted exactly in tokens with an optional remedy
(resampling, ghost grads, AuxK), metrics to JSON lines and a progress bar, and checkpoints from
which a killed run resumes to exactly the parameters of a run that never stopped.

A run is three phases, each a function of its own: ``start`` (a fresh start, or a resume from the
newest checkpoint), then once per step ``take_step`` (one optimizer update on the next batch) and
``after_step`` (resampling, the metric line, the checkpoint), and ``finish`` (held-out metrics,
the density plot). A ``Run`` carries what they share: the checkpointed ``RunState`` and what each
start rebuilds around it.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from sparsekit._util.log import logger
from sparsekit._util.words import joined
from sparsekit.errors import SourceExhausted
from sparsekit.ops.cpu import tuning
from sparsekit.sae import registry
from sparsekit.sae.base import SparseDictionary
from sparsekit.sae.metadata import record_training

from . import checkpoint as ckpt
from . import guards
from .batches import normalizing_scale
from .config import TrainConfig, TrainResult
from .dead_latents import auxk_loss, ghost_loss, resample, shared_pass_k
from .metrics import (
    DENSE_THRESHOLD,
    DENSITY_PLOT,
    MetricWindow,
    append_metrics,
    density_plot,
    restore_history,
    start_metrics_file,
)
from .optimizer import lr_factor, sparsity_weight
from .parallel import SingleProcess, training_context
from .parallel.data import failures_propagated
from .state import RunState, write_checkpoint
from .tracking import start_tracking


@guards.guard_run  # memory check before allocating; one run per checkpoint_dir (a lock)
def train(sae: SparseDictionary, source, config: TrainConfig | None = None, resume: bool = False) -> TrainResult:
    """Train ``sae`` in place on ``source`` and return a TrainResult.

    source: an ActivationSource, a tensor [N, d_in] (or an (x, y) pair of tensors for a
    transcoder), or any re-iterable / zero-argument callable yielding x or (x, y) batches.
    With ``resume=True`` and ``config.checkpoint_dir`` set, training continues from the newest
    complete checkpoint there (a fresh start if there is none) and ends exactly where an
    uninterrupted run ends. Under torchrun, an error on one rank stops every rank with it.
    """
    try:
        with failures_propagated():
            return _train(sae, source, config, resume)
    finally:
        tuning.unpin()  # a resume pinned its checkpoint's CPU crossovers for this run only


def _train(sae, source, config: TrainConfig | None, resume: bool) -> TrainResult:
    run = start(sae, source, config, resume)
    while run.state.step < run.total_steps:
        after_step(run, take_step(run))
    return finish(run)


@dataclasses.dataclass
class Run:
    """A run in progress: its checkpointed state and what every start rebuilds around it."""
    state: RunState
    context: SingleProcess          # how the run spreads over ranks (``parallel.training_context``)
    device: torch.device            # where the dictionary lives
    output_dir: Path | None         # metrics.jsonl and plots; None without one, and on every rank but the writer
    history: list[dict]             # the metric lines so far
    total_steps: int
    strategies: tuple[str, ...]     # the dead-latent remedies
    resample_schedule: list[int]    # token counts at which to resample
    k_aux: int                      # AuxK's k_aux
    params: list                    # the dictionary's parameters, in optimizer order
    progress: object                # the progress bar (tqdm)
    tracking: object                # tracking.NullTracker or tracking.WandbTracker


class Step(NamedTuple):
    """What one step leaves for ``after_step``: its normalised input x [b, d_in] and the detached
    residual target - x_hat [b, d_out] (this rank's b rows of the batch)."""
    x: Tensor
    residual: Tensor


# --- start or resume -----------------------------------------------------------------------------

def start(sae, source, config: TrainConfig | None = None, resume: bool = False) -> Run:
    """Start a run of `sae` on `source` (the arguments checked first: ValueError): with `resume`,
    from the newest checkpoint in config.checkpoint_dir (a fresh start if there is none), else
    fresh: the held-out split read, the input scales and b_dec set from the first rows, an empty
    metrics file. The dictionary is left in training mode, the same on every rank."""
    cfg = _checked_config(sae, config, resume)
    device = sae.W_enc.device
    # Data parallel under torchrun, or a latent-sharded dictionary (rank 0 writes); nothing extra otherwise.
    context = training_context(sae, cfg, repr((dataclasses.asdict(cfg), sae.config(), resume)))
    report = context.describe(sae)
    if report is not None and context.is_writer:
        logger.info("%s", report)
    state = RunState.initial(sae, source, cfg, context.tracked_latents(sae))
    output_dir = Path(cfg.output_dir or cfg.checkpoint_dir) if (cfg.output_dir or cfg.checkpoint_dir) else None
    if not context.is_writer:
        output_dir = None
    restored = ckpt.latest(cfg.checkpoint_dir) if resume else None
    if restored is not None:
        history = _resume(state, restored, context, output_dir)
    else:
        history = _start_fresh(state, output_dir)
    total_steps = cfg.total_tokens // cfg.batch_size
    if (warning := cfg.resample_warning()) is not None:
        logger.warning("WARNING: %s", warning)
    progress = _progress_bar(dataclasses.replace(cfg, progress=cfg.progress and context.is_writer), total_steps,
                             state.step)
    tracking = start_tracking(cfg, sae, output_dir, resume=restored is not None)
    context.broadcast_module(sae)
    sae.train()
    return Run(state, context, device, output_dir, history, total_steps, cfg.strategies(), cfg.resample_schedule(),
               cfg.aux_k or max(1, sae.d_in // 2), list(sae.parameters()), progress, tracking)


def _checked_config(sae, config: TrainConfig | None, resume: bool) -> TrainConfig:
    """config (None: TrainConfig()) once it and the other arguments are checked; ValueError if one is wrong."""
    cfg = config or TrainConfig()
    if not isinstance(cfg, TrainConfig):
        raise ValueError(f"config must be a TrainConfig, got {type(cfg).__name__}")
    cfg.validate()
    if not isinstance(sae, SparseDictionary) and not getattr(sae, "latent_sharded", False):
        raise ValueError(f"sae must be a sparsekit dictionary, got {type(sae).__name__}")
    sparse_coded = [name for name in registry.trainable() if registry.ARCHITECTURES[name].code_kind != "dense"]
    if "auxk" in cfg.strategies() and sae.architecture not in sparse_coded:  # AuxK picks from k-sparse codes
        raise ValueError(f"dead_strategy 'auxk' needs a {joined(sparse_coded, 'or')} dictionary, not {sae.architecture!r}")
    if resume and cfg.checkpoint_dir is None:
        raise ValueError("resume=True needs TrainConfig.checkpoint_dir")
    return cfg


def _resume(state: RunState, restored: tuple, context, output_dir: Path | None) -> list[dict]:
    """Load checkpoint `restored` (path, tensors, state.json) into `state`; the metric lines up to it."""
    path, tensors, saved = restored
    state.restore(path, tensors, saved, context)
    history = restore_history(output_dir, state.step)
    logger.info("resumed from %s (step %d, %s tokens)", path, state.step, f"{state.tokens:,}")
    return history


def _start_fresh(state: RunState, output_dir: Path | None) -> list[dict]:
    """Hold out the evaluation split, set the input scales and b_dec from the first rows (the
    held-out split, or the first training batch, which is put back), start the metrics file."""
    cfg, batches = state.config, state.batches
    if cfg.eval_tokens:
        state.eval_x, state.eval_y = batches.take(cfg.eval_tokens)
    first_x, first_y = (state.eval_x, state.eval_y) if state.eval_x is not None else batches.take(cfg.batch_size)
    if state.eval_x is None:  # no held-out split: the sample is the first training batch
        batches.put_back(first_x, first_y)
    _set_scales_and_bias(state.sae, cfg, first_x, first_y)
    if output_dir is not None:
        start_metrics_file(output_dir)
    return []


def _set_scales_and_bias(sae, cfg: TrainConfig, x: Tensor, y: Tensor | None) -> None:
    """Input (and output) scales from the sample x [r, d_in] (y [r, d_out]), then b_dec (b_in) from its first rows."""
    if cfg.normalize_inputs:
        sae.input_scale = normalizing_scale(x)
        sae.output_scale = normalizing_scale(y) if sae.transcoder else sae.input_scale
    b_dec_init = cfg.b_dec_init or ("mean" if sae.transcoder else "geometric_median")
    if b_dec_init != "keep":
        device = sae.W_enc.device
        sample_x = x[:4096].to(device) * sae.input_scale
        sample_y = y[:4096].to(device) * sae.output_scale if y is not None else None
        sae.init_decoder_bias(sample_x, b_dec_init, y=sample_y)


def _progress_bar(cfg: TrainConfig, total: int, initial: int):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, disable=not cfg.progress, unit="step", dynamic_ncols=True,
                desc="sparsekit train")


# --- one step ------------------------------------------------------------------------------------

def take_step(run: Run) -> Step:
    """One optimizer update on the next batch: the learning rate and sparsity weight for this
    step, the losses (with the dead-latent remedies), backward, Adam; then the fire counts, the
    metric window, and step and tokens advanced."""
    x, y = _next_batch(run)
    _apply_schedules(run.state)
    out, losses, residual = _losses(run, x, y)
    _update(run, losses)
    _count(run, out, losses, y if run.state.sae.transcoder else x)
    return Step(x, residual.detach())


def _next_batch(run: Run) -> tuple[Tensor, Tensor | None]:
    """This rank's rows of the next batch, normalised, on the run's device: x [b, d_in], y [b, d_out] or None."""
    state, cfg, sae = run.state, run.state.config, run.state.sae
    try:
        x, y = state.batches.take(cfg.batch_size)
    except SourceExhausted:
        raise SourceExhausted(f"the source ran out after {state.tokens:,} training tokens; TrainConfig.total_tokens="
                              f"{cfg.total_tokens:,}: lower total_tokens or let the source repeat") from None
    x, y = run.context.local_rows(x), run.context.local_rows(y)
    x = x.to(run.device) * sae.input_scale
    y = y.to(run.device) * sae.output_scale if y is not None else None
    return x, y


def _apply_schedules(state: RunState) -> None:
    """The learning rate and the sparsity penalty's weight for the step after state.tokens."""
    for group in state.optimizer.param_groups:
        group["lr"] = state.config.lr * lr_factor(state.config, state.tokens)
    if hasattr(state.sae, "sparsity_weight"):
        state.sae.sparsity_weight = sparsity_weight(state.config, state.tokens)


def _losses(run: Run, x: Tensor, y: Tensor | None):
    """(output, {name: 0-d loss}, residual [b, d_out]): the dictionary's losses on x, and
    "aux_loss" (AuxK and/or ghost grads) when some latent is dead."""
    state, cfg, sae, context = run.state, run.state.config, run.state.sae, run.context
    target = y if sae.transcoder else x
    dead = state.tracker.dead_indices(run.device)
    # One process, TopK: the remedies read the dead latents from the encoder's own pass.
    shared_k = shared_pass_k(sae, run.strategies, dead, run.k_aux) if context.shares_encoder_pass else None
    shared = None
    if shared_k is None:
        out = context.forward(sae, x, y)
    else:
        out, shared = sae.forward_with_latents(x, y, dead, shared_k)
    losses = dict(out.losses)
    residual = target - out.x_hat
    if context.any_dead(dead):
        if "auxk" in run.strategies:
            losses["aux_loss"] = cfg.aux_coeff * (auxk_loss(sae, x, residual, dead, run.k_aux, shared=shared)
                                                  if shared is not None else
                                                  context.auxk_loss(sae, x, residual, dead, run.k_aux))
        if "ghost" in run.strategies:
            ghost = (ghost_loss(sae, x, residual, dead, losses["mse"], shared=shared) if shared is not None else
                     context.ghost_loss(sae, x, residual, dead, losses["mse"]))
            losses["aux_loss"] = losses.get("aux_loss", 0) + ghost
    return out, losses, residual


def _update(run: Run, losses: dict) -> None:
    """Backward through the summed losses and one Adam update, with the gradient averaged over
    ranks, the decoder's parallel component removed, clipping, renormalisation and the NaN checks."""
    state, cfg, sae, context = run.state, run.state.config, run.state.sae, run.context
    loss = sum(losses.values())
    context.check_loss(state.step, loss, losses, cfg)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    context.average_gradients(run.params)
    sae.remove_parallel_decoder_grad()
    if cfg.grad_clip_norm is not None:
        context.clip_grad_norm(sae, run.params, cfg.grad_clip_norm)
    state.optimizer.step()
    sae.normalize_decoder()
    guards.check_parameters(state.step, sae, cfg)


def _count(run: Run, out, losses: dict, target: Tensor) -> None:
    """Fire counts into the dead-latent tracker and the metric window; step and tokens advance."""
    state, cfg, context = run.state, run.state.config, run.context
    with torch.no_grad():
        counts = context.sum(state.sae.fire_counts(out.codes)).cpu()
    state.tracker.update(counts, cfg.batch_size)
    state.window_counts += counts
    state.step += 1
    state.tokens += cfg.batch_size
    context.add_to_window(state.window, losses, target, out.x_hat, counts, cfg.batch_size)


# --- after a step --------------------------------------------------------------------------------

def after_step(run: Run, step: Step) -> None:
    """What follows an update: resampling when one is scheduled in this step's tokens, the metric
    line every log_every steps (and at the end), the progress bar, a checkpoint when one is due."""
    state, cfg = run.state, run.state.config
    if "resample" in run.strategies and any(state.tokens - cfg.batch_size < t <= state.tokens
                                            for t in run.resample_schedule):
        _resample(run, step)
    if state.step % cfg.log_every == 0 or state.step == run.total_steps:
        _log(run)
    run.progress.update(1)
    if _checkpoint_due(run):
        write_checkpoint(state, run.context)


def _resample(run: Run, step: Step) -> None:
    """Resample the latents dead now toward this step's high-loss rows (rank 0's draw on every rank)."""
    state = run.state
    dead_now = state.tracker.dead_indices(run.device)
    per_input = step.residual.pow(2).sum(-1)
    resample(state.sae, state.optimizer, dead_now, step.x, per_input, state.generator)
    run.context.broadcast_module(state.sae)  # rank 0's draw (each rank drew from its own rows)
    state.tracker.revive(dead_now)
    state.window.resampled += dead_now.numel()


def _log(run: Run) -> None:
    """The metric line of the window just ended: into the history, the tracker, metrics.jsonl and the progress bar."""
    state, context = run.state, run.context
    record = state.window.summary(state.step, state.tokens, context.whole_tracker(state.tracker),
                                  context.whole(state.window_counts), state.optimizer.param_groups[0]["lr"])
    state.window_counts.zero_()
    state.window = MetricWindow()
    run.history.append(record)
    run.tracking.log(record)
    if run.output_dir is not None:
        append_metrics(run.output_dir, record)
    run.progress.set_postfix(fvu=f"{record['fvu']:.3f}", l0=f"{record['l0']:.1f}", dead=f"{record['dead_frac']:.3f}")


def _checkpoint_due(run: Run) -> bool:
    """True when this step crossed a multiple of checkpoint_every_tokens, or ended the run (with checkpoints on)."""
    cfg, tokens, every = run.state.config, run.state.tokens, run.state.config.checkpoint_every_tokens
    return bool(every) and (tokens // every > (tokens - cfg.batch_size) // every or run.state.step == run.total_steps)


# --- finish --------------------------------------------------------------------------------------

def finish(run: Run) -> TrainResult:
    """Close the progress bar; the final metrics (step, tokens, dead fraction, and the held-out
    mse, fvu, l0, dense and never-fired fractions when there is a held-out split), the density plot,
    the tracker's summary. Returns the TrainResult."""
    run.progress.close()
    state = run.state
    metrics = {"step": state.step, "tokens": state.tokens,
               "dead_frac": float(run.context.whole_tracker(state.tracker).dead_mask().float().mean())}
    if state.eval_x is not None:
        held_out, density = _evaluate_held_out(run)
        metrics.update(held_out)
        if run.output_dir is not None:
            density_plot(density, run.output_dir / DENSITY_PLOT, state.sae,
                         dead_in_training=round(metrics["dead_frac"] * state.sae.n_latents))
    run.tracking.finish(metrics, [run.output_dir / DENSITY_PLOT] if run.output_dir is not None else [])
    record_training(state.sae, state.tokens, state.config.normalize_inputs, metrics)
    return TrainResult(state.sae, metrics, run.history, run.output_dir)


def _evaluate_held_out(run: Run) -> tuple[dict, Tensor]:
    """(mse, fvu, l0, dense_frac, never_fired_frac) on the held-out split, and each latent's firing
    density there [n]. never_fired_frac counts latents silent on these held-out tokens: not the same
    as dead_frac, which counts latents silent over the last dead_window_tokens of training."""
    state, sae, device = run.state, run.state.sae, run.device
    ev = run.context.evaluate(sae, state.eval_x.to(device) * sae.input_scale,
                              state.eval_y.to(device) * sae.output_scale if state.eval_y is not None else None,
                              state.config.batch_size)
    density = ev.pop("fire_counts").double() / state.eval_x.shape[0]
    return {**ev, "dense_frac": float((density > DENSE_THRESHOLD).float().mean()),
            "never_fired_frac": float((density == 0).float().mean())}, density
