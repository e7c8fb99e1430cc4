"""The CPU path's crossovers, measured on the machine that runs them and cached (``sparsekit tune``).

The CPU encoders choose between paths by size, at crossovers that depend on the machine (its
cores, caches, bf16 support and BLAS). Each is a knob with a measured default, the module constant
beside the code that uses it (measured on the 2-core AVX-512 EPYC):

- ``parallel_min_flop`` (``gemm.PARALLEL_MIN_FLOP``): the float32 encoder GEMM size (2*B*d*n) from
  which NumPy's OpenBLAS on row tiles beats torch's GEMM;
- ``pooled_mm_min_flop`` (``gemm.POOLED_MM_MIN_FLOP``): the size from which the dead-latent
  remedies' dense products (``gemm.matmul``) run on OpenBLAS row tiles instead of torch.mm;
- ``screen_min_flop`` (``screen.SCREEN_MIN_FLOP``): the size from which the bf16-screened encoder
  beats the float32 one (CPUs with native bf16 only);
- ``screen_min_n_over_k`` (``screen.SCREEN_MIN_N_OVER_K``): the screen for TopK/BatchTopK only when
  n >= this * k;
- ``screen_rows`` (``screen.SCREEN_ROWS``): rows per bf16 GEMM block.

A lookup (``chosen(name)``) takes, first found: the values a resumed run recorded in its checkpoint
(``pin``: its remaining steps then sum in the order its first ones did, so a killed run stays
bit-identical even when the cache changed in between); this machine's cache file; the default.
Nothing is measured unless asked (``sparsekit tune``, or ``tuner.tune()`` then ``save()``): a
training run never tunes on its own. SPARSEKIT_CPU_GEMM and SPARSEKIT_BF16_SCREEN still force a path over all of
these.

The cache is one JSON file per machine and software, like Triton's autotune cache:
``<folder>/<cpu>-<isa>-<hash>.json``, the hash over ``cache_key()`` (CPU model, the C++ kernels'
ISA level and the SHA-256 of their module, sparsekit, torch and NumPy versions, torch's thread
count). The folder is $SPARSEKIT_TUNING_CACHE, else $SPARSEKIT_CACHE/tuning, else
$XDG_CACHE_HOME/sparsekit/tuning, else ~/.cache/sparsekit/tuning. It is read once per process with
the bounded JSON reader and checked (format, key, every value's name, type and range); a corrupt or
foreign file is ignored with one warning and the defaults apply.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import platform
import re
import threading
from pathlib import Path
from typing import NamedTuple

from sparsekit._util.atomic import atomic_write_bytes
from sparsekit._util.bounded import load_json
from sparsekit._util.log import logger
from sparsekit._util.version import VERSION

FORMAT = 1
CACHE_ENV = "SPARSEKIT_TUNING_CACHE"
CACHE_LIMIT = 2**20   # bytes: a cache file is a few kB
NEVER = 2**60         # a crossover never reached: "this path did not win at any size measured"


class Knob(NamedTuple):
    """A tuned value: the module and constant holding its default, its range, what it decides."""
    module: str
    attribute: str
    low: int
    high: int
    what: str


KNOBS = {
    "parallel_min_flop": Knob("sparsekit.ops.cpu.gemm", "PARALLEL_MIN_FLOP", 0, NEVER,
                              "float32 encoder GEMM on OpenBLAS row tiles from this many FLOP (else torch)"),
    "pooled_mm_min_flop": Knob("sparsekit.ops.cpu.gemm", "POOLED_MM_MIN_FLOP", 0, NEVER,
                               "dense remedy GEMMs on OpenBLAS row tiles from this many FLOP (else torch.mm)"),
    "screen_min_flop": Knob("sparsekit.ops.cpu.screen", "SCREEN_MIN_FLOP", 0, NEVER,
                            "bf16-screened encoders from this many FLOP (CPUs with native bf16)"),
    "screen_min_n_over_k": Knob("sparsekit.ops.cpu.screen", "SCREEN_MIN_N_OVER_K", 1, NEVER,
                                "bf16 screen for TopK/BatchTopK only when n >= this * k"),
    "screen_rows": Knob("sparsekit.ops.cpu.screen", "SCREEN_ROWS", 1, 2**24, "rows per bf16 GEMM block"),
    "select_threshold_min_share": Knob("sparsekit.ops.cpu.encode", "THRESHOLD_SELECT_MIN_SHARE", 0, 2**24,
                                       "whole-row top-k by threshold, not a heap, when k * this >= the width "
                                       "(0: always the heap)"),
}

_lock = threading.Lock()
_cache: dict | None = None          # the cache file's values once read ({} when none or refused)
_cache_loaded = False
_pinned: dict | None = None         # a resumed run's values that differ from the defaults
_pinned_from: str | None = None
_trying: dict = {}                  # values under measurement (tune() only)


# --- lookups --------------------------------------------------------------------------------------

def default(name: str) -> int:
    """The measured default of knob ``name``: its module constant."""
    knob = KNOBS[name]
    return getattr(importlib.import_module(knob.module), knob.attribute)


def chosen(name: str) -> int:
    """The value of knob ``name`` in effect: pinned by a resumed run, else the cache's, else the default."""
    if name in _trying:
        return _trying[name]
    if _pinned is not None:
        return _pinned.get(name, default(name))
    values = _cached_values()
    return values[name] if name in values else default(name)


def in_effect() -> dict[str, int]:
    """Every knob's value in effect, by name."""
    return {name: chosen(name) for name in KNOBS}


def source() -> str:
    """Where the values in effect come from, in words."""
    if _pinned is not None:
        return f"recorded in {_pinned_from}"
    return f"tuned ({cache_path()})" if _cached_values() else "defaults (no tuning cache for this machine)"


FORCING = ("SPARSEKIT_CPU_GEMM", "SPARSEKIT_BF16_SCREEN")  # set, these choose a path over any crossover


def forced() -> dict[str, str]:
    """The FORCING variables that are set, with their values."""
    return {name: os.environ[name].strip().lower() for name in FORCING if os.environ.get(name, "").strip()}


def record() -> dict:
    """What a checkpoint records about the CPU paths: the values in effect, their source, the
    variables forcing a path, and the C++ kernels' ISA level (which also decides summation orders,
    and cannot change in a process)."""
    from sparsekit.ops.backend import CPP_ISA
    return {"values": in_effect(), "source": source(), "forced": forced(), "isa": CPP_ISA}


def pin(values: dict | None, where: str) -> dict[str, int]:
    """Use ``values`` (a checkpoint's recorded ones, from ``where``) instead of the cache from now on
    in this process, until ``unpin()``. None (a checkpoint written before sparsekit recorded them):
    the defaults, which every run then used. Names not known here are ignored; a value out of its
    knob's range is a ValueError naming it. Returns the values now in effect."""
    global _pinned, _pinned_from
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise ValueError(f"{where}: the recorded CPU paths must be an object, got {type(values).__name__}")
    checked = {name: _checked(name, values[name], where) for name in KNOBS if name in values}
    with _lock:
        # Only what differs from the default is kept: a pin of the defaults leaves the module constants in charge.
        _pinned = {name: value for name, value in checked.items() if value != default(name)}
        _pinned_from = where
    return in_effect()


def unpin() -> None:
    """Back to the cache (or the defaults) for the next run in this process."""
    global _pinned, _pinned_from
    with _lock:
        _pinned, _pinned_from = None, None


def reload() -> None:
    """Read the cache file again on the next lookup (after ``save`` or ``reset``, or a changed
    $SPARSEKIT_TUNING_CACHE)."""
    global _cache, _cache_loaded
    with _lock:
        _cache, _cache_loaded = None, False


@contextlib.contextmanager
def trying(**values):
    """Knob values for the duration (a tuner's measurement), above pins and the cache."""
    before = dict(_trying)
    _trying.update(values)
    try:
        yield
    finally:
        _trying.clear()
        _trying.update(before)


def _checked(name: str, value, where: str) -> int:
    knob = KNOBS[name]
    if type(value) is not int or not knob.low <= value <= knob.high:
        raise ValueError(f"{where}: {name} must be an int in [{knob.low}, {knob.high}], got {value!r}")
    return value


# --- the cache file -------------------------------------------------------------------------------

def cache_dir() -> Path:
    """$SPARSEKIT_TUNING_CACHE, else $SPARSEKIT_CACHE/tuning, else $XDG_CACHE_HOME/sparsekit/tuning,
    else ~/.cache/sparsekit/tuning."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    if os.environ.get("SPARSEKIT_CACHE"):
        return Path(os.environ["SPARSEKIT_CACHE"]).expanduser() / "tuning"
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "sparsekit" / "tuning"
    return Path.home() / ".cache" / "sparsekit" / "tuning"


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


_extension_digest: str | None = None


def _extension_sha256() -> str:
    """SHA-256 (12 hex digits) of the loaded C++ module's file, "none" without one."""
    global _extension_digest
    if _extension_digest is None:
        from sparsekit.ops.backend import _C
        path = getattr(_C, "__file__", None)
        if path is None:
            _extension_digest = "none"
        else:
            with open(path, "rb") as handle:
                _extension_digest = hashlib.file_digest(handle, "sha256").hexdigest()[:12]
    return _extension_digest


def cache_key() -> dict:
    """What a cache file is valid for: this CPU, the C++ kernels loaded, the library versions, the threads."""
    import numpy
    import torch

    from sparsekit.ops.backend import CPP_ISA
    return {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "isa": CPP_ISA,
            "extension_sha256": _extension_sha256(), "sparsekit": VERSION, "torch": torch.__version__,
            "numpy": numpy.__version__}


def cache_path(key: dict | None = None) -> Path:
    """This machine's cache file: <cache_dir()>/<cpu>-<isa>-<hash of cache_key()>.json."""
    key = cache_key() if key is None else key
    slug = re.sub(r"[^a-z0-9]+", "-", key["cpu"].lower()).strip("-")[:40] or "cpu"
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / f"{slug}-{key['isa'] or 'noext'}-{digest}.json"


def read_cache(path: Path, key: dict) -> dict:
    """The values in cache file ``path`` if it was written for ``key`` and holds only known knobs in
    range; ValueError (RefusedFile among them) naming the file and what is wrong otherwise."""
    data = load_json(path, CACHE_LIMIT, max_depth=8, what="tuning cache")
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path}: not a sparsekit tuning cache of format {FORMAT}")
    if data.get("key") != key:
        raise ValueError(f"{path}: written for another machine or software ({_difference(data.get('key'), key)})")
    values = data.get("values")
    if not isinstance(values, dict):
        raise ValueError(f"{path}: 'values' must be an object")
    unknown = sorted(set(values) - set(KNOBS))
    if unknown:
        raise ValueError(f"{path}: unknown knob {unknown[0]!r}")
    return {name: _checked(name, value, str(path)) for name, value in values.items()}


def _difference(found, key: dict) -> str:
    if not isinstance(found, dict):
        return "no key"
    fields = [name for name in key if found.get(name) != key[name]]
    return ", ".join(f"{name} {found.get(name)!r}, here {key[name]!r}" for name in fields[:2]) or "extra fields"


def _cached_values() -> dict:
    global _cache, _cache_loaded
    if _cache_loaded:
        return _cache
    with _lock:
        if not _cache_loaded:
            path = cache_path()
            try:
                _cache = read_cache(path, cache_key()) if os.path.lexists(path) else {}
            except (ValueError, OSError) as error:  # corrupt, foreign, unreadable: the defaults, said once
                reason = error if isinstance(error, ValueError) else f"{path}: {error.strerror or error}"
                logger.warning("ignoring the CPU tuning cache (%s); the default crossovers apply "
                               "(`sparsekit tune` measures them again)", reason)
                _cache = {}
            _cache_loaded = True
    return _cache


def load_file(path: Path | None = None) -> dict | None:
    """The whole record in this machine's cache file (for ``--show``), None when there is none;
    ValueError when it is corrupt or foreign."""
    path = cache_path() if path is None else path
    if not os.path.lexists(path):
        return None
    read_cache(path, cache_key())
    return load_json(path, CACHE_LIMIT, max_depth=8, what="tuning cache")


def save(result: dict) -> Path:
    """Write ``tune()``'s result as this machine's cache file (atomically) and use it from now on."""
    path = cache_path(result["key"])
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(result, indent=1).encode())
    reload()
    return path


def reset() -> Path | None:
    """Delete this machine's cache file (the defaults apply again); its path, or None when there was none."""
    path = cache_path()
    if not os.path.lexists(path):
        return None
    os.unlink(path)
    reload()
    return path


def shown(value: int) -> str:
    if value >= NEVER:
        return "never"
    return f"{value / 1e9:.3g} GFLOP" if value >= 10**6 else str(value)


def describe() -> list[str]:
    """Lines saying each knob's value in effect and where it comes from (``sparsekit tune --show``, the benches)."""
    lines = [f"CPU paths: {source()}"]
    for name, value in in_effect().items():
        lines.append(f"  {name} = {shown(value)} (default {shown(default(name))}): {KNOBS[name].what}")
    return lines

