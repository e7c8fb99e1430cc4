"""export_saelens: the files SAELens 6.x reads, and (where sae_lens is installed) SAELens's own
loader gives back the reconstructions and active latents of sae.reconstruct on raw activations."""
import json

import pytest
import torch
from helpers.dictionary_cases import ARCHITECTURES, D_IN, D_OUT, N_LATENTS, K, make_dictionary
from safetensors.torch import load_file

import sparsekit
from sparsekit.sae.saelens import export_saelens

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
    assert sae.export_saelens(tmp_path) == tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg == {"architecture": "topk", "d_in": D_IN, "d_sae": N_LATENTS, "dtype": "float32", "device": "cpu",
                   "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
                   "metadata": {"sae_lens_version": "6.0.0"}, "k": K, "rescale_acts_by_decoder_norm": False}
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
        export_saelens(make_dictionary("topk", transcoder=True), tmp_path)


def test_batchtopk_without_threshold_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no inference threshold"):
        export_saelens(sparsekit.BatchTopKSAE(D_IN, N_LATENTS, K), tmp_path)


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
    export_saelens(sae, tmp_path)
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
    export_saelens(sae, tmp_path)
    lens = load_with_saelens(tmp_path)
    x = raw_activations(torch.float32, seed=1)
    with torch.no_grad():
        expected, got = sae.reconstruct(x), lens(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
