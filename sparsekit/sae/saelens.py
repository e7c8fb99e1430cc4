"""SAELens 6.x both ways: ``export_saelens`` writes a dictionary in SAELens's on-disk layout, loadable
with ``sae_lens.SAE.load_from_disk``; ``load_saelens`` reads one SAELens saved (see its docstring).

Files: ``sae_weights.safetensors`` (W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_out],
b_dec [d_out], plus threshold [d_sae] for JumpReLU forms) and ``cfg.json`` with SAELens 6.x's
fields: architecture, d_in, d_sae, dtype, device, apply_b_dec_to_input, normalize_activations,
reshape_activations, metadata (sae_lens_version >= 6 marks the 6.x schema), k for "topk", d_out
for transcoders. Checked against sae-lens 6.54.

The export's metadata block holds hook_name (required: SAELens's HookedSAETransformer attaches the
dictionary there), sae_lens_version (the installed sae-lens 6.x, else the schema version
"6.0.0"), and what ``sae.metadata`` knows under SAELens's names (sae_lens/saes/sae.py's
SAEMetadata, sae_lens/evals.py's metrics): model -> model_name, context_len -> context_size,
dataset -> dataset_path (a string), metrics fvu -> explained_variance (1 - fvu), l0, mse,
ce_loss_score (sparsekit's ce_recovered or ce_loss_score), kl_div_score.

Architectures (sparsekit -> SAELens):
  relu      -> "standard"  (ReLU)                    transcoder -> "transcoder"
  topk      -> "topk" with k                         transcoder -> NotImplementedError (none in 6.x)
  jumprelu  -> "jumprelu", threshold = exp(log_threshold)          -> "jumprelu_transcoder"
  batchtopk -> "jumprelu", every latent's threshold = the learned global inference threshold
                                                                   -> "jumprelu_transcoder"
  matryoshka_batchtopk -> "jumprelu" the same way (SAELens's inference save of a Matryoshka
               BatchTopK dictionary; the prefix widths matter only in training) -> "jumprelu_transcoder"
  gated     -> "gated": b_enc as b_gate, plus r_mag and b_mag (the magnitude path's bias folded
               like b_enc's: b_mag' = b_mag - c @ (W_enc exp(r_mag)))   transcoder -> none in 6.x
  a ReLU skip transcoder (skip=True) -> "skip_transcoder" with W_skip' = (s_in / s_out) W_skip^T
               [d_out, d_in]; other skip transcoders -> NotImplementedError (SAELens's is ReLU only)

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

import importlib.metadata
import json
import math
import warnings
from pathlib import Path

import torch

from sparsekit._util.atomic import atomic_save_tensors, atomic_write_bytes
from sparsekit._util.validate import is_int

from . import registry
from .allocation import check_bytes
from .files import WEIGHTS_FILE, check_header, check_tensors, read_json_object, read_weights_header
from .metadata import check_metadata
from .transcoder import Transcoder

SAELENS_WEIGHTS_FILE = "sae_weights.safetensors"
SAELENS_CONFIG_FILE = "cfg.json"
SAELENS_SCHEMA_VERSION = "6.0.0"  # what sparsekit writes against: the SAELens 6 on-disk schema

def exportable() -> tuple[str, ...]:
    """The registered architectures SAELens 6.x has an equivalent for (each class's saelens_architecture)."""
    return tuple(name for name, cls in registry.ARCHITECTURES.items() if cls.saelens_architecture is not None)


def saelens_version() -> str:
    """The installed sae-lens version when it is a 6.x (the schema written), else SAELENS_SCHEMA_VERSION."""
    try:
        version = importlib.metadata.version("sae-lens")
    except importlib.metadata.PackageNotFoundError:
        return SAELENS_SCHEMA_VERSION
    return version if version.split(".")[0] == "6" else SAELENS_SCHEMA_VERSION


def saelens_metadata(sae, hook_name, metadata: dict | None) -> dict:
    """cfg.json's "metadata" block: hook_name (the argument, else metadata's, else sae.metadata["hook"]:
    a ValueError if none), the sae_lens version, sae.metadata under SAELens's names, then ``metadata``."""
    known = sae.metadata
    hook_name = hook_name or (metadata or {}).get("hook_name") or known.get("hook")
    if not isinstance(hook_name, str) or not hook_name:
        raise ValueError("hook_name is required to export to SAELens (where the dictionary attaches, e.g. "
                         "'blocks.6.hook_resid_post'): pass hook_name= or set sae.metadata['hook']")
    block = {"sae_lens_version": saelens_version(), "hook_name": hook_name}
    for ours, theirs in (("model", "model_name"), ("context_len", "context_size")):
        if known.get(ours) is not None:
            block[theirs] = known[ours]
    if isinstance(known.get("dataset"), str):
        block["dataset_path"] = known["dataset"]
    metrics = known.get("metrics") if isinstance(known.get("metrics"), dict) else {}
    number = lambda key: metrics.get(key) if isinstance(metrics.get(key), (int, float)) and \
        not isinstance(metrics.get(key), bool) else None
    if number("fvu") is not None:
        block["explained_variance"] = 1.0 - number("fvu")
    for ours, theirs in (("l0", "l0"), ("mse", "mse"), ("ce_loss_score", "ce_loss_score"),
                         ("ce_recovered", "ce_loss_score"), ("kl_div_score", "kl_div_score")):
        if number(ours) is not None:
            block[theirs] = number(ours)
    return {**block, **(metadata or {})}


def export_saelens(sae, directory, metadata: dict | None = None, hook_name: str | None = None) -> Path:
    """Write ``sae`` to ``directory`` (created if missing) in SAELens 6.x's layout.

    hook_name: where SAELens attaches it (default ``sae.metadata["hook"]``; one of them is required).
    metadata: extra entries for cfg.json's "metadata" block (e.g. model_name), over what
    ``sae.metadata`` gives (see the module docstring). Returns the directory.
    """
    sae_name, transcoder_name = type(sae).saelens_architecture, type(sae).saelens_transcoder_architecture
    if sae_name is None:
        raise ValueError(f"architecture {sae.architecture!r} has no SAELens equivalent; "
                         f"supported: {', '.join(exportable())}")
    if sae.transcoder and transcoder_name is None:
        raise NotImplementedError(f"SAELens 6.x has no {sae.architecture} transcoder (its transcoders are ReLU "
                                  f"and JumpReLU): a {sae.architecture} transcoder cannot be exported")
    architecture = transcoder_name if sae.transcoder else sae_name
    if sae.skip and architecture != "transcoder":
        raise NotImplementedError(f"SAELens 6.x's skip transcoder is ReLU only: a {sae.architecture} skip transcoder "
                                  f"cannot be exported")
    architecture = "skip_transcoder" if sae.skip else architecture
    block = saelens_metadata(sae, hook_name, metadata)
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
    thresholds = sae.inference_thresholds()
    if thresholds is not None:
        tensors["threshold"] = thresholds
    if sae.skip:  # SAELens: out + x @ W_skip.T on raw x; sparsekit: (... + s_in x @ W_skip) / s_out
        tensors["W_skip"] = (s_in / s_out) * sae.W_skip.detach().double().t()
    if architecture == "gated":  # b_gate for b_enc, and the magnitude path (r_mag, b_mag)
        r_mag, b_mag = sae.r_mag.detach().double(), sae.b_mag.detach().double()
        tensors["b_gate"] = tensors.pop("b_enc")
        tensors["r_mag"] = r_mag
        tensors["b_mag"] = b_mag if apply_b_dec_to_input else b_mag - center @ (W_enc * r_mag.exp())
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
        "metadata": block,
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


# --- import: SAELens 6.x folders -> sparsekit dictionaries ---------------------------------------

# SAELens architecture -> (sparsekit architecture, transcoder?). "batchtopk" is what SAELens's
# BatchTopKTrainingSAE.save_model writes, "matryoshka_batchtopk" its Matryoshka subclass's (their
# inference saves are "jumprelu").
SAELENS_IMPORTS = {
    "standard": ("relu", False),
    "topk": ("topk", False),
    "jumprelu": ("jumprelu", False),
    "batchtopk": ("batchtopk", False),
    "matryoshka_batchtopk": ("matryoshka_batchtopk", False),
    "gated": ("gated", False),
    "transcoder": ("relu", True),
    "jumprelu_transcoder": ("jumprelu", True),
    "skip_transcoder": ("relu", True),
}
# The SAELens training defaults the loaded dictionary keeps when cfg.json has no value (they matter
# only if it is trained further).
SAELENS_DEFAULT_COEFFICIENT = 1.0


def load_saelens(directory, dtype: torch.dtype | None = None, device=None, **hyperparameters):
    """Load a dictionary saved by SAELens 6.x (``sae.save_model(dir)`` or
    ``save_inference_model(dir)``: cfg.json + sae_weights.safetensors) as the matching sparsekit
    dictionary, in eval mode, whose ``reconstruct(x)`` equals SAELens's ``sae(x)`` on raw activations.

    Architectures: "standard" -> ReLUSAE (decoder_norm_penalty=True: SAELens leaves decoder norms
    free and weights its L1 by them), "topk" -> TopKSAE, "jumprelu" -> JumpReLUSAE,
    "batchtopk" (a BatchTopKTrainingSAE's save_model) -> BatchTopKSAE with its learned threshold,
    "matryoshka_batchtopk" (a MatryoshkaBatchTopKTrainingSAE's save_model) -> MatryoshkaBatchTopKSAE
    with its threshold and matryoshka_widths,
    "transcoder" / "jumprelu_transcoder" -> Transcoder. Weights are folded exactly (in float64):
    ``rescale_acts_by_decoder_norm`` moves the decoder norms into the encoder; without
    ``apply_b_dec_to_input`` the b_dec that sparsekit subtracts from inputs is added back into
    b_enc; JumpReLU thresholds t become log_threshold = log(t) (t <= 0 acts like the smallest
    positive float: SAELens's ReLU already zeroes what such a threshold would pass).

    dtype/device override cfg.json's; hyperparameters (l1_coeff, l0_coeff, bandwidth, ...) override
    the training coefficients read from cfg.json (l1_coefficient, l0_coefficient, jumprelu_bandwidth),
    which only matter for further training. The folder's "metadata" block (hook_name, model_name,
    ...) is kept as ``sae.saelens_metadata``, and its hook_name, model_name, context_size and
    dataset_path become ``sae.metadata``'s hook, model, context_len and dataset. Unsupported folders raise ValueError saying why.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory: expected a folder written by SAELens's save_model")
    config_path, weights_path = directory / SAELENS_CONFIG_FILE, directory / SAELENS_WEIGHTS_FILE
    if not weights_path.is_file():
        if (directory / WEIGHTS_FILE).is_file():
            raise ValueError(f"{directory} holds a sparsekit dictionary ({WEIGHTS_FILE}), not a SAELens one: "
                             f"load it with sparsekit.load")
        raise FileNotFoundError(f"{weights_path} does not exist: is {directory} a folder written by SAELens's save_model?")
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} does not exist: is {directory} a folder written by SAELens's save_model?")
    config = _read_saelens_config(config_path)
    sparsekit_architecture, transcoder = SAELENS_IMPORTS[config["architecture"]]
    weights = _read_saelens_weights(weights_path, config, transcoder)
    folded = _fold_saelens_weights(config, weights, transcoder, config_path)

    dtype = dtype or _saelens_dtype(config.get("dtype", "float32"), config_path)
    kwargs = dict(_saelens_hyperparameters(sparsekit_architecture, config), **hyperparameters)
    d_out = weights["W_dec"].shape[1]
    try:
        if transcoder:
            sae = Transcoder(config["d_in"], config["d_sae"], d_out, architecture=sparsekit_architecture,
                             dtype=dtype, device=device, seed=None, skip="W_skip" in folded, **kwargs)
        else:
            sae = registry.get(sparsekit_architecture)(config["d_in"], config["d_sae"], dtype=dtype, device=device,
                                                        seed=None, **kwargs)
    except TypeError as error:
        raise ValueError(f"hyperparameters do not fit {sparsekit_architecture!r}: {error}") from None
    with torch.no_grad():
        state = sae.state_dict()
        for name, value in folded.items():
            state[name].copy_(value.to(state[name].dtype))
    sae.saelens_metadata = dict(config.get("metadata") or {})
    names = {"hook_name": "hook", "model_name": "model", "context_size": "context_len", "dataset_path": "dataset"}
    sae.metadata = check_metadata({ours: sae.saelens_metadata[theirs] for theirs, ours in names.items()
                                   if sae.saelens_metadata.get(theirs) is not None}, f"{config_path}: metadata")
    return sae.eval()


def _read_saelens_config(config_path: Path) -> dict:
    config = read_json_object(config_path)
    if "n_latents" in config and "d_sae" not in config:
        raise ValueError(f"{config_path} is a sparsekit cfg.json, not a SAELens one: load it with sparsekit.load")
    architecture = config.get("architecture")
    if architecture not in SAELENS_IMPORTS:
        raise ValueError(f"{config_path}: SAELens architecture {architecture!r} has no sparsekit equivalent; "
                         f"supported: {', '.join(SAELENS_IMPORTS)}")
    for key in ("d_in", "d_sae"):
        value = config.get(key)
        if not is_int(value) or value < 1:
            raise ValueError(f"{config_path}: {key} must be a positive int, got {value!r}")
    normalize = config.get("normalize_activations", "none")
    if normalize == "expected_average_only_in":
        # SAELens's load_from_disk applies no scaling for it either (only from_pretrained folds a
        # factor, from its registry): the weights are used as they are, as SAELens would.
        warnings.warn(f"{config_path}: normalize_activations='expected_average_only_in' carries no scale on disk; "
                      f"the weights are used as they are (as SAELens's load_from_disk does)")
    elif normalize not in ("none", None):
        raise ValueError(f"{config_path}: normalize_activations={normalize!r} normalises each input at run time, "
                         f"which a sparsekit dictionary does not do; only 'none' (or a folded scale) can be loaded")
    return config


def _read_saelens_weights(weights_path: Path, config: dict, transcoder: bool) -> dict:
    from safetensors.torch import load_file
    architecture = config["architecture"]
    d_in, d_sae = config["d_in"], config["d_sae"]
    d_out = config.get("d_out", d_in) if transcoder else d_in
    expected = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_out), "b_dec": (d_out,)}
    if architecture in ("jumprelu", "jumprelu_transcoder"):
        expected["threshold"] = (d_sae,)
    if architecture in ("batchtopk", "matryoshka_batchtopk"):
        expected["topk_threshold"] = ()
    if architecture == "skip_transcoder":
        expected["W_skip"] = (d_out, d_in)
    if architecture == "gated":
        del expected["b_enc"]
        expected.update(b_gate=(d_sae,), r_mag=(d_sae,), b_mag=(d_sae,))
    layout = f"SAELens architecture {architecture!r} (cfg.json)"
    sizes = ", ".join(f"{key}={config[key]}" for key in ("d_in", "d_sae", "d_out") if key in config)
    # validate, then allocate: the header's shapes must be cfg.json's before a byte is read
    header = read_weights_header(weights_path)
    check_header(header, expected, weights_path, layout, claimed_by=f"cfg.json's {sizes}")
    elements = sum(math.prod(entry.shape) for entry in header.values())
    check_bytes(sum(entry.nbytes for entry in header.values()) + 2 * 8 * elements, "cpu",
                f"reading and folding {weights_path} (its tensors, then two float64 copies)")
    try:
        weights = load_file(str(weights_path))
    except Exception as error:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{weights_path} is not a readable safetensors file: {error}") from None
    check_tensors(weights, expected, weights_path, layout)
    return {name: t.double() for name, t in weights.items()}


def _fold_saelens_weights(config: dict, weights: dict, transcoder: bool, config_path: Path) -> dict:
    """SAELens's parameters -> sparsekit's state dict entries (float64), computing the same function."""
    gated = config["architecture"] == "gated"
    W_enc, b_enc, W_dec, b_dec = (weights[name] for name in ("W_enc", "b_gate" if gated else "b_enc", "W_dec", "b_dec"))
    if gated and config.get("rescale_acts_by_decoder_norm", False):
        raise ValueError(f"{config_path}: rescale_acts_by_decoder_norm is not defined for a gated SAE")
    if config.get("rescale_acts_by_decoder_norm", False):
        # SAELens: pre = (...) * ||W_dec[i]||, decode (f / ||W_dec[i]||) @ W_dec.
        norms = W_dec.norm(dim=-1)
        if not bool((norms > 0).all()):
            raise ValueError(f"{config_path}: rescale_acts_by_decoder_norm with an all-zero decoder row")
        W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms[:, None]
    apply_b_dec = bool(config.get("apply_b_dec_to_input", not transcoder))
    if transcoder and apply_b_dec:
        raise ValueError(f"{config_path}: apply_b_dec_to_input=True is invalid for a transcoder (SAELens refuses it too)")
    if not transcoder and not apply_b_dec:
        b_enc = b_enc + b_dec @ W_enc  # sparsekit always subtracts b_dec from an SAE's input
    state = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    if "W_skip" in weights:
        state["W_skip"] = weights["W_skip"].t()
    if gated:
        # sparsekit subtracts b_dec from the input of the magnitude path too, and keeps decoder rows
        # at unit norm: relu(mag) * ||W_dec[i]|| = relu(mag * ||W_dec[i]||), so each row's norm moves
        # into the magnitude path (r_mag + log norm, b_mag * norm); the gate only gives a sign.
        r_mag, b_mag = weights["r_mag"], weights["b_mag"]
        b_mag = b_mag + (0 if apply_b_dec else b_dec @ (W_enc * r_mag.exp()))
        norms = W_dec.norm(dim=-1)
        if not bool((norms > 0).all()):
            raise ValueError(f"{config_path}: a gated SAE with an all-zero decoder row")
        state.update(W_dec=W_dec / norms[:, None], r_mag=r_mag + norms.log(), b_mag=b_mag * norms)
    if transcoder:
        state["b_in"] = torch.zeros_like(W_enc[:, 0])
    if "threshold" in weights:
        tiny = torch.finfo(_saelens_dtype(config.get("dtype", "float32"), config_path)).tiny
        state["log_threshold"] = weights["threshold"].clamp_min(tiny).log()
    if "topk_threshold" in weights:
        state["threshold"] = weights["topk_threshold"]
    return state


def _saelens_dtype(name, config_path: Path) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{config_path}: dtype {name!r} is not a floating-point torch dtype")
    return dtype


def _saelens_hyperparameters(architecture: str, config: dict) -> dict:
    """Constructor arguments for the sparsekit class from SAELens's cfg.json (training fields)."""
    details = {**(config.get("metadata") or {}).get("training_architecture_details", {}), **config}

    def coefficient(key):
        value = details.get(key)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 \
            else SAELENS_DEFAULT_COEFFICIENT

    if architecture == "gated":
        return {"l1_coeff": coefficient("l1_coefficient")}
    if architecture == "relu":
        return {"l1_coeff": coefficient("l1_coefficient"), "decoder_norm_penalty": True}
    if architecture == "jumprelu":
        kwargs = {"l0_coeff": coefficient("l0_coefficient")}
        if isinstance(details.get("jumprelu_bandwidth"), (int, float)) and details["jumprelu_bandwidth"] > 0:
            kwargs["bandwidth"] = float(details["jumprelu_bandwidth"])
        return kwargs
    k = config.get("k")
    if not is_int(k) or not 1 <= k <= config["d_sae"]:
        raise ValueError(f"SAELens {config['architecture']!r} cfg.json needs k in [1, d_sae={config['d_sae']}], got {k!r}")
    if architecture == "matryoshka_batchtopk":  # checked by the constructor: strictly increasing, ending at d_sae
        return {"k": k, "matryoshka_widths": details.get("matryoshka_widths")}
    return {"k": k}
