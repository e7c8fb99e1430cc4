"""circuit-tracer's transcoder layout both ways: ``export_circuit_tracer`` writes per-layer transcoders
(a "transcoder_set") or a cross-layer transcoder (a "cross_layer_transcoder") as circuit-tracer loads
them; ``load_circuit_tracer`` reads such a folder back.

Layout, read from circuit-tracer 0.5.0 (the ``circuit-tracer`` wheel on PyPI: transcoder/
single_layer_transcoder.py ``load_relu_transcoder`` / ``SingleLayerTranscoder.to_safetensors``,
transcoder/cross_layer_transcoder.py ``_load_state_dict`` / ``to_safetensors``, utils/hf_utils.py
``load_transcoders``, utils/caching.py ``load_transcoders_from_cache``; the same names as
safety-research/circuit-tracer at commit b00048e4, cross_layer_transcoder.py and caching.py). One
folder, d = d_model, n = features per layer, L = layers from model layer 0:

    config.yaml                 model_kind ("transcoder_set" | "cross_layer_transcoder"),
                                feature_input_hook, feature_output_hook (TransformerLens hook names
                                inside a block, e.g. "ln2.hook_normalized", "hook_mlp_out"); model_name
    transcoder_set:         layer_{l}.safetensors: W_enc [n, d]  W_dec [n, d]  b_enc [n]  b_dec [d]
                                (+ activation_function.threshold [n] for JumpReLU, + W_skip [d, d])
    cross_layer_transcoder: W_enc_{l}.safetensors: W_enc_{l} [n, d]  b_enc_{l} [n]  b_dec_{l} [d]
                                (+ threshold_{l} [n] for JumpReLU)
                            W_dec_{l}.safetensors: W_dec_{l} [n, L - l, d] (layer l to l, l + 1, ...)

Its forward, on raw activations: pre = x @ W_enc^T + b_enc; f = relu(pre), or pre * (pre > threshold)
with a threshold; out = f @ W_dec + b_dec (+ x @ W_skip^T); a CLT's target t sums W_dec_{l}[:, t - l]
over l <= t. The layer of a file is its model layer, so layer 0 must be there: layers below a
sparsekit dictionary's first one are written silent (zero weights; pre = 0 never fires), as are
targets past a CLT's ``reach``. d_in must equal d_out (d_model).

Activations. circuit-tracer 0.5.0 loads ReLU (no threshold) and JumpReLU (a threshold tensor) only:
ReLU -> ReLU; JumpReLU -> JumpReLU (threshold = exp(log_threshold)); BatchTopK and Matryoshka
BatchTopK -> JumpReLU, every latent's threshold the learned global one (as SAELens's inference save
does). TopK (per-layer transcoders and sparsekit's CLT) has no equivalent there (its GitHub main
reads ``activation: topk`` for transcoder sets, not for CLTs; the published wheel neither), so a
TopK dictionary is refused unless ``topk_thresholds`` says which JumpReLU threshold to export it
with: then the export is an approximation, the global threshold per layer a sample's BatchTopK
selection would use (``calibrate_topk_thresholds``), not the same function. Gated is refused.

Normalisation and b_in are folded into the weights in float64, so the export reads raw
activations: with s_in, s_out a layer's input and output scales, W_enc' = s_in W_enc^T,
b_enc' = b_enc - b_in @ W_enc, W_dec' = W_dec / s_out(target), b_dec' = b_dec / s_out,
W_skip' = (s_in / s_out) W_skip^T. Pre-activations (so thresholds) are unchanged.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from sparsekit import ops
from sparsekit._util.atomic import atomic_save_tensors, atomic_write_bytes
from sparsekit._util.bounded import load_yaml
from sparsekit._util.validate import is_int

from .allocation import check_bytes
from .files import check_header, check_regular_file, check_tensors, read_weights_header
from .transcoder import Transcoder

CT_CONFIG_FILE = "config.yaml"
MODEL_KINDS = ("transcoder_set", "cross_layer_transcoder")
THRESHOLD = "activation_function.threshold"
# The coefficients an imported dictionary keeps (they matter only if it is trained further).
DEFAULT_COEFFICIENT = 1.0
SILENT_THRESHOLD = 1.0  # padded layers: zero weights, so pre = 0, below any positive threshold


def _layer_file(layer: int) -> str:
    return f"layer_{layer}.safetensors"


def is_circuit_tracer_folder(directory: Path) -> bool:
    """Whether ``directory`` holds circuit-tracer's layout (config.yaml beside layer_0 or W_enc_0)."""
    return (directory / CT_CONFIG_FILE).is_file() and any(
        (directory / name).is_file() for name in (_layer_file(0), "W_enc_0.safetensors"))


# --- export ---------------------------------------------------------------------------------------

def _hook(name: str, value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a TransformerLens hook name inside a block (e.g. 'ln2.hook_normalized', "
                         f"'hook_mlp_out'), got {value!r}")
    return value


def _thresholds(sae, topk_threshold, where: str) -> Tensor | None:
    """The JumpReLU threshold [n] (float64) ``sae`` exports with, None for ReLU."""
    if sae.architecture == "relu":
        return None
    if sae.architecture == "topk":
        if topk_threshold is None:
            raise ValueError(f"{where} is TopK, which circuit-tracer cannot run (its loaders take ReLU and JumpReLU): "
                             f"pass topk_thresholds= (e.g. calibrate_topk_thresholds(dicts, x)) to export it as "
                             f"JumpReLU, an approximation, or train architecture='batchtopk'")
        return torch.full((sae.n_latents,), topk_threshold, dtype=torch.float64)
    thresholds = sae.inference_thresholds()
    if thresholds is None:
        raise ValueError(f"{where} is {sae.architecture!r}, which circuit-tracer has no equivalent for "
                         f"(it runs ReLU and JumpReLU; BatchTopK exports as JumpReLU)")
    return thresholds.detach().double().cpu()


def _per_layer(topk_thresholds, layers: list[int]) -> dict:
    """topk_thresholds (None, one number, or one per covered layer) -> {layer: float or None}."""
    if topk_thresholds is None:
        return dict.fromkeys(layers)
    values = [topk_thresholds] * len(layers) if isinstance(topk_thresholds, (int, float)) else list(topk_thresholds)
    if len(values) != len(layers):
        raise ValueError(f"topk_thresholds must be one number or one per covered layer ({len(layers)}), "
                         f"got {len(values)}")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise ValueError(f"topk_thresholds must be positive finite numbers, got {value!r}")
    return {layer: float(value) for layer, value in zip(layers, values)}


def _as_layer_dict(dicts) -> dict:
    if isinstance(dicts, dict):
        layers = dicts
    elif isinstance(dicts, (list, tuple)):
        layers = dict(enumerate(dicts))
    else:
        raise ValueError(f"dicts must be a CrossLayerTranscoder, a list of Transcoders (index = layer) or a "
                         f"{{layer: Transcoder}} dict, got {type(dicts).__name__}")
    if not layers:
        raise ValueError("dicts is empty: pass one Transcoder per layer")
    for layer, sae in layers.items():
        if not is_int(layer) or layer < 0:
            raise ValueError(f"dicts: layer keys must be non-negative ints, got {layer!r}")
        if not getattr(sae, "transcoder", False) or not hasattr(sae, "W_enc") or getattr(sae, "n_layers", None):
            raise ValueError(f"dicts[{layer}] must be a single-layer Transcoder, got {type(sae).__name__}")
    return dict(sorted(layers.items()))


def _check_widths(d_in: int, d_out: int, where: str) -> None:
    if d_in != d_out:
        raise ValueError(f"{where}: circuit-tracer's transcoders read and write d_model: d_in={d_in} differs "
                         f"from d_out={d_out}")


def _config_yaml(model_kind: str, feature_input_hook: str, feature_output_hook: str, model_name, extra: dict) -> bytes:
    import yaml

    config = {"model_kind": model_kind, "feature_input_hook": feature_input_hook,
              "feature_output_hook": feature_output_hook}
    if model_name is not None:
        config["model_name"] = str(model_name)
    config["sparsekit"] = extra  # circuit-tracer reads only the keys above
    return yaml.safe_dump(config, sort_keys=False).encode()


def export_circuit_tracer(dicts, folder, *, feature_input_hook: str, feature_output_hook: str,
                          model_name: str | None = None, n_layers: int | None = None,
                          topk_thresholds=None) -> Path:
    """Write ``dicts`` into ``folder`` (created if missing) in circuit-tracer's layout (module docstring).

    dicts: a CrossLayerTranscoder, or per-layer Transcoders as a list (index = model layer) or a
    {layer: Transcoder} dict, each with d_in == d_out and one latent count. feature_input_hook /
    feature_output_hook: where the features read and write inside each block (circuit-tracer's
    config.yaml; e.g. "ln2.hook_normalized" and "hook_mlp_out"). n_layers: the model's layer count
    (circuit-tracer replaces every MLP): layers past the last covered one are written silent; default
    the last covered layer + 1. topk_thresholds: for TopK dictionaries only, the JumpReLU threshold
    per covered layer (or one for all) they are exported with. Returns the folder.
    """
    feature_input_hook = _hook("feature_input_hook", feature_input_hook)
    feature_output_hook = _hook("feature_output_hook", feature_output_hook)
    if getattr(dicts, "architecture", None) == "clt":
        covered = dicts.layers()
        model_kind = "cross_layer_transcoder"
    else:
        dicts = _as_layer_dict(dicts)
        covered = list(dicts)
        model_kind = "transcoder_set"
    if n_layers is None:
        n_layers = covered[-1] + 1
    if not is_int(n_layers) or n_layers <= covered[-1]:
        raise ValueError(f"n_layers must be an int above the last covered layer {covered[-1]}, got {n_layers!r}")
    thresholds = _per_layer(topk_thresholds, covered)
    folder = Path(folder)
    if model_kind == "cross_layer_transcoder":
        files = _clt_files(dicts, n_layers, thresholds)
        metadata = dicts.metadata
    else:
        files = _set_files(dicts, n_layers, thresholds)
        metadata = next(iter(dicts.values())).metadata
    model_name = model_name if model_name is not None else metadata.get("model")
    silent = [layer for layer in range(n_layers) if layer not in covered]
    extra = {"covered_layers": covered, "silent_layers": silent,
             "topk_thresholds": [thresholds[layer] for layer in covered] if topk_thresholds is not None else None}
    folder.mkdir(parents=True, exist_ok=True)
    for name, tensors in files.items():
        atomic_save_tensors(tensors, folder / name)
    atomic_write_bytes(folder / CT_CONFIG_FILE,
                       _config_yaml(model_kind, feature_input_hook, feature_output_hook, model_name, extra))
    return folder


def _set_files(dicts: dict, n_layers: int, thresholds: dict) -> dict:
    """{file name: tensors} for per-layer transcoders, silent layers included."""
    first = next(iter(dicts.values()))
    d, n, dtype = first.d_in, first.n_latents, first.W_enc.dtype
    any_skip = any(sae.skip for sae in dicts.values())
    files = {}
    for layer in range(n_layers):
        sae = dicts.get(layer)
        if sae is None:
            tensors = {"W_enc": torch.zeros(n, d, dtype=torch.float64), "W_dec": torch.zeros(n, d, dtype=torch.float64),
                       "b_enc": torch.zeros(n, dtype=torch.float64), "b_dec": torch.zeros(d, dtype=torch.float64)}
            if any_skip:
                tensors["W_skip"] = torch.zeros(d, d, dtype=torch.float64)
            files[_layer_file(layer)] = {name: t.to(dtype) for name, t in tensors.items()}
            continue
        where = f"dicts[{layer}]"
        _check_widths(sae.d_in, sae.d_out, where)
        if (sae.d_in, sae.n_latents) != (d, n):
            raise ValueError(f"{where}: every layer needs the same d_model and latent count (circuit-tracer's "
                             f"TranscoderSet): got d={sae.d_in}, n={sae.n_latents}, expected d={d}, n={n}")
        threshold = _thresholds(sae, thresholds[layer], where)
        s_in, s_out = float(sae.input_scale), float(sae.output_scale)
        W_enc, b_enc, W_dec, b_dec = (p.detach().double().cpu() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
        tensors = {"W_enc": (s_in * W_enc).t(), "W_dec": W_dec / s_out,
                   "b_enc": b_enc - sae.b_in.detach().double().cpu() @ W_enc, "b_dec": b_dec / s_out}
        if threshold is not None:
            tensors[THRESHOLD] = threshold
        if any_skip:
            W_skip = sae.W_skip.detach().double().cpu().t() * (s_in / s_out) if sae.skip else torch.zeros(d, d)
            tensors["W_skip"] = W_skip.double()
        files[_layer_file(layer)] = {name: t.to(sae.W_enc.dtype).contiguous() for name, t in tensors.items()}
    return files


def _clt_files(clt, n_layers: int, thresholds: dict) -> dict:
    """{file name: tensors} for a CrossLayerTranscoder over model layers first_layer ..., padded to
    model layers 0 .. n_layers - 1."""
    _check_widths(clt.d_in, clt.d_out, "the CrossLayerTranscoder")
    d, n, first, L, dtype = clt.d_in, clt.latents_per_layer, clt.first_layer, clt.n_layers, clt.W_enc.dtype
    si = (clt.layer_input_scale.detach().double().cpu() * float(clt.input_scale))
    so = (clt.layer_output_scale.detach().double().cpu() * float(clt.output_scale))
    if thresholds[first] is None:
        raise ValueError("the CrossLayerTranscoder is TopK per layer, which circuit-tracer cannot run (its CLT "
                         "loader takes ReLU and JumpReLU): pass topk_thresholds= (e.g. "
                         "calibrate_topk_thresholds(clt, x)) to export it as JumpReLU, an approximation")
    files = {}
    for layer in range(n_layers):
        local = layer - first
        enc = {f"W_enc_{layer}": torch.zeros(n, d, dtype=torch.float64), f"b_enc_{layer}": torch.zeros(n, dtype=torch.float64),
               f"b_dec_{layer}": torch.zeros(d, dtype=torch.float64)}
        W_dec = torch.zeros(n, n_layers - layer, d, dtype=torch.float64)
        enc[f"threshold_{layer}"] = torch.full((n,), thresholds.get(layer) or SILENT_THRESHOLD, dtype=torch.float64)
        if 0 <= local < L:
            W_enc = clt.encoder(local).detach().double().cpu()
            enc[f"W_enc_{layer}"] = (si[local] * W_enc).t()
            enc[f"b_enc_{layer}"] = (clt.b_enc.detach().double().cpu()[local * n:(local + 1) * n]
                                     - clt.b_in.detach().double().cpu()[local] @ W_enc)
            enc[f"b_dec_{layer}"] = clt.b_dec.detach().double().cpu()[local] / so[local]
            for offset in range(clt.spans[local]):
                target = local + offset
                W_dec[:, offset] = clt.decoder_to(local, target).detach().double().cpu() / so[target]
        files[f"W_enc_{layer}.safetensors"] = {name: t.to(dtype).contiguous() for name, t in enc.items()}
        files[f"W_dec_{layer}.safetensors"] = {f"W_dec_{layer}": W_dec.to(dtype).contiguous()}
    return files


@torch.no_grad()
def calibrate_topk_thresholds(dicts, x) -> list[float]:
    """One JumpReLU threshold per covered layer for exporting TopK dictionaries: on a sample of raw
    inputs, the smallest pre-activation BatchTopK would keep (the B*k largest over the sample), so the
    exported layer's mean L0 on that sample is k (up to ties). dicts: a TopK CrossLayerTranscoder with
    x [B, L, d_in], or TopK Transcoders (list or {layer: Transcoder}) with x {layer: [B, d_in]} or a
    list in the same order."""
    if getattr(dicts, "architecture", None) == "clt":
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[1:] != (dicts.n_layers, dicts.d_in):
            raise ValueError(f"x must be [B, n_layers={dicts.n_layers}, d_in={dicts.d_in}] raw inputs, got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        n, k = dicts.latents_per_layer, dicts.k_per_layer
        scaled = x.double() * dicts.layer_input_scale.double().cpu()[:, None] * dicts.input_scale
        pres = []
        for layer in range(dicts.n_layers):
            W = dicts.encoder(layer).detach().double().cpu()
            b = dicts.b_enc.detach().double().cpu()[layer * n:(layer + 1) * n]
            pres.append(((scaled[:, layer] - dicts.b_in.detach().double().cpu()[layer]) @ W + b, k))
    else:
        layers = _as_layer_dict(dicts)
        samples = dict(enumerate(x)) if isinstance(x, (list, tuple)) else dict(zip(layers, [x])) \
            if isinstance(x, Tensor) and len(layers) == 1 else x
        if not isinstance(samples, dict) or set(samples) != set(layers):
            raise ValueError(f"x must give a [B, d_in] sample for each layer {sorted(layers)}")
        pres = []
        for layer, sae in layers.items():
            if sae.architecture != "topk":
                raise ValueError(f"dicts[{layer}] is {sae.architecture!r}: only TopK dictionaries need thresholds")
            xs = samples[layer].double() * sae.input_scale
            W = sae.W_enc.detach().double().cpu()
            pres.append(((xs - sae.b_in.detach().double().cpu()) @ W + sae.b_enc.detach().double().cpu(), sae.k))
    thresholds = []
    for pre, k in pres:
        kept = pre.flatten().topk(min(pre.numel(), pre.shape[0] * k)).values
        positive = kept[kept > 0]
        thresholds.append(float(positive.min()) if positive.numel() else SILENT_THRESHOLD)
    return thresholds


# --- import ---------------------------------------------------------------------------------------

class CircuitTracerCLT(nn.Module):
    """A cross-layer transcoder read from circuit-tracer's layout (ReLU or JumpReLU; sparsekit's own
    ``CrossLayerTranscoder`` is TopK, so it is not one). Inference only.

    W_enc [L, d, n] (column-major per layer, as sparsekit's encoders), b_enc [L, n], threshold [L, n]
    or None (ReLU), W_dec: layer l's stacked decoder [n, (L - l) * d], b_dec [L, d]. ``reconstruct``
    maps raw x [B, L, d] to raw predicted MLP outputs [B, L, d], circuit-tracer's forward."""

    architecture = "circuit_tracer_clt"

    def __init__(self, W_enc: Tensor, b_enc: Tensor, W_dec: list, b_dec: Tensor, threshold: Tensor | None):
        super().__init__()
        self.n_layers, self.d_in, self.latents_per_layer = W_enc.shape
        self.d_out = self.d_in
        self.W_enc = nn.Parameter(W_enc, requires_grad=False)
        self.b_enc = nn.Parameter(b_enc, requires_grad=False)
        self.W_dec = nn.ParameterList([nn.Parameter(w, requires_grad=False) for w in W_dec])
        self.b_dec = nn.Parameter(b_dec, requires_grad=False)
        self.threshold = None if threshold is None else nn.Parameter(threshold, requires_grad=False)
        self.metadata: dict = {}

    def encode(self, x: Tensor) -> list[Tensor]:
        """Raw x [B, L, d] -> dense codes per layer [B, n], through sparsekit.ops."""
        codes = []
        for layer in range(self.n_layers):
            if self.threshold is None:
                codes.append(ops.relu_encode(x[:, layer], self.W_enc[layer], self.b_enc[layer]))
            else:
                codes.append(ops.jumprelu_encode(x[:, layer], self.W_enc[layer], self.b_enc[layer],
                                                 self.threshold[layer].log()))
        return codes

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Raw x [B, L, d] -> [B, L, d]: target t = b_dec[t] + sum over l <= t of f_l @ W_dec_l[:, t - l]."""
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[1:] != (self.n_layers, self.d_in):
            raise ValueError(f"x must be [B, n_layers={self.n_layers}, d={self.d_in}]")
        x = x.to(self.W_enc.dtype)
        out = self.b_dec.expand(x.shape[0], -1, -1).clone()
        for layer, f in enumerate(self.encode(x)):
            out[:, layer:] += (f @ self.W_dec[layer]).view(x.shape[0], self.n_layers - layer, self.d_in)
        return out


class _Config(NamedTuple):
    model_kind: str
    feature_input_hook: str
    feature_output_hook: str
    model_name: str | None


def _read_config(config_path: Path) -> _Config:
    config = load_yaml(config_path, what="circuit-tracer config")
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} must hold a YAML mapping, got {type(config).__name__}")
    kind = config.get("model_kind")
    if kind not in MODEL_KINDS:
        raise ValueError(f"{config_path}: model_kind must be one of {', '.join(MODEL_KINDS)}, got {kind!r}")
    hooks = []
    for key in ("feature_input_hook", "feature_output_hook"):
        if not isinstance(config.get(key), str) or not config[key]:
            raise ValueError(f"{config_path}: {key} must be a hook name, got {config.get(key)!r}")
        hooks.append(config[key])
    model_name = config.get("model_name")
    return _Config(kind, *hooks, model_name if isinstance(model_name, str) else None)


def _numbered(directory: Path, pattern: str, config_path: Path) -> int:
    """How many files ``pattern`` (with one {}) numbers 0 .. L - 1 in directory; a gap is an error naming it."""
    regex = re.compile("^" + re.escape(pattern).replace(r"\{\}", r"(\d+)") + "$")
    found = sorted(int(m.group(1)) for p in directory.iterdir() if (m := regex.match(p.name)))
    if not found:
        raise FileNotFoundError(f"{directory / pattern.format(0)} does not exist: {config_path.name}'s model_kind "
                                f"needs it")
    missing = sorted(set(range(found[-1] + 1)) - set(found))
    if missing:
        raise FileNotFoundError(f"{directory / pattern.format(missing[0])} does not exist: layers must run from 0 "
                                f"to {found[-1]} without a gap")
    return found[-1] + 1


def _read(path: Path, expected: dict, layout: str) -> dict:
    """A safetensors file's tensors: header names, shapes and kinds checked first, then the values."""
    from safetensors.torch import load_file

    check_regular_file(path, "circuit-tracer's layout needs it")
    header = read_weights_header(path)
    check_header(header, expected, path, layout)
    check_bytes(sum(entry.nbytes for entry in header.values()), "cpu", f"reading {path}")
    try:
        tensors = load_file(str(path))
    except Exception as error:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{path} is not a readable safetensors file: {error}") from None
    check_tensors(tensors, expected, path, layout)
    return tensors


def _shapes_from_header(path: Path, name: str) -> tuple:
    check_regular_file(path, "circuit-tracer's layout needs it")
    header = read_weights_header(path)
    if name not in header or len(header[name].shape) != 2:
        raise ValueError(f"{path}: expected a 2-D tensor {name} [n, d_model], found "
                         f"{ {key: tuple(entry.shape) for key, entry in header.items()} }")
    return tuple(header[name].shape), {key for key in header}


def _check_thresholds(threshold: Tensor, path: Path, name: str) -> None:
    if not bool((threshold > 0).all()):
        raise ValueError(f"{path}: {name} must be positive (sparsekit's JumpReLU keeps log thresholds), "
                         f"min {float(threshold.min())}")


def load_circuit_tracer(directory, dtype: torch.dtype | None = None, device=None):
    """Read a folder in circuit-tracer's layout (``export_circuit_tracer`` or circuit-tracer's own
    ``to_safetensors`` + config.yaml). A "transcoder_set" becomes a list of sparsekit Transcoders,
    index = model layer (ReLU, or JumpReLU with its thresholds; skip paths kept), each
    ``reconstruct(x)`` equal to circuit-tracer's forward of that layer; a "cross_layer_transcoder"
    a ``CircuitTracerCLT``. Each carries config.yaml's hooks and model name in ``metadata``.
    dtype/device: where to build them (default: the files' dtype, the CPU)."""
    directory = Path(directory)
    config_path = directory / CT_CONFIG_FILE
    check_regular_file(config_path, f"is {directory} a folder in circuit-tracer's layout?")
    config = _read_config(config_path)
    metadata = {"feature_input_hook": config.feature_input_hook, "feature_output_hook": config.feature_output_hook}
    if config.model_name is not None:
        metadata["model"] = config.model_name
    if config.model_kind == "cross_layer_transcoder":
        clt = _load_clt(directory, config_path, dtype)
        clt.metadata = metadata
        return clt.to(device) if device is not None else clt
    L = _numbered(directory, "layer_{}.safetensors", config_path)
    (n, d), names = _shapes_from_header(directory / _layer_file(0), "W_enc")
    result = []
    for layer in range(L):
        path = directory / _layer_file(layer)
        _, names = _shapes_from_header(path, "W_enc")
        expected = {"W_enc": (n, d), "W_dec": (n, d), "b_enc": (n,), "b_dec": (d,)}
        for optional, shape in ((THRESHOLD, (n,)), ("W_skip", (d, d))):
            if optional in names:
                expected[optional] = shape
        t = _read(path, expected, f"circuit-tracer's transcoder layout (n={n}, d_model={d} from layer 0)")
        factory = dict(dtype=dtype or t["W_enc"].dtype, device=device, seed=None, skip="W_skip" in t)
        if THRESHOLD in t:
            _check_thresholds(t[THRESHOLD], path, THRESHOLD)
            sae = Transcoder(d, n, d, architecture="jumprelu", l0_coeff=DEFAULT_COEFFICIENT, **factory)
        else:
            sae = Transcoder(d, n, d, architecture="relu", l1_coeff=DEFAULT_COEFFICIENT, **factory)
        with torch.no_grad():
            sae.W_enc.copy_(t["W_enc"].t())
            sae.b_enc.copy_(t["b_enc"])
            sae.W_dec.copy_(t["W_dec"])
            sae.b_dec.copy_(t["b_dec"])
            sae.b_in.zero_()
            if THRESHOLD in t:
                sae.log_threshold.copy_(t[THRESHOLD].double().log())
            if "W_skip" in t:
                sae.W_skip.copy_(t["W_skip"].t())
        sae.metadata = {**metadata, "layer": layer}
        result.append(sae.eval())
    return result


def _load_clt(directory: Path, config_path: Path, dtype) -> CircuitTracerCLT:
    L = _numbered(directory, "W_enc_{}.safetensors", config_path)
    (n, d), names = _shapes_from_header(directory / "W_enc_0.safetensors", "W_enc_0")
    jumprelu = "threshold_0" in names
    W_enc, b_enc, b_dec, thresholds, W_dec = [], [], [], [], []
    for layer in range(L):
        enc_path = directory / f"W_enc_{layer}.safetensors"
        expected = {f"W_enc_{layer}": (n, d), f"b_enc_{layer}": (n,), f"b_dec_{layer}": (d,)}
        if jumprelu:
            expected[f"threshold_{layer}"] = (n,)
        layout = f"circuit-tracer's CLT layout (n={n}, d_model={d} from W_enc_0, {L} layers)"
        t = _read(enc_path, expected, layout)
        W_enc.append(t[f"W_enc_{layer}"].t())
        b_enc.append(t[f"b_enc_{layer}"])
        b_dec.append(t[f"b_dec_{layer}"])
        if jumprelu:
            _check_thresholds(t[f"threshold_{layer}"], enc_path, f"threshold_{layer}")
            thresholds.append(t[f"threshold_{layer}"])
        dec = _read(directory / f"W_dec_{layer}.safetensors", {f"W_dec_{layer}": (n, L - layer, d)}, layout)
        W_dec.append(dec[f"W_dec_{layer}"].reshape(n, (L - layer) * d))
    dtype = dtype or W_enc[0].dtype
    cast = lambda ts: [t.to(dtype).contiguous() for t in ts]  # noqa: E731
    return CircuitTracerCLT(torch.stack(cast(W_enc)), torch.stack(cast(b_enc)), cast(W_dec), torch.stack(cast(b_dec)),
                            torch.stack(cast(thresholds)) if jumprelu else None).eval()
