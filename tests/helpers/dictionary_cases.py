"""Dictionaries of every architecture, SAE and transcoder forms, with non-trivial parameters
(perturbed biases, thresholds that matter, a learned BatchTopK threshold, input/output scales),
as after training: what persistence and export tests need."""
from __future__ import annotations

import torch

import sparsekit

ARCHITECTURES = ("relu", "topk", "batchtopk", "jumprelu", "gated", "matryoshka_batchtopk")
D_IN, N_LATENTS, D_OUT, K = 12, 48, 7, 6


def make_dictionary(architecture: str, transcoder: bool = False, dtype=torch.float32, seed: int = 0,
                    input_scale: float = 2.7, output_scale: float = 2.7):
    """An eval-mode dictionary whose every parameter and buffer differs from its initial value."""
    d_out = D_OUT if transcoder else None
    hyper = {"relu": dict(l1_coeff=3e-3, decoder_norm_penalty=True), "topk": dict(k=K),
             "batchtopk": dict(k=K, threshold_momentum=0.9), "jumprelu": dict(l0_coeff=2e-3, bandwidth=0.05),
             "gated": dict(l1_coeff=2e-3),
             "matryoshka_batchtopk": dict(k=K, matryoshka_widths=(6, 18, N_LATENTS), threshold_momentum=0.9)}
    kwargs = dict(hyper[architecture], dtype=dtype, seed=seed)
    if transcoder:
        sae = sparsekit.Transcoder(D_IN, N_LATENTS, d_out, architecture=architecture, **kwargs)
    else:
        sae = sparsekit.sae.ARCHITECTURES[architecture](D_IN, N_LATENTS, **kwargs)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in sae.parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=gen, dtype=param.dtype))
        if architecture == "jumprelu":
            sae.log_threshold.copy_(torch.empty(N_LATENTS, dtype=dtype).uniform_(-2.0, 0.0, generator=gen))
        if architecture in ("batchtopk", "matryoshka_batchtopk"):
            sae.threshold.fill_(0.4)
    sae.input_scale, sae.output_scale = input_scale, output_scale
    return sae.eval()
