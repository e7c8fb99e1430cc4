"""Tiled GEMM with a fused epilogue: out = epilogue(a @ b + bias), the encoders' workhorse.

a [M, K] and b [K, N] may be any strided views (W_enc.t(), x.t(): no copies); out [M, N] is
contiguous in a's dtype (or float32). Tiles accumulate in float32. Epilogues (applied to pre = a @ b + bias):

- ``none``      pre
- ``relu``      relu(pre)
- ``jumprelu``  pre * (pre > threshold[col]), also storing pre itself (the threshold's gradient needs it)
- ``exp``       exp(pre) (the ghost-grads pre-activations)
- ``mul``       pre * aux[row, col] (the ghost-grads backward: grad_pre = (grad_g @ V.T) * exp(pre))

Used by topk_encode/batchtopk_encode (pre-activations, then selection), relu_encode,
jumprelu_encode, the dense encoders' backward GEMMs and the ghost-grads term.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import INTERPRETING, check_dtype, configs, dot_precision, layout_code, prune_oversized, size_bucket, upcast_inputs

EPILOGUES = {"none": 0, "relu": 1, "jumprelu": 2, "exp": 3, "mul": 4}

# Configs differ only in output tiling, warps and stages; BLOCK_K (the order in which each output
# element sums over K) is chosen by dtype in the launcher, so autotuning never changes results.
_HOPPER = [
    dict(BLOCK_M=128, BLOCK_N=256, num_warps=8, num_stages=3),
    dict(BLOCK_M=256, BLOCK_N=128, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=256, num_warps=4, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=5),
]
_SMALL = dict(BLOCK_M=16, BLOCK_N=32)
GPU_BLOCK_K = {torch.float32: 32, torch.bfloat16: 64, torch.float16: 64}  # block_k on a GPU


def block_k(dtype: torch.dtype) -> int:
    """The K step of every tile for this dtype (the order each output element sums in): fixed per dtype,
    so no config changes a result's bits; the fused TopK (fused_topk.py) takes the same."""
    return 16 if INTERPRETING else GPU_BLOCK_K[dtype]


@triton.jit
def tile_of_product(a_ptr, b_ptr, bias_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's [BLOCK_M, BLOCK_N] tile of a [M, K] @ b [K, N] (+ bias [N]) in float32, the one
    K loop every GEMM-shaped kernel here shares (``_gemm_kernel``, ``fused_topk``), so their tiles hold
    the same bits. Returns (acc [BLOCK_M, BLOCK_N] fp32, rows, cols (int64), row_ok, col_ok, pid_n, tiles_n)."""
    # Grouped launch order: GROUP_M row tiles share each column tile of b while it is in L2.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    group_rows = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % group_rows
    pid_n = (pid % (GROUP_M * tiles_n)) // group_rows

    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + ks) < K
        a = tl.load(a_ptr + rows[:, None] * stride_am + (k0 + ks)[None, :] * stride_ak,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr + (k0 + ks)[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc, rows, cols, row_ok, col_ok, pid_n, tiles_n


# Keyed on size buckets, layout and precision (dtypes join the key by themselves), not exact sizes.
@triton.autotune(configs=configs(_HOPPER, _SMALL),
                 key=["M_BUCKET", "N_BUCKET", "K_BUCKET", "LAYOUT", "PRECISION", "EPILOGUE", "HAS_BIAS"],
                 prune_configs_by={"early_config_prune": prune_oversized(BLOCK_M="M", BLOCK_N="N")})
@triton.jit
def _gemm_kernel(a_ptr, b_ptr, bias_ptr, threshold_ptr, aux_ptr, out_ptr, pre_ptr,
                 M, N, K, stride_am, stride_ak, stride_bk, stride_bn, M_BUCKET, N_BUCKET, K_BUCKET, LAYOUT,
                 HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr, UPCAST: tl.constexpr,
                 PRECISION: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr = 8):
    acc, rows, cols, row_ok, col_ok, pid_n, tiles_n = tile_of_product(
        a_ptr, b_ptr, bias_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
        HAS_BIAS, UPCAST, PRECISION, BLOCK_K, BLOCK_M, BLOCK_N, GROUP_M)
    out_offsets = rows[:, None] * N + cols[None, :]
    out_mask = row_ok[:, None] & col_ok[None, :]
    if EPILOGUE == 1:
        acc = tl.maximum(acc, 0.0)
    elif EPILOGUE == 2:
        # Round pre to the output dtype first, so the comparison sees the stored pre-activations.
        pre = acc.to(out_ptr.dtype.element_ty)
        tl.store(pre_ptr + out_offsets, pre, mask=out_mask)
        threshold = tl.load(threshold_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc = tl.where(pre.to(tl.float32) > threshold[None, :], pre.to(tl.float32), 0.0)
    elif EPILOGUE == 3:
        acc = tl.exp(acc)
    elif EPILOGUE == 4:
        acc = acc * tl.load(aux_ptr + out_offsets, mask=out_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def gemm(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, epilogue: str = "none",
         threshold: torch.Tensor | None = None, aux: torch.Tensor | None = None,
         out_dtype: torch.dtype | None = None, tile: dict | None = None):
    """epilogue(a @ b + bias): a [M, K], b [K, N], bias [N] -> [M, N] contiguous, in out_dtype
    (default a's dtype; float32 keeps a 16-bit GEMM's float32 accumulator as it is: the bf16 screen).

    ``threshold`` [N] (already exp(log_threshold)) for ``jumprelu``, which returns (out, pre);
    ``aux`` [M, N] for ``mul``. ``tile``: BLOCK_M, BLOCK_N, num_warps, num_stages (and optionally
    BLOCK_K, default ``block_k``) to run instead of autotuning (comparisons at one tile config, e.g.
    against the fused TopK's).
    """
    check_dtype(a, b)
    M, K = a.shape
    N = b.shape[1]
    code = EPILOGUES[epilogue]
    out = torch.empty((M, N), dtype=out_dtype or a.dtype, device=a.device)
    pre = torch.empty_like(out) if code == 2 else out
    if code == 2:
        threshold = threshold.contiguous()
    if code == 4:
        aux = aux.contiguous()
    if M == 0 or N == 0:
        return (out, pre) if code == 2 else out
    if K == 0:  # tl.dot needs at least one K tile; an empty sum is zero
        a = a.new_zeros(M, 1)
        b = b.new_zeros(1, N)
        K = 1

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    chosen = dict(tile or {})
    chosen.setdefault("BLOCK_K", block_k(a.dtype))
    args = (a, b, bias if bias is not None else out, threshold if threshold is not None else out,
            aux if aux is not None else out, out, pre,
            M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            size_bucket(M), size_bucket(N), size_bucket(K), layout_code(a.stride(1) == 1, b.stride(1) == 1))
    flags = dict(HAS_BIAS=bias is not None, EPILOGUE=code, UPCAST=upcast_inputs(a.dtype),
                 PRECISION=dot_precision(a.dtype), **chosen)
    if tile is None:
        _gemm_kernel[grid](*args, **flags)
    else:  # one config: the kernel without its autotuner
        _gemm_kernel.fn[grid](*args, **flags)
    return (out, pre) if code == 2 else out
