"""Transcoders: read one activation, predict another (Dunefsky et al. 2024; Anthropic's circuits
updates): e.g. MLP input -> MLP output, or the residual stream at layer L -> layer L + m.

A transcoder is any architecture built with transcoder=True: it gets its own input-side bias
b_in (subtracted from x, as an SAE subtracts b_dec), d_out may differ from d_in, its b_dec is
initialised from the mean of the targets, and the encoder starts as the decoder's transpose only
when d_in == d_out. Its forward takes (x, y) and its mse is against y.
"""
from __future__ import annotations

from . import registry


def Transcoder(d_in: int, n_latents: int, d_out: int, k: int | None = None, architecture: str = "topk",
               **kwargs):
    """Build a transcoder of the given architecture ("topk", "batchtopk", "relu", "jumprelu").

    k is required for "topk"/"batchtopk"; pass l1_coeff (relu) or l0_coeff (jumprelu) as keywords.
    """
    if architecture not in registry.ARCHITECTURES:
        raise ValueError(f"architecture must be one of {', '.join(sorted(registry.trainable()))}, got {architecture!r}")
    cls = registry.get(architecture)
    takes_k, _ = registry.architectures_taking("k")
    if architecture in takes_k:
        if k is None:
            raise ValueError(f"a {architecture} transcoder needs k")
        return cls(d_in, n_latents, k=k, d_out=d_out, transcoder=True, **kwargs)
    if k is not None:
        raise ValueError(f"k applies to {'/'.join(takes_k)} transcoders, not {architecture!r}")
    return cls(d_in, n_latents, d_out=d_out, transcoder=True, **kwargs)
