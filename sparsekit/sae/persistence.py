"""Save and load dictionaries: safetensors weights + cfg.json, never pickle.

``save_dictionary`` writes sae.safetensors and cfg.json (the format stamp, ``sae.config()`` and
``sae.metadata``: sparsekit.sae.metadata). ``load`` reads a local folder or a Hugging Face Hub repo
(sparsekit.sae.hub) and tells the layouts apart by their files: a sparsekit or sparsify folder
(both cfg.json + sae.safetensors; cfg.json says which), SAELens (sae_weights.safetensors),
dictionary_learning (ae.pt + config.json) or circuit-tracer (config.yaml + layer_0.safetensors or
W_enc_0.safetensors: a list of per-layer Transcoders, or a CLT), each read by its importer.

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
from sparsekit._util.bounded import check_path_length
from sparsekit._util.extras import MissingExtra
from sparsekit._util.validate import is_number

from . import hub, registry
from .allocation import check_bytes
from .circuit_tracer_format import is_circuit_tracer_folder, load_circuit_tracer
from .dictionary_learning_format import DL_WEIGHTS_FILE, load_dictionary_learning
from .files import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    check_claims,
    check_layout,
    check_regular_file,
    read_json_object,
    read_weights_header,
)
from .metadata import layout, read_stamp, stamp
from .saelens import SAELENS_WEIGHTS_FILE, load_saelens
from .sparsify_format import load_sparsify

RUNTIME_KEYS = ("architecture", "input_scale", "output_scale")


def save_dictionary(sae, directory) -> Path:
    """Write a SparseDictionary's weights and cfg.json (format stamp, ``sae.config()``, ``sae.metadata``)
    into directory. The metadata is checked first, so a bad entry leaves no files behind."""
    content = stamp(sae.config(), sae.metadata)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(dict(sae.state_dict()), directory / WEIGHTS_FILE)
    atomic_write_bytes(directory / CONFIG_FILE, (json.dumps(content, indent=2) + "\n").encode())
    return directory


def load(directory, device=None, *, revision: str | None = None, subfolder: str | None = None,
         cache_dir=None):
    """Rebuild a dictionary, in eval mode, from a local folder or a Hugging Face Hub repo id
    ("user/repo", at ``revision``; downloaded once into the Hub cache, or ``cache_dir``).

    subfolder: the dictionary's folder inside it (a sparsify repo holds one per hookpoint).
    Reads the folder sae.save() writes, and sparsify's, SAELens's and dictionary_learning's
    layouts. Errors name the file and field."""
    if not isinstance(directory, (str, os.PathLike)):
        raise ValueError(f"directory must be a path (str or os.PathLike), got {directory!r}")
    check_path_length(directory, "directory")  # RefusedFile: one line, not an OSError from the first stat
    path = Path(directory)
    if not path.exists() and hub.looks_like_repo_id(directory):
        try:
            path = hub.snapshot(str(directory), revision=revision, subfolder=subfolder, cache_dir=cache_dir)
        except MissingExtra as missing:  # most likely a mistyped local path: say both
            raise FileNotFoundError(f"{path} is not a directory, nor a Hugging Face Hub repo this installation can "
                                    f"read ({missing})") from None
    elif subfolder is not None:
        path = path / hub.checked_subfolder(subfolder)
        check_path_length(path, "directory / subfolder")
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory: expected one written by sae.save()")
    return load_folder(path, device)


def load_folder(directory: Path, device=None):
    """The dictionary in a local folder, read by the importer its files call for."""
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if (directory / DL_WEIGHTS_FILE).is_file() and not weights_path.is_file():
        return load_dictionary_learning(directory, device=device)
    if (directory / SAELENS_WEIGHTS_FILE).is_file() and not weights_path.is_file():
        return load_saelens(directory, device=device)
    if is_circuit_tracer_folder(directory) and not weights_path.is_file():  # a list of Transcoders, or a CLT
        return load_circuit_tracer(directory, device=device)
    if not config_path.is_file() and not weights_path.is_file():
        inside = sorted(p.name for p in directory.iterdir()
                        if p.is_dir() and ((p / CONFIG_FILE).is_file() or (p / DL_WEIGHTS_FILE).is_file()))
        if inside:  # a sparsify run (one folder per hookpoint), dictionary_learning's trainer_<i> folders
            raise FileNotFoundError(f"{directory} holds dictionaries in folders ({', '.join(inside[:8])}"
                                    f"{', ...' if len(inside) > 8 else ''}), none of its own: pass subfolder= "
                                    f"or that folder's path")
    for path in (config_path, weights_path):  # a pipe or a device under either name is refused by name
        check_regular_file(path, f"is {directory} a directory written by sae.save()?")
    config = read_json_object(config_path)
    if layout(config) == "sparsify":
        return load_sparsify(directory, device=device)
    config, metadata = read_stamp(config, config_path)
    # validate, then allocate: the header (checked against the file's size) must carry cfg.json's
    # sizes before a dictionary of those sizes is built, and every tensor's name, shape and dtype
    # before a byte of data is read
    header = read_weights_header(weights_path)
    d_in = config.get("d_in")
    check_claims(config_path, weights_path, header, [("d_in", d_in, "W_enc", 0),
                                                     ("n_latents", config.get("n_latents"), "W_enc", 1),
                                                     ("d_out", config.get("d_out", d_in), "W_dec", 1)])
    sae = _build(config, config_path, device)
    expected = dict(sae.state_dict())
    _check_header(header, expected, sae.architecture, weights_path)
    check_bytes(sum(entry.nbytes for entry in header.values()), device, f"reading {weights_path}")
    state = _read_weights(weights_path, device)
    for name in expected:  # in parameter order: W_enc first
        tensor = state[name]
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{weights_path}: {name} holds non-finite values (NaN or inf)")
    sae.load_state_dict(state)
    sae.metadata = metadata
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


def _check_header(header: dict, expected: dict, architecture: str, weights_path: Path) -> None:
    """The file's tensors, from its header, against the built dictionary's: names, shapes, dtypes."""
    check_layout({name: entry.shape for name, entry in header.items()},
                 {name: tuple(tensor.shape) for name, tensor in expected.items()},  # in parameter order: W_enc first
                 weights_path, repr(architecture), claimed_by="cfg.json")
    for name, tensor in expected.items():
        entry = header[name]
        if entry.torch_dtype_name != str(tensor.dtype).removeprefix("torch."):
            raise ValueError(f"{weights_path}: {name} is {entry.torch_dtype_name} ({entry.dtype}), cfg.json's dtype "
                             f"implies {str(tensor.dtype).removeprefix('torch.')}")


def _read_weights(weights_path: Path, device) -> dict:
    try:
        return load_file(str(weights_path), device=str(device) if device is not None else "cpu")
    except Exception as error:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{weights_path} is not a readable safetensors file: {error}") from None
