"""Check a dictionary's size against the memory it would take, before one byte of it is allocated.

``check_dictionary_memory`` runs in every dictionary's constructor after its arguments are
validated and before ``init_parameters``: ``TopKSAE(768, 10**11, k=32)`` is refused at once with
an ``InsufficientMemory`` that states the bytes needed and available, instead of asking torch for
hundreds of GB (a kernel OOM kill, or minutes of swapping, or torch's own "not enough memory" after
part of it was touched). The importers call it too, before the float64 copies they fold weights in.

Bytes needed: the parameters in their dtype on their device, plus the float64 scratch the random
initialisation draws on the host (init_parameters: the decoder, the encoder and one temporary of
the larger, 8 bytes each). Available: CUDA's free memory for a CUDA device; for the host, the
tightest of MemAvailable, the cgroup limits and ``ulimit -v`` (sparsekit._util.memlimits). A device
whose free memory cannot be read (meta, mps) is not checked.
"""
from __future__ import annotations

import torch

from sparsekit._util import memlimits
from sparsekit.errors import InsufficientMemory


def parameter_count(d_in: int, n_latents: int, d_out: int, transcoder: bool, skip: bool, per_latent: int) -> int:
    """Elements in a dictionary's parameters: W_enc, b_enc, W_dec, b_dec (+ b_in, the extra
    per-latent parameters, W_skip)."""
    n = n_latents
    return (d_in * n + n + n * d_out + d_out + (d_in if transcoder else 0) + n * per_latent
            + (d_in * d_out if skip else 0))


def initialisation_scratch(d_in: int, n_latents: int, d_out: int) -> int:
    """Host bytes init_parameters holds at its peak: float64 decoder, encoder and one temporary."""
    return 8 * n_latents * (d_in + d_out + max(d_in, d_out))


def available(device) -> tuple[int, str] | None:
    """(bytes that can still be allocated on ``device``, which limit says so); None when unknown."""
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None
        return int(torch.cuda.mem_get_info(device)[0]), f"free memory on {device}"
    if device.type != "cpu":
        return None
    limit = memlimits.tightest()
    return None if limit is None else (limit.available, limit.source)


SMALL = 16 * 2**20  # below this, no limit is read: any process that got this far can hold it


def check_bytes(needed: int, device, what: str, advice: str = "lower n_latents", detail: str = "") -> None:
    """InsufficientMemory when ``needed`` bytes exceed what ``device`` has available; the message
    says ``what`` needs them (``detail``: of what they are made) and which limit refused them."""
    if needed <= SMALL:
        return
    found = available(device)
    if found is None or needed <= found[0]:
        return
    free, source = found
    device = torch.device("cpu") if device is None else torch.device(device)
    detail = f" ({detail})" if detail else ""
    raise InsufficientMemory(f"{what} needs {memlimits.fmt_bytes(needed)}{detail}, but {device} has "
                             f"{memlimits.fmt_bytes(free)} available (the tightest limit: {source}): {advice}",
                             None, free)


def check_dictionary_memory(name: str, d_in: int, n_latents: int, d_out: int, transcoder: bool, skip: bool,
                            per_latent: int, dtype: torch.dtype, device) -> None:
    """Before a dictionary allocates: its parameters (on ``device``) and initialisation scratch
    (on the host) must fit; InsufficientMemory stating the bytes needed and available otherwise."""
    item = torch.empty((), dtype=dtype, device="meta").element_size()
    params = parameter_count(d_in, n_latents, d_out, transcoder, skip, per_latent) * item
    scratch = initialisation_scratch(d_in, n_latents, d_out)
    what = f"{name}(d_in={d_in}, n_latents={n_latents}{'' if d_out == d_in else f', d_out={d_out}'})"
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type == "cpu":
        check_bytes(params + scratch, device, what, detail=f"{params:,} for its {str(dtype).split('.')[-1]} parameters, "
                                                           f"{scratch:,} of float64 initialisation scratch")
    else:
        check_bytes(scratch, "cpu", f"{what}'s float64 initialisation scratch")
        check_bytes(params, device, f"{what}'s {str(dtype).split('.')[-1]} parameters")
