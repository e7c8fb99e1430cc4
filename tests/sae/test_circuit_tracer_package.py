"""circuit-tracer itself reads sparsekit's export: its own loaders (load_transcoder_set, load_clt) build
the transcoders from the folder, and their forward equals sparsekit's outputs. Runs where the
``circuit-tracer`` package imports (its transcoder modules need no network)."""
import pytest
import torch
import yaml

import sparsekit
from sparsekit.sae.circuit_tracer_format import calibrate_topk_thresholds, export_circuit_tracer

single = pytest.importorskip("circuit_tracer.transcoder.single_layer_transcoder")
cross = pytest.importorskip("circuit_tracer.transcoder.cross_layer_transcoder")

from test_circuit_tracer_format import HOOKS, D, jumprelu_clt_reference, random_clt, random_transcoder  # noqa: E402

CPU = torch.device("cpu")


@pytest.mark.parametrize("architecture,skip", [("relu", True), ("jumprelu", False), ("batchtopk", False)])
def test_circuit_tracer_transcoder_set_computes_sparsekit_outputs(tmp_path, architecture, skip):
    saes = [random_transcoder(architecture, skip) for _ in range(2)]
    export_circuit_tracer(saes, tmp_path, **HOOKS)
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    theirs = single.load_transcoder_set({i: str(tmp_path / f"layer_{i}.safetensors") for i in range(2)}, "test",
                                        config["feature_input_hook"], config["feature_output_hook"], device=CPU,
                                        dtype=torch.float64, lazy_encoder=False, lazy_decoder=False)
    assert theirs.feature_input_hook == HOOKS["feature_input_hook"] and len(theirs) == 2
    for sae, transcoder in zip(saes, theirs):
        x = 2 * torch.randn(64, D, dtype=torch.float64)
        with torch.no_grad():
            torch.testing.assert_close(transcoder(x), sae.reconstruct(x), rtol=1e-10, atol=1e-10)


def test_circuit_tracer_clt_computes_the_export(tmp_path):
    clt = random_clt(first_layer=0, n_layers=3)
    thresholds = calibrate_topk_thresholds(clt, 2 * torch.randn(256, 3, D, dtype=torch.float64))
    export_circuit_tracer(clt, tmp_path, **HOOKS, topk_thresholds=thresholds)
    theirs = cross.load_clt(str(tmp_path), **HOOKS, device=CPU, dtype=torch.float64, lazy_decoder=False)
    x = 2 * torch.randn(32, 3, D, dtype=torch.float64)
    with torch.no_grad():
        got = theirs(x.transpose(0, 1)).transpose(0, 1)  # circuit-tracer stacks layers first: [L, B, d]
    torch.testing.assert_close(got, jumprelu_clt_reference(clt, x, thresholds), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got, sparsekit.load(tmp_path).reconstruct(x), rtol=1e-10, atol=1e-10)
