"""Which implementation runs an op: chosen per tensor device, forced with SPARSEKIT_BACKEND.

- "cpp":    the C++17/OpenMP kernels for float32/float64 CPU tensors, built once per instruction-set
            level; sparsekit.ops.cpu.isa loads the best this CPU runs (SPARSEKIT_ISA forces one).
- "triton": Triton kernels (sparsekit.kernels) for float32/bfloat16/float16 CUDA tensors, chosen
            for CUDA whenever Triton is installed; on CPU tensors only when forced, under Triton's
            interpreter (TRITON_INTERPRET=1, for tests).
- "torch":  sparsekit.ops.reference, plain PyTorch, on any device and dtype.

SPARSEKIT_BACKEND=torch|cpp|triton forces one; forcing one that cannot run raises
BackendUnavailable (a RuntimeError) rather than quietly falling back; so does a SPARSEKIT_ISA the
C++ kernels cannot honour, on the first op that would have run them. CPU bfloat16/float16 always use the reference path, and so do
float64 CUDA tensors (the Triton kernels take 32- and 16-bit floats).
"""
from __future__ import annotations

import importlib.util
import os

import torch

from sparsekit.errors import BackendUnavailable
from sparsekit.ops.cpu.isa import load_extension

BACKEND_NAMES = ("torch", "cpp", "triton")

_extension = load_extension()
_C = _extension.module  # the C++ kernels (None when not built, or SPARSEKIT_ISA=none)
CPP_ISA: str | None = _extension.isa  # "avx512" | "avx2" | "baseline" | None
CPU_ISA_LEVELS: tuple = _extension.cpu_levels  # the levels this CPU runs, best first
CPP_IMPORT_ERROR: str | None = _extension.error
CPP_REFUSED: bool = _extension.refused  # SPARSEKIT_ISA asked for what cannot run: CPU ops refuse

CPP_DTYPES = (torch.float32, torch.float64)
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def triton_installed() -> bool:
    """Whether Triton can be imported (checked without importing it: that is slow)."""
    return importlib.util.find_spec("triton") is not None


def forced_backend() -> str | None:
    """The backend named by SPARSEKIT_BACKEND, or None when unset."""
    name = os.environ.get("SPARSEKIT_BACKEND", "").strip().lower()
    if not name:
        return None
    if name not in BACKEND_NAMES:
        raise BackendUnavailable(f"SPARSEKIT_BACKEND={name!r} is not one of {', '.join(BACKEND_NAMES)}")
    return name


def _triton_unavailable_reason(device_type: str) -> str | None:
    """Why the Triton kernels cannot run on this device type, or None when they can."""
    if not triton_installed():
        return "Triton is not installed (pip install 'sparsekit[gpu]')"
    if device_type == "cuda":
        return None
    if device_type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") != "1":
            return ("CPU tensors run the Triton kernels only under Triton's interpreter: set "
                    "TRITON_INTERPRET=1 before sparsekit.kernels is first imported")
        return None
    return f"the Triton kernels run CUDA tensors, got a {device_type} tensor"


def _default_cpu() -> str:
    if CPP_REFUSED:
        raise BackendUnavailable(CPP_IMPORT_ERROR)
    return "cpp" if _C is not None else "torch"


def backend_for_device(device_type: str) -> str:
    """The backend that runs ops on tensors of this device type ("cpu", "cuda", ...)."""
    forced = forced_backend()
    if forced == "torch":
        return "torch"
    if forced == "cpp":
        if _C is None:
            raise BackendUnavailable(f"SPARSEKIT_BACKEND=cpp but sparsekit's C++ extension is unavailable: {CPP_IMPORT_ERROR}")
        if device_type != "cpu":
            raise BackendUnavailable(f"SPARSEKIT_BACKEND=cpp runs CPU tensors only, got a {device_type} tensor")
        return "cpp"
    if forced == "triton":
        reason = _triton_unavailable_reason(device_type)
        if reason is not None:
            raise BackendUnavailable(f"SPARSEKIT_BACKEND=triton is unavailable: {reason}")
        return "triton"
    if device_type == "cpu":
        return _default_cpu()
    return "triton" if device_type == "cuda" and triton_installed() else "torch"


def backend_for(tensor: torch.Tensor) -> str:
    """The backend for an op whose main input is ``tensor`` (device and dtype decide)."""
    name = backend_for_device(tensor.device.type)
    if name == "cpp" and tensor.dtype not in CPP_DTYPES:
        if forced_backend() == "cpp":
            raise BackendUnavailable(f"SPARSEKIT_BACKEND=cpp supports float32/float64, got {tensor.dtype}")
        return "torch"
    if name == "triton" and tensor.dtype not in TRITON_DTYPES:
        if forced_backend() == "triton":
            raise BackendUnavailable(f"SPARSEKIT_BACKEND=triton supports float32/bfloat16/float16, got {tensor.dtype}")
        return "torch"
    return name


def backends() -> dict:
    """The backend each device uses, and the C++ kernels' instruction-set level:
    {"cpu": "cpp"|"torch"|"triton", "cuda": "triton"|"torch"|None, "cpu_isa": "avx512"|"avx2"|"baseline"|None}.

    "cpu_isa" is the level of the C++ module loaded (sparsekit.ops.cpu.isa), None when CPU ops do not
    run it.
    "cuda" is None when CUDA is unavailable (or SPARSEKIT_BACKEND=cpp), "triton" when Triton is
    installed. "cpu" is "triton" only when forced under the interpreter (TRITON_INTERPRET=1), and
    None when Triton is forced on a GPU machine without the interpreter. Raises RuntimeError if
    SPARSEKIT_BACKEND forces a backend that cannot run here.
    """
    forced = forced_backend()
    cuda = None
    if torch.cuda.is_available() and forced != "cpp":
        cuda = backend_for_device("cuda")
    if forced == "triton" and cuda is not None:  # forced onto the GPU: CPU tensors run only interpreted
        cpu = "triton" if _triton_unavailable_reason("cpu") is None else None
    else:
        cpu = backend_for_device("cpu")
    return {"cpu": cpu, "cuda": cuda, "cpu_isa": CPP_ISA if cpu == "cpp" else None}
