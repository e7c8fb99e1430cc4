"""A saved dictionary's folder: its file names, and the checked JSON and tensor readers every format shares."""
from __future__ import annotations

from pathlib import Path

import torch

from sparsekit._util.bounded import load_json
from sparsekit._util.safetensors_header import read_header

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"


CONFIG_MAX_BYTES = 16 * 2**20  # a dictionary's cfg.json is a few KB; SAELens's and sparsify's too


def read_json_object(config_path: Path) -> dict:
    """A JSON file that must hold an object (cfg.json), at most 16 MiB and 64 levels deep; anything
    else is a ValueError naming the file."""
    config = load_json(config_path, CONFIG_MAX_BYTES, what="config")
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} must hold a JSON object, got {type(config).__name__}")
    return config



def check_tensors(tensors: dict, expected: dict, where, layout: str, integer: tuple = ()) -> None:
    """Every tensor an importer reads, before anything is built from it: exactly the names of
    ``expected`` (name -> shape), each of that shape, floating point and finite (the names in
    ``integer``: an integer dtype instead). ValueError naming ``where`` and the tensor otherwise."""
    missing, unexpected = set(expected) - set(tensors), set(tensors) - set(expected)
    if missing or unexpected:
        raise ValueError(f"{where}: tensors do not match {layout}: missing {sorted(missing)}, "
                         f"unexpected {sorted(map(str, unexpected))}")
    for name, shape in expected.items():
        tensor = tensors[name]
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{where}: {name} must be a tensor, got {type(tensor).__name__}")
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{where}: {name} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")
        if name in integer:
            if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
                raise ValueError(f"{where}: {name} must hold an integer, got {tensor.dtype}")
        elif not tensor.is_floating_point():
            raise ValueError(f"{where}: {name} must be floating point, got {tensor.dtype}")
        elif not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{where}: {name} holds non-finite values (NaN or inf)")


def read_weights_header(weights_path: Path) -> dict:
    """The safetensors header of ``weights_path`` ({name: TensorEntry}), checked against the file's
    size before any tensor is read (sparsekit._util.safetensors_header); ValueError naming the file."""
    try:
        return read_header(weights_path)
    except OSError as error:
        raise ValueError(f"{weights_path} cannot be read: {error.strerror or error}") from None


def check_header(header: dict, expected: dict, where, layout: str, integer: tuple = (), claimed_by: str = "") -> None:
    """``check_tensors`` on a safetensors header, before a byte of data is read or a dictionary
    built: exactly ``expected``'s names (name -> shape), each of that shape and floating point (the
    names in ``integer``: integer). ``claimed_by`` names where the expected shapes come from
    (cfg.json's fields); ValueError naming ``where``, the tensor and that source otherwise."""
    source = f" from {claimed_by}" if claimed_by else ""
    missing, unexpected = set(expected) - set(header), set(header) - set(expected)
    if missing or unexpected:
        raise ValueError(f"{where}: tensors do not match {layout}: missing {sorted(missing)}, "
                         f"unexpected {sorted(map(str, unexpected))[:16]}")
    for name, shape in expected.items():
        entry = header[name]
        if tuple(entry.shape) != tuple(shape):
            raise ValueError(f"{where}: {name} has shape {tuple(entry.shape)}, expected {tuple(shape)}{source}")
        if name in integer:
            if entry.is_floating_point or entry.dtype in ("BOOL", "C64"):
                raise ValueError(f"{where}: {name} must hold an integer, got {entry.dtype}")
        elif not entry.is_floating_point:
            raise ValueError(f"{where}: {name} must be floating point, got {entry.dtype}")


def check_claims(config_path: Path, weights_path: Path, header: dict, claims) -> None:
    """cfg.json's sizes against the tensors that carry them, before anything of those sizes is built:
    ``claims`` is (field, value, tensor name, axis) tuples; a field whose value is not an int is left
    to the constructor's own check. ValueError naming both files, the field and the tensor otherwise."""
    for field, value, name, axis in claims:
        if not isinstance(value, int) or isinstance(value, bool):
            continue
        entry = header.get(name)
        if entry is None or len(entry.shape) <= axis:
            shape = None if entry is None else tuple(entry.shape)
            raise ValueError(f"{weights_path}: {name} {'is missing' if entry is None else f'has shape {shape}'}, "
                             f"so {config_path}'s {field}={value} cannot be checked against it")
        if entry.shape[axis] != value:
            implied = tuple(value if i == axis else extent for i, extent in enumerate(entry.shape))
            raise ValueError(f"{config_path}: {field}={value} does not match {weights_path}, whose {name} has "
                             f"shape {tuple(entry.shape)} (the field implies {implied})")
