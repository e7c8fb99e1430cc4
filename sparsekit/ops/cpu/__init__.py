"""The CPU back end: the C++ kernels (csrc/, loaded per instruction-set level by ``isa``) registered
as torch custom ops, in modules named like ``sparsekit.kernels``'s: ``encode`` (the encoders),
``decode`` (sparse_decode), ``ghost`` (the ghost-grads term) and ``sparse`` (the sparse products
their backward passes share); the screened encoders (``screen``) and the BLAS-backed GEMM helpers
they share (``gemm``). Reached only through the op door, ``sparsekit.ops``, whose ``cpu_ops()``
table names the custom op each op runs; importing a module registers its custom ops.

Nothing here is imported with the package itself (``sparsekit.ops.backend`` imports ``isa`` while
the door is still loading). For the deprecated path ``sparsekit.cpu_ops`` (``sparsekit._moved``),
which resolves here, the names of that one module, since split into encode / decode / ghost /
sparse, are read from those modules on first use (reading works; patching such a name here does
not reach the module that uses it: patch it there).
"""
from __future__ import annotations

MODULES = ("decode", "encode", "gemm", "ghost", "isa", "screen", "sparse", "tuner", "tuning")  # this package's, never looked up


def __getattr__(name: str):
    """A public name of the old ``sparsekit.cpu_ops``, from the module that holds it now."""
    if not name.startswith("_") and name not in MODULES:
        from . import decode, encode, ghost, sparse
        for module in (encode, decode, ghost, sparse):
            if name in vars(module):
                return vars(module)[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
