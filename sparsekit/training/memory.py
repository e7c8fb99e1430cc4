"""Estimate a training run's memory before allocating it, and refuse one that cannot fit.

The estimate counts what sparsekit.train holds at its peak: the parameters, Adam's two moments,
one gradient per parameter, the [B, n] buffers of one step (pre-activations; dense codes and
their gradients for ReLU and JumpReLU), the [B, d] activations of one step (input, target,
reconstruction, residual and their gradients), the held-out split and the per-latent counters.
It is an estimate, meant to catch a configuration that is off by a wide margin (n_latents ten
times too large) before the kernel's OOM killer does, not to budget the last percent.

A TopK step on the CPU never holds a [B, n] buffer (the encoder computes and selects in row tiles
of ~1 MiB per thread, sparsekit.ops.cpu.encode), so with ``device="cpu"`` its estimate is the one
measured from RSS high-water marks (docs/reliability.md, "Allocation before
validation"): the parameters, Adam's moments, the gradients, the update's temporaries (one more
parameter-sized set), twelve [B, d] activation buffers and a fixed runtime allowance, which lies
above the measured peak and within 1.5x of it from d=256, n=8192 up. Other devices (the GPU's
encoder writes the whole [B, n] pre-activations) and architectures keep the counted formula.

Available memory on the CPU is the tightest host limit (sparsekit._util.memlimits: MemAvailable,
nested cgroup v2 and v1 limits, ``ulimit -v``).
"""
from __future__ import annotations

import dataclasses

import torch

from sparsekit._util import memlimits
from sparsekit._util.validate import positive_int
from sparsekit.errors import InsufficientMemory
from sparsekit.sae import registry

GIB = 1024 ** 3
# The TopK CPU step's measured extras (docs/reliability.md): one more parameter-sized set for the
# update's temporaries (measured 1.06x), [B, d] buffers (measured 9.5), and a runtime allowance
# (measured 13 MiB at one thread) plus each thread's encoder tile.
TOPK_CPU_UPDATE_SCRATCH = 1.35
TOPK_CPU_ACTIVATION_BUFFERS = 12
TOPK_CPU_RUNTIME = 24 * 2**20
TOPK_CPU_TILE_PER_THREAD = 2 * 2**20


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per part of a training run; ``total`` is their sum."""
    parts: dict

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        """'about 1.2 GiB (parameters 0.4 GiB, adam_moments 0.8 GiB, ...)'."""
        parts = ", ".join(f"{name} {_gib(size)}" for name, size in self.parts.items() if size)
        return f"about {_gib(self.total)} ({parts})"


def _gib(size: int) -> str:
    return f"{size / GIB:,.3g} GiB" if size >= GIB / 100 else f"{size / 1024 ** 2:,.3g} MiB"


def estimate_training_memory(d_in: int, n_latents: int, batch_size: int, k: int | None = None,
                             architecture: str = "topk", d_out: int | None = None,
                             dtype: torch.dtype = torch.float32, eval_tokens: int = 0,
                             skip: bool = False, device=None) -> MemoryEstimate:
    """Bytes a training run of this shape needs, by part. Pure arithmetic: allocates nothing.

    d_out: a transcoder's output width (None: an SAE, d_out = d_in). k: active latents per row
    (topk, batchtopk; defaults to n_latents for the sparse-code buffers otherwise). skip: a skip
    transcoder's W_skip [d_in, d_out] (parameters, moments and gradient like the rest).
    """
    for name, value in (("d_in", d_in), ("n_latents", n_latents), ("batch_size", batch_size)):
        positive_int(name, value)
    if architecture not in registry.ARCHITECTURES:
        raise ValueError(f"architecture must be one of {', '.join(registry.names())}, got {architecture!r}")
    facts = registry.get(architecture)  # the class declares its buffers and extra parameters
    item = torch.empty((), dtype=dtype).element_size()
    transcoder = d_out is not None
    d_out = d_in if d_out is None else d_out
    n, batch = n_latents, batch_size
    parameters = d_in * n + n + n * d_out + d_out + (d_in if transcoder else 0) + n * facts.parameters_per_latent
    parameters += d_in * d_out if skip else 0
    kept = batch * (k if k is not None else n)
    if facts.code_kind == "topk" and device is not None and torch.device(device).type == "cpu":
        return MemoryEstimate({
            "parameters": parameters * item,
            "adam_moments": 2 * parameters * item,
            "gradients": parameters * item,
            "update_scratch": int(TOPK_CPU_UPDATE_SCRATCH * parameters * item),
            "sparse_codes": 2 * kept * (item + 8),
            "activations": TOPK_CPU_ACTIVATION_BUFFERS * batch * max(d_in, d_out) * item,
            "held_out_split": eval_tokens * (d_in + (d_out if transcoder else 0)) * 4,
            "latent_counters": 3 * n * 8,
            "runtime": TOPK_CPU_RUNTIME + TOPK_CPU_TILE_PER_THREAD * torch.get_num_threads(),
        })
    return MemoryEstimate({
        "parameters": parameters * item,
        "adam_moments": 2 * parameters * item,
        "gradients": parameters * item,
        "batch_by_latent_buffers": facts.batch_by_latent_buffers * batch * n * item,
        "sparse_codes": 2 * kept * (item + 8) if facts.code_kind != "dense" else 0,
        "activations": (2 * batch * d_in + 4 * batch * d_out) * item,
        "held_out_split": eval_tokens * (d_in + (d_out if transcoder else 0)) * 4,
        "latent_counters": 3 * n * 8,
    })


def estimate_for(sae, config) -> MemoryEstimate:
    """The estimate for training this dictionary with this TrainConfig."""
    return estimate_training_memory(sae.d_in, sae.n_latents, config.batch_size, getattr(sae, "k", None),
                                    sae.architecture, sae.d_out if sae.transcoder else None, sae.W_enc.dtype,
                                    config.eval_tokens, getattr(sae, "skip", False), sae.W_enc.device)


def available_memory(device) -> int | None:
    """Bytes that can still be allocated on device: CUDA's free memory; on the CPU, the tightest of
    MemAvailable, every cgroup v2/v1 limit up the process's cgroup path and ``ulimit -v``
    (sparsekit._util.memlimits). None when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    limit = memlimits.tightest()
    return None if limit is None else limit.available


def check_fits(estimate: MemoryEstimate, device, already_allocated: int = 0, what: str = "this configuration") -> None:
    """InsufficientMemory naming the figures when estimate.total - already_allocated exceeds the
    device's available memory (nothing is checked when that is unknown)."""
    available = available_memory(device)
    needed = estimate.total - already_allocated
    if available is None or needed <= available:
        return
    held = f", of which {_gib(already_allocated)} is already allocated" if already_allocated else ""
    raise InsufficientMemory(f"{what} needs {estimate.describe()}{held}, but {torch.device(device)} has "
                             f"{_gib(available)} available: lower n_latents or batch_size",
                             estimate, available)
