"""Run metadata and the format stamp of a saved dictionary's cfg.json.

cfg.json holds ``"format": "sparsekit"``, ``"format_version": FORMAT_VERSION``, the architecture's
fields (``sae.config()``) and a ``"metadata"`` object: where the dictionary came from. The keys
sparsekit itself fills (others may add any):

    model, hook, input_hook, dataset, context_len      whoever trains it (the CLI, a study)
    tokens_trained, sparsekit_version, normalisation   sparsekit.train (``record_training``)
    metrics                                            sparsekit.train: the final held-out metrics

Metadata never changes the weights or the rebuilt architecture; it is checked on save and on load
(a JSON object of plain values, at most MAX_METADATA_BYTES once encoded, nested at most MAX_DEPTH).
A cfg.json without format_version was written by sparsekit before it had one: format 0, still read.
"""
from __future__ import annotations

import json
import math

from sparsekit._util.validate import is_int
from sparsekit._util.version import VERSION

FORMAT = "sparsekit"
FORMAT_VERSION = 1
MAX_METADATA_BYTES = 64 * 1024
MAX_DEPTH = 8
# cfg.json keys only sparsify writes (sparsify.SparseCoderConfig and d_in): a folder holding them and
# no "architecture" is sparsify's, which also names its files cfg.json + sae.safetensors.
SPARSIFY_KEYS = frozenset({"expansion_factor", "num_latents", "normalize_decoder", "multi_topk", "skip_connection",
                           "transcode", "activation"})


def check_metadata(metadata, where: str = "metadata") -> dict:
    """A validated deep copy of ``metadata``: a dict with str keys whose values are None, bool, int,
    finite float, str, or lists / dicts of those; ValueError naming ``where`` and the key otherwise."""
    if not isinstance(metadata, dict):
        raise ValueError(f"{where} must be a dict (a JSON object), got {type(metadata).__name__}")
    copied = _plain(metadata, where, 0)
    size = len(json.dumps(copied).encode())
    if size > MAX_METADATA_BYTES:
        raise ValueError(f"{where} takes {size:,} bytes as JSON, more than the {MAX_METADATA_BYTES:,} allowed: "
                         f"keep metadata to provenance and a few metrics")
    return copied


def _plain(value, where: str, depth: int):
    if depth > MAX_DEPTH:
        raise ValueError(f"{where} is nested deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, (bool, str)):
        return value
    if is_int(value):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where} must be finite, got {value!r}")
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value)]
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise ValueError(f"{where} has a key {key!r} that is not a string")
        return {key: _plain(item, f"{where}[{key!r}]", depth + 1) for key, item in value.items()}
    raise ValueError(f"{where} must hold plain JSON values (str, int, float, bool, None, lists, dicts), "
                     f"got {type(value).__name__}")


def stamp(config: dict, metadata: dict) -> dict:
    """cfg.json's content: the format stamp, ``config`` (sae.config()) and the checked metadata."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION, **config,
            "metadata": check_metadata(metadata, "sae.metadata")}


def read_stamp(config: dict, config_path) -> tuple[dict, dict]:
    """(the architecture's fields, the metadata) of a sparsekit cfg.json, after checking its format
    and format_version: a newer version than this code reads is a ValueError saying to upgrade."""
    config = dict(config)
    fmt = config.pop("format", FORMAT)
    if fmt != FORMAT:
        raise ValueError(f"{config_path}: format {fmt!r} is not {FORMAT!r}")
    version = config.pop("format_version", 0)
    if not is_int(version) or version < 0:
        raise ValueError(f"{config_path}: format_version must be a non-negative int, got {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(f"{config_path} was saved in sparsekit format {version}, newer than this sparsekit "
                         f"({VERSION}) reads (up to {FORMAT_VERSION}): upgrade sparsekit (pip install -U sparsekit)")
    metadata = check_metadata(config.pop("metadata", {}), f"{config_path}: metadata")
    return config, metadata


def layout(config: dict) -> str:
    """Which library wrote a cfg.json that sits beside sae.safetensors: "sparsekit" (it says so, or
    has an "architecture"), "sparsify" (its config keys and no architecture), else "unknown"."""
    if "format" in config or "architecture" in config:
        return "sparsekit"
    if "d_in" in config and SPARSIFY_KEYS & set(config):
        return "sparsify"
    return "unknown"


def record_training(sae, tokens_trained: int, normalize_inputs: bool, metrics: dict | None = None) -> None:
    """What ``sparsekit.train`` knows, into ``sae.metadata``: tokens trained, the sparsekit version, the
    normalisation (the scales and how they were chosen) and the final metrics (finite numbers only)."""
    if not isinstance(getattr(sae, "metadata", None), dict):  # a latent-sharded module has none of its own
        sae.metadata = {}
    method = ("E||x||^2 = width on the first training rows (TrainConfig.normalize_inputs)" if normalize_inputs
              else "none (TrainConfig.normalize_inputs=False)")
    sae.metadata["tokens_trained"] = int(tokens_trained)
    sae.metadata["sparsekit_version"] = VERSION
    sae.metadata["normalisation"] = {"input_scale": float(sae.input_scale), "output_scale": float(sae.output_scale),
                                     "method": method}
    if metrics:
        sae.metadata["metrics"] = {key: value for key, value in metrics.items()
                                   if is_int(value) or (isinstance(value, float) and math.isfinite(value))}
