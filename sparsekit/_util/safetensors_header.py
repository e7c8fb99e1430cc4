"""A safetensors file's header, read and checked without reading (or allocating) a tensor.

The format: 8 bytes of little-endian header length N, N bytes of JSON ({name: {"dtype", "shape",
"data_offsets": [begin, end]}, optional "__metadata__": {str: str}}), then the data, each tensor's
bytes at [8 + N + begin, 8 + N + end). ``read_header`` checks, from the file's size and the N
bytes alone, everything a loader relies on before it builds anything of the sizes a file claims:

- the file holds the 8 length bytes, N is at most HEADER_MAX_BYTES (safetensors' own cap, 100 MB)
  and fits in the file, and the header is a JSON object (bounded: sparsekit._util.bounded);
- each tensor's dtype is one safetensors defines, its shape a list of at most MAX_DIMS
  non-negative integers, its offsets two integers with begin <= end inside the data area;
- end - begin equals the shape's element count times the dtype's size (computed with Python's
  integers: a shape of 10^12 x 10^12 claims its true size and does not wrap), and no two tensors
  overlap.

So a tensor's claimed size is bounded by the file's real size, which is what lets a loader
compare the shapes with cfg.json and only then allocate them. Every failure is one ValueError
naming the file and, where there is one, the tensor.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from .bounded import parse_json

HEADER_MAX_BYTES = 100_000_000  # safetensors refuses larger headers too
MAX_DIMS = 8
# safetensors dtype -> (bytes per element, the torch dtype's name; None where torch has none)
DTYPES = {
    "BOOL": (1, "bool"), "U8": (1, "uint8"), "I8": (1, "int8"), "F8_E4M3": (1, "float8_e4m3fn"),
    "F8_E5M2": (1, "float8_e5m2"), "I16": (2, "int16"), "U16": (2, "uint16"), "F16": (2, "float16"),
    "BF16": (2, "bfloat16"), "I32": (4, "int32"), "U32": (4, "uint32"), "F32": (4, "float32"),
    "I64": (8, "int64"), "U64": (8, "uint64"), "F64": (8, "float64"), "C64": (8, "complex64"),
}
FLOATING = ("F8_E4M3", "F8_E5M2", "F16", "BF16", "F32", "F64")


class TensorEntry(NamedTuple):
    dtype: str        # safetensors' name ("F32")
    shape: tuple      # of ints
    begin: int        # byte offsets in the data area
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def is_floating_point(self) -> bool:
        return self.dtype in FLOATING

    @property
    def torch_dtype_name(self) -> str | None:
        return DTYPES[self.dtype][1]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_header(path) -> dict:
    """{tensor name: TensorEntry} of the safetensors file ``path`` (its "__metadata__" left out),
    every entry checked against the file's size; ValueError naming the file otherwise."""
    path = Path(path)
    with open(path, "rb") as handle:
        size = handle.seek(0, 2)
        if size < 8:
            raise _bad(path, f"{size} bytes, fewer than its 8-byte header length")
        handle.seek(0)
        length = int.from_bytes(handle.read(8), "little")
        if length > HEADER_MAX_BYTES:
            raise _bad(path, f"a header of {length:,} bytes is larger than the {HEADER_MAX_BYTES:,} allowed")
        if length > size - 8:
            raise _bad(path, f"its header claims {length:,} bytes but the file has {size - 8:,} after its length "
                             f"(truncated?)")
        raw = handle.read(length)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _bad(path, "its header is not UTF-8 text") from None
    try:
        header = parse_json(text, "its header")
    except ValueError as error:
        raise _bad(path, str(error)) from None
    if not isinstance(header, dict):
        raise _bad(path, f"its header must be a JSON object, got {type(header).__name__}")
    data_size = size - 8 - length
    entries = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        entries[name] = _entry(path, name, spec, data_size)
    spans = sorted((entry.begin, entry.end, name) for name, entry in entries.items() if entry.nbytes)
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise _bad(path, f"tensors {first[:80]!r} and {second[:80]!r} overlap in the data area")
    return entries


def _bad(path: Path, reason: str) -> ValueError:
    return ValueError(f"{path} is not a readable safetensors file: {reason}")


def _entry(path: Path, name: str, spec, data_size: int) -> TensorEntry:
    where = f"{path} is not a readable safetensors file: tensor {name[:80]!r}"
    if not isinstance(spec, dict):
        raise ValueError(f"{where} must be described by a JSON object, got {type(spec).__name__}")
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if dtype not in DTYPES:
        raise ValueError(f"{where} has dtype {str(dtype)[:40]!r}, not one safetensors defines")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_int(s) and s >= 0 for s in shape):
        raise ValueError(f"{where} has shape {str(shape)[:80]}: expected a list of at most {MAX_DIMS} "
                         f"non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise ValueError(f"{where} has data_offsets {str(offsets)[:80]}: expected [begin, end] with 0 <= begin <= end")
    begin, end = offsets
    count = 1
    for extent in shape:
        count *= extent
    claimed = count * DTYPES[dtype][0]
    if end > data_size:
        raise ValueError(f"{where} ends at byte {end:,} of the data, but the file holds {data_size:,} bytes of data "
                         f"(truncated, or a forged shape)")
    if end - begin != claimed:
        raise ValueError(f"{where}: shape {tuple(shape)} of {dtype} needs {claimed:,} bytes, but its data_offsets "
                         f"span {end - begin:,}")
    return TensorEntry(dtype, tuple(shape), begin, end)
