"""EleutherAI sparsify (``eai-sparsify`` 1.3) both ways: one folder per hookpoint holding cfg.json +
sae.safetensors, the same file names as sparsekit's (``sparsekit.load`` tells them apart by cfg.json:
sparsify's has no "architecture").

Layout (sparsify/sparse_coder.py, ``SparseCoder.save_to_disk`` / ``load_from_disk``, 1.3.3):
cfg.json = SparseCoderConfig's fields (activation, expansion_factor, normalize_decoder, num_latents,
k, multi_topk, skip_connection, transcode) plus d_in; tensors (one dtype):

    encoder.weight [n, d_in]   encoder.bias [n]   W_dec [n, d_in]   b_dec [d_in]   W_skip [d_in, d_in] (skip only)

with n = num_latents or d_in * expansion_factor. Its forward, on raw activations:

    pre = relu((x - b_dec) @ encoder.weight^T + encoder.bias)   (a transcoder does not subtract b_dec)
    out = TopK_k(pre) @ W_dec + b_dec (+ x @ W_skip^T)

so a sparsify SAE is a sparsekit TopKSAE and a sparsify transcoder a TopK Transcoder with b_in = 0
(d_out = d_in, the only shape sparsify builds), optionally with its skip path. ``activation="groupmax"``
and an SAE (not a transcoder) with a skip connection have no sparsekit equivalent and are refused.

Export folds sparsekit's input/output scales and a transcoder's b_in into the weights (float64), as
the SAELens export does: the exported coder reads raw activations and returns raw outputs, like
``sae.reconstruct``. sae.metadata travels in cfg.json's "metadata" (sparsify drops unknown fields).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from sparsekit._util.atomic import atomic_save_tensors, atomic_write_bytes
from sparsekit._util.validate import is_int

from . import registry
from .allocation import check_bytes
from .files import CONFIG_FILE, WEIGHTS_FILE, check_header, check_tensors, read_json_object, read_weights_header
from .metadata import check_metadata
from .transcoder import Transcoder

LAYOUT = "sparsify"


def load_sparsify(directory, dtype: torch.dtype | None = None, device=None):
    """A folder sparsify wrote (``SparseCoder.save_to_disk``: cfg.json + sae.safetensors) as a TopKSAE
    or TopK Transcoder in eval mode, whose ``reconstruct(x)`` equals sparsify's forward output.
    dtype/device: where to build it (default: the file's dtype, the CPU)."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: is {directory} a folder sparsify's save_to_disk wrote?")
    config = _read_config(config_path)
    d_in, n, k = config["d_in"], config["n"], config["k"]
    expected = {"encoder.weight": (n, d_in), "encoder.bias": (n,), "W_dec": (n, d_in), "b_dec": (d_in,)}
    if config["skip_connection"]:
        expected["W_skip"] = (d_in, d_in)
    layout = f"sparsify's layout for this cfg.json (d_in={d_in}, {n} latents)"
    # validate, then allocate: the header's shapes must be cfg.json's before a byte is read
    header = read_weights_header(weights_path)
    check_header(header, expected, weights_path, layout,
                 claimed_by=f"{config_path.name}'s d_in={d_in}, {config['latents_from']}")
    check_bytes(sum(entry.nbytes for entry in header.values()), "cpu", f"reading {weights_path}")
    try:
        tensors = load_file(str(weights_path))
    except Exception as error:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{weights_path} is not a readable safetensors file: {error}") from None
    check_tensors(tensors, expected, weights_path, layout)
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) != 1:
        raise ValueError(f"{weights_path}: tensors must share one dtype, got {sorted(map(str, dtypes))}")
    dtype = dtype or dtypes.pop()
    factory = dict(dtype=dtype, device=device, seed=None)
    if config["transcode"]:
        sae = Transcoder(d_in, n, d_in, k=k, architecture="topk", skip=config["skip_connection"], **factory)
    else:
        sae = registry.get("topk")(d_in, n, k=k, **factory)
    state = {"W_enc": tensors["encoder.weight"].t(), "b_enc": tensors["encoder.bias"], "W_dec": tensors["W_dec"],
             "b_dec": tensors["b_dec"]}
    if "W_skip" in tensors:
        state["W_skip"] = tensors["W_skip"].t()
    with torch.no_grad():
        for name, value in state.items():
            getattr(sae, name).copy_(value)
    sae.metadata = config["metadata"]
    return sae.eval()


def _read_config(config_path: Path) -> dict:
    """sparsify's cfg.json, checked; adds n (the latent count) and the metadata sparsekit's export wrote."""
    config = read_json_object(config_path)
    d_in = config.get("d_in")
    if not is_int(d_in) or d_in < 1:
        raise ValueError(f"{config_path}: d_in must be a positive int, got {d_in!r}")
    activation = config.get("activation", "topk")
    if activation != "topk":
        raise ValueError(f"{config_path}: activation={activation!r} has no sparsekit equivalent (only 'topk' does)")
    num_latents, expansion = config.get("num_latents", 0), config.get("expansion_factor", 32)
    for key, value, low in (("num_latents", num_latents, 0), ("expansion_factor", expansion, 1)):
        if not is_int(value) or value < low:
            raise ValueError(f"{config_path}: {key} must be an int >= {low}, got {value!r}")
    n = num_latents or d_in * expansion
    k = config.get("k", 32)
    if not is_int(k) or not 1 <= k <= n:
        raise ValueError(f"{config_path}: k must be an int in [1, {n}] (the latent count), got {k!r}")
    flags = {}
    for key in ("transcode", "skip_connection"):
        flags[key] = config.get(key, False)
        if not isinstance(flags[key], bool):
            raise ValueError(f"{config_path}: {key} must be true or false, got {flags[key]!r}")
    if flags["skip_connection"] and not flags["transcode"]:
        raise ValueError(f"{config_path}: a sparsify SAE with a skip connection (skip_connection=true, transcode=false) "
                         f"has no sparsekit equivalent: sparsekit's skip path is for transcoders")
    metadata = check_metadata(config.get("metadata", {}), f"{config_path}: metadata")
    latents_from = f"num_latents={num_latents}" if num_latents else f"expansion_factor={expansion}"
    return {"d_in": d_in, "n": n, "k": k, **flags, "metadata": metadata, "latents_from": latents_from}


def export_sparsify(sae, directory) -> Path:
    """Write ``sae`` (a TopKSAE, or a TopK Transcoder with d_out = d_in) into ``directory`` (created if
    missing) in sparsify 1.3's layout, which ``sparsify.SparseCoder.load_from_disk`` reads. Returns
    the directory."""
    if sae.architecture != "topk":
        raise ValueError(f"sparsify holds TopK dictionaries only, got architecture {sae.architecture!r}")
    if sae.transcoder and sae.d_out != sae.d_in:
        raise ValueError(f"sparsify's transcoders predict an output of the input's width: d_out={sae.d_out} "
                         f"differs from d_in={sae.d_in}")
    metadata = check_metadata(sae.metadata, "sae.metadata")
    s_in, s_out = float(sae.input_scale), float(sae.output_scale)
    W_enc, b_enc, W_dec, b_dec = (p.detach().double() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    if sae.transcoder:  # sparsify subtracts nothing: b_in goes into the encoder bias
        bias = b_enc - sae.b_in.detach().double() @ W_enc
    elif s_in == s_out:  # sparsify subtracts b_dec / s_out = b_dec / s_in: b_enc as it is
        bias = b_enc
    else:
        bias = b_enc + (s_in / s_out - 1.0) * (b_dec @ W_enc)
    tensors = {"encoder.weight": (s_in * W_enc).t(), "encoder.bias": bias, "W_dec": W_dec / s_out,
               "b_dec": b_dec / s_out}
    if sae.skip:
        tensors["W_skip"] = (s_in / s_out) * sae.W_skip.detach().double().t()
    tensors = {name: t.to(sae.W_enc.dtype).contiguous() for name, t in tensors.items()}
    config = {"activation": "topk", "expansion_factor": max(1, sae.n_latents // sae.d_in),
              "normalize_decoder": bool(sae.unit_norm_decoder), "num_latents": sae.n_latents, "k": sae.k,
              "multi_topk": False, "skip_connection": bool(sae.skip), "transcode": bool(sae.transcoder),
              "d_in": sae.d_in, "metadata": metadata}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(tensors, directory / WEIGHTS_FILE)
    atomic_write_bytes(directory / CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode())
    return directory
