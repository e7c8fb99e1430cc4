"""The CPU GEMM behind the TopK encoder: the one GEMM a fused step cannot avoid.

On the CPUs measured here NumPy's bundled OpenBLAS runs the float32 encoder GEMM faster than
torch's (DESIGN.md: ~1.7x on an AVX2 EPYC; ~1.2x on an AVX-512 one). Tensors cross as zero-copy
``Tensor.numpy()`` views and the product is written into a preallocated output.

But OpenBLAS's worker thread spins for ~0.1 s after each call and fights torch's OpenMP threads
(which sparsekit._C shares) for the cores. Measured on a 2-core AVX-512 EPYC, a TopK step through
OpenBLAS was 7x slower at B=256, d=24, n=96, 1.7x slower at 2 GFLOP, 1.3x slower at 17 GFLOP and
~5% faster at 69 GFLOP (B=4096, d=512, n=16384). So SPARSEKIT_CPU_GEMM=auto (the default) uses
OpenBLAS only for encoder GEMMs of at least OPENBLAS_MIN_FLOP, and torch otherwise;
SPARSEKIT_CPU_GEMM=numpy|torch forces one. Only the TopK encoder uses this module; every other
GEMM is torch's.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from torch import Tensor


OPENBLAS_MIN_FLOP = 2**35  # ~34 GFLOP


def gemm_library(flop: float = float("inf")) -> str:
    """The library that runs an encoder GEMM of `flop` floating-point operations: "numpy"
    (OpenBLAS) or "torch"."""
    name = os.environ.get("SPARSEKIT_CPU_GEMM", "auto").strip().lower()
    if name not in ("auto", "numpy", "torch"):
        raise RuntimeError(f"SPARSEKIT_CPU_GEMM={name!r} is not 'auto', 'numpy' or 'torch'")
    if name == "auto":
        return "numpy" if flop >= OPENBLAS_MIN_FLOP else "torch"
    return name


def matmul_into(a: Tensor, b: Tensor, out: Tensor, library: str = "torch") -> Tensor:
    """out = a @ b for contiguous CPU float tensors: a [m, p], b [p, q], out [m, q]."""
    if library == "numpy":
        np.matmul(a.detach().numpy(), b.detach().numpy(), out=out.detach().numpy())
    else:
        torch.matmul(a.detach(), b.detach(), out=out)
    return out
