"""Which build of the C++ kernels runs: the best instruction-set level this CPU supports.

The extension is compiled once per level (CMakeLists.txt), so one wheel runs on any x86-64 CPU:

- ``avx512``   ``sparsekit._C_avx512``, x86-64-v4 (AVX-512 F/BW/CD/DQ/VL on top of AVX2); the bf16
  screen's bound loops use AVX-512 intrinsics here;
- ``avx2``     ``sparsekit._C_avx2``, x86-64-v3 (AVX2, FMA, BMI2, F16C);
- ``baseline`` ``sparsekit._C_baseline``, the compiler's default target (x86-64: SSE2), the only one
  built on other architectures.

``_C_baseline`` runs on any CPU of its architecture, so it is imported first and asks the CPU
(cpuid, with the OS's support for the wide registers) which levels it runs; the best one that was
built is then imported. The choice is made at import, never at build time: no module is ever
loaded on a CPU that lacks its instructions.

``SPARSEKIT_ISA=avx512|avx2|baseline`` forces a level (a lower one: to compare, or to step around
a fault). A level this CPU lacks, or an unknown name, loads nothing and is refused: the first CPU op
raises BackendUnavailable naming the variable (never an illegal instruction, never a quiet fallback;
``import sparsekit`` itself still works). ``SPARSEKIT_ISA=none`` loads no extension (every CPU op
then runs sparsekit.ops.reference).
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import NamedTuple

from sparsekit.errors import BackendUnavailable

ISA_LEVELS = ("avx512", "avx2", "baseline")  # best first
NO_EXTENSION = "none"
ISA_ENV = "SPARSEKIT_ISA"


class LoadedExtension(NamedTuple):
    """What ``load_extension`` found: the module (None when none loaded), its level, the levels
    this CPU supports (best first; empty when unknown), why no module loaded (else None), and
    whether SPARSEKIT_ISA asked for something that cannot run (then CPU ops must refuse to run)."""
    module: ModuleType | None
    isa: str | None
    cpu_levels: tuple = ()
    error: str | None = None
    refused: bool = False


def forced_isa() -> str | None:
    """The level named by SPARSEKIT_ISA ("avx512", "avx2", "baseline" or "none"), None when unset;
    BackendUnavailable for any other value."""
    name = os.environ.get(ISA_ENV, "").strip().lower()
    if not name:
        return None
    if name not in ISA_LEVELS + (NO_EXTENSION,):
        raise BackendUnavailable(f"{ISA_ENV}={name!r} is not one of {', '.join(ISA_LEVELS + (NO_EXTENSION,))}")
    return name


def _import_level(level: str) -> ModuleType:
    return importlib.import_module(f"sparsekit._C_{level}")


def load_extension() -> LoadedExtension:
    """Import the C++ kernels built for the best level this CPU runs (or the one SPARSEKIT_ISA
    forces). Never raises: the module is None when the extension was not built or SPARSEKIT_ISA
    is "none", and ``refused`` is set (with the reason in ``error``) when SPARSEKIT_ISA names an
    unknown level, one this CPU lacks or one that was not built."""
    try:
        return _load(forced_isa())
    except BackendUnavailable as error:
        return LoadedExtension(None, None, error=str(error), refused=True)


def _load(forced: str | None) -> LoadedExtension:
    if forced == NO_EXTENSION:
        return LoadedExtension(None, None, error=f"{ISA_ENV}=none")
    try:
        baseline = _import_level("baseline")
    except ImportError as error:  # no compiler at install time, or SPARSEKIT_NO_EXTENSION=1
        if forced is not None:
            raise BackendUnavailable(f"{ISA_ENV}={forced} but sparsekit's C++ extension is unavailable: {error}") from None
        return LoadedExtension(None, None, error=str(error))
    cpu_levels = tuple(baseline.cpu_isa_levels())
    if forced is not None and forced not in cpu_levels:
        raise BackendUnavailable(f"{ISA_ENV}={forced}: this CPU does not run it (it runs {', '.join(cpu_levels)}); "
                           f"choose one of those, or unset {ISA_ENV}")
    for level in [forced] if forced is not None else cpu_levels:  # cpu_levels ends in "baseline"
        if level == "baseline":
            break
        try:
            return LoadedExtension(_import_level(level), level, cpu_levels, None)
        except ImportError as error:  # a build that left this level out: the next one down
            if forced is not None:
                raise BackendUnavailable(f"{ISA_ENV}={forced} but sparsekit._C_{forced} was not built: {error}") from None
    return LoadedExtension(baseline, "baseline", cpu_levels, None)
