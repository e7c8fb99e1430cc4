"""`.npy` files checked before anything is allocated: the header (shape, dtype, order) must be
sane and must describe exactly the bytes the file holds.

``np.load`` believes a header: one claiming (10**12, 512) float32 asks for 2 TB before reading a
byte. ``npy_layout`` reads the header only (numpy's own parser, whose length limit stops header
bombs), and ``read_npy`` then allocates what the header said, which is now known to be the file's
true size, and fills it from the same open file. Objects are never read (no pickle).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sparsekit._util.validate import is_int

HEADER_LIMIT = 10_000  # numpy's own max_header_size: np.save writes a few hundred bytes
_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
_PARSE_ERRORS = (ValueError, OSError, EOFError, SyntaxError, TypeError, RecursionError, MemoryError)


@dataclass(frozen=True)
class NpyLayout:
    """What a `.npy` header says: shape, dtype, fortran_order, where the data starts (``offset``,
    bytes) and how long the header says it is (``nbytes``), beside what the file holds after its
    header (``file_bytes``)."""
    shape: tuple
    dtype: np.dtype
    fortran_order: bool
    offset: int
    nbytes: int
    file_bytes: int

    def check_size(self, path, what: str = "file") -> None:
        """ValueError naming `what` and `path` unless the file holds exactly the header's bytes."""
        if self.nbytes != self.file_bytes:
            claim = f"{' x '.join(str(n) for n in self.shape) or 'a scalar'} {self.dtype} ({self.nbytes:,} bytes)"
            state = "is truncated" if self.nbytes > self.file_bytes else "is longer than its header says"
            raise ValueError(f"{what} {path} {state}: its header claims {claim} but the file holds "
                             f"{self.file_bytes:,} bytes after its header")


def npy_header(handle, path, what: str = "file") -> NpyLayout:
    """Read and check the header of the `.npy` file open as `handle` (binary, at position 0): it
    must parse (numpy's parser, with its header length limit) and name a plain (non-object) dtype
    and a shape of non-negative ints; ValueError naming `what` and `path` otherwise. The size is
    not checked: see ``npy_layout``."""
    try:
        version = np.lib.format.read_magic(handle)
        reader = _READERS.get(version)
        if reader is None:
            raise ValueError(f".npy format version {version[0]}.{version[1]} is not supported (1.0 and 2.0 are)")
        start = handle.tell()
        width = 2 if version == (1, 0) else 4
        length_bytes = handle.read(width)
        if len(length_bytes) < width:
            raise ValueError("it ends inside its header")
        length = int.from_bytes(length_bytes, "little")
        if length > HEADER_LIMIT:  # numpy would read (and allocate) the whole claimed length first
            raise ValueError(f"its header claims {length:,} bytes, more than the {HEADER_LIMIT:,} a .npy header may have")
        handle.seek(start)
        shape, fortran_order, dtype = reader(handle, max_header_size=HEADER_LIMIT)
        offset = handle.tell()
    except _PARSE_ERRORS as error:
        raise ValueError(f"{what} {path} is not a readable .npy file ({_first_line(error)})") from None
    if not isinstance(shape, tuple) or not all(is_int(n) and n >= 0 for n in shape):
        raise ValueError(f"{what} {path}: its header's shape {shape!r} is not a tuple of non-negative ints")
    if dtype.hasobject or dtype.itemsize == 0:
        raise ValueError(f"{what} {path} holds {dtype}, not numbers (objects are never read)")
    nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
    size = os.fstat(handle.fileno()).st_size
    return NpyLayout(tuple(int(n) for n in shape), dtype, bool(fortran_order), offset, nbytes, size - offset)


def npy_layout(handle, path, what: str = "file") -> NpyLayout:
    """``npy_header``, and the file must hold exactly the bytes the header claims (truncated,
    padded and forged headers are refused before anything is allocated)."""
    layout = npy_header(handle, path, what)
    layout.check_size(path, what)
    return layout


def read_npy(path, what: str = "file") -> np.ndarray:
    """The array in `.npy` file `path`, its header checked (``npy_layout``) before the array is
    allocated; ValueError naming `what` and the file otherwise (FileNotFoundError if it is missing)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    with open(path, "rb") as handle:
        layout = npy_layout(handle, path, what)
        array = np.empty(layout.shape, dtype=layout.dtype, order="F" if layout.fortran_order else "C")
        flat = array.T if layout.fortran_order else array   # C-contiguous either way: the bytes in file order
        got = handle.readinto(flat.reshape(-1).view(np.uint8)) if layout.nbytes else 0
    if got != layout.nbytes:
        raise ValueError(f"{what} {path} shrank while it was read: {got:,} of {layout.nbytes:,} bytes")
    return array


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__
