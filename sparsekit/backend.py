"""Which implementation runs an op: chosen per tensor device, forced with SPARSEKIT_BACKEND.

- "cpp":    sparsekit._C (C++17, OpenMP) for float32/float64 CPU tensors.
- "triton": Triton kernels for CUDA tensors (sparsekit.kernels; not built yet).
- "torch":  sparsekit.reference, plain PyTorch, on any device and dtype.

SPARSEKIT_BACKEND=torch|cpp|triton forces one; forcing one that cannot run raises RuntimeError
rather than quietly falling back. CPU bfloat16/float16 always use the reference path.
"""
from __future__ import annotations

import os

import torch

BACKEND_NAMES = ("torch", "cpp", "triton")

try:
    from . import _C
    CPP_IMPORT_ERROR: str | None = None
except ImportError as error:  # no compiler at install time, or SPARSEKIT_NO_EXTENSION=1
    _C = None
    CPP_IMPORT_ERROR = str(error)

CPP_DTYPES = (torch.float32, torch.float64)


def forced_backend() -> str | None:
    """The backend named by SPARSEKIT_BACKEND, or None when unset."""
    name = os.environ.get("SPARSEKIT_BACKEND", "").strip().lower()
    if not name:
        return None
    if name not in BACKEND_NAMES:
        raise RuntimeError(f"SPARSEKIT_BACKEND={name!r} is not one of {', '.join(BACKEND_NAMES)}")
    return name


def _triton_unavailable_reason() -> str:
    return ("sparsekit's Triton kernels are not built yet (the GPU-path issue); "
            "CUDA tensors run on the torch backend")


def _default_cpu() -> str:
    return "cpp" if _C is not None else "torch"


def backend_for_device(device_type: str) -> str:
    """The backend that runs ops on tensors of this device type ("cpu", "cuda", ...)."""
    forced = forced_backend()
    if forced == "torch":
        return "torch"
    if forced == "cpp":
        if _C is None:
            raise RuntimeError(f"SPARSEKIT_BACKEND=cpp but sparsekit._C is unavailable: {CPP_IMPORT_ERROR}")
        if device_type != "cpu":
            raise RuntimeError(f"SPARSEKIT_BACKEND=cpp runs CPU tensors only, got a {device_type} tensor")
        return "cpp"
    if forced == "triton":
        raise RuntimeError(f"SPARSEKIT_BACKEND=triton is unavailable: {_triton_unavailable_reason()}")
    return _default_cpu() if device_type == "cpu" else "torch"


def backend_for(tensor: torch.Tensor) -> str:
    """The backend for an op whose main input is ``tensor`` (device and dtype decide)."""
    name = backend_for_device(tensor.device.type)
    if name == "cpp" and tensor.dtype not in CPP_DTYPES:
        if forced_backend() == "cpp":
            raise RuntimeError(f"SPARSEKIT_BACKEND=cpp supports float32/float64, got {tensor.dtype}")
        return "torch"
    return name


def backends() -> dict:
    """The backend each device uses: {"cpu": "cpp"|"torch", "cuda": "triton"|"torch"|None}.

    "cuda" is None when CUDA is unavailable (or SPARSEKIT_BACKEND=cpp). Raises RuntimeError if SPARSEKIT_BACKEND forces a
    backend that cannot run here.
    """
    cpu = backend_for_device("cpu")
    if not torch.cuda.is_available() or forced_backend() == "cpp":
        return {"cpu": cpu, "cuda": None}
    return {"cpu": cpu, "cuda": backend_for_device("cuda")}
