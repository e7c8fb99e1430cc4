"""A saved dictionary's folder: its file names, and the checked JSON and tensor readers every format shares."""
from __future__ import annotations

import stat
from pathlib import Path

import torch

from sparsekit._util.bounded import RefusedFile, load_json
from sparsekit._util.safetensors_header import read_header

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"


CONFIG_MAX_BYTES = 16 * 2**20  # a dictionary's cfg.json is a few KB; SAELens's and sparsify's too


def check_regular_file(path: Path, missing: str) -> None:
    """``path`` must be a regular file: FileNotFoundError saying ``missing`` (what to check) when
    nothing is there, RefusedFile (a ValueError) naming it when it is a folder, a pipe, a socket or a
    device (reading a FIFO would wait for a writer forever; a dictionary's files are never one)."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist: {missing}") from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else "a pipe, socket or device"
        raise RefusedFile(str(path), f"is {kind}, not a regular file: a dictionary's files must be regular files",
                          sep=" ")


def read_json_object(config_path: Path) -> dict:
    """A JSON file that must hold an object (cfg.json), at most 16 MiB and 64 levels deep; anything
    else is a ValueError naming the file."""
    config = load_json(config_path, CONFIG_MAX_BYTES, what="config")
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} must hold a JSON object, got {type(config).__name__}")
    return config



def check_layout(shapes: dict, expected: dict, where, layout: str, claimed_by: str = "") -> None:
    """The tensors a file holds, as {name: shape} (from a safetensors header or from tensors read),
    against ``expected`` ({name: shape}): exactly the same names, each of its expected shape.
    ``claimed_by`` names where the expected shapes come from (cfg.json's fields); ValueError naming
    ``where``, ``layout``, the tensor and that source otherwise."""
    missing, unexpected = set(expected) - set(shapes), set(shapes) - set(expected)
    if missing or unexpected:
        raise ValueError(f"{where}: tensors do not match {layout}: missing {sorted(missing)}, "
                         f"unexpected {sorted(map(str, unexpected))[:16]}")
    source = f" from {claimed_by}" if claimed_by else ""
    for name, shape in expected.items():
        if tuple(shapes[name]) != tuple(shape):
            raise ValueError(f"{where}: {name} has shape {tuple(shapes[name])}, expected {tuple(shape)}{source}")


def _check_kind(where, name: str, kind: str, dtype, integer: tuple) -> None:
    """A tensor's kind ("float", "int", or "other" for bool and complex) against what ``name`` must hold."""
    if name in integer:
        if kind != "int":
            raise ValueError(f"{where}: {name} must hold an integer, got {dtype}")
    elif kind != "float":
        raise ValueError(f"{where}: {name} must be floating point, got {dtype}")


def check_tensors(tensors: dict, expected: dict, where, layout: str, integer: tuple = ()) -> None:
    """Every tensor an importer reads, before anything is built from it: exactly the names of
    ``expected`` (name -> shape), each of that shape (``check_layout``), floating point and finite
    (the names in ``integer``: an integer dtype instead). ValueError naming ``where`` and the tensor otherwise."""
    for name in expected:
        if name in tensors and not isinstance(tensors[name], torch.Tensor):
            raise ValueError(f"{where}: {name} must be a tensor, got {type(tensors[name]).__name__}")
    check_layout({name: tuple(getattr(t, "shape", ())) for name, t in tensors.items()}, expected, where, layout)
    for name in expected:
        tensor = tensors[name]
        kind = ("float" if tensor.is_floating_point() else
                "other" if tensor.is_complex() or tensor.dtype == torch.bool else "int")
        _check_kind(where, name, kind, tensor.dtype, integer)
        if kind == "float" and not bool(torch.isfinite(tensor).all()):
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
    built: exactly ``expected``'s names (name -> shape), each of that shape (``check_layout``) and
    floating point (the names in ``integer``: integer). ``claimed_by`` names where the expected
    shapes come from (cfg.json's fields); ValueError naming ``where``, the tensor and that source otherwise."""
    check_layout({name: entry.shape for name, entry in header.items()}, expected, where, layout, claimed_by)
    for name in expected:
        entry = header[name]
        kind = "float" if entry.is_floating_point else "other" if entry.dtype in ("BOOL", "C64") else "int"
        _check_kind(where, name, kind, entry.dtype, integer)


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
