"""sparsekit's ops on NumPy arrays and on any DLPack array (JAX, CuPy, ...), without copies.

    import sparsekit.numpy as snp
    codes = snp.topk_encode(x, W_enc, b_enc, k=32)          # x, W_enc, b_enc: np.ndarray
    x_hat = snp.sparse_decode(codes.values, codes.indices, W_dec, b_dec)

Inputs cross into torch as views (``torch.from_numpy`` for NumPy arrays, ``torch.from_dlpack`` for
anything with ``__dlpack__``), so contiguous float32/float64 CPU arrays reach the C++ kernels
without a copy; results come back as views of the tensors the kernels wrote (``tensor.numpy()``).
The ops here are the forward ops of ``sparsekit.ops`` (same checks, same ValueErrors) run without
autograd, plus the sparse decode backward as explicit functions.

What comes back: NumPy arrays when every array argument is a NumPy array; otherwise torch tensors,
which export ``__dlpack__``, so the caller's framework takes them back without a copy
(``jax.numpy.from_dlpack(out)``, ``cupy.from_dlpack(out)``). Arrays on a GPU stay there (the ops
then run on torch's CUDA path).

Shapes as in ``sparsekit.ops``: x [B, d_in], W_enc [d_in, n], b_enc [n], W_dec [n, d_out],
b_dec [d_out]; TopK codes (values [B, k], indices [B, k] int64); COO codes (values, rows, cols) [E].
"""
from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy
import torch

from . import ops
from .ops import BatchTopKCodes, TopKCodes

__all__ = ["BatchTopKCodes", "SparseDecodeGrads", "TopKCodes", "batchtopk_encode", "from_dlpack", "jumprelu_encode",
           "relu_encode", "sparse_decode", "sparse_decode_backward", "sparse_decode_coo",
           "sparse_decode_coo_backward", "to_dlpack", "topk_encode"]


class SparseDecodeGrads(NamedTuple):
    """Gradients of a sparse decode y = S @ W_dec + b_dec given grad_y [B, d_out]:
    values (like the codes' values), W_dec [n, d_out], b_dec [d_out]."""
    values: object
    W_dec: object
    b_dec: object


def from_dlpack(array) -> torch.Tensor:
    """A torch tensor sharing memory with ``array``: any object with ``__dlpack__`` (NumPy, JAX,
    CuPy, torch, ...) or a legacy DLPack capsule. No copy is made."""
    if isinstance(array, torch.Tensor):
        return array
    if isinstance(array, numpy.ndarray):
        return _from_numpy("array", array)
    if not hasattr(array, "__dlpack__") and type(array).__name__ != "PyCapsule":
        raise ValueError(f"array must support DLPack (have __dlpack__) or be a DLPack capsule, "
                         f"got {type(array).__name__}")
    return torch.utils.dlpack.from_dlpack(array)


def to_dlpack(array, capsule: bool = False):
    """``array`` (a torch tensor or a NumPy array) as an object with ``__dlpack__`` that shares its
    memory: pass it to ``jax.numpy.from_dlpack``, ``cupy.from_dlpack``, ``numpy.from_dlpack``.
    capsule=True gives a legacy DLPack capsule instead (for consumers that still take one; a
    capsule may be consumed once)."""
    tensor = from_dlpack(array) if isinstance(array, numpy.ndarray) else array
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"array must be a torch.Tensor or a numpy.ndarray, got {type(array).__name__}")
    tensor = tensor.detach()
    return torch.utils.dlpack.to_dlpack(tensor) if capsule else tensor


def _from_numpy(name: str, array: numpy.ndarray) -> torch.Tensor:
    try:
        with warnings.catch_warnings():
            # Read-only arrays (e.g. views of JAX buffers) are fine: the ops never write to inputs.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(array)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name}: cannot view a NumPy array of dtype {array.dtype} as a tensor ({error})") from None


class _Arguments:
    """Converts each array argument to a tensor view and remembers whether all were NumPy."""

    def __init__(self):
        self.all_numpy = True

    def __call__(self, name: str, array) -> torch.Tensor:
        if isinstance(array, numpy.ndarray):
            return _from_numpy(name, array)
        self.all_numpy = False
        if isinstance(array, torch.Tensor):
            return array.detach()
        if hasattr(array, "__dlpack__"):
            return torch.from_dlpack(array)
        raise ValueError(f"{name} must be a NumPy array or support DLPack (__dlpack__), got {type(array).__name__}")

    def result(self, tensor: torch.Tensor):
        return tensor.numpy() if self.all_numpy else tensor


def topk_encode(x, W_enc, b_enc, k: int) -> TopKCodes:
    """Per row of x @ W_enc + b_enc keep the k largest (ties: lower index), ReLU'd.
    -> TopKCodes(values [B, k], indices [B, k] int64)."""
    arg = _Arguments()
    with torch.no_grad():
        codes = ops.topk_encode(arg("x", x), arg("W_enc", W_enc), arg("b_enc", b_enc), k)
    return TopKCodes(arg.result(codes.values), arg.result(codes.indices))


def batchtopk_encode(x, W_enc, b_enc, k: int) -> BatchTopKCodes:
    """The B*k largest of relu(x @ W_enc + b_enc) over the batch -> BatchTopKCodes(values, rows, cols) [B*k]."""
    arg = _Arguments()
    with torch.no_grad():
        codes = ops.batchtopk_encode(arg("x", x), arg("W_enc", W_enc), arg("b_enc", b_enc), k)
    return BatchTopKCodes(*(arg.result(t) for t in codes))


def relu_encode(x, W_enc, b_enc):
    """relu(x @ W_enc + b_enc): [B, d_in] -> [B, n]."""
    arg = _Arguments()
    with torch.no_grad():
        return arg.result(ops.relu_encode(arg("x", x), arg("W_enc", W_enc), arg("b_enc", b_enc)))


def jumprelu_encode(x, W_enc, b_enc, log_threshold, bandwidth: float = 1e-3):
    """pre * (pre > exp(log_threshold)) with pre = x @ W_enc + b_enc: [B, n]; log_threshold [n]."""
    arg = _Arguments()
    with torch.no_grad():
        out = ops.jumprelu_encode(arg("x", x), arg("W_enc", W_enc), arg("b_enc", b_enc),
                                  arg("log_threshold", log_threshold), bandwidth)
    return arg.result(out)


def sparse_decode(values, indices, W_dec, b_dec):
    """y[b] = sum_j values[b, j] * W_dec[indices[b, j]] + b_dec: values, indices [B, k] -> [B, d_out]."""
    arg = _Arguments()
    with torch.no_grad():
        out = ops.sparse_decode(arg("values", values), arg("indices", indices), arg("W_dec", W_dec), arg("b_dec", b_dec))
    return arg.result(out)


def sparse_decode_coo(values, rows, cols, W_dec, b_dec, batch_size: int):
    """y[rows[e]] += values[e] * W_dec[cols[e]], plus b_dec: values, rows, cols [E] -> [batch_size, d_out]."""
    arg = _Arguments()
    with torch.no_grad():
        out = ops.sparse_decode_coo(arg("values", values), arg("rows", rows), arg("cols", cols), arg("W_dec", W_dec),
                                    arg("b_dec", b_dec), batch_size)
    return arg.result(out)


def _decode_backward(arg: _Arguments, decode, values: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor,
                     grad_y: torch.Tensor) -> SparseDecodeGrads:
    """Runs ``decode(values, W_dec, b_dec)`` under autograd and pulls grad_y back through the
    backend's backward kernels (on the CPU: one C++ pass over the kept entries)."""
    leaves = [t.detach().requires_grad_() for t in (values, W_dec, b_dec)]
    with torch.enable_grad():
        y = decode(*leaves)
        if grad_y.shape != y.shape or grad_y.dtype != y.dtype or grad_y.device != y.device:
            raise ValueError(f"grad_y must have shape {tuple(y.shape)} and dtype {str(y.dtype)[6:]} on {y.device} like "
                             f"the decoded output, got {tuple(grad_y.shape)} {str(grad_y.dtype)[6:]} on {grad_y.device}")
        grads = torch.autograd.grad(y, leaves, grad_y)
    return SparseDecodeGrads(*(arg.result(g) for g in grads))


def sparse_decode_backward(values, indices, W_dec, b_dec, grad_y) -> SparseDecodeGrads:
    """Gradients of ``sparse_decode`` given grad_y [B, d_out]: SparseDecodeGrads(values [B, k],
    W_dec [n, d_out] (deterministic scatter-add), b_dec [d_out])."""
    arg = _Arguments()
    indices_t = arg("indices", indices)
    return _decode_backward(arg, lambda v, W, b: ops.sparse_decode(v, indices_t, W, b),
                            arg("values", values), arg("W_dec", W_dec), arg("b_dec", b_dec), arg("grad_y", grad_y))


def sparse_decode_coo_backward(values, rows, cols, W_dec, b_dec, grad_y) -> SparseDecodeGrads:
    """Gradients of ``sparse_decode_coo`` given grad_y [batch_size, d_out]: SparseDecodeGrads(values [E],
    W_dec [n, d_out], b_dec [d_out])."""
    arg = _Arguments()
    rows_t, cols_t, grad_y_t = arg("rows", rows), arg("cols", cols), arg("grad_y", grad_y)
    if grad_y_t.dim() != 2:
        raise ValueError(f"grad_y must be 2-D [batch_size, d_out], got shape {tuple(grad_y_t.shape)}")
    batch_size = grad_y_t.shape[0]
    return _decode_backward(arg, lambda v, W, b: ops.sparse_decode_coo(v, rows_t, cols_t, W, b, batch_size),
                            arg("values", values), arg("W_dec", W_dec), arg("b_dec", b_dec), grad_y_t)
