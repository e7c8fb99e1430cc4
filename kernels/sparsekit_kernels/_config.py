"""Shared launch settings for the Triton kernels: interpreter detection, autotune configs, precision.

Under ``TRITON_INTERPRET=1`` (tests on CPU tensors) every kernel runs one small config: the
interpreter executes each program as NumPy, so big blocks only cost time there. On a GPU the
autotuned kernels choose among Hopper (H100/H200) configs.

Determinism: kernels whose summation order depends on a block size either keep that block size
fixed across their configs (the GEMM's BLOCK_K) or sum in a sequential loop whose order no config
changes (the segment reductions). Kernels whose reduction order would depend on the thread layout
(``sampled_dot``, the column reductions) are not autotuned at all.
"""
from __future__ import annotations

import os

import torch
import triton

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
if INTERPRETING:  # nested @triton.jit helpers re-patch triton.language on every call: skip that
    from ._interpreter import skip_redundant_patching

    skip_redundant_patching()

# Triton's dtype for each torch dtype a kernel accepts (tl.dot takes the 16-bit ones as they are
# on a GPU; the kernels cast them to float32 right after loading under the interpreter, whose
# bfloat16 arithmetic is wrong).
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def env_choice(name: str, choices: tuple[str, ...]) -> str:
    """The switch in environment variable `name`, lower-cased; unset means choices[0] ("auto"); anything
    outside choices is a RuntimeError naming the variable and the choices."""
    mode = os.environ.get(name, choices[0]).strip().lower()
    if mode not in choices:
        allowed = ", ".join(repr(c) for c in choices[:-1]) + f" or {choices[-1]!r}"
        raise RuntimeError(f"{name}={mode!r} is not {allowed}")
    return mode


def configs(hopper: list[dict], small: dict, warps: tuple[int, ...] = (4, 8), stages: int = 3) -> list:
    """triton.Config list: ``small`` alone under the interpreter, else every Hopper config
    (each dict may carry ``num_warps``/``num_stages``; the rest are kernel meta-parameters)."""
    if INTERPRETING:
        return [triton.Config(dict(small), num_warps=1, num_stages=1)]
    out = []
    for entry in hopper:
        meta = dict(entry)
        num_warps = meta.pop("num_warps", warps[0])
        num_stages = meta.pop("num_stages", stages)
        out.append(triton.Config(meta, num_warps=num_warps, num_stages=num_stages))
    return out


def prune_oversized(**size_of_block: str):
    """An ``early_config_prune`` for ``triton.autotune``: drop the configs whose tiles overshoot the
    problem, e.g. ``prune_oversized(BLOCK_M="M", BLOCK_N="N")``. A config stays when each named block
    is at most the next power of two of its size argument (or the list's smallest value of that block);
    when none stays, the config with the smallest tile does. Every config computes the same sums in
    the same order (see above), so pruning changes which configs are compiled and timed, not results:
    on an H200, a 13 x 29 GEMM spent 50-109 s compiling and timing all eight Hopper configs, 128 x 256
    tiles included (bench/results/2026-12-04-nvidia-h200.md); an autotune key that changes re-tunes."""

    def prune(configs: list, named_args: dict, **kwargs) -> list:
        smallest = {block: min(c.kwargs[block] for c in configs) for block in size_of_block}
        limits = {block: max(triton.next_power_of_2(max(int(named_args[size]), 1)), smallest[block])
                  for block, size in size_of_block.items()}
        kept = [c for c in configs if all(c.kwargs[block] <= limit for block, limit in limits.items())]
        if kept:
            return kept

        def tile(config):
            area = 1
            for block in size_of_block:
                area *= config.kwargs[block]
            return area
        return [min(configs, key=tile)]

    return prune


def size_bucket(size: int) -> int:
    """The autotune key for a size: its next power of two. Triton's autotuner re-tunes (compiling and
    timing every config) for each new key; keyed on exact sizes, every new batch size or dead-latent
    count did (27 autotunes, 202 s, in the first H200 bench: bench/results/2026-12-04-nvidia-h200.md).
    Sizes within a factor of two share a config; ``prune_oversized`` prunes by the same power of two."""
    return triton.next_power_of_2(max(int(size), 1))


def layout_code(*unit_strides: bool) -> int:
    """An autotune key for the operands' layout: bit i set when operand i is contiguous along the
    dimension the kernel reads fastest (a transposed operand wants other tiles)."""
    return sum(1 << i for i, contiguous in enumerate(unit_strides) if contiguous)


def fixed(gpu: dict, small: dict) -> dict:
    """Meta-parameters of a kernel that is not autotuned (its summation order must not change)."""
    return dict(small if INTERPRETING else gpu)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: float32 follows torch's own TF32 switch (off by default, so the GEMM
    agrees with torch's to float32 rounding); 16-bit inputs multiply exactly into float32."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def upcast_inputs(dtype: torch.dtype) -> bool:
    """Cast loaded tiles to float32 before tl.dot: always for float32 (no-op), and for 16-bit
    inputs only under the interpreter (on a GPU tensor cores take them as they are)."""
    return dtype == torch.float32 or INTERPRETING


def check_dtype(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.dtype not in SUPPORTED_DTYPES:
            raise RuntimeError(f"sparsekit's Triton kernels take float32/bfloat16/float16, got {t.dtype}")
