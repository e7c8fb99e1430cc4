"""Export a dictionary in SAELens 6.x's on-disk layout, loadable with ``sae_lens.SAE.load_from_disk``.

Files: ``sae_weights.safetensors`` (W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_out],
b_dec [d_out], plus threshold [d_sae] for JumpReLU forms) and ``cfg.json`` with SAELens 6.x's
fields: architecture, d_in, d_sae, dtype, device, apply_b_dec_to_input, normalize_activations,
reshape_activations, metadata (sae_lens_version >= 6 marks the 6.x schema), k for "topk", d_out
for transcoders. Checked against sae-lens 6.54.

Architectures (sparsekit -> SAELens):
  relu      -> "standard"  (ReLU)                    transcoder -> "transcoder"
  topk      -> "topk" with k                         transcoder -> NotImplementedError (none in 6.x)
  jumprelu  -> "jumprelu", threshold = exp(log_threshold)          -> "jumprelu_transcoder"
  batchtopk -> "jumprelu", every latent's threshold = the learned global inference threshold
                                                                   -> "jumprelu_transcoder"

Normalisation is folded into the weights (``normalize_activations="none"``) so the exported
dictionary reads raw activations and returns raw reconstructions, exactly as ``sae.reconstruct``.
SAELens's own "expected_average_only_in" cannot carry a scale through ``load_from_disk`` (only
``from_pretrained`` folds it, from its registry), so it is not used. With s_in = input_scale,
s_out = output_scale and c the pre-encoder bias (b_dec for an SAE, b_in for a transcoder):

    pre = (s_in x - c) @ W_enc + b_enc = (x - c / s_in) @ (s_in W_enc) + b_enc
    out = (f @ W_dec + b_dec) / s_out  = f @ (W_dec / s_out) + b_dec / s_out

so W_enc' = s_in W_enc, W_dec' = W_dec / s_out, b_dec' = b_dec / s_out, and pre-activations (hence
thresholds and top-k choices) are unchanged. An SAE with s_in == s_out subtracts c / s_in == b_dec'
from its input: SAELens's ``apply_b_dec_to_input=True``. Otherwise (a transcoder, which SAELens
never lets subtract b_dec, or an SAE with s_in != s_out) the input bias goes into the encoder bias,
b_enc' = b_enc - c @ W_enc, with ``apply_b_dec_to_input=False``. Folding is done in float64.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .base import SparseDictionary
from ..atomic import atomic_save_tensors, atomic_write_bytes

SAELENS_WEIGHTS_FILE = "sae_weights.safetensors"
SAELENS_CONFIG_FILE = "cfg.json"
SAELENS_SCHEMA_VERSION = "6.0.0"  # what sparsekit writes against: the SAELens 6 on-disk schema

# sparsekit architecture -> (SAELens SAE architecture, SAELens transcoder architecture or None)
SAELENS_ARCHITECTURES = {
    "relu": ("standard", "transcoder"),
    "topk": ("topk", None),
    "jumprelu": ("jumprelu", "jumprelu_transcoder"),
    "batchtopk": ("jumprelu", "jumprelu_transcoder"),
}


def _thresholds(sae: SparseDictionary) -> torch.Tensor | None:
    """Per-latent inference thresholds [n] in float64, or None for architectures without them."""
    if sae.architecture == "jumprelu":
        return sae.log_threshold.detach().double().exp()
    if sae.architecture == "batchtopk":
        if float(sae.threshold) < 0:
            raise ValueError("BatchTopKSAE has no inference threshold yet (threshold=-1): train it before exporting")
        # The same floor as BatchTopKSAE.encode in evaluation mode.
        theta = max(float(sae.threshold), 1e-30)
        return torch.full((sae.n_latents,), theta, dtype=torch.float64, device=sae.b_enc.device)
    return None


def export_saelens(sae: SparseDictionary, directory, metadata: dict | None = None) -> Path:
    """Write ``sae`` to ``directory`` (created if missing) in SAELens 6.x's layout.

    metadata: extra entries for cfg.json's "metadata" block (e.g. model_name, hook_name, which
    SAELens's HookedSAETransformer reads). Returns the directory.
    """
    if sae.architecture not in SAELENS_ARCHITECTURES:
        raise ValueError(f"architecture {sae.architecture!r} has no SAELens equivalent; "
                         f"supported: {', '.join(SAELENS_ARCHITECTURES)}")
    sae_name, transcoder_name = SAELENS_ARCHITECTURES[sae.architecture]
    if sae.transcoder and transcoder_name is None:
        raise NotImplementedError(f"SAELens 6.x has no {sae.architecture} transcoder (its transcoders are ReLU "
                                  f"and JumpReLU): a {sae.architecture} transcoder cannot be exported")
    architecture = transcoder_name if sae.transcoder else sae_name
    s_in, s_out = float(sae.input_scale), float(sae.output_scale)
    for name, value in (("input_scale", s_in), ("output_scale", s_out)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive finite number to export, got {value!r}")

    W_enc, b_enc, W_dec, b_dec = (p.detach().double() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    center = (sae.b_in if sae.transcoder else sae.b_dec).detach().double()
    apply_b_dec_to_input = not sae.transcoder and s_in == s_out
    tensors = {
        "W_enc": W_enc * s_in,
        "b_enc": b_enc if apply_b_dec_to_input else b_enc - center @ W_enc,
        "W_dec": W_dec / s_out,
        "b_dec": b_dec / s_out,
    }
    thresholds = _thresholds(sae)
    if thresholds is not None:
        tensors["threshold"] = thresholds
    dtype = sae.W_enc.dtype
    tensors = {name: t.to(dtype) for name, t in tensors.items()}

    config = {
        "architecture": architecture,
        "d_in": sae.d_in,
        "d_sae": sae.n_latents,
        "dtype": str(dtype).split(".")[-1],
        "device": "cpu",
        "apply_b_dec_to_input": apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"sae_lens_version": SAELENS_SCHEMA_VERSION, **(metadata or {})},
    }
    if architecture == "topk":
        config.update(k=sae.k, rescale_acts_by_decoder_norm=False)
    if sae.transcoder:
        config["d_out"] = sae.d_out

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(tensors, directory / SAELENS_WEIGHTS_FILE)
    atomic_write_bytes(directory / SAELENS_CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode())
    return directory
