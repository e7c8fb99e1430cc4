"""Training checkpoints: crash-safe, verifiable, exact.

A checkpoint is a folder ``step_<step:09d>`` holding ``state.safetensors`` (every tensor: the
dictionary's parameters and buffers, the optimizer's moments, the dead-latent counters, the
held-out split, rows carried between batches) and ``state.json`` (everything else, with the
SHA-256 of the tensor file). It is written under a temporary name, each file fsynced, then the
folder is renamed: a run killed at any moment leaves either the old checkpoints or the new one,
never half of one. ``latest`` returns the newest checkpoint whose checksum matches.

A checkpoint holding NaN or Inf is never written (TrainingDiverged); a failed write (a full
disk) removes its temporary folder and raises CheckpointWriteFailed, leaving the checkpoints
already written untouched. Old checkpoints are renamed away before they are deleted, so a kill
during the deletion cannot leave half of one under a checkpoint's name.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sparsekit._util.atomic import fsync_path
from sparsekit._util.log import logger
from sparsekit.errors import CheckpointWriteFailed, TrainingDiverged
from sparsekit.ops import checks

STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
PREFIX = "step_"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write(directory, step: int, tensors: dict, state: dict, keep: int = 2) -> Path:
    """Write checkpoint ``step`` into directory atomically; keep the newest ``keep`` checkpoints."""
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not checks.all_finite(t.detach().contiguous())]
    if bad:
        raise TrainingDiverged(f"step {step}: refusing to write a checkpoint holding NaN or Inf (in {', '.join(bad)}); "
                               f"the earlier checkpoints in {directory} are kept: resume from the newest with a lower "
                               f"TrainConfig.lr", step)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{PREFIX}{step:09d}"
    tmp = directory / f".{final.name}.tmp-{os.getpid()}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        save_file({name: t.detach().contiguous().cpu() for name, t in tensors.items()}, str(tmp / STATE_TENSORS))
        state = {**state, "step": step, "tensors_sha256": _sha256(tmp / STATE_TENSORS)}
        (tmp / STATE_JSON).write_text(json.dumps(state, indent=1))
        for name in (STATE_TENSORS, STATE_JSON):
            fsync_path(tmp / name)
        fsync_path(tmp)
        if final.exists():  # the same step written again (e.g. after a resume): replace it
            _remove(final)
        os.replace(tmp, final)
        fsync_path(directory)
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = complete_checkpoints(directory)
        raise CheckpointWriteFailed(error.errno, f"could not write checkpoint {final.name} in {directory}: "
                                    f"{error.strerror or error}; nothing already written was touched (newest "
                                    f"checkpoint: {kept[-1].name if kept else 'none'}): free space and resume "
                                    f"with resume=True") from error
    for old in sorted(complete_checkpoints(directory))[:-keep]:
        _remove(old)
    return final


def _remove(path: Path) -> None:
    """Rename a checkpoint out of the step_* namespace, then delete it."""
    trash = path.with_name(f".{path.name}.trash-{os.getpid()}")
    try:
        os.replace(path, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def remove_stale_temporaries(directory) -> None:
    """Delete half-written (.step_*.tmp-*) and half-deleted (.step_*.trash-*) folders: only for a
    caller that holds the folder's lock, for whom they can only be a dead run's leftovers."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for path in directory.iterdir():
        if path.name.startswith("." + PREFIX) and (".tmp-" in path.name or ".trash-" in path.name):
            shutil.rmtree(path, ignore_errors=True)


def complete_checkpoints(directory) -> list[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir()
                  if p.is_dir() and p.name.startswith(PREFIX) and (p / STATE_JSON).is_file())


def read(path) -> tuple[dict, dict]:
    """(tensors, state) of one checkpoint folder; ValueError if it is corrupt."""
    path = Path(path)
    try:
        state = json.loads((path / STATE_JSON).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path / STATE_JSON} is unreadable: {error}") from None
    tensor_file = path / STATE_TENSORS
    if not tensor_file.is_file() or _sha256(tensor_file) != state.get("tensors_sha256"):
        raise ValueError(f"{tensor_file} is missing or does not match its checksum")
    # Fresh, aligned copies: tensors read from the file can sit at any offset, and vectorised
    # kernels (the fused Adam step) round differently on misaligned memory, which would break
    # bit-identical resume.
    return {name: t.clone() for name, t in load_file(str(tensor_file)).items()}, state


def latest(directory) -> tuple[Path, dict, dict] | None:
    """The newest readable checkpoint in directory as (path, tensors, state), or None.

    A corrupt newest checkpoint is reported and skipped in favour of the one before it.
    """
    for path in reversed(complete_checkpoints(directory)):
        try:
            tensors, state = read(path)
        except ValueError as error:
            logger.warning("skipping corrupt checkpoint: %s", error)
            continue
        return path, tensors, state
    return None


def generator_state(generator: torch.Generator) -> list[int]:
    return generator.get_state().tolist()


def set_generator_state(generator: torch.Generator, state: list[int]) -> None:
    generator.set_state(torch.tensor(state, dtype=torch.uint8))
