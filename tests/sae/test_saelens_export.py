"""export_saelens: the files SAELens 6.x reads, and (where sae_lens is installed) SAELens's own
loader gives back the reconstructions and active latents of sae.reconstruct on raw activations."""
import json

import pytest
import torch
from helpers.dictionary_cases import ARCHITECTURES, D_IN, D_OUT, N_LATENTS, K, make_dictionary
from safetensors.torch import load_file

import sparsekit
from sparsekit.sae.saelens import SAELENS_SCHEMA_VERSION, export_saelens, saelens_version

SAELENS_NAME = {("relu", False): "standard", ("topk", False): "topk", ("jumprelu", False): "jumprelu",
                ("batchtopk", False): "jumprelu", ("relu", True): "transcoder",
                ("jumprelu", True): "jumprelu_transcoder", ("batchtopk", True): "jumprelu_transcoder",
                ("gated", False): "gated"}
EXPORTABLE = list(SAELENS_NAME)
# (input_scale, output_scale): equal scales keep SAELens's b_dec-on-input form; unequal ones fold it
# into b_enc.
SCALES = [(2.7, 2.7), (1.0, 1.0), (0.35, 3.1)]


def test_layout_and_field_names(tmp_path):
    sae = make_dictionary("topk")
    assert sae.export_saelens(tmp_path, hook_name="blocks.0.hook_resid_pre") == tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg == {"architecture": "topk", "d_in": D_IN, "d_sae": N_LATENTS, "dtype": "float32", "device": "cpu",
                   "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
                   "metadata": {"sae_lens_version": saelens_version(), "hook_name": "blocks.0.hook_resid_pre"},
                   "k": K, "rescale_acts_by_decoder_norm": False}
    weights = load_file(str(tmp_path / "sae_weights.safetensors"))
    assert {name: tuple(t.shape) for name, t in weights.items()} == {
        "W_enc": (D_IN, N_LATENTS), "b_enc": (N_LATENTS,), "W_dec": (N_LATENTS, D_IN), "b_dec": (D_IN,)}


@pytest.mark.parametrize("architecture,transcoder", EXPORTABLE)
def test_architecture_names_and_thresholds(tmp_path, architecture, transcoder):
    sae = make_dictionary(architecture, transcoder)
    export_saelens(sae, tmp_path, metadata={"hook_name": "blocks.0.hook_resid_post"})
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    weights = load_file(str(tmp_path / "sae_weights.safetensors"))
    assert cfg["architecture"] == SAELENS_NAME[architecture, transcoder]
    assert cfg["metadata"]["hook_name"] == "blocks.0.hook_resid_post"
    assert cfg.get("d_out") == (D_OUT if transcoder else None)
    assert cfg["apply_b_dec_to_input"] is (not transcoder)  # SAELens transcoders refuse it
    if architecture == "jumprelu":
        torch.testing.assert_close(weights["threshold"], sae.log_threshold.detach().exp())
    elif architecture == "batchtopk":
        assert torch.equal(weights["threshold"], torch.full((N_LATENTS,), float(sae.threshold)))
    else:
        assert "threshold" not in weights


def test_topk_transcoder_is_not_implemented(tmp_path):
    with pytest.raises(NotImplementedError, match="no topk transcoder"):
        export_saelens(make_dictionary("topk", transcoder=True), tmp_path, hook_name="blocks.0.hook_resid_pre")


def test_batchtopk_without_threshold_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no inference threshold"):
        export_saelens(sparsekit.BatchTopKSAE(D_IN, N_LATENTS, K), tmp_path, hook_name="blocks.0.hook_resid_pre")


# --- loaded by SAELens itself -------------------------------------------------------------------

def load_with_saelens(directory):
    sae_lens = pytest.importorskip("sae_lens")
    return sae_lens.SAE.load_from_disk(str(directory)).eval()


def raw_activations(dtype, seed=0):
    """Raw-scale activations with an offset, as a model's would be."""
    gen = torch.Generator().manual_seed(seed)
    return (3.0 * torch.randn(200, D_IN, generator=gen) + 1.0).to(dtype)


@pytest.mark.parametrize("architecture,transcoder", EXPORTABLE)
@pytest.mark.parametrize("scales", SCALES)
def test_saelens_reproduces_reconstruct(tmp_path, architecture, transcoder, scales):
    # float64 so the folded weights cannot move a pre-activation across a threshold or the top-k cut
    sae = make_dictionary(architecture, transcoder, dtype=torch.float64, input_scale=scales[0],
                          output_scale=scales[1])
    export_saelens(sae, tmp_path, hook_name="blocks.0.hook_resid_pre")
    lens = load_with_saelens(tmp_path)
    x = raw_activations(torch.float64)
    with torch.no_grad():
        expected = sae.reconstruct(x)
        got = lens(x)
        codes = sae.dense_codes(sae.encode(x * sae.input_scale))
        lens_codes = lens.encode(x)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    assert torch.equal(lens_codes > 0, codes > 0)  # same latents fire
    assert 0 < (codes > 0).float().mean() < 1


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_saelens_reproduces_reconstruct_in_float32(tmp_path, architecture):
    sae = make_dictionary(architecture, input_scale=0.37, output_scale=0.37)
    export_saelens(sae, tmp_path, hook_name="blocks.0.hook_resid_pre")
    lens = load_with_saelens(tmp_path)
    x = raw_activations(torch.float32, seed=1)
    with torch.no_grad():
        expected, got = sae.reconstruct(x), lens(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


# --- the metadata block: hook_name, the sae_lens version, sae.metadata under SAELens's names ---------

def test_export_without_a_hook_is_refused_in_one_line(tmp_path):
    with pytest.raises(ValueError, match="hook_name is required") as raised:
        make_dictionary("relu").export_saelens(tmp_path / "out")
    assert "\n" not in str(raised.value) and not (tmp_path / "out").exists()


def test_hook_and_provenance_come_from_sae_metadata(tmp_path):
    sae = make_dictionary("jumprelu")
    fvu, l0, ce = (float(v) for v in torch.rand(3))
    sae.metadata.update(hook="blocks.3.hook_mlp_out", model="SmolLM2-135M", context_len=128, dataset="tiny-stories",
                        metrics={"fvu": fvu, "l0": l0 * 50, "ce_recovered": ce, "dead_frac": 0.1})
    export_saelens(sae, tmp_path, metadata={"prepend_bos": True})
    block = json.loads((tmp_path / "cfg.json").read_text())["metadata"]
    assert block == {"sae_lens_version": saelens_version(), "hook_name": "blocks.3.hook_mlp_out",
                     "model_name": "SmolLM2-135M", "context_size": 128, "dataset_path": "tiny-stories",
                     "explained_variance": 1.0 - fvu, "l0": l0 * 50, "ce_loss_score": ce, "prepend_bos": True}
    assert sparsekit.load_saelens(tmp_path).metadata == {"hook": "blocks.3.hook_mlp_out", "model": "SmolLM2-135M",
                                                         "context_len": 128, "dataset": "tiny-stories"}


def test_the_argument_wins_over_sae_metadata_hook(tmp_path):
    sae = make_dictionary("topk")
    sae.metadata["hook"] = "blocks.0.hook_resid_pre"
    sae.export_saelens(tmp_path, hook_name="blocks.1.hook_resid_pre")
    assert json.loads((tmp_path / "cfg.json").read_text())["metadata"]["hook_name"] == "blocks.1.hook_resid_pre"


def test_sae_lens_version_is_the_installed_6x_else_the_schema(monkeypatch):
    import importlib.metadata
    real = importlib.metadata.version
    for installed, expected in (("6.54.12", "6.54.12"), ("7.0.1", SAELENS_SCHEMA_VERSION), (None, SAELENS_SCHEMA_VERSION)):
        def version(name, installed=installed):
            if name != "sae-lens":
                return real(name)
            if installed is None:
                raise importlib.metadata.PackageNotFoundError(name)
            return installed
        monkeypatch.setattr(importlib.metadata, "version", version)
        assert saelens_version() == expected
