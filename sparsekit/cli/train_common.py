"""What both paths of `sparsekit train` share (stored activations in ``train``, a model and a text
dataset in ``train_lm``): the one-line errors, the dictionary's checks and construction, the run's
settings, the training and saving."""
from __future__ import annotations

import dataclasses
import difflib
import re
from pathlib import Path

from sparsekit._util.words import joined

from .parser import quoted

PROG = "sparsekit train"


def architecture_names() -> tuple[str, ...]:
    """Every registered architecture (sparsekit.sae.registry): --architecture's choices."""
    from sparsekit.sae import registry
    return registry.names()


def hyperparameter_flags() -> dict:
    """Dictionary hyperparameter with a flag -> (its spec, the architectures taking it, those requiring it),
    read from the architectures' classes."""
    from sparsekit.sae import registry
    return {name: (spec, *registry.architectures_taking(name))
            for name, spec in registry.hyperparameters().items() if spec.flag}


class UsageError(Exception):
    """Bad input: reported as one line on stderr and exit status 2."""


class TrainingError(Exception):
    """Training itself failed (diverged, out of memory): one line on stderr and exit status 1."""


def check_dictionary(settings: dict) -> None:
    architecture = settings.setdefault("architecture", "topk")
    names = architecture_names()
    if architecture not in names:
        close = difflib.get_close_matches(architecture, names, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UsageError(f"unknown architecture {quoted(architecture)}{hint}; choose one of {', '.join(names)}")
    if "n_latents" not in settings:
        raise UsageError("--n-latents is required: the number of latents in the dictionary (e.g. --n-latents 4096)")
    if settings["n_latents"] < 1:
        raise UsageError(f"--n-latents must be a positive int, got {settings['n_latents']}")
    for name, (_, architectures, requiring) in hyperparameter_flags().items():
        flag = "--" + name.replace("_", "-")
        if architecture in requiring and name not in settings:
            raise UsageError(f"{flag} is required for a {architecture} dictionary")
        if architecture not in architectures and name in settings:
            raise UsageError(f"{flag} applies to {joined(architectures)} dictionaries, not {architecture}")
    if "k" in settings:
        if settings["k"] < 1:
            raise UsageError(f"--k must be a positive int, got {settings['k']}")
        if settings["k"] > settings["n_latents"]:
            raise UsageError(f"--k {settings['k']} exceeds --n-latents {settings['n_latents']}: a {architecture} "
                             f"dictionary keeps k of its n_latents latents")


DEVICE_FORM = re.compile(r"(auto|cpu|cuda)(:[0-9]{1,18})?")


def choose_device(name: str):
    """--device's torch.device, refused up front (UsageError naming the flag) unless this machine can
    train on it: auto, cpu, or cuda / cuda:N with CUDA available and N below its device count. Other
    torch device types (meta holds no data, mps, xla, ...) are not ones sparsekit trains on."""
    import torch

    shown = name if isinstance(name, str) and len(name) <= 40 and name.isprintable() else quoted(name, 40)
    form = DEVICE_FORM.fullmatch(name.strip()) if isinstance(name, str) else None
    if form is None:  # meta (holds no data), mps, xla, ...: torch knows them, sparsekit does not train there
        raise UsageError(f"--device {quoted(name, 40)} is not a device; use auto, cpu, cuda or cuda:N")
    kind, index = form.group(1), int(form.group(2)[1:]) if form.group(2) else None
    if kind == "auto":
        if index is not None:
            raise UsageError(f"--device {shown}: auto takes no index; use auto, cpu, cuda or cuda:N")
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cpu":
        if index not in (None, 0):
            raise UsageError(f"--device {shown}: there is one CPU device; use --device cpu")
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UsageError(f"--device {shown}: CUDA is not available on this machine; use --device cpu")
    count = torch.cuda.device_count()
    if index is not None and index >= count:
        raise UsageError(f"--device {shown}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return torch.device("cuda", index) if index is not None else torch.device("cuda")


def newest_checkpoint(directory) -> Path | None:
    from sparsekit.training import checkpoint as ckpt

    found = ckpt.complete_checkpoints(directory)
    return found[-1] if found else None


def check_resume(path: Path, sae, cfg) -> None:
    """The checkpoint a resume will start from (the newest valid one at or below ``path``, as the
    trainer picks it) must come from the same dictionary and batching as this run."""
    from sparsekit.training import checkpoint as ckpt

    for candidate in reversed(ckpt.complete_checkpoints(path.parent)):
        if candidate.name > path.name:
            continue
        try:
            state = ckpt.verify(candidate)
            saved_sae, saved_cfg = dict(state["sae_config"]), dict(state["config"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # invalid: the trainer skips it (and says so), or stops if none is valid
        path = candidate
        break
    else:
        return
    now = sae.config()
    differences = [f"{key}={saved_sae.get(key)!r} (this run: {now.get(key)!r})"
                   for key in sorted(set(saved_sae) | set(now))
                   if key not in ("input_scale", "output_scale") and saved_sae.get(key) != now.get(key)]
    differences += [f"{key}={saved_cfg.get(key)!r} (this run: {getattr(cfg, key)!r})"
                    for key in ("batch_size", "seed") if key in saved_cfg and saved_cfg[key] != getattr(cfg, key)]
    if differences:
        raise UsageError(f"--resume: checkpoint {path} was written by a different run: {', '.join(differences)}; "
                         f"use the same data and settings, or a fresh --checkpoint-dir")


def build_dictionary(settings: dict, d_in: int, d_out: int | None, device, seed: int):
    from sparsekit.sae import registry

    architecture = settings["architecture"]
    kwargs = {name: settings[name] for name in hyperparameter_flags() if name in settings}
    common = dict(device=device, seed=seed)
    if d_out is not None:
        common.update(d_out=d_out, transcoder=True, skip=bool(settings.get("skip")))
    return registry.get(architecture)(d_in, settings["n_latents"], **kwargs, **common)


def check_memory(settings: dict, cfg, d_in: int, d_out: int | None, device) -> None:
    """Refuse, before the dictionary is allocated, a run whose estimated memory exceeds what the device has."""
    from sparsekit.errors import InsufficientMemory
    from sparsekit.training.memory import check_fits, estimate_training_memory

    estimate = estimate_training_memory(d_in, settings["n_latents"], cfg.batch_size, settings.get("k"),
                                        settings["architecture"], d_out, eval_tokens=cfg.eval_tokens,
                                        skip=bool(settings.get("skip")), device=device)
    try:
        check_fits(estimate, device, what=f"--n-latents {settings['n_latents']} with --batch-size {cfg.batch_size}")
    except InsufficientMemory as error:
        raise UsageError(str(error)) from None


def prepare(settings: dict):
    """The checks both paths share -> (TrainConfig, out folder, resume, newest checkpoint or None, device)."""
    from sparsekit.training.config import TrainConfig

    check_dictionary(settings)
    if settings.get("latent_parallel", 1) < 1:
        raise UsageError(f"--latent-parallel must be a positive int, got {settings['latent_parallel']}")

    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {name: value for name, value in settings.items() if name in train_fields}
    if not any(values.get(name) for name in ("checkpoint_dir", "output_dir")) and "out" not in settings:
        raise UsageError("nowhere to save the dictionary: pass --out DIR, --checkpoint-dir DIR or --output-dir DIR")
    resume = settings.get("resume", False)
    if resume and not values.get("checkpoint_dir"):
        raise UsageError("--resume needs --checkpoint-dir: the folder whose newest checkpoint to continue from")
    if values.get("output_dir") is None and values.get("checkpoint_dir") is None:
        values["output_dir"] = settings["out"]  # metrics.jsonl and the density plot beside the dictionary
    cfg = TrainConfig(**values)
    try:
        cfg.validate()
    except ValueError as error:
        raise UsageError(str(error)) from None
    if cfg.checkpoint_dir is not None and cfg.checkpoint_every_tokens is None:
        cfg.checkpoint_every_tokens = max(cfg.batch_size, cfg.total_tokens // 10)
    out = Path(settings.get("out") or Path(cfg.checkpoint_dir or cfg.output_dir) / "final")
    for flag, folder in (("--out", out), ("--checkpoint-dir", cfg.checkpoint_dir), ("--output-dir", cfg.output_dir)):
        if folder is not None and Path(folder).exists() and not Path(folder).is_dir():
            raise UsageError(f"{flag} {folder} is a file, not a folder")

    newest = newest_checkpoint(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    if newest is not None and not resume:
        raise UsageError(f"--checkpoint-dir {cfg.checkpoint_dir} already holds checkpoints (newest {newest.name}) "
                         f"from an earlier run: pass --resume to continue it, or choose another folder")
    device = choose_device(settings.get("device", "auto"))
    return cfg, out, resume, newest, device


def make_dictionary(settings: dict, cfg, d_in: int, d_out: int | None, device, newest, resume: bool):
    """The memory check, the dictionary (sharded under --latent-parallel), the resume check."""
    check_memory(settings, cfg, d_in, d_out, device)
    try:
        sae = build_dictionary(settings, d_in, d_out, device, cfg.seed)
        if settings.get("latent_parallel", 1) != 1:
            from sparsekit.training.parallel.sharded import shard_for_cli
            sae = shard_for_cli(sae, settings["latent_parallel"])
    except ValueError as error:
        raise UsageError(str(error)) from None
    if newest is not None:
        check_resume(newest, sae, cfg)
    elif resume:
        say(f"{PROG}: --resume: no checkpoint in {cfg.checkpoint_dir} yet; starting fresh")
    return sae


def train_and_save(sae, source, cfg, resume: bool, out: Path, quiet: bool = False):
    from sparsekit.errors import CheckpointDirBusy, CheckpointWriteFailed, InsufficientMemory, TrainingDiverged
    from sparsekit.training.loop import train
    from sparsekit.training.metrics import METRICS_FILE
    from sparsekit.training.parallel import ranks

    try:
        result = train(sae, source, cfg, resume=resume)
        whole = sae.gather() if getattr(sae, "latent_sharded", False) else sae
        if ranks.speaks():  # under torchrun rank 0 alone writes (and says so)
            whole.save(out)
    except (CheckpointWriteFailed, TrainingDiverged) as error:
        raise TrainingError(one_line(error)) from None
    except (ValueError, OSError, CheckpointDirBusy, InsufficientMemory) as error:
        raise UsageError(one_line(error)) from None
    except RuntimeError as error:  # e.g. out of memory: one line, not a traceback
        raise TrainingError(f"training failed: {type(error).__name__}: {one_line(error)}") from None
    metrics, history = dict(result.metrics), result.history
    where = "held-out"
    if "fvu" not in metrics and history:  # no held-out split: the last logged training window
        metrics.update(fvu=history[-1]["fvu"], l0=history[-1]["l0"])
        where = "training"
    formats = {"fvu": ".4f", "l0": ".2f", "dead_frac": ".3f"}
    parts = [f"{name} {metrics[name]:{spec}}" for name, spec in formats.items() if name in metrics]
    metrics_at = f"{result.output_dir / METRICS_FILE}" if result.output_dir is not None else "not written"
    if not quiet:
        say(f"{PROG}: dictionary saved to {out}; metrics in {metrics_at}; final {where} {', '.join(parts)} "
            f"after {metrics['step']:,} steps ({metrics['tokens']:,} tokens)")
    return result, out


def say(line: str, stream=None) -> None:
    """Print a line about the whole run (to stream, default stdout): under torchrun from rank 0 alone,
    once for the run."""
    from sparsekit.training.parallel import ranks

    if ranks.speaks():
        print(line, file=stream, flush=True)


def failure_line(error: BaseException) -> str:
    """The one stderr line for an error that stops the command: under torchrun it names the failing rank
    ("sparsekit train: rank 1 of 2: ..."), since every rank that fails prints its own."""
    from sparsekit.training.parallel import ranks

    text, prefix = str(error), ranks.rank_prefix()
    return f"{PROG}: {text if text.startswith(prefix) else prefix + text}"


def one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
