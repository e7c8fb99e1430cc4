"""The CPU back end: the C++ kernels (csrc/, loaded per instruction-set level by ``isa``) registered
as torch custom ops (``custom_ops``), the screened encoders (``screen``) and the BLAS-backed GEMM
helpers they share (``gemm``). Reached only through the op door, ``sparsekit.ops``."""
