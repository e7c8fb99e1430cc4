"""circuit-tracer's layout both ways: per-layer transcoders and CLTs exported, the files checked against
the published layout, read back through sparsekit.load with the same outputs (float64), and bad
folders refused in one line naming the file. The layout's names and shapes are from circuit-tracer
0.5.0 (PyPI wheel; transcoder/single_layer_transcoder.py load_relu_transcoder, transcoder/
cross_layer_transcoder.py _load_state_dict; safety-research/circuit-tracer b00048e4 has the same)."""
import secrets

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import sparsekit
from sparsekit.sae.circuit_tracer_format import (
    CircuitTracerCLT,
    calibrate_topk_thresholds,
    export_circuit_tracer,
    load_circuit_tracer,
)

D, N = 10, 24
HOOKS = dict(feature_input_hook="ln2.hook_normalized", feature_output_hook="hook_mlp_out")


def jiggle(module, scale=0.3):
    with torch.no_grad():
        for param in module.parameters():
            param.add_(scale * torch.randn_like(param))
    return module


def random_transcoder(architecture, skip=False, dtype=torch.float64):
    seed = secrets.randbelow(2**31)
    coefficient = {"relu": dict(l1_coeff=1.0), "jumprelu": dict(l0_coeff=1.0), "batchtopk": dict(k=4),
                   "topk": dict(k=4)}[architecture]
    sae = jiggle(sparsekit.Transcoder(D, N, D, architecture=architecture, skip=skip, dtype=dtype, seed=seed,
                                      **coefficient))
    if architecture == "batchtopk":
        sae.threshold.fill_(0.2 + torch.rand(()).item())
    sae.input_scale, sae.output_scale = 0.5 + torch.rand(()).item(), 0.5 + torch.rand(()).item()
    return sae.eval()


def circuit_tracer_forward(path, x):
    """A layer file's forward as circuit-tracer's SingleLayerTranscoder computes it (plain torch)."""
    t = load_file(str(path))
    pre = x @ t["W_enc"].T + t["b_enc"]
    f = pre * (pre > t["activation_function.threshold"]) if "activation_function.threshold" in t else pre.relu()
    out = f @ t["W_dec"] + t["b_dec"]
    return out + x @ t["W_skip"].T if "W_skip" in t else out


@pytest.mark.parametrize("architecture,skip", [("relu", False), ("relu", True), ("jumprelu", False),
                                               ("jumprelu", True), ("batchtopk", False)])
def test_transcoder_set_round_trip_keeps_outputs(tmp_path, architecture, skip):
    saes = [random_transcoder(architecture, skip) for _ in range(2)]
    export_circuit_tracer(saes, tmp_path, **HOOKS, model_name="SmolLM2-135M")
    back = sparsekit.load(tmp_path)
    assert isinstance(back, list) and len(back) == 2
    for layer, (sae, copy) in enumerate(zip(saes, back)):
        x = 2 * torch.randn(64, D, dtype=torch.float64)
        expected = sae.reconstruct(x)
        assert (expected != sae.b_dec / sae.output_scale).any()  # some latents fired
        torch.testing.assert_close(circuit_tracer_forward(tmp_path / f"layer_{layer}.safetensors", x), expected,
                                   rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(copy.reconstruct(x), expected, rtol=1e-10, atol=1e-10)
        assert copy.metadata == {**HOOKS, "model": "SmolLM2-135M", "layer": layer}


def test_transcoder_set_files_match_the_published_layout(tmp_path):
    saes = {1: random_transcoder("jumprelu", skip=True, dtype=torch.float32)}
    export_circuit_tracer(saes, tmp_path, **HOOKS, n_layers=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"] + [f"layer_{i}.safetensors" for i in range(3)]
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert {key: config[key] for key in ("model_kind", *HOOKS)} == {"model_kind": "transcoder_set", **HOOKS}
    assert config["sparsekit"]["silent_layers"] == [0, 2]
    for layer in range(3):
        t = load_file(str(tmp_path / f"layer_{layer}.safetensors"))
        shapes = {name: tuple(v.shape) for name, v in t.items()}
        expected = {"W_enc": (N, D), "W_dec": (N, D), "b_enc": (N,), "b_dec": (D,), "W_skip": (D, D)}
        if layer == 1:
            expected["activation_function.threshold"] = (N,)
        assert shapes == expected
        assert {v.dtype for v in t.values()} == {torch.float32}
    silent = load_file(str(tmp_path / "layer_0.safetensors"))
    assert all((v == 0).all() for v in silent.values())


def random_clt(first_layer=1, reach=None, n_layers=3):
    clt = sparsekit.sae.CrossLayerTranscoder(D, n_layers * N, n_layers=n_layers, k_per_layer=4, reach=reach,
                                             first_layer=first_layer, dtype=torch.float64,
                                             seed=secrets.randbelow(2**31))
    jiggle(clt, 0.2)
    with torch.no_grad():
        clt.layer_input_scale.uniform_(0.5, 1.5)
        clt.layer_output_scale.uniform_(0.5, 1.5)
    return clt.eval()


def jumprelu_clt_reference(clt, x, thresholds):
    """The sparsekit CLT's parameters run with JumpReLU at ``thresholds`` (one per layer) instead of
    TopK: what the exported files must compute. Raw x [B, L, d] -> raw y [B, L, d]."""
    n, L = clt.latents_per_layer, clt.n_layers
    xs = x * clt.layer_input_scale[:, None]
    y = clt.b_dec.expand(x.shape[0], L, D).clone()
    for layer in range(L):
        pre = (xs[:, layer] - clt.b_in[layer]) @ clt.encoder(layer) + clt.b_enc[layer * n:(layer + 1) * n]
        f = pre * (pre > thresholds[layer])
        for offset in range(clt.spans[layer]):
            y[:, layer + offset] += f @ clt.decoder_to(layer, layer + offset)
    return y / clt.layer_output_scale[:, None]


@pytest.mark.parametrize("reach", [None, 1])
def test_clt_round_trip_computes_the_jumprelu_export(tmp_path, reach):
    clt = random_clt(reach=reach)
    sample = 2 * torch.randn(512, 3, D, dtype=torch.float64)
    thresholds = calibrate_topk_thresholds(clt, sample)
    export_circuit_tracer(clt, tmp_path, **HOOKS, n_layers=5, topk_thresholds=thresholds)
    back = sparsekit.load(tmp_path)
    assert isinstance(back, CircuitTracerCLT) and back.n_layers == 5
    x = 2 * torch.randn(64, 3, D, dtype=torch.float64)
    padded = torch.zeros(64, 5, D, dtype=torch.float64)
    padded[:, 1:4] = x
    got = back.reconstruct(padded)
    expected = jumprelu_clt_reference(clt, x, thresholds)
    torch.testing.assert_close(got[:, 1:4], expected, rtol=1e-10, atol=1e-10)
    assert (got[:, [0, 4]] == 0).all()  # silent layers, and no decoder reaches past the covered ones
    # the calibration: mean L0 per layer on its sample is k (ties aside)
    n = clt.latents_per_layer
    scaled = sample * clt.layer_input_scale[:, None]
    for layer in range(3):
        pre = (scaled[:, layer] - clt.b_in[layer]) @ clt.encoder(layer) + clt.b_enc[layer * n:(layer + 1) * n]
        assert (pre >= thresholds[layer]).sum(-1).double().mean().item() == pytest.approx(4.0)


def test_clt_files_match_the_published_layout(tmp_path):
    clt = random_clt(first_layer=0, n_layers=2)
    export_circuit_tracer(clt, tmp_path, **HOOKS, topk_thresholds=0.5)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["W_dec_0.safetensors", "W_dec_1.safetensors", "W_enc_0.safetensors", "W_enc_1.safetensors",
                     "config.yaml"]
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["model_kind"] == "cross_layer_transcoder"
    for layer in range(2):
        enc = load_file(str(tmp_path / f"W_enc_{layer}.safetensors"))
        assert {k: tuple(v.shape) for k, v in enc.items()} == {
            f"W_enc_{layer}": (N, D), f"b_enc_{layer}": (N,), f"b_dec_{layer}": (D,), f"threshold_{layer}": (N,)}
        dec = load_file(str(tmp_path / f"W_dec_{layer}.safetensors"))
        assert {k: tuple(v.shape) for k, v in dec.items()} == {f"W_dec_{layer}": (N, 2 - layer, D)}


def test_topk_export_without_thresholds_is_refused(tmp_path):
    with pytest.raises(ValueError, match="TopK.*topk_thresholds"):
        export_circuit_tracer([random_transcoder("topk")], tmp_path, **HOOKS)
    with pytest.raises(ValueError, match="TopK per layer.*topk_thresholds"):
        export_circuit_tracer(random_clt(), tmp_path, **HOOKS)
    assert not any(tmp_path.iterdir())


def test_topk_transcoder_exports_as_jumprelu_at_its_threshold(tmp_path):
    sae = random_transcoder("topk")
    x = 2 * torch.randn(256, D, dtype=torch.float64)
    (theta,) = calibrate_topk_thresholds([sae], [x])
    export_circuit_tracer([sae], tmp_path, **HOOKS, topk_thresholds=[theta])
    (copy,) = sparsekit.load(tmp_path)
    assert copy.architecture == "jumprelu"
    torch.testing.assert_close(copy.log_threshold.exp(), torch.full((N,), theta, dtype=torch.float64))


def test_bad_exports_name_the_argument(tmp_path):
    wide = sparsekit.Transcoder(D, N, D + 1, architecture="relu", l1_coeff=1.0, dtype=torch.float64)
    with pytest.raises(ValueError, match="d_in=10 differs from d_out=11"):
        export_circuit_tracer([wide], tmp_path, **HOOKS)
    with pytest.raises(ValueError, match="feature_input_hook"):
        export_circuit_tracer([random_transcoder("relu")], tmp_path, feature_input_hook="", feature_output_hook="x")
    gated = sparsekit.Transcoder(D, N, D, architecture="gated", l1_coeff=1.0, dtype=torch.float64)
    with pytest.raises(ValueError, match="'gated'"):
        export_circuit_tracer([gated], tmp_path, **HOOKS)
    with pytest.raises(ValueError, match="same d_model and latent count"):
        export_circuit_tracer([random_transcoder("relu"),
                               sparsekit.Transcoder(D, N + 1, D, architecture="relu", l1_coeff=1.0)], tmp_path, **HOOKS)
    with pytest.raises(ValueError, match="n_layers"):
        export_circuit_tracer({2: random_transcoder("relu")}, tmp_path, **HOOKS, n_layers=2)


def test_missing_or_misshapen_files_are_one_line_naming_the_file(tmp_path):
    export_circuit_tracer([random_transcoder("relu") for _ in range(3)], tmp_path, **HOOKS)
    (tmp_path / "layer_1.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="layer_1.safetensors does not exist"):
        load_circuit_tracer(tmp_path)
    t = load_file(str(tmp_path / "layer_0.safetensors"))
    t["W_dec"] = t["W_dec"][:, :-1].contiguous()
    save_file(t, str(tmp_path / "layer_1.safetensors"))
    with pytest.raises(ValueError, match=r"layer_1.safetensors: W_dec has shape \(24, 9\), expected \(24, 10\)"):
        load_circuit_tracer(tmp_path)
    (tmp_path / "config.yaml").write_text("model_kind: sae\nfeature_input_hook: a\nfeature_output_hook: b\n")
    with pytest.raises(ValueError, match="config.yaml: model_kind must be one of"):
        load_circuit_tracer(tmp_path)


def test_clt_missing_decoder_file_is_named(tmp_path):
    export_circuit_tracer(random_clt(first_layer=0, n_layers=2), tmp_path, **HOOKS, topk_thresholds=0.5)
    (tmp_path / "W_dec_1.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="W_dec_1.safetensors does not exist"):
        sparsekit.load(tmp_path)
