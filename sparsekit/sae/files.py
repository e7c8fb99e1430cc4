"""A saved dictionary's folder: its file names, and the checked JSON and tensor readers every format shares."""
from __future__ import annotations

from pathlib import Path

import torch

from sparsekit._util.bounded import load_json

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
