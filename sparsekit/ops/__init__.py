"""sparsekit's ops: the one door to every kernel.

Each op checks its arguments (a ValueError naming the argument), makes inputs contiguous (on
purpose: the kernels never copy silently), then runs on the backend chosen for the input's device
(``sparsekit.ops.backend``): C++ custom ops on CPU, Triton custom ops on CUDA (``sparsekit.kernels``,
imported on first use), or the PyTorch reference (``sparsekit.ops.reference``) that defines them all.
Every op is differentiable. ``cpu_ops()`` and ``triton_ops()`` are the explicit tables from each
op to the custom op that runs it on that backend.

Shapes: x [B, d_in], W_enc [d_in, n], b_enc [n], W_dec [n, d_out], b_dec [d_out];
TopK codes (values [B, k], indices [B, k] int64); BatchTopK codes (values, rows, cols), each [B*k];
SparseCodes (values, rows, cols, each [E], and B) for codes of varying count per row.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from sparsekit._util.validate import is_int
from sparsekit.ops import autograd, checks, reference

from .backend import _C, backend_for


class TopKCodes(NamedTuple):
    """values [B, k] (sorted descending per row), indices [B, k] int64."""
    values: Tensor
    indices: Tensor


class BatchTopKCodes(NamedTuple):
    """Flat COO codes in row-major order: values, rows, cols, each [B*k] (rows, cols int64)."""
    values: Tensor
    rows: Tensor
    cols: Tensor


class SparseCodes(NamedTuple):
    """Codes of varying count per row as flat COO in row-major order: values, rows, cols, each
    [E] (rows, cols int64), and the batch size B (rows may be empty)."""
    values: Tensor
    rows: Tensor
    cols: Tensor
    batch_size: int


# A ReLU encoder's codes go sparse at or below this fraction of positive entries: the sparse
# decode and backward cost ~10-20x a dense GEMM per multiply-add, so 1/64 keeps them cheaper.
SPARSE_RELU_MAX_DENSITY = 1 / 64


_CPU_OPS: dict[str, Callable] = {}  # cpu_ops()'s table, filled on first use
_TRITON_OPS: dict[str, Callable] = {}  # triton_ops()'s


def cpu_ops() -> dict[str, Callable]:
    """op -> the C++ custom op that runs it (sparsekit.ops.cpu), its modules imported (and their
    custom ops registered) on first use. ``*_centered``: the encoder of x - pre_bias."""
    if not _CPU_OPS:
        from .cpu import decode, encode, ghost
        _CPU_OPS.update({
            "topk_encode": encode.topk_encode_cpu,
            "topk_encode_centered": encode.topk_encode_centered_cpu,
            "batchtopk_encode": encode.batchtopk_encode_cpu,
            "batchtopk_encode_centered": encode.batchtopk_encode_centered_cpu,
            "relu_encode": encode.relu_encode_cpu,
            "relu_encode_adaptive": encode.relu_encode_adaptive_cpu,
            "jumprelu_encode": encode.jumprelu_encode_cpu,
            "sparse_decode": decode.sparse_decode_cpu,
            "ghost_grad_loss": ghost.ghost_grad_loss_cpu,
            "topk_encode_with_latents": encode.topk_encode_latents_cpu,
            "ghost_grad_loss_from_pre": ghost.ghost_from_pre_cpu,
            "topk_positions": encode.topk_positions_cpu,
            "dense_decode": decode.dense_decode_cpu,
        })
    return _CPU_OPS


def triton_ops() -> dict[str, Callable]:
    """op -> the Triton custom op that runs it (sparsekit.kernels), its modules imported (and their
    custom ops registered) on first use: Triton is slow to import and absent on some machines
    (then MissingExtra names the gpu extra)."""
    if not _TRITON_OPS:
        from sparsekit._util.extras import require
        require("triton", "gpu", what="sparsekit's GPU kernels")
        from sparsekit.kernels import decode, encode, ghost
        _TRITON_OPS.update({
            "topk_encode": encode.topk_encode_triton,
            "batchtopk_encode": encode.batchtopk_encode_triton,
            "relu_encode": encode.relu_encode_triton,
            "jumprelu_encode": encode.jumprelu_encode_triton,
            "sparse_decode": decode.sparse_decode_triton,
            "ghost_grad_loss": ghost.ghost_grad_loss_triton,
        })
    return _TRITON_OPS


def _check_encoder(x, W_enc, b_enc) -> tuple[Tensor, Tensor, Tensor]:
    checks.tensor("x", x, 2)
    checks.tensor("W_enc", W_enc, 2)
    checks.tensor("b_enc", b_enc, 1)
    checks.same_dtype_and_device("x", x, W_enc=W_enc, b_enc=b_enc)
    checks.non_empty_batch("x", x)
    checks.positive_width("x", x, 1)
    checks.size("W_enc", W_enc, 0, x.shape[1], "d_in, the width of x")
    checks.positive_width("W_enc", W_enc, 1)
    checks.size("b_enc", b_enc, 0, W_enc.shape[1], "n_latents, the columns of W_enc")
    checks.finite(x=x, W_enc=W_enc, b_enc=b_enc)
    return x.contiguous(), W_enc.contiguous(), b_enc.contiguous()


def _check_decoder(W_dec, b_dec, codes_dtype, codes_device) -> tuple[Tensor, Tensor]:
    checks.tensor("W_dec", W_dec, 2)
    checks.tensor("b_dec", b_dec, 1)
    checks.positive_width("W_dec", W_dec, 1)
    if W_dec.dtype != codes_dtype or W_dec.device != codes_device:
        raise ValueError(f"W_dec is {W_dec.dtype} on {W_dec.device}, expected {codes_dtype} on "
                         f"{codes_device} like values")
    checks.same_dtype_and_device("W_dec", W_dec, b_dec=b_dec)
    checks.size("b_dec", b_dec, 0, W_dec.shape[1], "d_out, the columns of W_dec")
    checks.finite(W_dec=W_dec, b_dec=b_dec)
    return W_dec.contiguous(), b_dec.contiguous()


def _check_pre_bias(pre_bias, x) -> Tensor:
    checks.tensor("pre_bias", pre_bias, 1)
    checks.same_dtype_and_device("x", x, pre_bias=pre_bias)
    checks.size("pre_bias", pre_bias, 0, x.shape[1], "d_in, the width of x")
    checks.finite(pre_bias=pre_bias)
    return pre_bias.contiguous()


def _check_sparse_encoder(x, W_enc, b_enc, k, pre_bias) -> tuple:
    """The checks shared by topk_encode and batchtopk_encode, and the backend they run on:
    (x, W_enc, b_enc, k, pre_bias (None when not given), backend)."""
    x, W_enc, b_enc = _check_encoder(x, W_enc, b_enc)
    k = checks.k_in_range(k, W_enc.shape[1])
    backend = backend_for(x)
    if pre_bias is not None:
        pre_bias = _check_pre_bias(pre_bias, x)
    return x, W_enc, b_enc, k, pre_bias, backend


def topk_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, pre_bias: Tensor | None = None) -> TopKCodes:
    """Per row of pre = x @ W_enc + b_enc keep the k largest (ties: lower index), ReLU them.

    x [B, d_in], W_enc [d_in, n], b_enc [n] -> TopKCodes(values [B, k], indices [B, k] int64),
    values sorted descending. Backward reaches x, W_enc and b_enc through the B*k kept entries.
    pre_bias [d_in] (optional): encode x - pre_bias instead, i.e. with the bias
    b_enc - pre_bias @ W_enc (that fold is the definition; the C++ and Triton backends compute
    (x - pre_bias) @ W_enc + b_enc, equal up to rounding); gradients reach pre_bias too. An SAE's
    b_dec goes here: the C++ and Triton backends then never form a dense [d_in, n] gradient for it
    (Triton: ``autograd.centered_input``, pre_bias's gradient -W_enc @ grad b_enc).
    """
    x, W_enc, b_enc, k, pre_bias, backend = _check_sparse_encoder(x, W_enc, b_enc, k, pre_bias)
    if pre_bias is not None:
        if backend == "cpp":
            return TopKCodes(*cpu_ops()["topk_encode_centered"](x, W_enc, b_enc, pre_bias, k))
        if backend == "triton":
            x, b_enc = autograd.centered_input(x, W_enc, b_enc, pre_bias)
        else:
            b_enc = b_enc - pre_bias @ W_enc
    if backend == "cpp":
        return TopKCodes(*cpu_ops()["topk_encode"](x, W_enc, b_enc, k))
    if backend == "triton":
        return TopKCodes(*triton_ops()["topk_encode"](x, W_enc, b_enc, k))
    return TopKCodes(*reference.topk_encode(x, W_enc, b_enc, k))


class LatentPass(NamedTuple):
    """What topk_encode_with_latents read of the latents L [m] in the encoder's pass: pre [B, m],
    their pre-activations (k_latents == 0, else None), or codes, their top k_latents per row as
    TopKCodes with indices in [0, n) (k_latents > 0, else None)."""
    pre: Tensor | None
    codes: TopKCodes | None


def _check_latents(latents: Tensor, x: Tensor, n: int, k_latents) -> int:
    checks.tensor("latents", latents, 1, floating=False)
    checks.same_device("x", x, latents=latents)
    if latents.numel() == 0:
        raise ValueError("latents must name at least one latent")
    checks.indices_in_range("latents", latents, n, "n_latents")
    checks.distinct("latents", latents)
    if not is_int(k_latents) or not 0 <= k_latents <= latents.numel():
        raise ValueError(f"k_latents must be an int in [0, {latents.numel()}] (the number of latents), "
                         f"got {k_latents!r}")
    return int(k_latents)


def topk_encode_with_latents(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, latents: Tensor, k_latents: int = 0,
                             pre_bias: Tensor | None = None) -> tuple[TopKCodes, LatentPass]:
    """topk_encode's codes and, from the same pre-activations, what the dead-latent remedies read
    of the latents L = ``latents`` [m] (distinct int64, any order): k_latents == 0: pre[:, L]
    [B, m] (ghost grads; AuxK when it keeps most of L); k_latents > 0: the k_latents largest of
    pre[:, L] per row, ReLU'd, sorted descending, ties to the lower latent index (AuxK's codes).
    Both differentiable in x, W_enc, b_enc and pre_bias (see reference.topk_encode_with_latents).

    On the C++ path both come out of the encoder's GEMM tiles (no second GEMM over L), and the
    backward is one sparse pass over the main and the latent codes together; where the bf16 screen
    runs, L's columns are recomputed in float32 (sparsekit.ops.cpu.encode.topk_encode_latents_cpu).
    """
    x, W_enc, b_enc, k, pre_bias, backend = _check_sparse_encoder(x, W_enc, b_enc, k, pre_bias)
    k_latents = _check_latents(latents, x, W_enc.shape[1], k_latents)
    ordered, order = latents.sort()
    in_order = bool((order == torch.arange(order.numel(), device=order.device)).all())
    if backend == "cpp":
        if pre_bias is None:
            pre_bias = x.new_zeros(x.shape[1])
        values, indices, pre, latent_values, latent_indices = cpu_ops()["topk_encode_with_latents"](
            x, W_enc, b_enc, pre_bias, k, ordered.contiguous(), k_latents)
    else:  # the backend's own encoder, then a GEMM over L's columns (reference.topk_encode_with_latents' values)
        values, indices = topk_encode(x, W_enc, b_enc, k, pre_bias)
        pre = (x if pre_bias is None else x - pre_bias) @ W_enc[:, ordered] + b_enc[ordered]
        if k_latents:
            positions = reference.topk_positions(pre, k_latents)
            latent_values, latent_indices = torch.relu(pre.gather(1, positions)), ordered[positions]
    codes = TopKCodes(values, indices)
    if k_latents:
        return codes, LatentPass(None, TopKCodes(latent_values, latent_indices))
    if not in_order:  # pre's columns back in the caller's order of latents
        pre = pre.index_select(1, torch.argsort(order))
    return codes, LatentPass(pre, None)


@torch.no_grad()
def topk_positions(pre: Tensor, k: int) -> Tensor:
    """The columns of the k largest entries of each row of pre [B, m], largest first, ties to the
    lower column: [B, k] int64 (a selection: not differentiable)."""
    checks.tensor("pre", pre, 2)
    checks.non_empty_batch("pre", pre)
    k = checks.k_in_range(k, pre.shape[1])
    if backend_for(pre) == "cpp":
        return cpu_ops()["topk_positions"](pre.detach().contiguous(), k)
    return reference.topk_positions(pre, k)


def batchtopk_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int,
                     pre_bias: Tensor | None = None) -> BatchTopKCodes:
    """Keep the B*k largest of relu(x @ W_enc + b_enc) over the whole batch (Bussmann et al. 2024).

    -> BatchTopKCodes(values, rows, cols), each [B*k], row-major; ties: lower flat index.
    pre_bias [d_in] (optional): encode x - pre_bias, as in topk_encode.
    """
    x, W_enc, b_enc, k, pre_bias, backend = _check_sparse_encoder(x, W_enc, b_enc, k, pre_bias)
    if pre_bias is not None:
        if backend == "cpp":
            return BatchTopKCodes(*cpu_ops()["batchtopk_encode_centered"](x, W_enc, b_enc, pre_bias, k))
        if backend == "triton":
            x, b_enc = autograd.centered_input(x, W_enc, b_enc, pre_bias)
        else:
            b_enc = b_enc - pre_bias @ W_enc
    if backend == "cpp":
        return BatchTopKCodes(*cpu_ops()["batchtopk_encode"](x, W_enc, b_enc, k))
    if backend == "triton":
        return BatchTopKCodes(*triton_ops()["batchtopk_encode"](x, W_enc, b_enc, k))
    return BatchTopKCodes(*reference.batchtopk_encode(x, W_enc, b_enc, k))


def relu_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor) -> Tensor:
    """relu(x @ W_enc + b_enc): [B, d_in] -> [B, n] dense."""
    x, W_enc, b_enc = _check_encoder(x, W_enc, b_enc)
    backend = backend_for(x)
    if backend == "cpp":
        return cpu_ops()["relu_encode"](x, W_enc, b_enc)
    if backend == "triton":
        return triton_ops()["relu_encode"](x, W_enc, b_enc)
    return reference.relu_encode(x, W_enc, b_enc)


def relu_encode_adaptive(x: Tensor, W_enc: Tensor, b_enc: Tensor, pre_bias: Tensor | None = None,
                         max_density: float = SPARSE_RELU_MAX_DENSITY) -> Tensor | SparseCodes:
    """relu((x - pre_bias) @ W_enc + b_enc), as SparseCodes when at most ``max_density`` of its
    B*n entries are positive and the backend gains from it (C++), else dense [B, n].

    Both forms hold the same codes; with SparseCodes the decode (sparse_decode_coo) and the
    encoder's backward run over the E positive entries instead of dense [B, n] GEMMs. The choice
    depends on this batch only (under torch.compile: always dense). Differentiable in x, W_enc,
    b_enc and pre_bias.
    """
    x, W_enc, b_enc = _check_encoder(x, W_enc, b_enc)
    if not (isinstance(max_density, (int, float)) and not isinstance(max_density, bool) and 0 <= max_density <= 1):
        raise ValueError(f"max_density must be a number in [0, 1], got {max_density!r}")
    if pre_bias is not None:
        pre_bias = _check_pre_bias(pre_bias, x)
    if backend_for(x) == "cpp" and not torch.compiler.is_compiling():  # compiled graphs keep static shapes
        if pre_bias is None:
            pre_bias = x.new_zeros(x.shape[1])
        dense, values, rows, cols = cpu_ops()["relu_encode_adaptive"](x, W_enc, b_enc, pre_bias, float(max_density))
        return dense if dense.shape[0] else SparseCodes(values, rows, cols, x.shape[0])
    if pre_bias is not None:
        b_enc = b_enc - pre_bias @ W_enc
    return relu_encode(x, W_enc, b_enc)


def jumprelu_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, log_threshold: Tensor,
                    bandwidth: float = 1e-3) -> Tensor:
    """pre * (pre > exp(log_threshold)) with pre = x @ W_enc + b_enc: [B, n] dense.

    log_threshold [n]. Its gradient is the rectangle-kernel pseudo-derivative of width
    ``bandwidth`` (Rajamanoharan et al. 2024); x, W_enc, b_enc get the ordinary gradient.
    """
    x, W_enc, b_enc = _check_encoder(x, W_enc, b_enc)
    checks.tensor("log_threshold", log_threshold, 1)
    checks.same_dtype_and_device("x", x, log_threshold=log_threshold)
    checks.size("log_threshold", log_threshold, 0, W_enc.shape[1], "n_latents, the columns of W_enc")
    checks.finite(log_threshold=log_threshold)
    bandwidth = checks.positive_number("bandwidth", bandwidth)
    log_threshold = log_threshold.contiguous()
    backend = backend_for(x)
    if backend == "cpp":
        return cpu_ops()["jumprelu_encode"](x, W_enc, b_enc, log_threshold, bandwidth)[0]
    if backend == "triton":
        return triton_ops()["jumprelu_encode"](x, W_enc, b_enc, log_threshold, bandwidth)[0]
    return reference.jumprelu_encode(x, W_enc, b_enc, log_threshold, bandwidth)


def _check_threshold_args(pre, log_threshold, bandwidth) -> float:
    checks.tensor("pre", pre, 2)
    checks.tensor("log_threshold", log_threshold, 1)
    checks.same_dtype_and_device("pre", pre, log_threshold=log_threshold)
    checks.size("log_threshold", log_threshold, 0, pre.shape[1], "n_latents, the columns of pre")
    checks.finite(pre=pre, log_threshold=log_threshold)
    return checks.positive_number("bandwidth", bandwidth)


def jumprelu(pre: Tensor, log_threshold: Tensor, bandwidth: float = 1e-3) -> Tensor:
    """pre * (pre > exp(log_threshold)) on given pre-activations [B, n]; log_threshold [n].

    Elementwise (every backend runs the reference): for a JumpReLU SAE that needs its
    pre-activations twice (codes and the L0 penalty) without a second GEMM.
    """
    bandwidth = _check_threshold_args(pre, log_threshold, bandwidth)
    return reference.jumprelu(pre, log_threshold, bandwidth)


def heaviside_step(pre: Tensor, log_threshold: Tensor, bandwidth: float = 1e-3) -> Tensor:
    """(pre > exp(log_threshold)) as 0/1 [B, n]; gradient only to log_threshold, through the
    rectangle-kernel pseudo-derivative (the JumpReLU L0 penalty). Elementwise, reference path."""
    bandwidth = _check_threshold_args(pre, log_threshold, bandwidth)
    return reference.heaviside_step(pre, log_threshold, bandwidth)


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    """y[b] = sum_j values[b, j] * W_dec[indices[b, j]] + b_dec.

    values [B, k], indices [B, k] int64, W_dec [n, d_out], b_dec [d_out] -> [B, d_out].
    Backward: grad values by gathered dot products, grad W_dec by a deterministic scatter-add.
    """
    checks.tensor("values", values, 2)
    checks.tensor("indices", indices, 2, floating=False)
    checks.non_empty_batch("values", values)
    checks.positive_width("values", values, 1)
    if indices.shape != values.shape:
        raise ValueError(f"indices has shape {tuple(indices.shape)}, expected {tuple(values.shape)} like values")
    checks.same_device("values", values, indices=indices)
    W_dec, b_dec = _check_decoder(W_dec, b_dec, values.dtype, values.device)
    checks.indices_in_range("indices", indices, W_dec.shape[0], "rows of W_dec")
    checks.finite(values=values)
    batch, k = values.shape
    backend = backend_for(values)
    if backend == "cpp":
        rows = torch.arange(batch).repeat_interleave(k)
        return cpu_ops()["sparse_decode"](values.reshape(-1), rows, indices.reshape(-1).contiguous(),
                                          W_dec, b_dec, batch)
    if backend == "triton":
        rows = torch.arange(batch, device=values.device).repeat_interleave(k)
        return triton_ops()["sparse_decode"](values.contiguous().reshape(-1), rows,
                                             indices.contiguous().reshape(-1), W_dec, b_dec, batch, True)
    return reference.sparse_decode(values.contiguous(), indices.contiguous(), W_dec, b_dec)


def sparse_decode_coo(values: Tensor, rows: Tensor, cols: Tensor, W_dec: Tensor, b_dec: Tensor,
                      batch_size: int) -> Tensor:
    """y[rows[e]] += values[e] * W_dec[cols[e]], plus b_dec; duplicates add up.

    values [E], rows [E], cols [E] int64, W_dec [n, d_out], b_dec [d_out] -> [batch_size, d_out].
    """
    checks.tensor("values", values, 1)
    checks.tensor("rows", rows, 1, floating=False)
    checks.tensor("cols", cols, 1, floating=False)
    for name, t in (("rows", rows), ("cols", cols)):
        if t.shape != values.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(values.shape)} like values")
    checks.same_device("values", values, rows=rows, cols=cols)
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    W_dec, b_dec = _check_decoder(W_dec, b_dec, values.dtype, values.device)
    checks.indices_in_range("rows", rows, batch_size, "batch_size")
    checks.indices_in_range("cols", cols, W_dec.shape[0], "rows of W_dec")
    checks.finite(values=values)
    values, rows, cols = values.contiguous(), rows.contiguous(), cols.contiguous()
    backend = backend_for(values)
    if backend == "cpp":
        return cpu_ops()["sparse_decode"](values, rows, cols, W_dec, b_dec, batch_size)
    if backend == "triton":
        return triton_ops()["sparse_decode"](values, rows, cols, W_dec, b_dec, batch_size, False)
    return reference.sparse_decode_coo(values, rows, cols, W_dec, b_dec, batch_size)


def _check_ghost_args(lead_name: str, lead: Tensor, W_dec: Tensor, dead_idx: Tensor, residual: Tensor,
                      mse_main: Tensor, eps: float) -> float:
    """The checks both ghost-grads ops share; lead [B, .] (x or pre_dead) gives dtype, device and batch.
    Returns eps as a float."""
    checks.tensor("W_dec", W_dec, 2)
    checks.tensor("dead_idx", dead_idx, 1, floating=False)
    checks.tensor("residual", residual, 2)
    if not isinstance(mse_main, Tensor) or mse_main.dim() != 0:
        raise ValueError(f"mse_main must be a 0-d tensor, got {mse_main!r:.80}")
    checks.same_dtype_and_device(lead_name, lead, W_dec=W_dec, residual=residual, mse_main=mse_main)
    checks.same_device(lead_name, lead, dead_idx=dead_idx)
    checks.size("residual", residual, 0, lead.shape[0], f"the batch of {lead_name}")
    checks.size("residual", residual, 1, W_dec.shape[1], "d_out, the columns of W_dec")
    checks.indices_in_range("dead_idx", dead_idx, W_dec.shape[0], "n_latents, the rows of W_dec")
    checks.distinct("dead_idx", dead_idx)
    checks.finite(W_dec=W_dec, residual=residual, mse_main=mse_main)
    return checks.positive_number("eps", eps)


def ghost_grad_loss(x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, dead_idx: Tensor,
                    residual: Tensor, mse_main: Tensor, eps: float = 1e-8) -> Tensor:
    """The ghost-grads loss over dead latents D = dead_idx (see reference.ghost_grad_loss).

    x [B, d_in], W_enc [d_in, n], b_enc [n], W_dec [n, d_out], dead_idx [|D|] int64 (distinct),
    residual [B, d_out] (x - x_hat, treated as a constant), mse_main scalar -> scalar.
    Cost grows with |D|, not n; zero when D is empty.
    """
    x, W_enc, b_enc = _check_encoder(x, W_enc, b_enc)
    checks.size("W_dec", W_dec, 0, W_enc.shape[1], "n_latents, the columns of W_enc")
    eps = _check_ghost_args("x", x, W_dec, dead_idx, residual, mse_main, eps)
    residual, mse_main = residual.detach().contiguous(), mse_main.detach()
    if dead_idx.numel() == 0:
        return torch.zeros((), dtype=x.dtype, device=x.device)
    backend = backend_for(x)
    if backend == "cpp":
        return cpu_ops()["ghost_grad_loss"](x, W_enc, b_enc, W_dec.detach().contiguous(), dead_idx.contiguous(),
                                            residual, mse_main, eps)[0]
    if backend == "triton":
        return triton_ops()["ghost_grad_loss"](x, W_enc, b_enc, W_dec.detach().contiguous(),
                                               dead_idx.contiguous(), residual, mse_main, eps)[0]
    return reference.ghost_grad_loss(x, W_enc, b_enc, W_dec, dead_idx, residual, mse_main, eps)


def ghost_grad_loss_from_pre(pre_dead: Tensor, W_dec: Tensor, dead_idx: Tensor, residual: Tensor,
                             mse_main: Tensor, eps: float = 1e-8) -> Tensor:
    """ghost_grad_loss given the dead latents' pre-activations pre_dead = pre[:, D] [B, |D|]
    (``topk_encode_with_latents`` computed them in the encoder's pass), D = dead_idx: no encoder
    GEMM here; the gradient reaches pre_dead (see reference.ghost_grad_loss_from_pre)."""
    checks.tensor("pre_dead", pre_dead, 2)
    eps = _check_ghost_args("pre_dead", pre_dead, W_dec, dead_idx, residual, mse_main, eps)
    checks.size("pre_dead", pre_dead, 1, dead_idx.shape[0], "the number of dead latents (dead_idx)")
    checks.finite(pre_dead=pre_dead)
    if dead_idx.numel() == 0:
        return torch.zeros((), dtype=pre_dead.dtype, device=pre_dead.device)
    residual, mse_main = residual.detach().contiguous(), mse_main.detach()
    if backend_for(pre_dead) == "cpp":
        W_dec_dead = W_dec.detach().index_select(0, dead_idx).contiguous()
        return cpu_ops()["ghost_grad_loss_from_pre"](pre_dead.contiguous(), W_dec_dead, residual, mse_main, eps)[0]
    return reference.ghost_grad_loss_from_pre(pre_dead, W_dec, dead_idx, residual, mse_main, eps)


def dense_decode(codes: Tensor, W_dec: Tensor, latents: Tensor) -> Tensor:
    """codes @ W_dec[latents]: the dense codes [B, m] of the latents L = ``latents`` [m] (distinct
    int64) decoded -> [B, d_out], no bias; differentiable in codes and W_dec (see
    reference.dense_decode). AuxK's reconstruction when it keeps most dead latents. On the C++ path
    the three products (forward, grad codes, grad W_dec[L]) are ``sparsekit.ops.cpu.gemm.matmul``'s,
    and W_dec's gradient is written into rows L only."""
    checks.tensor("codes", codes, 2)
    checks.tensor("W_dec", W_dec, 2)
    checks.tensor("latents", latents, 1, floating=False)
    checks.same_dtype_and_device("codes", codes, W_dec=W_dec)
    checks.same_device("codes", codes, latents=latents)
    checks.size("codes", codes, 1, latents.shape[0], "the number of latents")
    checks.indices_in_range("latents", latents, W_dec.shape[0], "n_latents, the rows of W_dec")
    checks.distinct("latents", latents)
    checks.finite(codes=codes)
    if backend_for(codes) == "cpp" and latents.numel() and codes.shape[0]:
        return cpu_ops()["dense_decode"](codes.contiguous(), W_dec, latents.contiguous())
    return reference.dense_decode(codes, W_dec, latents)


def _rows_on_cpp(*tensors: Tensor) -> bool:
    return backend_for(tensors[0]) == "cpp" and all(t.is_contiguous() for t in tensors)


@torch.no_grad()
def remove_parallel_rows_(grad: Tensor, W: Tensor) -> Tensor:
    """In place: each row of grad [n, d] loses its component along the same row of W [n, d]
    (see reference.remove_parallel_rows). Returns grad. Not differentiable (an optimiser step)."""
    checks.tensor("W", W, 2)
    checks.tensor("grad", grad, 2)
    checks.same_dtype_and_device("W", W, grad=grad)
    checks.size("grad", grad, 0, W.shape[0], "the rows of W")
    checks.size("grad", grad, 1, W.shape[1], "the columns of W")
    if _rows_on_cpp(grad, W):
        _C.remove_parallel_rows(W.detach().numpy(), grad.detach().numpy())
        return grad
    return grad.copy_(reference.remove_parallel_rows(grad, W))


@torch.no_grad()
def normalize_rows_(W: Tensor) -> Tensor:
    """In place: each row of W [n, d] divided by max(its norm, 1e-12). Returns W. Not
    differentiable (a projection after the optimiser step)."""
    checks.tensor("W", W, 2)
    if _rows_on_cpp(W):
        _C.normalize_rows(W.detach().numpy())
        return W
    return W.copy_(reference.normalize_rows(W))
