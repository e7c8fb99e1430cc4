"""The CPU GEMM behind the TopK encoder: the one GEMM a fused step cannot avoid.

On the CPUs measured here NumPy's bundled OpenBLAS runs the float32 encoder GEMM faster than
torch's (DESIGN.md: ~1.7x on an AVX2 EPYC; ~1.2x on an AVX-512 one). Tensors cross as zero-copy
``Tensor.numpy()`` views and the product is written into a preallocated output.
SPARSEKIT_CPU_GEMM=torch|numpy picks one (default numpy).

Only the TopK encoder uses it: its selection runs on one thread beside each GEMM tile. Elsewhere
OpenBLAS's worker, which spins for a while after each call, would fight torch's OpenMP threads
for the cores (measured: dense encoders ran 2x slower through it), so other GEMMs use torch.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from torch import Tensor


def gemm_library() -> str:
    """The library that runs CPU matmuls: "numpy" (OpenBLAS) or "torch"."""
    name = os.environ.get("SPARSEKIT_CPU_GEMM", "numpy").strip().lower()
    if name not in ("numpy", "torch"):
        raise RuntimeError(f"SPARSEKIT_CPU_GEMM={name!r} is not 'numpy' or 'torch'")
    return name


def matmul_into(a: Tensor, b: Tensor, out: Tensor) -> Tensor:
    """out = a @ b for contiguous CPU float tensors: a [m, p], b [p, q], out [m, q]."""
    if gemm_library() == "numpy":
        np.matmul(a.detach().numpy(), b.detach().numpy(), out=out.detach().numpy())
    else:
        torch.matmul(a.detach(), b.detach(), out=out)
    return out
