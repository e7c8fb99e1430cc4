"""saprmarks/dictionary_learning both ways: a folder holding ``ae.pt`` (a state dict saved with
``torch.save``) and ``config.json`` (``{"trainer": {"dict_class": ..., ...}, "buffer": {...}}``),
as its ``training.py`` writes them and ``utils.load_dictionary`` reads them.

Read from its source at commit 60ec6bf5264944d64a4ca271f45a29ebfb9d4946 (dictionary_learning/
dictionary.py, trainers/top_k.py, trainers/batch_top_k.py, training.py). The final ae.pt has the
normalisation factor folded back in (``scale_biases(norm_factor)``), so it reads raw activations.
Tensor names and shapes (d = activation_dim, n = dict_size; nn.Linear stores weight as [out, in]):

  AutoEncoder (ReLU)   bias [d], encoder.weight [n, d], encoder.bias [n], decoder.weight [d, n]
                       f = relu((x - bias) @ encoder.weight^T + encoder.bias); x_hat = f @ decoder.weight^T + bias
  AutoEncoderTopK      k [] (int), threshold [] , encoder.weight [n, d], encoder.bias [n], decoder.weight [d, n],
                       b_dec [d]; the top k of relu((x - b_dec) @ encoder.weight^T + encoder.bias)
  BatchTopKSAE         the same tensors; inference keeps relu(pre) > threshold (the learned global threshold)
  JumpReluAutoEncoder  W_enc [d, n], b_enc [n], W_dec [n, d], b_dec [d], threshold [n];
                       f = relu(pre * (pre > threshold)) with pre = x @ W_enc + b_enc (b_dec is not
                       subtracted: apply_b_dec_to_input is False and not saved)
  GatedAutoEncoder     decoder_bias [d], encoder.weight [n, d], r_mag [n], gate_bias [n], mag_bias [n],
                       decoder.weight [d, n]; sparsekit's GatedSAE with b_enc = gate_bias, b_mag = mag_bias

Each maps to the sparsekit dictionary computing the same function (TopKSAE, BatchTopKSAE with its
threshold, ReLUSAE, JumpReLUSAE with b_enc + b_dec @ W_enc and log_threshold = log(threshold),
GatedSAE). A ReLU or gated dictionary whose decoder rows are not unit norm (the April-update
trainer) loads as ReLUSAE(decoder_norm_penalty=True) / with the norms moved into the magnitude path.
Other classes (AutoEncoderNew, MatryoshkaBatchTopKSAE, ...) are refused with a ValueError.

ae.pt is untrusted: it is read with ``torch.load(weights_only=True, map_location="cpu", mmap=True)``
only (no code from the file ever runs; tensors stay on disk until copied), and every tensor's name,
shape, dtype and finiteness is checked before a dictionary is built.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from sparsekit._util.atomic import atomic_write, atomic_write_bytes

from . import registry
from .allocation import check_bytes
from .files import check_tensors, read_json_object
from .metadata import check_metadata

DL_WEIGHTS_FILE = "ae.pt"
DL_CONFIG_FILE = "config.json"
# dict_class -> sparsekit architecture
DL_CLASSES = {"AutoEncoder": "relu", "AutoEncoderTopK": "topk", "BatchTopKSAE": "batchtopk",
              "JumpReluAutoEncoder": "jumprelu", "GatedAutoEncoder": "gated"}
# sparsekit architecture -> (dict_class, trainer_class) written on export
DL_EXPORTS = {"relu": ("AutoEncoder", "StandardTrainer"), "topk": ("AutoEncoderTopK", "TopKTrainer"),
              "batchtopk": ("BatchTopKSAE", "BatchTopKTrainer"), "jumprelu": ("JumpReluAutoEncoder", "JumpReluTrainer"),
              "gated": ("GatedAutoEncoder", "GatedSAETrainer")}
UNIT_NORM_TOLERANCE = 1e-5


def _expected(dict_class: str, d: int, n: int) -> tuple[dict, tuple]:
    """(tensor name -> shape, the integer-valued names) of a dict_class's state dict."""
    if dict_class == "AutoEncoder":
        return {"bias": (d,), "encoder.weight": (n, d), "encoder.bias": (n,), "decoder.weight": (d, n)}, ()
    if dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        return {"k": (), "threshold": (), "encoder.weight": (n, d), "encoder.bias": (n,), "decoder.weight": (d, n),
                "b_dec": (d,)}, ("k",)
    if dict_class == "JumpReluAutoEncoder":
        return {"W_enc": (d, n), "b_enc": (n,), "W_dec": (n, d), "b_dec": (d,), "threshold": (n,)}, ()
    return {"decoder_bias": (d,), "encoder.weight": (n, d), "r_mag": (n,), "gate_bias": (n,), "mag_bias": (n,),
            "decoder.weight": (d, n)}, ()


def load_dictionary_learning(directory, dtype: torch.dtype | None = None, device=None):
    """A folder dictionary_learning wrote (ae.pt + config.json) as the matching sparsekit dictionary,
    in eval mode, computing what dictionary_learning's forward computes (on raw activations).
    dtype/device: where to build it (default: the weights' dtype, the CPU)."""
    directory = Path(directory)
    weights_path, config_path = directory / DL_WEIGHTS_FILE, directory / DL_CONFIG_FILE
    for path in (weights_path, config_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: is {directory} a folder dictionary_learning's training wrote?")
    trainer = _read_config(config_path)
    dict_class = trainer["dict_class"]
    state = _read_state(weights_path)
    d, n = _dimensions(state, dict_class, weights_path)
    for field, value in (("activation_dim", d), ("dict_size", n)):  # the trainer's record, when it has one
        claimed = trainer.get(field)
        if isinstance(claimed, int) and not isinstance(claimed, bool) and claimed != value:
            raise ValueError(f"{config_path}: trainer.{field}={claimed} does not match {weights_path}, whose "
                             f"encoder holds {field}={value}")
    expected, integer = _expected(dict_class, d, n)
    check_tensors(state, expected, weights_path, f"dictionary_learning's {dict_class}", integer=integer)
    # the tensors are still mapped from the file: the float64 copies below are the first allocation
    check_bytes(2 * sum(8 * t.numel() for name, t in state.items() if name not in integer), "cpu",
                f"folding {weights_path}'s weights in float64")
    weights = {name: t.double() for name, t in state.items() if name not in integer}
    dtype = dtype or state["W_enc" if dict_class == "JumpReluAutoEncoder" else "encoder.weight"].dtype
    architecture = DL_CLASSES[dict_class]
    params, hyper = _to_sparsekit(dict_class, weights, state, trainer, weights_path)
    try:
        sae = registry.get(architecture)(d, n, dtype=dtype, device=device, seed=None, **hyper)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{config_path}: hyperparameters do not fit {architecture!r}: {error}") from None
    with torch.no_grad():
        for name, value in params.items():
            getattr(sae, name).copy_(value)
    sae.metadata = trainer["metadata"]
    return sae.eval()


def _read_config(config_path: Path) -> dict:
    config = read_json_object(config_path)
    trainer = config.get("trainer")
    if not isinstance(trainer, dict):
        raise ValueError(f"{config_path}: trainer must be a JSON object holding dict_class, got {trainer!r}")
    dict_class = trainer.get("dict_class")
    if dict_class not in DL_CLASSES:
        raise ValueError(f"{config_path}: dict_class {dict_class!r} has no sparsekit equivalent; "
                         f"supported: {', '.join(DL_CLASSES)}")
    ours = config.get("sparsekit", {})  # what export_dictionary_learning adds for the way back
    if not isinstance(ours, dict):
        raise ValueError(f"{config_path}: sparsekit must be a JSON object, got {ours!r}")
    if "metadata" in ours:
        metadata = check_metadata(ours["metadata"], f"{config_path}: sparsekit.metadata")
    else:  # a dictionary_learning run: its model and submodule are the provenance it records
        metadata = {ours_key: trainer[theirs] for theirs, ours_key in (("lm_name", "model"), ("submodule_name", "hook"))
                    if isinstance(trainer.get(theirs), str)}
    hyper = ours.get("hyperparameters", {})
    if not isinstance(hyper, dict):
        raise ValueError(f"{config_path}: sparsekit.hyperparameters must be a JSON object, got {hyper!r}")
    return {**trainer, "metadata": metadata, "sparsekit_hyperparameters": hyper}


def _read_state(weights_path: Path) -> dict:
    """ae.pt's state dict, through torch's weights-only unpickler alone; anything else is a ValueError."""
    try:
        state = torch.load(weights_path, weights_only=True, map_location="cpu", mmap=True)
    except Exception as error:  # the weights-only unpickler refuses code; a non-zip file fails to map
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{weights_path} is not a plain state dict of tensors that torch.load(weights_only=True) "
                         f"reads: {first_line}") from None
    if not isinstance(state, dict) or not all(isinstance(key, str) for key in state):
        raise ValueError(f"{weights_path} must hold a dict of tensor names to tensors, got {type(state).__name__}")
    return state


def _dimensions(state: dict, dict_class: str, weights_path: Path) -> tuple[int, int]:
    """(activation_dim, dict_size) from the encoder weight, as dictionary_learning's from_pretrained reads them."""
    name = "W_enc" if dict_class == "JumpReluAutoEncoder" else "encoder.weight"
    tensor = state.get(name)
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2 or 0 in tensor.shape:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else None
        raise ValueError(f"{weights_path}: {name} must be a non-empty 2-D tensor for {dict_class}, got {shape}")
    d, n = tensor.shape if name == "W_enc" else tensor.shape[::-1]
    return int(d), int(n)


def _to_sparsekit(dict_class: str, w: dict, state: dict, trainer: dict, where: Path) -> tuple[dict, dict]:
    """(sparsekit parameter name -> float64 tensor, constructor hyperparameters)."""
    saved = trainer["sparsekit_hyperparameters"]

    def coefficient(key):  # a trainer's penalty (l1_penalty, sparsity_penalty) when it is a usable number
        value = trainer.get(key)
        usable = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
        return float(value) if usable else 1.0
    if dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        k = int(state["k"])
        if not 1 <= k <= w["encoder.bias"].shape[0]:
            raise ValueError(f"{where}: k={k} must be in [1, dict_size={w['encoder.bias'].shape[0]}]")
        params = {"W_enc": w["encoder.weight"].t(), "b_enc": w["encoder.bias"], "W_dec": w["decoder.weight"].t(),
                  "b_dec": w["b_dec"]}
        hyper = {"k": k}
        if dict_class == "BatchTopKSAE":
            params["threshold"] = w["threshold"]
            if "threshold_momentum" in saved:
                hyper["threshold_momentum"] = saved["threshold_momentum"]
        return params, hyper
    if dict_class == "AutoEncoder":
        params = {"W_enc": w["encoder.weight"].t(), "b_enc": w["encoder.bias"], "W_dec": w["decoder.weight"].t(),
                  "b_dec": w["bias"]}
        unit = bool(((params["W_dec"].norm(dim=-1) - 1).abs() <= UNIT_NORM_TOLERANCE).all())
        hyper = {"l1_coeff": saved.get("l1_coeff", coefficient("l1_penalty")),
                 "decoder_norm_penalty": saved.get("decoder_norm_penalty", not unit)}
        return params, hyper
    if dict_class == "JumpReluAutoEncoder":
        tiny = torch.finfo(state["W_enc"].dtype).tiny  # threshold <= 0: relu already zeroes what it would pass
        params = {"W_enc": w["W_enc"], "b_enc": w["b_enc"] + w["b_dec"] @ w["W_enc"], "W_dec": w["W_dec"],
                  "b_dec": w["b_dec"], "log_threshold": w["threshold"].clamp_min(tiny).log()}
        hyper = {"l0_coeff": saved.get("l0_coeff", coefficient("sparsity_penalty"))}
        hyper.update({key: saved[key] for key in ("bandwidth", "init_threshold") if key in saved})
        if "bandwidth" not in hyper and coefficient("bandwidth") != 1.0:  # JumpReluTrainer's config has it
            hyper["bandwidth"] = coefficient("bandwidth")
        return params, hyper
    # GatedAutoEncoder: sparsekit keeps decoder rows at unit norm; relu(mag) * ||row|| = relu(mag * ||row||).
    W_dec, r_mag, b_mag = w["decoder.weight"].t(), w["r_mag"], w["mag_bias"]
    norms = W_dec.norm(dim=-1)
    if not bool(((norms - 1).abs() <= UNIT_NORM_TOLERANCE).all()):
        if not bool((norms > 0).all()):
            raise ValueError(f"{where}: a gated dictionary with an all-zero decoder row")
        W_dec, r_mag, b_mag = W_dec / norms[:, None], r_mag + norms.log(), b_mag * norms
    params = {"W_enc": w["encoder.weight"].t(), "b_enc": w["gate_bias"], "W_dec": W_dec, "b_dec": w["decoder_bias"],
              "r_mag": r_mag, "b_mag": b_mag}
    return params, {"l1_coeff": saved.get("l1_coeff", coefficient("l1_penalty"))}


def export_dictionary_learning(sae, directory) -> Path:
    """Write ``sae`` (an SAE, not a transcoder: dictionary_learning has none) into ``directory``
    (created if missing) as ae.pt + config.json, loadable by dictionary_learning's
    ``utils.load_dictionary``. Input/output scales are folded into the weights (float64); its
    hyperparameters and sae.metadata are kept in config.json's "sparsekit" block for the way back.
    Returns the directory."""
    if sae.architecture not in DL_EXPORTS:
        raise ValueError(f"dictionary_learning has no {sae.architecture!r} dictionary; supported: {', '.join(DL_EXPORTS)}")
    if sae.transcoder:
        raise ValueError("dictionary_learning has no transcoders: only an SAE (transcoder=False) can be exported")
    metadata = check_metadata(sae.metadata, "sae.metadata")
    dict_class, trainer_class = DL_EXPORTS[sae.architecture]
    s_in, s_out = float(sae.input_scale), float(sae.output_scale)
    W_enc, b_enc, W_dec, b_dec = (p.detach().double() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    # Raw activations: pre = x @ (s_in W_enc) + b_enc - b_dec @ W_enc; out = f @ (W_dec / s_out) + b_dec / s_out.
    # Layouts that subtract their output bias b_dec / s_out from x keep b_enc when s_in == s_out.
    W, b_out = s_in * W_enc, b_dec / s_out
    shift = (s_in / s_out - 1.0) * (b_dec @ W_enc)
    bias = b_enc if s_in == s_out else b_enc + shift
    if sae.architecture == "jumprelu":
        state = {"W_enc": W, "b_enc": b_enc - b_dec @ W_enc, "W_dec": W_dec / s_out, "b_dec": b_out,
                 "threshold": sae.inference_thresholds()}
    elif sae.architecture == "relu":
        state = {"bias": b_out, "encoder.weight": W.t(), "encoder.bias": bias, "decoder.weight": (W_dec / s_out).t()}
    elif sae.architecture == "gated":
        r_mag, b_mag = sae.r_mag.detach().double(), sae.b_mag.detach().double()
        mag_bias = b_mag if s_in == s_out else b_mag + (s_in / s_out - 1.0) * (b_dec @ (W_enc * r_mag.exp()))
        state = {"decoder_bias": b_out, "encoder.weight": W.t(), "r_mag": r_mag, "gate_bias": bias,
                 "mag_bias": mag_bias, "decoder.weight": (W_dec / s_out).t()}
    else:
        # dictionary_learning keeps threshold in float32 (load_state_dict converts): it is written in
        # sparsekit's dtype so that the way back is exact. A TopK dictionary has none (-1, its default).
        threshold = sae.threshold.detach().double() if sae.architecture == "batchtopk" else torch.tensor(-1.0)
        state = {"k": torch.tensor(sae.k, dtype=torch.int32), "threshold": threshold.reshape(()),
                 "encoder.weight": W.t(), "encoder.bias": bias, "decoder.weight": (W_dec / s_out).t(), "b_dec": b_out}
    dtype = sae.W_enc.dtype
    state = {name: t if name == "k" else t.to(dtype).contiguous() for name, t in state.items()}
    trainer = {"dict_class": dict_class, "trainer_class": trainer_class, "activation_dim": sae.d_in,
               "dict_size": sae.n_latents, "lm_name": metadata.get("model"), "submodule_name": metadata.get("hook")}
    if sae.architecture in ("topk", "batchtopk"):
        trainer["k"] = sae.k
    config = {"trainer": trainer, "sparsekit": {"hyperparameters": sae.hyperparameters(), "metadata": metadata}}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / DL_WEIGHTS_FILE, lambda handle: torch.save(state, handle))
    atomic_write_bytes(directory / DL_CONFIG_FILE, (json.dumps(config, indent=4) + "\n").encode())
    return directory
