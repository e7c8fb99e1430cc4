"""The encoders on the C++ path, as torch.library custom ops with autograd (namespace ``sparsekit``),
as ``sparsekit.kernels.encode`` is on the Triton path.

- ``topk_encode_cpu`` / ``batchtopk_encode_cpu``: encoder GEMM in row tiles (``gemm``), the
  selection fused with bias + ReLU in C++; bf16-screened (``screen``) on CPUs with native bf16.
- ``topk_encode_centered_cpu`` / ``batchtopk_encode_centered_cpu``: the same of x - pre_bias, with
  pre_bias's gradient in the sparse backward (no dense [d, n] outer product).
- ``relu_encode_adaptive_cpu``: a ReLU encoder's codes as COO when they are sparse, else dense.
- ``relu_encode_cpu`` / ``jumprelu_encode_cpu``: dense encoders, the cost their GEMM.

Each forward and backward kernel is its own custom op with a fake (meta) kernel, and each
differentiable op's autograd formula composes them (the sparse backward's products are
``sparse``'s), so the ops work under autograd and ``torch.compile`` alike; fake kernels and saved
tensors of the uncentered ops are ``sparsekit.ops.autograd``'s, shared with the Triton backend.
Inputs are assumed checked by ``sparsekit.ops``; every op here makes its tensor inputs contiguous
(a no-op when they are) because the C++ side refuses to copy. Outputs are allocated here and
handed to ``sparsekit._C`` as zero-copy NumPy views.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from sparsekit.ops.autograd import kept_rows, register_batchtopk, register_jumprelu, register_relu, register_topk
from sparsekit.ops.backend import _C

from . import tuning
from .gemm import empty_output, gemm_library, matmul, numpy_view, row_tiles, scratch
from .screen import batchtopk_encode_screened, relu_encode_screened, topk_encode_screened, use_screen
from .sparse import coo_t_times_dense_cpu, coo_times_dense_t_cpu

# Rows of pre-activations computed per encoder GEMM tile: a [rows, n] scratch block of about
# 64 MiB per thread instead of the whole [B, n] matrix. Each tile's GEMM packs all of W_enc again,
# so taller tiles are cheaper: measured on one core at d=512, n=16384, B=4096, GEMM + top-k took
# 890 / 828 / 782 / 766 ms with 128 / 256 / 512 / 1024-row tiles (the selection reads the tile
# from L3 or DRAM at any of these heights, ~60 ms in all).
TILE_BYTES = 64 * 2**20


# The TopK encoder's GEMM blocks: 1024 rows (taller row blocks repack W_enc less often) by as many
# columns as fit in ~1 MiB, so the selection reads each block from L2 right after the GEMM wrote
# it. Measured on one core at d=512, n=16384: 1024 x 256 blocks cost the GEMM no more than whole
# 1024-row tiles (169 vs 176 ms per 1024 rows), and selecting from L2 costs ~22 ms per 4096 rows
# against ~60 ms from L3 or DRAM.
TOPK_TILE_ROWS = 1024
L2_TILE_BYTES = 2**20


# Whole-row top-k (topk_positions, the latents' top k_latents, AuxK's aux codes) by threshold
# (a sampled bound, nth_element, then a sort of the k kept; csrc/topk_select.hpp) instead of a heap
# when k * this >= the row's width: the heap takes most entries in when k is a large share of the
# row. Measured on the 2-core AVX2 EPYC, 4096 Gaussian rows, threshold / heap time: width 1638:
# 2.67 / 0.91 / 0.62 / 0.38 at k = 8 / 32 / 64 / 256; width 8192: 2.03 / 1.16 / 0.70 / 0.43 at
# k = 32 / 64 / 128 / 256; width 16384: 0.98 at k = 128, 0.59 at 256. `sparsekit tune` measures it.
THRESHOLD_SELECT_MIN_SHARE = 64


def select_share() -> int:
    """THRESHOLD_SELECT_MIN_SHARE as in effect (tuned, pinned by a resumed run, or the default)."""
    return tuning.chosen("select_threshold_min_share")


def topk_positions_cpu(pre: Tensor, k: int) -> Tensor:
    """The columns of the k largest entries of each row of pre [B, m] (contiguous), largest first,
    ties to the lower column -> [B, k] int64."""
    values, indices = pre.new_empty(pre.shape[0], k), torch.empty(pre.shape[0], k, dtype=torch.int64)
    _C.topk_select_block(numpy_view(pre), numpy_view(pre.new_zeros(pre.shape[1])), 0, k, True, True,
                         numpy_view(values), numpy_view(indices), 0, select_share())
    return indices


def _tile_rows(n: int, itemsize: int) -> int:
    return max(1, TILE_BYTES // (n * itemsize))


# --- the sparse encoders' backward --------------------------------------------------------------

def _sparse_encoder_backward(ctx, grad_kept: Tensor, rows: Tensor, cols: Tensor, x: Tensor, W_enc: Tensor):
    """Gradients of a sparse encoder from the gradient of its B*k kept pre-activations [E]:
    (grad x [B, d], grad W_enc [d, n], grad b_enc [n]); None where no gradient is needed."""
    grad_x = grad_W_enc = grad_b_enc = None
    if ctx.needs_input_grad[0]:
        grad_x = coo_times_dense_t_cpu(grad_kept, rows, cols, W_enc, x.shape[0])
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        grad_W_enc, grad_b_enc = coo_t_times_dense_cpu(grad_kept, rows, cols, x, W_enc.shape[1], True)
    return grad_x, grad_W_enc, grad_b_enc


# --- topk_encode ------------------------------------------------------------------------------

def _screened_or_float32(screened_encode, float32_encode, x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int,
                         pre_bias: Tensor | None = None):
    """A sparse encoder of x - pre_bias (pre_bias None: of x): the bf16-screened one
    (sparsekit.ops.cpu.screen) where it applies and decides, which encodes x - pre_bias itself (its
    rounding bound scales with the norm of what enters the GEMM); else the float32 one, with
    pre_bias folded into the bias."""
    x, W_enc, b_enc = x.contiguous(), W_enc.contiguous(), b_enc.contiguous()
    if use_screen(x, W_enc, k):
        screened = screened_encode(x if pre_bias is None else (x - pre_bias).contiguous(), W_enc, b_enc, k)
        if screened is not None:
            return screened
    if pre_bias is not None:
        b_enc = _folded_bias(b_enc, pre_bias, W_enc)
    return float32_encode(x, W_enc, b_enc, k)


@torch.library.custom_op("sparsekit::topk_encode_cpu", mutates_args=())
def topk_encode_cpu(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """x [B, d], W_enc [d, n], b_enc [n] -> values [B, k], indices [B, k]; bf16-screened on CPUs
    with native bf16, else _topk_encode_float32."""
    return _screened_or_float32(topk_encode_screened, _topk_encode_float32, x, W_enc, b_enc, k)


def _topk_encode_float32(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, latents: Tensor | None = None,
                         latent_bias: Tensor | None = None, k_latents: int = 0) -> tuple[Tensor, ...]:
    """Encoder GEMM in row tiles, each tile's top-k fused with bias + ReLU in C++ (contiguous
    inputs) -> (values, indices).

    With latents [m] (sorted ascending, distinct) the same tiles also give those latents' columns
    while they are cache-hot (no second GEMM over them), and the result gains
    k_latents == 0: their pre-activations without bias [B, m];
    k_latents > 0: the top k_latents of those columns + latent_bias [m] per row, ReLU'd, sorted, as
    (values [B, k_latents], positions in latents [B, k_latents])."""
    batch, n = x.shape[0], W_enc.shape[1]
    values = x.new_empty(batch, k)
    indices = torch.empty(batch, k, dtype=torch.int64)
    bias = numpy_view(b_enc)
    share = select_share()
    library = gemm_library(2.0 * batch * x.shape[1] * n)
    if library == "numpy":
        rows = min(batch, TOPK_TILE_ROWS)
        width = max(1, L2_TILE_BYTES // (rows * x.element_size()))
    else:  # torch's GEMM copies a column block of W_enc and is slow on narrow ones: whole rows
        rows, width = min(batch, _tile_rows(n, x.element_size())), n
    extra: tuple[Tensor, ...] = ()
    if latents is not None:
        m = latents.shape[0]
        # Latent positions [p0, p1) of each column block [c, c + width): latents are sorted.
        bounds = torch.searchsorted(latents, torch.arange(0, n + width, width)).clamp_(max=m).tolist()
        latents_np = numpy_view(latents)
        if k_latents == 0:
            latent_pre = empty_output((batch, m), x.dtype)  # recycled: a fresh [B, m] faults on every page
            latent_pre_np = numpy_view(latent_pre)
            extra = (latent_pre,)
        else:
            latent_values = x.new_empty(batch, k_latents)
            latent_positions = torch.empty(batch, k_latents, dtype=torch.int64)
            latent_bias_np = numpy_view(latent_bias)
            extra = (latent_values, latent_positions)

    def select(start: int, stop: int, col0: int, pre: Tensor, threads: int) -> None:
        _C.topk_select_block(numpy_view(pre), bias[col0:col0 + pre.shape[1]], col0, k, col0 == 0,
                             col0 + pre.shape[1] == n, numpy_view(values[start:stop]),
                             numpy_view(indices[start:stop]), threads, share)
        if latents is None:
            return
        p0, p1 = bounds[col0 // width], bounds[col0 // width + 1]
        if p1 == p0:
            return
        # The row block's columns of L, gathered by NumPy (no GIL, one thread: torch's copy_ into a
        # strided slice from a pool thread ran ~100x slower on a loaded 2-core machine, its OpenMP
        # team fighting the pool): into the output, or for codes into a per-thread [rows, m] buffer
        # selected from once the row block's last column block is in (a k_latents-wide heap carried
        # across every column block cost more than the selection itself).
        target = latent_pre_np if k_latents == 0 else numpy_view(scratch(stop - start, m, x.dtype, "latent columns"))
        rows_of = slice(start, stop) if k_latents == 0 else slice(0, stop - start)
        np.take(numpy_view(pre), latents_np[p0:p1] - col0, axis=1, out=target[rows_of, p0:p1])
        if k_latents and p1 == m:
            _C.topk_select_block(target, latent_bias_np, 0, k_latents, True, True,
                                 numpy_view(latent_values[start:stop]), numpy_view(latent_positions[start:stop]),
                                 threads, share)

    row_tiles(x, W_enc, rows, select, library=library, col_tile=width)
    return (values, indices, *extra)


register_topk(topk_encode_cpu, _sparse_encoder_backward)


# --- topk_encode with a pre-encoder bias ---------------------------------------------------

def _folded_bias(b_enc: Tensor, pre_bias: Tensor, W_enc: Tensor) -> Tensor:
    """b_enc - pre_bias @ W_enc [n], contiguous, outside autograd: encoding x with it equals
    encoding x - pre_bias with b_enc (the centered ops' backward accounts for pre_bias itself)."""
    with torch.no_grad():
        return (b_enc - pre_bias @ W_enc).contiguous()


@torch.library.custom_op("sparsekit::topk_encode_centered_cpu", mutates_args=())
def topk_encode_centered_cpu(x: Tensor, W_enc: Tensor, b_enc: Tensor, pre_bias: Tensor,
                             k: int) -> tuple[Tensor, Tensor]:
    """topk_encode of x - pre_bias: the GEMM runs on x with the bias b_enc - pre_bias @ W_enc.
    x [B, d], W_enc [d, n], b_enc [n], pre_bias [d] -> values [B, k], indices [B, k].

    Folding pre_bias into the bias by autograd (SparseDictionary.encoder_bias) would cost a dense
    [d, n] outer product in backward; here W_enc's gradient is (x - pre_bias)^T S in one sparse
    pass and pre_bias's is -W_enc @ grad b_enc."""
    return _screened_or_float32(topk_encode_screened, _topk_encode_float32, x, W_enc, b_enc, k, pre_bias)


@topk_encode_centered_cpu.register_fake
def _(x, W_enc, b_enc, pre_bias, k):
    return x.new_empty(x.shape[0], k), x.new_empty(x.shape[0], k, dtype=torch.int64)


def _topk_centered_setup(ctx, inputs, output):
    x, W_enc, _, pre_bias, _ = inputs
    values, indices = output
    ctx.save_for_backward(x, W_enc, pre_bias, values, indices)


def _centered_encoder_backward(ctx, grad_kept: Tensor, rows: Tensor, cols: Tensor, x: Tensor, W_enc: Tensor,
                               pre_bias: Tensor):
    """Gradients of a sparse encoder of x - pre_bias from those of its kept entries [E]:
    (grad x, grad W_enc = (x - pre_bias)^T S, grad b_enc = S^T 1, grad pre_bias = -W_enc grad b_enc,
    None for k); None where no gradient is needed."""
    grad_kept = grad_kept.reshape(-1)
    grad_x = grad_W_enc = grad_b_enc = grad_pre_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = coo_times_dense_t_cpu(grad_kept, rows, cols, W_enc, x.shape[0])
    if any(ctx.needs_input_grad[1:4]):
        grad_W_enc, grad_b_enc = coo_t_times_dense_cpu(grad_kept, rows, cols, x - pre_bias, W_enc.shape[1], True)
        if ctx.needs_input_grad[3]:
            grad_pre_bias = -(W_enc @ grad_b_enc)
    return (grad_x, grad_W_enc if ctx.needs_input_grad[1] else None,
            grad_b_enc if ctx.needs_input_grad[2] else None, grad_pre_bias, None)


def _topk_centered_backward(ctx, grad_values, grad_indices):
    x, W_enc, pre_bias, values, indices = ctx.saved_tensors
    rows = kept_rows(x.shape[0], values.shape[1])
    return _centered_encoder_backward(ctx, grad_values * (values > 0), rows, indices.reshape(-1), x, W_enc, pre_bias)


topk_encode_centered_cpu.register_autograd(_topk_centered_backward, setup_context=_topk_centered_setup)


# --- topk_encode with the dead latents' pre-activations (the remedies' shared pass) ----------------

@torch.library.custom_op("sparsekit::topk_encode_latents_cpu", mutates_args=())
def topk_encode_latents_cpu(x: Tensor, W_enc: Tensor, b_enc: Tensor, pre_bias: Tensor, k: int, latents: Tensor,
                            k_latents: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """topk_encode_centered_cpu's codes and, for the latents L [m] (int64, sorted ascending,
    distinct), from the same encoder pass: k_latents == 0: pre[:, L] [B, m] (their pre-activations);
    k_latents > 0: their top k_latents per row, ReLU'd (values [B, k_latents], indices in [0, n)).
    Returns (values, indices, pre[:, L] or [B, 0], latent values or [B, 0], latent indices or [B, 0]).

    On the float32 path L's columns are read from the encoder GEMM's tiles while they are
    cache-hot. On the bf16-screened path (CPUs with native bf16) the tiles hold bf16 products only,
    so L's pre-activations are recomputed in float32 by a GEMM over just those columns: the remedies
    read float32 pre-activations on every path (never bf16-rounded ones)."""
    x, W_enc, b_enc = x.contiguous(), W_enc.contiguous(), b_enc.contiguous()
    batch = x.shape[0]
    folded = _folded_bias(b_enc, pre_bias, W_enc)
    latent_bias = folded.index_select(0, latents)
    codes = None
    if use_screen(x, W_enc, k):
        codes = topk_encode_screened((x - pre_bias).contiguous(), W_enc, b_enc, k)
    if codes is None:
        values, indices, *extra = _topk_encode_float32(x, W_enc, folded, k, latents, latent_bias, k_latents)
    else:  # float32 recompute of just L's columns
        values, indices = codes
        columns = matmul(x, W_enc.index_select(1, latents))
        if k_latents == 0:
            extra = [columns]
        else:
            extra = [x.new_empty(batch, k_latents), torch.empty(batch, k_latents, dtype=torch.int64)]
            _C.topk_select_block(numpy_view(columns), numpy_view(latent_bias), 0, k_latents, True, True,
                                 numpy_view(extra[0]), numpy_view(extra[1]), 0, select_share())
    empty = x.new_empty(batch, 0)
    if k_latents == 0:
        return values, indices, extra[0].add_(latent_bias), empty, empty.to(torch.int64)
    return values, indices, empty, extra[0], latents[extra[1]]


@topk_encode_latents_cpu.register_fake
def _(x, W_enc, b_enc, pre_bias, k, latents, k_latents):
    batch, m = x.shape[0], latents.shape[0]
    width = k_latents if k_latents else 0
    return (x.new_empty(batch, k), x.new_empty(batch, k, dtype=torch.int64), x.new_empty(batch, 0 if k_latents else m),
            x.new_empty(batch, width), x.new_empty(batch, width, dtype=torch.int64))


def _topk_latents_setup(ctx, inputs, output):
    x, W_enc, _, pre_bias, _, latents, k_latents = inputs
    values, indices, _, latent_values, latent_indices = output
    ctx.k_latents = k_latents
    ctx.set_materialize_grads(False)  # the unused outputs' gradients stay None (no zeros of their size)
    ctx.save_for_backward(x, W_enc, pre_bias, latents, values, indices, latent_values, latent_indices)


def _topk_latents_backward(ctx, grad_values, grad_indices, grad_pre, grad_latent_values, grad_latent_indices):
    """One sparse encoder backward over the main codes' entries and, when the latents came as
    codes, theirs too; pre[:, L]'s dense gradient G [B, m] adds (x - pre_bias)^T G to W_enc's
    columns L, G's column sums to b_enc[L], G W_enc[:, L]^T to x."""
    x, W_enc, pre_bias, latents, values, indices, latent_values, latent_indices = ctx.saved_tensors
    batch, k = values.shape
    need = ctx.needs_input_grad
    grad_values = torch.zeros_like(values) if grad_values is None else grad_values
    grad_kept, rows, cols = (grad_values * (values > 0)).reshape(-1), kept_rows(batch, k), indices.reshape(-1)
    if ctx.k_latents and grad_latent_values is not None:
        grad_kept = torch.cat([grad_kept, (grad_latent_values * (latent_values > 0)).reshape(-1)])
        rows = torch.cat([rows, kept_rows(batch, ctx.k_latents)])
        cols = torch.cat([cols, latent_indices.reshape(-1)])
    dense = grad_pre if (not ctx.k_latents and grad_pre is not None) else None
    grad_x = grad_W_enc = grad_b_enc = grad_pre_bias = None
    if need[0]:
        grad_x = coo_times_dense_t_cpu(grad_kept, rows, cols, W_enc, batch)
        if dense is not None:
            grad_x = grad_x.add_(matmul(dense, W_enc.index_select(1, latents).t()))
    if any(need[1:4]):
        centered = x - pre_bias
        grad_W_enc, grad_b_enc = coo_t_times_dense_cpu(grad_kept, rows, cols, centered, W_enc.shape[1], True)
        if dense is not None:
            grad_W_enc.index_add_(1, latents, matmul(centered.t(), dense))
            grad_b_enc.index_add_(0, latents, dense.sum(0))
        if need[3]:
            grad_pre_bias = -(W_enc @ grad_b_enc)
    return (grad_x, grad_W_enc if need[1] else None, grad_b_enc if need[2] else None, grad_pre_bias,
            None, None, None)


topk_encode_latents_cpu.register_autograd(_topk_latents_backward, setup_context=_topk_latents_setup)


# --- batchtopk_encode -------------------------------------------------------------------------

@torch.library.custom_op("sparsekit::batchtopk_encode_cpu", mutates_args=())
def batchtopk_encode_cpu(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """-> values, rows, cols, each [B*k], in flat order; bf16-screened on CPUs with native bf16,
    else _batchtopk_encode_float32."""
    return _screened_or_float32(batchtopk_encode_screened, _batchtopk_encode_float32, x, W_enc, b_enc, k)


def _batchtopk_encode_float32(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Global selection of the B*k largest relu(pre) by radix select in C++ (contiguous inputs)."""
    batch = x.shape[0]
    pre = scratch(batch, W_enc.shape[1], x.dtype, "batch pre-activations")  # overwritten by the selection
    row_tiles(x, W_enc, _tile_rows(W_enc.shape[1], x.element_size()), out=pre)
    values = x.new_empty(batch * k)
    rows = torch.empty(batch * k, dtype=torch.int64)
    cols = torch.empty(batch * k, dtype=torch.int64)
    _C.batchtopk_select(numpy_view(pre), numpy_view(b_enc), batch * k, numpy_view(values), numpy_view(rows),
                        numpy_view(cols))
    return values, rows, cols


register_batchtopk(batchtopk_encode_cpu, _sparse_encoder_backward)


@torch.library.custom_op("sparsekit::batchtopk_encode_centered_cpu", mutates_args=())
def batchtopk_encode_centered_cpu(x: Tensor, W_enc: Tensor, b_enc: Tensor, pre_bias: Tensor,
                                  k: int) -> tuple[Tensor, Tensor, Tensor]:
    """batchtopk_encode of x - pre_bias, as topk_encode_centered_cpu."""
    return _screened_or_float32(batchtopk_encode_screened, _batchtopk_encode_float32, x, W_enc, b_enc, k, pre_bias)


@batchtopk_encode_centered_cpu.register_fake
def _(x, W_enc, b_enc, pre_bias, k):
    m = x.shape[0] * k
    return x.new_empty(m), x.new_empty(m, dtype=torch.int64), x.new_empty(m, dtype=torch.int64)


def _batchtopk_centered_setup(ctx, inputs, output):
    x, W_enc, _, pre_bias, _ = inputs
    values, rows, cols = output
    ctx.save_for_backward(x, W_enc, pre_bias, values, rows, cols)


def _batchtopk_centered_backward(ctx, grad_values, grad_rows, grad_cols):
    x, W_enc, pre_bias, values, rows, cols = ctx.saved_tensors
    return _centered_encoder_backward(ctx, grad_values * (values > 0), rows, cols, x, W_enc, pre_bias)


batchtopk_encode_centered_cpu.register_autograd(_batchtopk_centered_backward, setup_context=_batchtopk_centered_setup)


# --- relu_encode_adaptive: a ReLU encoder's codes as COO when they are sparse ------------------

@torch.library.custom_op("sparsekit::relu_encode_adaptive_cpu", mutates_args=())
def relu_encode_adaptive_cpu(x: Tensor, W_enc: Tensor, b_enc: Tensor, pre_bias: Tensor,
                             max_density: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """relu((x - pre_bias) @ W_enc + b_enc) as COO (values, rows, cols, each [E], row-major) when
    at most max_density of the B*n entries are positive, else dense [B, n]. Returns
    (dense, values, rows, cols); the unused form is empty (dense [0, n] or E = 0).

    The choice is a function of this batch alone (a resumed run takes the same path as an
    uninterrupted one). Sparse codes make the decode and every backward GEMM sparse. On CPUs with
    native bf16 the sparse codes come from the bf16 screen (sparsekit.ops.cpu.screen) when it finds
    them; the float32 path decides every other batch."""
    x, W_enc = x.contiguous(), W_enc.contiguous()
    batch, n = x.shape[0], W_enc.shape[1]
    if use_screen(x, W_enc):  # sparse codes found from the bf16 GEMM, or None: this path decides
        coo = relu_encode_screened((x - pre_bias).contiguous(), W_enc, b_enc.contiguous(), max_density)
        if coo is not None:
            return (x.new_empty(0, n), *coo)
    bias = _folded_bias(b_enc, pre_bias, W_enc)
    pre = scratch(batch, n, x.dtype, "batch pre-activations")
    row_tiles(x, W_enc, _tile_rows(n, x.element_size()), out=pre)
    coo = _C.relu_compact(numpy_view(pre), numpy_view(bias), int(max_density * batch * n))
    if coo is None:
        empty_index = torch.empty(0, dtype=torch.int64)
        dense = torch.add(pre, bias, out=empty_output((batch, n), x.dtype)).clamp_(min=0)
        return dense, x.new_empty(0), empty_index, empty_index.clone()
    values, cols, counts = (torch.from_numpy(a) for a in coo)
    rows = torch.repeat_interleave(torch.arange(batch), counts)
    return x.new_empty(0, n), values, rows, cols


@relu_encode_adaptive_cpu.register_fake
def _(x, W_enc, b_enc, pre_bias, max_density):
    ctx = torch.library.get_ctx()
    entries = ctx.new_dynamic_size()
    return (x.new_empty(ctx.new_dynamic_size(), W_enc.shape[1]), x.new_empty(entries),
            x.new_empty(entries, dtype=torch.int64), x.new_empty(entries, dtype=torch.int64))


def _relu_adaptive_setup(ctx, inputs, output):
    x, W_enc, _, pre_bias, _ = inputs
    dense, _, rows, cols = output
    ctx.save_for_backward(x, W_enc, pre_bias, dense, rows, cols)


def _relu_adaptive_backward(ctx, grad_dense, grad_values, grad_rows, grad_cols):
    x, W_enc, pre_bias, dense, rows, cols = ctx.saved_tensors
    if dense.shape[0] == 0:
        return _centered_encoder_backward(ctx, grad_values, rows, cols, x, W_enc, pre_bias)
    grad_pre = torch.ops.aten.threshold_backward(grad_dense, dense, 0)
    grad_x, grad_W_enc, grad_b_enc = _dense_encoder_backward(ctx, grad_pre, x - pre_bias, W_enc)
    grad_pre_bias = None
    if ctx.needs_input_grad[3]:
        grad_pre_bias = -(W_enc @ (grad_b_enc if grad_b_enc is not None else grad_pre.sum(0)))
    return grad_x, grad_W_enc, grad_b_enc, grad_pre_bias, None


relu_encode_adaptive_cpu.register_autograd(_relu_adaptive_backward, setup_context=_relu_adaptive_setup)


# --- dense encoders: relu_encode, jumprelu_encode ---------------------------------------------

def _dense_encoder_backward(ctx, grad_pre: Tensor, x: Tensor, W_enc: Tensor):
    grad_x = grad_W_enc = grad_b_enc = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.mm(grad_pre, W_enc.t())
    if ctx.needs_input_grad[1]:
        grad_W_enc = torch.mm(x.t(), grad_pre, out=empty_output((x.shape[1], grad_pre.shape[1]), grad_pre.dtype))
    if ctx.needs_input_grad[2]:
        grad_b_enc = grad_pre.sum(0)
    return grad_x, grad_W_enc, grad_b_enc


@torch.library.custom_op("sparsekit::relu_encode_cpu", mutates_args=())
def relu_encode_cpu(x: Tensor, W_enc: Tensor, b_enc: Tensor) -> Tensor:
    """relu(x @ W_enc + b_enc): the bias enters the GEMM (addmm), the ReLU is applied in place.
    A dense encoder's cost is its GEMM; torch's runs it on the same thread pool as the rest."""
    return torch.addmm(b_enc, x, W_enc, out=empty_output((x.shape[0], W_enc.shape[1]), x.dtype)).clamp_(min=0)


def _relu_backward(ctx, grad_out):
    x, W_enc, out = ctx.saved_tensors
    return _dense_encoder_backward(ctx, torch.ops.aten.threshold_backward(grad_out, out, 0), x, W_enc)


register_relu(relu_encode_cpu, _relu_backward)


@torch.library.custom_op("sparsekit::jumprelu_encode_cpu", mutates_args=())
def jumprelu_encode_cpu(x: Tensor, W_enc: Tensor, b_enc: Tensor, log_threshold: Tensor,
                        bandwidth: float) -> tuple[Tensor, Tensor]:
    """(pre * (pre > exp(log_threshold)), pre): the output and the pre-activations its
    threshold gradient needs (the public op returns only the first)."""
    pre = torch.addmm(b_enc, x, W_enc, out=empty_output((x.shape[0], W_enc.shape[1]), x.dtype))
    return pre * (pre > torch.exp(log_threshold)), pre


def _jumprelu_backward(ctx, grad_out, grad_pre_out):
    x, W_enc, log_threshold, pre = ctx.saved_tensors
    theta = torch.exp(log_threshold)
    if grad_out is None:
        grad_out = torch.zeros_like(pre)
    grad_pre = grad_out * (pre > theta)
    if grad_pre_out is not None:
        grad_pre = grad_pre + grad_pre_out
    grad_x, grad_W_enc, grad_b_enc = _dense_encoder_backward(ctx, grad_pre, x, W_enc)
    grad_log_threshold = None
    if ctx.needs_input_grad[3]:
        # Rectangle-kernel pseudo-derivative, as reference._JumpReLU defines it.
        in_window = ((pre - theta).abs() < ctx.bandwidth / 2).to(pre.dtype)
        grad_log_threshold = -(grad_out * in_window).sum(0) * theta * theta / ctx.bandwidth
    return grad_x, grad_W_enc, grad_b_enc, grad_log_threshold, None


register_jumprelu(jumprelu_encode_cpu, _jumprelu_backward)
