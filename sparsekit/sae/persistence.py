"""Save and load dictionaries: safetensors weights + cfg.json, never pickle.

Files are written to a temporary name, fsynced and renamed, so a crash never leaves a half-written
dictionary under the real name.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from sparsekit._util.atomic import atomic_save_tensors, atomic_write_bytes
from sparsekit._util.validate import is_number

from . import registry
from .files import CONFIG_FILE, WEIGHTS_FILE, read_json_object

RUNTIME_KEYS = ("architecture", "input_scale", "output_scale")


def save_dictionary(sae, directory) -> Path:
    """Write a SparseDictionary's weights and cfg.json (``sae.config()``) into directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(dict(sae.state_dict()), directory / WEIGHTS_FILE)
    atomic_write_bytes(directory / CONFIG_FILE, (json.dumps(sae.config(), indent=2) + "\n").encode())
    return directory


def load(directory, device=None):
    """Rebuild a dictionary saved by ``sae.save(directory)``, in eval mode. Errors name the file
    and field."""
    if not isinstance(directory, (str, os.PathLike)):
        raise ValueError(f"directory must be a path (str or os.PathLike), got {directory!r}")
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory: expected one written by sae.save()")
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: is {directory} a directory written by sae.save()?")
    config = read_json_object(config_path)
    sae = _build(config, config_path, device)
    state = _read_weights(weights_path, device)
    expected = dict(sae.state_dict())
    missing, unexpected = set(expected) - set(state), set(state) - set(expected)
    if missing or unexpected:
        raise ValueError(f"{weights_path}: tensors do not match {sae.architecture!r}: missing {sorted(missing)}, "
                         f"unexpected {sorted(unexpected)}")
    for name in expected:  # in parameter order: W_enc first
        tensor = state[name]
        if tensor.shape != expected[name].shape:
            raise ValueError(f"{weights_path}: {name} has shape {tuple(tensor.shape)}, cfg.json implies "
                             f"{tuple(expected[name].shape)}")
        if tensor.dtype != expected[name].dtype:
            raise ValueError(f"{weights_path}: {name} is {tensor.dtype}, cfg.json's dtype implies {expected[name].dtype}")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{weights_path}: {name} holds non-finite values (NaN or inf)")
    sae.load_state_dict(state)
    return sae.eval()


def _build(config: dict, config_path: Path, device):
    """An untrained dictionary of cfg.json's architecture and fields; every field is checked."""
    architecture = config.get("architecture")
    if not isinstance(architecture, str) or architecture not in registry.ARCHITECTURES:
        raise ValueError(f"{config_path}: architecture must be one of {', '.join(sorted(registry.ARCHITECTURES))}, "
                         f"got {architecture!r}")
    cls = registry.get(architecture)
    kwargs = {key: value for key, value in config.items() if key not in RUNTIME_KEYS}
    dtype_name = kwargs.pop("dtype", "float32")
    dtype = getattr(torch, dtype_name, None) if isinstance(dtype_name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{config_path}: dtype {dtype_name!r} is not a torch dtype")
    try:
        sae = cls(dtype=dtype, device=device, seed=None, **kwargs)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{config_path}: fields do not fit architecture {architecture!r}: {error}") from None
    for key in ("input_scale", "output_scale"):
        value = config.get(key, 1.0)
        if not is_number(value) or not (math.isfinite(value) and value > 0):
            raise ValueError(f"{config_path}: {key} must be a positive finite number, got {value!r}")
        setattr(sae, key, float(value))
    # Constructors coerce some fields (bool("no") is True): a field that does not read back as
    # written had the wrong type.
    rebuilt = sae.config()
    for key, value in config.items():
        mismatch = rebuilt.get(key) != value or isinstance(rebuilt.get(key), bool) != isinstance(value, bool)
        if key in rebuilt and value is not None and mismatch:
            raise ValueError(f"{config_path}: field {key}={value!r} is not valid for {architecture!r} "
                             f"(expected a value like {rebuilt[key]!r})")
    return sae


def _read_weights(weights_path: Path, device) -> dict:
    try:
        return load_file(str(weights_path), device=str(device) if device is not None else "cpu")
    except Exception as error:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{weights_path} is not a readable safetensors file: {error}") from None
