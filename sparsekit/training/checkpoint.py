"""Training checkpoints: crash-safe, verifiable, exact.

A checkpoint is a folder ``step_<step:09d>`` holding ``state.safetensors`` (every tensor: the
dictionary's parameters and buffers, the optimizer's moments, the dead-latent counters, the
held-out split, rows carried between batches) and ``state.json`` (everything else: the fields
``STATE_SCHEMA`` lists, with the SHA-256 of the tensor file and the SHA-256 of its own fields). It is
written under a temporary name, each file fsynced, then the folder is renamed: a run killed at any
moment leaves either the old checkpoints or the new one, never half of one.

``latest`` returns the newest valid checkpoint: both checksums match and state.json holds every
field with its type (``STATE_SCHEMA``). An invalid one is skipped for the one before it with a
warning naming its file and the reason; when checkpoints exist but none is valid, it raises
NoValidCheckpoint rather than let the run start over. The checksums find damage and edits; they do
not stop someone who recomputes them (that would need a secret key).

A checkpoint holding NaN or Inf is never written (TrainingDiverged); any failure while writing (a
full disk, whether reported as OSError or as safetensors' SafetensorError) removes the temporary
folder and raises CheckpointWriteFailed, leaving the checkpoints already written untouched. After a
write, only checkpoints older than the ``keep``-th newest valid one at or below the step just written
are deleted: an invalid one never counts as kept, and nothing above the step just written is touched.
Old checkpoints are renamed away before they are deleted, so a kill during the deletion cannot leave
half of one under a checkpoint's name. Symbolic links inside the checkpoint folder are refused
(SymlinkRefused), never followed.

Each state.json also records the CPU paths the run chose (``cpu_paths``: the crossovers of
``sparsekit.ops.cpu.tuning`` in effect, their source and the C++ kernels' ISA level), because
different paths sum in different orders. ``latest`` pins them for the rest of the process, so a
resumed run takes the paths its first steps took, bit-identical even when `sparsekit tune` changed
this machine's cache in between (a checkpoint without the field was written when the defaults were
all there was: those are pinned).
"""
from __future__ import annotations

import errno as errnos
import hashlib
import json
import math
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sparsekit._util.atomic import (
    SymlinkRefused,
    fsync_path,
    read_file_nofollow,
    refuse_symlinks,
    symlink_refused,
    write_new_file,
)
from sparsekit._util.bounded import parse_json
from sparsekit._util.log import logger
from sparsekit.errors import CheckpointWriteFailed, NoValidCheckpoint, TrainingDiverged
from sparsekit.ops import checks
from sparsekit.ops.cpu import tuning

STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
PREFIX = "step_"
FORMAT = 2               # state.json's "format": 2 added the self-checksum and the schema
STATE_JSON_LIMIT = 64 << 20  # bytes: a state.json is tens of kB; a bigger one is refused before it is read
GENERATOR_BYTES = torch.Generator().get_state().numel()


# --- state.json's schema ---------------------------------------------------------------------------
# Each check returns None when the value is acceptable, else what it should have been.

def _count(value):
    return None if type(value) is int and value >= 0 else "a non-negative int"


def _number(value):
    return None if type(value) in (int, float) and math.isfinite(value) else "a finite number"


def _scale(value):
    return None if type(value) in (int, float) and math.isfinite(value) and value > 0 else "a positive finite number"


def _sha(value):
    return None if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) else "a SHA-256 (64 hex digits)"


def _mapping(value):
    return None if isinstance(value, dict) else "an object"


def _config(value):
    if not isinstance(value, dict):
        return "an object"
    return None if type(value.get("batch_size")) is int and value["batch_size"] > 0 else \
        "an object with a positive int batch_size"


def _source_state(value):
    return None if isinstance(value, dict) and isinstance(value.get("kind"), str) else "an object with a string kind"


def _generator(value):
    ok = (isinstance(value, list) and len(value) == GENERATOR_BYTES
          and all(type(b) is int and 0 <= b < 256 for b in value))
    return None if ok else f"a list of {GENERATOR_BYTES} bytes (ints 0-255)"


def _groups(value):
    ok = (isinstance(value, list) and value and all(isinstance(g, dict) and _number(g.get("lr")) is None for g in value))
    return None if ok else "a non-empty list of objects, each with a finite lr"


def _log_window(value):
    if not isinstance(value, dict):
        return "an object"
    checks_ = {"steps": _count, "rows": _count, "resampled": _count, "sq_err": _number, "variance": _number,
               "active": _number, "sums": _mapping}
    for key, check in checks_.items():
        if key not in value:
            return f"an object with {key}"
        if check(value[key]) is not None:
            return f"an object whose {key} is {check(value[key])}"
    if not all(_number(v) is None for v in value["sums"].values()):
        return "an object whose sums are finite numbers"
    return None


def _cpu_paths(value):
    def in_range(name, v):  # a knob this version knows within its range; any other name: any int >= 0
        knob = tuning.KNOBS.get(name)
        return type(v) is int and (knob.low <= v <= knob.high if knob else v >= 0)
    ok = (isinstance(value, dict) and isinstance(value.get("values"), dict)
          and all(isinstance(k, str) and in_range(k, v) for k, v in value["values"].items())
          and isinstance(value.get("source"), str) and (value.get("isa") is None or isinstance(value["isa"], str))
          and isinstance(value.get("forced", {}), dict)
          and all(isinstance(k, str) and isinstance(v, str) for k, v in value.get("forced", {}).items()))
    return None if ok else ("an object with values (each knob's name to an int in its range), a string source and "
                            "isa, and forced (names to strings)")


STATE_SCHEMA = {  # state.json: field -> its check (RunState.checkpoint_json writes all but the last four)
    "tokens": _count, "config": _config, "sae_config": _mapping, "input_scale": _scale, "output_scale": _scale,
    "source_state": _source_state, "generator": _generator, "optimizer_groups": _groups, "log_window": _log_window,
    "step": _count, "tensors_sha256": _sha, "format": lambda v: None if v == FORMAT else f"{FORMAT}",
    "state_sha256": _sha,
}
OPTIONAL_SCHEMA = {"cpu_paths": _cpu_paths}  # added by ``write`` since the tuning cache; absent in older checkpoints
REQUIRED_TENSORS = ("tokens_since_fired", "window_counts")


def state_digest(state: dict) -> str:
    """SHA-256 of state.json's fields but state_sha256, as canonical JSON (sorted keys, no spaces)."""
    body = {k: v for k, v in state.items() if k != "state_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def check_state(state, where) -> None:
    """ValueError naming `where` (a state.json) and the first field that is missing, of the wrong
    type or inconsistent: every STATE_SCHEMA field, an OPTIONAL_SCHEMA field when present,
    tokens = step * batch_size, and the self-checksum state_sha256."""
    if not isinstance(state, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(state).__name__}")
    for key, check in STATE_SCHEMA.items():
        if key not in state:
            hint = " (written before sparsekit checksummed state.json: start that run over)" if key == "format" else ""
            raise ValueError(f"{where}: missing field {key!r}{hint}")
        expected = check(state[key])
        if expected is not None:
            raise ValueError(f"{where}: field {key!r} must be {expected}, got {_short(state[key])}")
    for key, check in OPTIONAL_SCHEMA.items():
        expected = check(state[key]) if key in state else None
        if expected is not None:
            raise ValueError(f"{where}: field {key!r} must be {expected}, got {_short(state[key])}")
    if state["tokens"] != state["step"] * state["config"]["batch_size"]:
        raise ValueError(f"{where}: tokens={state['tokens']} is not step={state['step']} times "
                         f"batch_size={state['config']['batch_size']}")
    if state_digest(state) != state["state_sha256"]:
        raise ValueError(f"{where}: its fields do not match their checksum state_sha256 (edited or damaged)")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def step_of(path: Path) -> int | None:
    """The step a checkpoint folder's name gives (step_000000012 -> 12), or None for another name."""
    match = re.fullmatch(PREFIX + r"(\d{9,})", Path(path).name)
    return int(match.group(1)) if match else None


# --- writing ---------------------------------------------------------------------------------------

def write(directory, step: int, tensors: dict, state: dict, keep: int = 2) -> Path:
    """Write checkpoint ``step`` into directory atomically; keep the newest ``keep`` valid checkpoints
    at or below ``step``. state: RunState.checkpoint_json()'s fields (see STATE_SCHEMA).
    Raises TrainingDiverged (non-finite tensors), SymlinkRefused (a link in directory),
    CheckpointWriteFailed (any failure while writing; nothing already written is touched)."""
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not checks.all_finite(t.detach().contiguous())]
    if bad:
        raise TrainingDiverged(f"step {step}: refusing to write a checkpoint holding NaN or Inf (in {', '.join(bad)}); "
                               f"the earlier checkpoints in {directory} are kept: resume from the newest with a lower "
                               f"TrainConfig.lr", step)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    refuse_symlinks(directory)
    final = directory / f"{PREFIX}{step:09d}"
    tmp = directory / f".{final.name}.tmp-{os.getpid()}"
    created = False
    try:
        if os.path.lexists(tmp):  # a dead process with our pid left it (refuse_symlinks: no link)
            shutil.rmtree(tmp)
        tmp.mkdir(mode=0o700)  # only we can add entries to it
        created = True
        save_file({name: t.detach().contiguous().cpu() for name, t in tensors.items()}, str(tmp / STATE_TENSORS))
        state = json.loads(json.dumps({**state, "step": step, "tensors_sha256": _sha256(tmp / STATE_TENSORS),
                                       "format": FORMAT, "cpu_paths": tuning.record()}))  # as it is read back
        state["state_sha256"] = state_digest(state)
        check_state(state, f"checkpoint {final.name}'s state.json")
        write_new_file(tmp / STATE_JSON, json.dumps(state, indent=1).encode())
        for name in (STATE_TENSORS, STATE_JSON):
            fsync_path(tmp / name)
        fsync_path(tmp)
        if os.path.lexists(final):  # the same step written again (e.g. after a resume): replace it
            if os.path.islink(final):
                raise symlink_refused(final, directory)
            _remove(final)
        os.replace(tmp, final)
        fsync_path(directory)
    except (SymlinkRefused, ValueError):
        if created:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as error:  # OSError, safetensors' SafetensorError, anything else: one named error
        if created:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _write_failed(error, final, directory) from error
    except BaseException:  # KeyboardInterrupt and the like: no half-written folder, then on its way
        if created:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _verified[str(final)] = _fingerprint(final)
    _prune(directory, keep, step)
    return final


def _errno_of(error: BaseException) -> int | None:
    """The errno behind a write failure: an OSError's, or the "(os error N)" safetensors puts in its message."""
    if isinstance(error, OSError) and error.errno is not None:
        return error.errno
    match = re.search(r"os error (\d+)", str(error))
    if match:
        return int(match.group(1))
    return errnos.ENOSPC if "No space left on device" in str(error) else None


def _write_failed(error: Exception, final: Path, directory: Path) -> CheckpointWriteFailed:
    code = _errno_of(error)
    detail = " ".join(str(error).split()) or type(error).__name__
    cause = f"{os.strerror(code)} ({type(error).__name__}: {detail})" if code is not None else \
        f"{type(error).__name__}: {detail}"
    try:
        kept = [p for p in checkpoint_folders(directory) if p != final]
    except OSError:
        kept = []
    advice = "free space and resume with resume=True" if code in (errnos.ENOSPC, errnos.EDQUOT) else \
        "fix the cause and resume with resume=True"
    return CheckpointWriteFailed(code, f"could not write checkpoint {final.name} in {directory}: {cause}; nothing "
                                       f"already written was touched (newest checkpoint: "
                                       f"{kept[-1].name if kept else 'none'}): {advice}")


def _remove(path: Path) -> None:
    """Rename a checkpoint out of the step_* namespace, then delete it."""
    trash = path.with_name(f".{path.name}.trash-{os.getpid()}")
    try:
        os.replace(path, trash)
    except OSError:
        return
    _verified.pop(str(path), None)
    shutil.rmtree(trash, ignore_errors=True)


def _prune(directory: Path, keep: int, step: int) -> None:
    """Delete the checkpoints older than the keep-th newest valid one at or below `step` (the one just
    written). Invalid checkpoints never count as kept; none above `step` is touched."""
    mine = [p for p in checkpoint_folders(directory) if step_of(p) <= step]
    valid = 0
    for index in range(len(mine) - 1, -1, -1):
        valid += _is_valid(mine[index])
        if valid == keep:
            for old in mine[:index]:
                _remove(old)
            return


# Checkpoints found valid, by path: the (inode, size, mtime) of both files when they were. Clean-up
# consults it so that it does not hash again what this process wrote or read; loading always does.
_verified: dict[str, tuple] = {}


def _fingerprint(path: Path) -> tuple | None:
    try:
        return tuple((s.st_ino, s.st_size, s.st_mtime_ns) for s in (os.stat(path / STATE_JSON, follow_symlinks=False),
                                                                     os.stat(path / STATE_TENSORS, follow_symlinks=False)))
    except OSError:
        return None


def _is_valid(path: Path) -> bool:
    fingerprint = _fingerprint(path)
    if fingerprint is not None and _verified.get(str(path)) == fingerprint:
        return True
    try:
        verify(path)
    except (ValueError, OSError):
        return False
    return True


# --- finding and reading ---------------------------------------------------------------------------

def remove_stale_temporaries(directory) -> None:
    """Delete half-written (.step_*.tmp-*) and half-deleted (.step_*.trash-*) folders: only for a
    caller that holds the folder's lock, for whom they can only be a dead run's leftovers. Refuses
    (SymlinkRefused) a folder holding a symbolic link first, so a run never starts on one."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    refuse_symlinks(directory)
    for path in directory.iterdir():
        if path.name.startswith("." + PREFIX) and (".tmp-" in path.name or ".trash-" in path.name):
            shutil.rmtree(path, ignore_errors=True)


def complete_checkpoints(directory) -> list[Path]:
    """The checkpoint folders that hold a state.json, oldest first (valid or not: see ``latest``)."""
    return [p for p in checkpoint_folders(directory) if (p / STATE_JSON).is_file()]


def checkpoint_folders(directory) -> list[Path]:
    """Every step_<step> entry in directory, oldest first, whatever it holds."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.iterdir() if step_of(p) is not None), key=step_of)


def verify(path) -> dict:
    """state.json of checkpoint folder `path` once it is checked (``check_state``: schema, the
    step its name gives, both checksums, the tensor file present); ValueError naming the file and
    the reason if not, SymlinkRefused for a link. No tensor is loaded."""
    path = Path(path)
    if os.path.islink(path):
        raise symlink_refused(path, path.parent)
    state_file, tensor_file = path / STATE_JSON, path / STATE_TENSORS
    try:
        text = read_file_nofollow(state_file, STATE_JSON_LIMIT)
    except FileNotFoundError:
        raise ValueError(f"{state_file} is missing") from None
    except OSError as error:
        raise ValueError(f"{state_file} is unreadable: {error.strerror or error}") from None
    state = parse_json(text, state_file)  # RefusedFile (a ValueError) for text that is not JSON or nests too deep
    check_state(state, state_file)
    if state["step"] != step_of(path):
        raise ValueError(f"{state_file}: step={state['step']} but the folder is {path.name}")
    if os.path.islink(tensor_file):
        raise symlink_refused(tensor_file, path.parent)
    if not tensor_file.is_file() or _sha256(tensor_file) != state["tensors_sha256"]:
        raise ValueError(f"{tensor_file} is missing or does not match its checksum")
    return state


def read(path) -> tuple[dict, dict]:
    """(tensors, state) of one checkpoint folder; ValueError naming the file and the reason if it is
    not valid (see ``verify``)."""
    path = Path(path)
    state = verify(path)
    # Fresh, aligned copies: tensors read from the file can sit at any offset, and vectorised
    # kernels (the fused Adam step) round differently on misaligned memory, which would break
    # bit-identical resume.
    try:
        tensors = {name: t.clone() for name, t in load_file(str(path / STATE_TENSORS)).items()}
    except Exception as error:  # the file changed since verify hashed it, or safetensors refuses it
        raise ValueError(f"{path / STATE_TENSORS} is not a readable safetensors file: {_short(str(error))}") from None
    missing = [name for name in REQUIRED_TENSORS if name not in tensors]
    if missing:
        raise ValueError(f"{path / STATE_TENSORS} lacks {', '.join(missing)}")
    _verified[str(path)] = _fingerprint(path)
    return tensors, state


def latest(directory) -> tuple[Path, dict, dict] | None:
    """The newest valid checkpoint in directory as (path, tensors, state), or None when it holds none.
    The CPU paths it recorded are pinned for this process (``reuse_cpu_paths``): the resume this
    is for then sums as the run did before it stopped.

    An invalid checkpoint is skipped for the one before it, with a warning naming its file and the
    reason. Checkpoints present but none valid: NoValidCheckpoint (resuming would silently start
    over). A symbolic link in the folder: SymlinkRefused.
    """
    directory = Path(directory)
    refuse_symlinks(directory)
    folders = checkpoint_folders(directory)
    reasons = []
    for path in reversed(folders):
        try:
            tensors, state = read(path)
        except SymlinkRefused:
            raise
        except ValueError as error:
            logger.warning("skipping invalid checkpoint, falling back to the one before: %s", error)
            reasons.append(str(error))
            continue
        reuse_cpu_paths(path, state)
        return path, tensors, state
    if folders:
        raise NoValidCheckpoint(
            f"cannot resume: none of the {len(folders)} checkpoint(s) in {directory} is valid ({'; '.join(reasons)}); "
            f"to start over, move or delete the step_* folders there (or choose another checkpoint_dir) and run "
            f"without resume")
    return None


def reuse_cpu_paths(path: Path, state: dict) -> None:
    """Pin the CPU crossovers checkpoint ``path`` recorded (its state.json ``state``; none recorded:
    the defaults) for the rest of this process (``tuning.unpin`` undoes it), saying so when they
    differ from what this machine would choose; warn when SPARSEKIT_CPU_GEMM / SPARSEKIT_BF16_SCREEN
    or the C++ kernels' ISA level differ (the environment's choices, and the level cannot change in a
    running process: the last bits may then differ)."""
    recorded = state.get("cpu_paths") or {}
    tuning.unpin()
    own = tuning.in_effect()  # what this machine would choose: its cache's values, else the defaults
    values = tuning.pin(recorded.get("values"), f"checkpoint {path.name}")
    if own != values:
        changed = ", ".join(f"{name} {values[name]} (here {own[name]})" for name in values if values[name] != own[name])
        logger.info("resuming with the CPU crossovers checkpoint %s recorded, not this machine's: %s", path.name,
                    changed)
    if "forced" in recorded and recorded["forced"] != tuning.forced():
        logger.warning("checkpoint %s was written with %s, this process has %s: the resumed run may take other CPU "
                       "paths than its first steps, and its last bits may differ from an uninterrupted one",
                       path.name, _settings(recorded["forced"]), _settings(tuning.forced()))
    from sparsekit.ops.backend import CPP_ISA
    if "isa" in recorded and recorded["isa"] != CPP_ISA:
        logger.warning("checkpoint %s was written by the %s C++ kernels, this process runs %s: the resumed run's "
                       "last bits may differ from an uninterrupted one (SPARSEKIT_ISA=%s reproduces them)",
                       path.name, recorded["isa"], CPP_ISA, recorded["isa"])


def _settings(variables: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(variables.items())) or "no SPARSEKIT_CPU_GEMM or SPARSEKIT_BF16_SCREEN"


def generator_state(generator: torch.Generator) -> list[int]:
    return generator.get_state().tolist()


def set_generator_state(generator: torch.Generator, state: list[int]) -> None:
    generator.set_state(torch.tensor(state, dtype=torch.uint8))
