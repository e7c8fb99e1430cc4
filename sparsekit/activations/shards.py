"""Activations on disk: a folder of ``.npy`` shards plus ``manifest.json``, read row by row with file reads.

Layout (format_version 1)::

    manifest.json     {"format": "sparsekit-shards", "format_version": 1, "model": str, "hook": str,
                       "dtype": "float32"|"float16"|"float64"|"bfloat16", "d": int, "d_out": int (only with
                       targets), "tokens": int, "scale": float|null,
                       "shards": [{"x": "x-00000.npy", "y": "y-00000.npy" (only with targets), "rows": int}, ...]}
    x-00000.npy       inputs  [rows, d]      (C order, the manifest's dtype)
    y-00000.npy       targets [rows, d_out]  (transcoders only)

NumPy has no bfloat16, so a ``bfloat16`` folder holds ``x-00000.safetensors`` (one tensor "x", BF16
[rows, d]; "y" likewise) instead: half the bytes of float32, values rounded to nearest-even by
torch. The reader checks each file's header against the manifest before reading it, reads the data
as raw 16-bit words and hands out bfloat16 tensors (the trainer widens them to the dictionary's dtype).

Reading never memory-maps a shard: a mapped file that shrinks (truncated, or rewritten in place)
kills the process with SIGBUS at the next touched page, which no Python code can catch. Rows are
read with ``os.preadv`` into the batch instead (one call per run of adjacent rows; a shrunken file
is a short read), and each file's inode, size and modification time are checked before every batch
that reads it: a shard that changed under a running source is ``ShardChanged``, naming the file.

Shards hold raw activations; ``scale`` (the factor that makes E||x||^2 = d) is recorded, not applied.
Every file is written atomically (temporary name, fsync, rename) and the manifest last, so a folder
with a manifest is complete.
"""
from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import Tensor

from sparsekit._util.atomic import atomic_write, fsync_path
from sparsekit._util.bounded import load_json
from sparsekit._util.seeding import permutation
from sparsekit._util.validate import check_epochs, check_seed, check_state, is_int, is_number, positive_int, state_int
from sparsekit.ops import checks

from .npy import npy_header, read_npy
from .source import Batch

FORMAT = "sparsekit-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DTYPES = ("float16", "float32", "float64", "bfloat16")
BF16 = "bfloat16"
_SAFETENSORS_HEADER_LIMIT = 1 << 20  # a shard's header names one tensor: a few hundred bytes
MANIFEST_MAX_BYTES = 256 << 20  # a million shards take about 60 MB


# --- writing -------------------------------------------------------------------------------------

def _batch_array(name: str, value, index: int, dtype: np.dtype | str, place: Callable[[int], str]) -> np.ndarray:
    """A batch's x or y as a 2-D array of dtype; for "bfloat16", the bfloat16 bit patterns as uint16.
    Refuses NaN and Inf, and values the conversion to dtype would turn into inf (float16 beyond
    65,504, say); place(row) names the shard file and row a batch row would be written to."""
    if isinstance(value, Tensor):
        value = value.detach().cpu()
        value = (value.float() if value.dtype in (torch.bfloat16, torch.float16) else value).numpy()
    if not isinstance(value, np.ndarray):
        raise ValueError(f"batch {index}: {name} must be a Tensor or numpy array, got {type(value).__name__}")
    if value.ndim != 2:
        raise ValueError(f"batch {index}: {name} must be 2-D [rows, features], got shape {value.shape}")
    if not np.issubdtype(value.dtype, np.floating):
        raise ValueError(f"batch {index}: {name} must be floating-point, got {value.dtype}")
    finite = np.isfinite(value).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise ValueError(f"batch {index}: {name} row {row} holds NaN or Inf; activations must be finite "
                         f"({place(row)})")
    if dtype == BF16:
        stored = torch.from_numpy(np.ascontiguousarray(value)).to(torch.bfloat16)
        finite = torch.isfinite(stored).all(dim=1).numpy()
        converted = stored.view(torch.int16).numpy().view(np.uint16)
    else:
        with np.errstate(over="ignore"):  # overflow is refused below, with the row and the shard
            converted = value.astype(dtype, copy=False)
        finite = np.isfinite(converted).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        largest = float(np.abs(value).max())
        limit = float(torch.finfo(torch.bfloat16).max if dtype == BF16 else np.finfo(dtype).max)
        wider = "dtype='bfloat16' (float32's range in 16 bits) or 'float32'" if dtype == "float16" else "dtype='float64'"
        kind = BF16 if dtype == BF16 else np.dtype(dtype).name
        raise ValueError(f"batch {index}: {name} holds {largest:.6g} (row {row}), beyond {kind}'s largest finite "
                         f"value {limit:.6g}: it would be stored as inf ({place(row)}). Write {wider}")
    return converted


def _shard_names(index: int, dtype: str = "float32") -> tuple[str, str]:
    suffix = "safetensors" if dtype == BF16 else "npy"
    return f"x-{index:05d}.{suffix}", f"y-{index:05d}.{suffix}"


def _bf16_bytes(name: str, bits: np.ndarray) -> bytes:
    """uint16 bfloat16 bit patterns [rows, d] -> a safetensors file holding them as tensor `name` (BF16)."""
    from safetensors.torch import save

    tensor = torch.from_numpy(np.ascontiguousarray(bits).view(np.int16)).view(torch.bfloat16)
    return save({name: tensor})


def _save_shard(path: Path, name: str, array: np.ndarray, dtype: str) -> None:
    if dtype == BF16:
        data = _bf16_bytes(name, array)
        atomic_write(path, lambda f: f.write(data))
    else:
        atomic_write(path, lambda f: np.save(f, np.ascontiguousarray(array)))


def write_shards(directory, batches: Iterable[Batch], *, model: str = "", hook: str = "", dtype: str = "float32",
                 shard_rows: int = 65536, scale: float | None = None, overwrite: bool = False) -> dict:
    """Write a finite iterable of x [b, d] or (x [b, d], y [b, d_out]) batches as shards of
    shard_rows rows (the last one shorter) and return the manifest.

    overwrite=False refuses a folder that already holds a manifest or shards; overwrite=True removes
    the old manifest first (so a crash never leaves one describing a mix) and stale shards last.
    """
    directory = Path(directory)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    np_dtype = dtype if dtype == BF16 else np.dtype(dtype)
    shard_rows = positive_int("shard_rows", shard_rows)
    if scale is not None and (not is_number(scale)
                              or not math.isfinite(scale) or scale <= 0):
        raise ValueError(f"scale must be a positive finite number or None, got {scale!r}")
    directory.mkdir(parents=True, exist_ok=True)
    manifest_path = directory / MANIFEST
    old_files = {p.name for pattern in ("x-*.npy", "y-*.npy", "x-*.safetensors", "y-*.safetensors")
                 for p in directory.glob(pattern)}
    if not overwrite and (manifest_path.exists() or old_files):
        raise FileExistsError(f"{directory} already holds activation shards; pass overwrite=True to replace them")
    manifest_path.unlink(missing_ok=True)

    shards: list[dict] = []
    pending: list[tuple[np.ndarray, np.ndarray | None]] = []
    pending_rows, d, d_out = 0, None, None

    def write(xs: np.ndarray, ys: np.ndarray | None) -> None:
        x_name, y_name = _shard_names(len(shards), dtype)
        _save_shard(directory / x_name, "x", xs, dtype)
        entry = {"x": x_name, "rows": int(xs.shape[0])}
        if ys is not None:
            _save_shard(directory / y_name, "y", ys, dtype)
            entry["y"] = y_name
        shards.append(entry)

    def flush(final: bool) -> None:
        nonlocal pending, pending_rows
        if not pending or (pending_rows < shard_rows and not final):
            return
        xs = np.concatenate([x for x, _ in pending])
        ys = None if d_out is None else np.concatenate([y for _, y in pending])
        start = 0
        while xs.shape[0] - start >= shard_rows or (final and start < xs.shape[0]):
            stop = min(start + shard_rows, xs.shape[0])
            write(xs[start:stop], None if ys is None else ys[start:stop])
            start = stop
        rest_x = xs[start:].copy()
        pending = [(rest_x, None if ys is None else ys[start:].copy())] if rest_x.shape[0] else []
        pending_rows = rest_x.shape[0]

    try:
        for index, batch in enumerate(batches):
            first = sum(s["rows"] for s in shards) + pending_rows  # the folder's row this batch's row 0 becomes

            def place(key: int, row: int, first: int = first) -> str:
                shard, local = divmod(first + row, shard_rows)
                return f"shard {directory / _shard_names(shard, dtype)[key]}, row {local}"

            if isinstance(batch, (tuple, list)):
                if len(batch) != 2:
                    raise ValueError(f"batch {index}: expected x or (x, y), got a sequence of {len(batch)} items")
                x = _batch_array("x", batch[0], index, np_dtype, lambda row: place(0, row))
                y = _batch_array("y", batch[1], index, np_dtype, lambda row: place(1, row))
                if y.shape[0] != x.shape[0]:
                    raise ValueError(f"batch {index}: y has {y.shape[0]} rows but x has {x.shape[0]}")
            else:
                x, y = _batch_array("x", batch, index, np_dtype, lambda row: place(0, row)), None
            if d is None:
                d, d_out = x.shape[1], None if y is None else y.shape[1]
            if x.shape[1] != d:
                raise ValueError(f"batch {index}: x has {x.shape[1]} features but earlier batches had {d}")
            if (y is None) != (d_out is None):
                raise ValueError(f"batch {index}: targets y are {'missing' if y is None else 'present'} but earlier "
                                 f"batches {'had' if y is None else 'had none'}; pass x or (x, y) throughout")
            if y is not None and y.shape[1] != d_out:
                raise ValueError(f"batch {index}: y has {y.shape[1]} features but earlier batches had {d_out}")
            if x.shape[0]:
                pending.append((x, y))
                pending_rows += x.shape[0]
                flush(final=False)
        flush(final=True)
        if not shards:
            raise ValueError("batches yielded no rows: nothing to write")
    except BaseException:
        for entry in shards:
            for key in ("x", "y"):
                if key in entry:
                    (directory / entry[key]).unlink(missing_ok=True)
        raise

    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": str(model), "hook": str(hook),
                "dtype": dtype, "d": int(d)}
    if d_out is not None:
        manifest["d_out"] = int(d_out)
    manifest.update(tokens=sum(s["rows"] for s in shards), scale=None if scale is None else float(scale),
                    shards=shards)
    atomic_write(manifest_path, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
    for name in old_files - {s[k] for s in shards for k in ("x", "y") if k in s}:
        (directory / name).unlink(missing_ok=True)
    fsync_path(directory)
    return manifest


# --- reading -------------------------------------------------------------------------------------

def read_manifest(directory) -> dict:
    """Load and validate directory/manifest.json (fields only; ShardSource checks the files)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {directory}: not an activation shard folder (see write_shards)")
    manifest = load_json(path, MANIFEST_MAX_BYTES, what="manifest")  # size and nesting bounded before parsing
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(manifest).__name__}")

    def field(name: str, check: Callable[[object], bool], expected: str, required: bool = True):
        if name not in manifest:
            if required:
                raise ValueError(f"{path}: field {name!r} is missing")
            return None
        value = manifest[name]
        if isinstance(value, bool) or not check(value):
            raise ValueError(f"{path}: field {name!r} must be {expected}, got {value!r}")
        return value

    field("format", lambda v: v == FORMAT, repr(FORMAT), required=False)
    version = field("format_version", lambda v: isinstance(v, int), "an int")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: unknown format_version {version}; this sparsekit reads version {FORMAT_VERSION}")
    field("dtype", lambda v: v in DTYPES, f"one of {', '.join(DTYPES)}")
    field("d", lambda v: isinstance(v, int) and v > 0, "a positive int")
    d_out = field("d_out", lambda v: isinstance(v, int) and v > 0, "a positive int", required=False)
    tokens = field("tokens", lambda v: isinstance(v, int) and v > 0, "a positive int")
    field("scale", lambda v: v is None or (isinstance(v, (int, float)) and math.isfinite(v) and v > 0),
          "a positive number or null")
    shards = field("shards", lambda v: isinstance(v, list) and len(v) > 0, "a non-empty list")
    keys = ("x", "y") if d_out is not None else ("x",)
    for i, shard in enumerate(shards):
        if not isinstance(shard, dict):
            raise ValueError(f"{path}: shards[{i}] must be an object, got {shard!r}")
        rows = shard.get("rows")
        if not is_int(rows) or rows < 1:
            raise ValueError(f"{path}: shards[{i}].rows must be a positive int, got {rows!r}")
        for key in keys:
            name = shard.get(key)
            if not isinstance(name, str) or not name or Path(name).name != name:
                raise ValueError(f"{path}: shards[{i}].{key} must be a file name in the folder, got {name!r}")
    if sum(s["rows"] for s in shards) != tokens:
        raise ValueError(f"{path}: field 'tokens' is {tokens} but the shards' rows sum to {sum(s['rows'] for s in shards)}")
    return manifest


def bf16_data_offset(path: Path, name: str, rows: int, width: int) -> int:
    """Read a bfloat16 shard's safetensors header only: it must hold tensor `name`, BF16 [rows, width],
    and the file must be long enough; returns the byte offset of its data (ValueError naming the file
    otherwise; nothing is allocated from what the header claims before it is checked)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) != 8:
                raise ValueError("shorter than a safetensors header")
            length = int.from_bytes(prefix, "little")
            if not 2 <= length <= min(_SAFETENSORS_HEADER_LIMIT, size - 8):
                raise ValueError(f"header length {length} is impossible for a {size}-byte shard")
            header = json.loads(f.read(length))
    except (ValueError, OSError, UnicodeDecodeError) as e:
        raise ValueError(f"shard {path} is not a readable bfloat16 .safetensors file ({e})") from None
    entry = header.get(name) if isinstance(header, dict) else None
    if not isinstance(entry, dict):
        raise ValueError(f"shard {path} holds no tensor {name!r}")
    if entry.get("dtype") != "BF16":
        raise ValueError(f"shard {path} holds {entry.get('dtype')!r} but the manifest's 'dtype' is bfloat16")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if shape != [rows, width]:
        raise ValueError(f"shard {path} has shape {shape} but the manifest says [{rows}, {width}]")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_int(o) for o in offsets)
            and offsets[1] - offsets[0] == rows * width * 2 and offsets[0] >= 0):
        raise ValueError(f"shard {path}: data_offsets {offsets!r} do not cover {rows} x {width} bfloat16 values")
    start = 8 + length + offsets[0]
    if size < start + rows * width * 2:
        raise ValueError(f"shard {path} is truncated: {size} bytes for {rows} x {width} bfloat16")
    return start


def shard_data_offset(path: Path, rows: int, width: int, dtype: str, key: str = "x") -> int:
    """Check shard `path`'s header against the manifest (rows x width of dtype, C order, and the
    file holding exactly those bytes) without reading its rows; the byte offset where they start."""
    if not path.is_file():
        raise FileNotFoundError(f"shard {path} listed in {MANIFEST} is missing")
    if dtype == BF16:
        return bf16_data_offset(path, key, rows, width)
    width_field = "d_out" if key == "y" else "d"
    with open(path, "rb") as handle:
        layout = npy_header(handle, path, "shard")
    if len(layout.shape) != 2:
        raise ValueError(f"shard {path} has shape {layout.shape}; expected 2-D [rows, {width_field}]")
    if layout.shape[1] != width:
        raise ValueError(f"shard {path} has {layout.shape[1]} columns but the manifest's {width_field!r} is {width}")
    if layout.dtype != np.dtype(dtype):
        raise ValueError(f"shard {path} holds {layout.dtype} but the manifest's 'dtype' is {dtype}")
    if layout.shape[0] != rows:
        raise ValueError(f"shard {path} has {layout.shape[0]} rows but the manifest's 'rows' says {rows}")
    if layout.fortran_order and rows > 1 and width > 1:
        raise ValueError(f"shard {path} is stored in Fortran order; shards are C order (rows contiguous), as "
                         f"write_shards writes them")
    layout.check_size(path, "shard")
    return layout.offset


class ShardChanged(ValueError):
    """A shard changed on disk while a ShardSource was reading it: it shrank, or was rewritten or
    replaced since the source checked it. ``path`` is the shard's file. (Reads go through ``pread``,
    never a memory map, so a shrinking file is this error, not a SIGBUS that kills the process.)"""

    def __init__(self, path, message: str):
        super().__init__(message)
        self.path = Path(path)


class NonFiniteActivations(ValueError):
    """A shard holds NaN or Inf: ``path`` is the shard's file and ``row`` the row (0-based) in it."""

    def __init__(self, path, row: int, message: str):
        super().__init__(message)
        self.path, self.row = Path(path), row


class _ShardFile:
    """One shard file open for positional reads: its rows start at ``offset`` and are
    ``row_bytes`` long; ``identity`` (device, inode, size, mtime) as first checked."""

    def __init__(self, path: Path, offset: int, row_bytes: int, identity: tuple):
        self.path, self.offset, self.row_bytes, self.identity = path, offset, row_bytes, identity
        try:
            self.handle = open(path, "rb", buffering=0)  # noqa: SIM115 (closed with the object: the LRU drops it)
        except FileNotFoundError:
            self.changed(None, "when opened for reading")
        self.changed(_identity(os.fstat(self.handle.fileno())), "when opened for reading")

    def check(self, when: str) -> None:
        """ShardChanged unless the shard's name still leads to the file first checked (same inode,
        size and modification time): not truncated, grown, rewritten, replaced or deleted."""
        try:
            found = _identity(os.stat(self.path))
        except FileNotFoundError:
            found = None
        self.changed(found, when)

    def changed(self, now: tuple | None, when: str) -> None:
        """ShardChanged saying how identity `now` (None: no file) differs from the first one, if it does."""
        before = self.identity
        if now == before:
            return
        if now is None:
            what = "disappeared"
        elif now[:2] != before[:2]:
            what = "was replaced by another file"
        elif now[2] < before[2]:
            what = f"shrank from {before[2]:,} to {now[2]:,} bytes"
        elif now[2] > before[2]:
            what = f"grew from {before[2]:,} to {now[2]:,} bytes"
        else:
            what = "was rewritten (its modification time changed)"
        raise ShardChanged(self.path, f"shard {self.path} {what} while training read it ({when}): restore the folder "
                                      f"as write_shards wrote it (or rewrite it) and resume from the last checkpoint")

    def read_rows(self, local: np.ndarray, out: memoryview, where: np.ndarray) -> None:
        """Rows `local` of this shard into rows `where` of out (the batch's bytes, row_bytes a row),
        in ascending file order, one read per run of rows adjacent both here and in out."""
        order = np.argsort(local, kind="stable")
        src, dst = local[order], where[order]
        breaks = np.flatnonzero((np.diff(src) != 1) | (np.diff(dst) != 1)) + 1
        firsts = np.concatenate(([0], breaks))
        ends = np.concatenate((breaks, [src.shape[0]]))
        rb, fd = self.row_bytes, self.handle.fileno()
        offsets = (self.offset + src[firsts].astype(np.int64) * rb).tolist()
        starts, stops = (dst[firsts] * rb).tolist(), ((dst[firsts] + ends - firsts) * rb).tolist()
        for offset, start, stop in zip(offsets, starts, stops):  # the hot loop: one system call a run
            if _preadv(fd, [out[start:stop]], offset) != stop - start:
                self._read_rest(out, start, stop, offset)

    def _read_rest(self, out: memoryview, start: int, stop: int, offset: int) -> None:
        """Read out[start:stop] from `offset` after a short read: retried while the file gives bytes;
        ShardChanged when it ends first (it shrank between the last check and the read)."""
        fd = self.handle.fileno()
        while start < stop:
            got = _preadv(fd, [out[start:stop]], offset)
            if got <= 0:
                self.check("reading rows")  # names how it changed when it can
                raise ShardChanged(self.path, f"shard {self.path} ended at byte {offset:,} while training read "
                                              f"it: it shrank; restore the folder as write_shards wrote it (or "
                                              f"rewrite it) and resume from the last checkpoint")
            start, offset = start + got, offset + got


def _identity(stat: os.stat_result) -> tuple:
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


if hasattr(os, "preadv"):
    _preadv = os.preadv
else:  # Windows: seek and read (a shard's handle is used by one thread)
    def _preadv(fd: int, buffers: list, offset: int) -> int:
        os.lseek(fd, offset, os.SEEK_SET)
        data = os.read(fd, len(buffers[0]))
        buffers[0][:len(data)] = data
        return len(data)


def _row_finite(array: np.ndarray, dtype: str) -> np.ndarray:
    """[rows] bool: the row holds no NaN or Inf (array: a batch as read, bfloat16 as its bit patterns)."""
    if dtype == BF16:
        return ((array & 0x7F80) != 0x7F80).all(axis=1)
    return np.isfinite(array).all(axis=1)


def _all_finite(array: np.ndarray, dtype: str) -> bool:
    if dtype in ("float32", "float64"):
        return checks.all_finite(torch.from_numpy(array))
    return bool(_row_finite(array, dtype).all())


class ShardSource:
    """An ActivationSource over a shard folder: x [b, d] or (x [b, d], y [b, d_out]) batches in the
    stored dtype, read with positional file reads (only the rows a batch needs; never a memory map,
    so a shard truncated under a running source is a ``ShardChanged`` error, not a SIGBUS).

    Each epoch visits every row once. With shuffle, the shard order is permuted by (seed, epoch),
    consecutive groups of buffer_shards shards form windows, and the rows of each window are
    permuted by (seed, epoch, window): mixing across shards with only an index array in memory.
    Without shuffle, rows come in manifest order. Batches span windows and shards; the last batch
    of an epoch is smaller. epochs=None repeats forever. State: {"epoch", "position"} plus settings.
    Attributes: manifest, d, d_out, dtype, tokens, scale.

    Data under your feet: each shard's header, size, inode and modification time are checked when
    the source is made and before every batch that reads it; a shard that changed raises
    ``ShardChanged`` naming it, and a row holding NaN or Inf raises ``NonFiniteActivations``
    naming the shard file and the row.
    """

    def __init__(self, directory, batch_size: int = 4096, shuffle: bool = True, seed: int = 0,
                 epochs: int | None = None, buffer_shards: int = 8):
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        self.batch_size = positive_int("batch_size", batch_size)
        self.shuffle = bool(shuffle)
        self.seed = check_seed(seed)
        self.epochs = check_epochs(epochs)
        self.buffer_shards = positive_int("buffer_shards", buffer_shards)
        m = self.manifest
        self.d, self.d_out, self.dtype = m["d"], m.get("d_out"), m["dtype"]
        self.tokens, self.scale = m["tokens"], m["scale"]
        self.shards = m["shards"]
        self._files: dict[str, tuple[int, tuple]] = {}  # file name -> (data offset, identity when checked)
        for shard in self.shards:
            for key, width in (("x", self.d), ("y", self.d_out)):
                if width is not None:
                    path = self.directory / shard[key]
                    offset = shard_data_offset(path, shard["rows"], width, self.dtype, key)
                    self._files[shard[key]] = (offset, _identity(path.stat()))
        self.offsets = np.cumsum([0] + [s["rows"] for s in self.shards])  # [n_shards + 1] global row starts
        self.epoch = 0
        self.position = 0
        self._windows: tuple[int, np.ndarray, list[np.ndarray]] | None = None  # (epoch, starts, shard groups)
        self._window_order: tuple[int, int, np.ndarray] | None = None  # (epoch, window, global rows)
        self._open_files: OrderedDict[int, tuple[_ShardFile, _ShardFile | None]] = OrderedDict()

    # --- the epoch's order of global row ids ---------------------------------------------------

    def _epoch_windows(self) -> tuple[np.ndarray, list[np.ndarray]]:
        """Window start positions [n_windows + 1] and each window's shards, for the current epoch."""
        if self._windows is None or self._windows[0] != self.epoch:
            order = permutation(len(self.shards), self.seed, self.epoch)
            groups = [order[i:i + self.buffer_shards] for i in range(0, len(order), self.buffer_shards)]
            sizes = [int(sum(self.shards[s]["rows"] for s in g)) for g in groups]
            self._windows = (self.epoch, np.cumsum([0] + sizes), groups)
        return self._windows[1], self._windows[2]

    def _window_rows(self, window: int, group: np.ndarray) -> np.ndarray:
        if self._window_order is None or self._window_order[:2] != (self.epoch, window):
            rows = np.concatenate([np.arange(self.offsets[s], self.offsets[s + 1]) for s in group])
            rows = rows[permutation(rows.shape[0], self.seed, self.epoch, window)]
            self._window_order = (self.epoch, window, rows)
        return self._window_order[2]

    def _global_rows(self, start: int, stop: int) -> np.ndarray:
        """Global row ids at epoch positions [start, stop)."""
        if not self.shuffle:
            return np.arange(start, stop)
        starts, groups = self._epoch_windows()
        pieces = []
        while start < stop:
            window = int(np.searchsorted(starts, start, side="right")) - 1
            end = min(stop, int(starts[window + 1]))
            rows = self._window_rows(window, groups[window])
            pieces.append(rows[start - starts[window]:end - starts[window]])
            start = end
        return np.concatenate(pieces)

    # --- reading rows ----------------------------------------------------------------------------

    def _open(self, shard: int) -> tuple[_ShardFile, _ShardFile | None]:
        """A shard's x (and y) files open for reading, a few kept open (each holds a file descriptor)."""
        if shard in self._open_files:
            self._open_files.move_to_end(shard)
            return self._open_files[shard]
        entry = self.shards[shard]
        files = tuple(None if width is None else self._open_file(entry[key], width)
                      for key, width in (("x", self.d), ("y", self.d_out)))
        self._open_files[shard] = files
        if len(self._open_files) > self.buffer_shards + 1:
            self._open_files.popitem(last=False)
        return files

    def _open_file(self, name: str, width: int) -> _ShardFile:
        offset, identity = self._files[name]
        return _ShardFile(self.directory / name, offset, width * self._itemsize, identity)

    @property
    def _itemsize(self) -> int:
        return 2 if self.dtype == BF16 else np.dtype(self.dtype).itemsize

    def _read(self, rows: np.ndarray) -> Batch:
        stored = np.uint16 if self.dtype == BF16 else self.dtype  # bfloat16: its bit patterns
        x = np.empty((rows.shape[0], self.d), dtype=stored)
        y = None if self.d_out is None else np.empty((rows.shape[0], self.d_out), dtype=stored)
        x_bytes = memoryview(x.reshape(-1).view(np.uint8))
        y_bytes = None if y is None else memoryview(y.reshape(-1).view(np.uint8))
        shard_of = np.searchsorted(self.offsets, rows, side="right") - 1
        for shard in np.unique(shard_of).tolist():
            where = np.nonzero(shard_of == shard)[0]
            local = rows[where] - self.offsets[shard]
            for file, out in zip(self._open(shard), (x_bytes, y_bytes)):
                if file is not None:
                    file.check("before reading a batch")
                    file.read_rows(local, out, where)
        for key, array in (("x", x), ("y", y)):
            if array is not None and not _all_finite(array, self.dtype):
                self._refuse_nonfinite(key, array, rows, shard_of)
        if self.dtype == BF16:
            x, y = (None if a is None else torch.from_numpy(a.view(np.int16)).view(torch.bfloat16) for a in (x, y))
            return x if y is None else (x, y)
        return torch.from_numpy(x) if y is None else (torch.from_numpy(x), torch.from_numpy(y))

    def _refuse_nonfinite(self, key: str, array: np.ndarray, rows: np.ndarray, shard_of: np.ndarray) -> None:
        """NonFiniteActivations naming the shard file and row of the batch's first non-finite row
        (of those in the lowest such file row)."""
        bad = np.flatnonzero(~_row_finite(array, self.dtype))
        shard = shard_of[bad]
        local = rows[bad] - self.offsets[shard]
        first = np.lexsort((local, shard))[0]
        shard, row = int(shard[first]), int(local[first])
        values = array[bad[first]]
        if self.dtype == BF16:
            values = torch.from_numpy(values.view(np.int16)).view(torch.bfloat16).float().numpy()
        column = int(np.flatnonzero(~np.isfinite(values))[0])
        path = self.directory / self.shards[shard][key]
        raise NonFiniteActivations(path, row, f"shard {path} row {row} holds {values[column]} (column {column}): "
                                              f"activations must be finite; rewrite the shards without it")

    def __iter__(self) -> Iterator[Batch]:
        while self.epochs is None or self.epoch < self.epochs:
            if self.position >= self.tokens:
                self.epoch, self.position = self.epoch + 1, 0
                continue
            start, stop = self.position, min(self.position + self.batch_size, self.tokens)
            batch = self._read(self._global_rows(start, stop))
            self.position = stop  # before yielding: a state taken now counts this batch as consumed
            yield batch

    # --- state -----------------------------------------------------------------------------------

    def _settings(self) -> dict:
        return {"tokens": self.tokens, "shards": len(self.shards), "batch_size": self.batch_size,
                "shuffle": self.shuffle, "seed": self.seed, "buffer_shards": self.buffer_shards}

    def state_dict(self) -> dict:
        return {"kind": "ShardSource", "epoch": self.epoch, "position": self.position, **self._settings()}

    def load_state_dict(self, state: dict) -> None:
        check_state("ShardSource", state, self._settings())
        epoch, position = state_int(state, "epoch"), state_int(state, "position")
        if position > self.tokens:
            raise ValueError(f"state field 'position' is {position}, beyond the {self.tokens} rows in {self.directory}")
        self.epoch, self.position = epoch, position


# --- single files --------------------------------------------------------------------------------

def load_activation_file(path) -> Tensor | tuple[Tensor, Tensor]:
    """A whole activation file in memory: ``.npy`` -> x [N, d]; ``.safetensors`` -> its tensor "x"
    [N, d], or (x, y [N, d_out]) when it also holds "y". (A shard folder: use ShardSource.)"""
    path = Path(path)
    if path.is_dir():
        hint = " (a shard folder: use ShardSource)" if (path / MANIFEST).exists() else ""
        raise ValueError(f"{path} is a directory{hint}; load_activation_file reads one .npy or .safetensors file")
    if not path.is_file():
        raise FileNotFoundError(f"activation file {path} does not exist")
    if path.suffix == ".npy":
        tensors = {"x": torch.from_numpy(read_npy(path, "activation file"))}  # header checked before allocating
    elif path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            tensors = load_file(path)
        except SafetensorError as e:
            raise ValueError(f"{path} is not a readable .safetensors file ({e})") from None
        if "x" not in tensors:
            raise ValueError(f"{path} has no tensor named 'x' (found: {', '.join(sorted(tensors)) or 'none'})")
    else:
        raise ValueError(f"{path}: unknown activation file type {path.suffix!r}; expected .npy or .safetensors")
    for name in ("x", "y"):
        t = tensors.get(name)
        if t is not None and (t.dim() != 2 or not t.is_floating_point() or t.shape[0] == 0):
            raise ValueError(f"{path}: {name!r} must be a non-empty 2-D floating-point array, got shape "
                             f"{tuple(t.shape)} {t.dtype}")
    if "y" in tensors and tensors["y"].shape[0] != tensors["x"].shape[0]:
        raise ValueError(f"{path}: 'y' has {tensors['y'].shape[0]} rows but 'x' has {tensors['x'].shape[0]}")
    return tensors["x"] if "y" not in tensors else (tensors["x"], tensors["y"])
