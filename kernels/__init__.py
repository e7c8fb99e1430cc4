"""Triton GPU kernels (packaged as ``sparsekit.kernels``).

Empty until the GPU-path issue lands: CUDA tensors run on sparsekit's PyTorch reference path
meanwhile, and ``sparsekit.backends()["cuda"]`` says so. Import kernels lazily from here: importing
Triton is slow and fails on machines without it.
"""
