"""load_saelens: dictionaries that SAELens 6.x itself created and saved come back as sparsekit
dictionaries whose reconstructions (through sparsekit's kernels) equal SAELens's own, in float64."""
import json

import pytest
import torch
from helpers.dictionary_cases import make_dictionary
from safetensors.torch import load_file, save_file

import sparsekit

sae_lens = pytest.importorskip("sae_lens")

D_IN, D_SAE, D_OUT, K = 10, 40, 7, 5

# name -> (SAELens class, its config class, config fields, sparsekit architecture, transcoder?)
CASES = {
    "standard": ("StandardSAE", "StandardSAEConfig", {}, "relu", False),
    "standard_b_dec_not_on_input": ("StandardSAE", "StandardSAEConfig", {"apply_b_dec_to_input": False}, "relu", False),
    "topk": ("TopKSAE", "TopKSAEConfig", {"k": K}, "topk", False),
    "topk_rescaled_by_decoder_norm": ("TopKTrainingSAE", "TopKTrainingSAEConfig", {"k": K}, "topk", False),
    "jumprelu": ("JumpReLUSAE", "JumpReLUSAEConfig", {}, "jumprelu", False),
    "jumprelu_training": ("JumpReLUTrainingSAE", "JumpReLUTrainingSAEConfig", {"l0_coefficient": 0.3}, "jumprelu", False),
    "batchtopk_training": ("BatchTopKTrainingSAE", "BatchTopKTrainingSAEConfig", {"k": K}, "batchtopk", False),
    "gated": ("GatedSAE", "GatedSAEConfig", {}, "gated", False),
    "gated_b_dec_not_on_input": ("GatedSAE", "GatedSAEConfig", {"apply_b_dec_to_input": False}, "gated", False),
    "gated_training": ("GatedTrainingSAE", "GatedTrainingSAEConfig", {"l1_coefficient": 0.7}, "gated", False),
    "transcoder": ("Transcoder", "TranscoderConfig", {"d_out": D_OUT, "apply_b_dec_to_input": False}, "relu", True),
    "jumprelu_transcoder": ("JumpReLUTranscoder", "JumpReLUTranscoderConfig",
                            {"d_out": D_OUT, "apply_b_dec_to_input": False}, "jumprelu", True),
}


def saelens_dictionary(name, seed=0):
    """A SAELens dictionary with random float64 weights (thresholds partly <= 0 where SAELens allows)."""
    cls_name, cfg_name, fields, _, _ = CASES[name]
    cfg = getattr(sae_lens, cfg_name)(d_in=D_IN, d_sae=D_SAE, dtype="float64",
                                      metadata=sae_lens.saes.sae.SAEMetadata(hook_name="blocks.1.hook_resid_post"),
                                      **fields)
    lens = getattr(sae_lens, cls_name)(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param_name, param in lens.named_parameters():
            param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float64).to(param.dtype))
            if param_name == "threshold":  # inference forms take any threshold; training forms keep it >= 0
                low = 0.05 if "training" in name else -0.5
                param.copy_(torch.empty(param.shape, dtype=param.dtype).uniform_(low, 1.5, generator=gen))
        if name == "batchtopk_training":
            lens.topk_threshold.fill_(0.8)
    return lens.eval()


def raw_activations(seed=1, rows=64):
    gen = torch.Generator().manual_seed(seed)
    return 2.0 * torch.randn(rows, D_IN, generator=gen, dtype=torch.float64) + 0.5


@pytest.mark.parametrize("name", CASES)
def test_saelens_dictionaries_reconstruct_the_same_through_sparsekit(tmp_path, name):
    lens = saelens_dictionary(name)
    lens.save_model(tmp_path / "saved")
    if name == "batchtopk_training":  # SAELens itself loads only the inference form (a JumpReLU)
        lens.save_inference_model(tmp_path / "inference")
        reference = sae_lens.SAE.load_from_disk(str(tmp_path / "inference")).eval()
    else:
        reference = sae_lens.SAE.load_from_disk(str(tmp_path / "saved")).eval()

    sae = sparsekit.load_saelens(tmp_path / "saved")
    _, _, _, architecture, transcoder = CASES[name]
    assert sae.architecture == architecture and sae.transcoder == transcoder and not sae.training
    assert sae.W_enc.dtype == torch.float64 and sae.saelens_metadata["hook_name"] == "blocks.1.hook_resid_post"
    x = raw_activations()
    with torch.no_grad():
        expected = reference(x)
        got = sae.reconstruct(x)
        codes = sae.encode(x)
        fired = sae.dense_codes(codes) > 0
        expected_fired = reference.encode(x) > 0
    if architecture == "topk":
        assert isinstance(codes, sparsekit.TopKCodes)  # decoded by the sparse kernel
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    assert torch.equal(fired, expected_fired)
    assert 0 < fired.double().mean() < 1


def test_training_coefficients_come_from_cfg_and_can_be_overridden(tmp_path):
    saelens_dictionary("jumprelu_training").save_model(tmp_path)
    sae = sparsekit.load_saelens(tmp_path)
    assert (sae.l0_coeff, sae.bandwidth) == (0.3, json.loads((tmp_path / "cfg.json").read_text())["jumprelu_bandwidth"])
    assert sparsekit.load_saelens(tmp_path, l0_coeff=2e-3, bandwidth=1e-2).l0_coeff == 2e-3
    assert sparsekit.load_saelens(tmp_path, dtype=torch.float32).W_dec.dtype == torch.float32


@pytest.mark.parametrize("architecture,transcoder", [("relu", False), ("topk", False), ("jumprelu", True),
                                                     ("batchtopk", False), ("gated", False)])
def test_sparsekit_export_then_import_gives_back_the_same_reconstructions(tmp_path, architecture, transcoder):
    sae = make_dictionary(architecture, transcoder, dtype=torch.float64, input_scale=0.6, output_scale=1.9)
    sae.export_saelens(tmp_path, hook_name="blocks.0.hook_resid_pre")
    back = sparsekit.load_saelens(tmp_path)
    x = 2.0 * torch.randn(40, sae.d_in, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.5
    torch.testing.assert_close(back.reconstruct(x), sae.reconstruct(x), rtol=1e-10, atol=1e-10)


def test_foreign_and_broken_folders_are_refused_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        sparsekit.load_saelens(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="sae_weights.safetensors does not exist"):
        sparsekit.load_saelens(empty)
    native = make_dictionary("topk").save(tmp_path / "native")
    with pytest.raises(ValueError, match="holds a sparsekit dictionary .* sparsekit.load"):
        sparsekit.load_saelens(native)

    folder = tmp_path / "lens"
    saelens_dictionary("standard").save_model(folder)
    cfg = json.loads((folder / "cfg.json").read_text())

    def rewrite(**changes):
        (folder / "cfg.json").write_text(json.dumps({**cfg, **changes}))

    rewrite(architecture="matching_pursuit")
    with pytest.raises(ValueError, match="architecture 'matching_pursuit' has no sparsekit equivalent; supported: standard"):
        sparsekit.load_saelens(folder)
    rewrite(normalize_activations="layer_norm")
    with pytest.raises(ValueError, match="normalize_activations='layer_norm'"):
        sparsekit.load_saelens(folder)
    rewrite(d_sae=41)
    with pytest.raises(ValueError, match=r"W_enc has shape \(10, 40\), expected \(10, 41\)"):
        sparsekit.load_saelens(folder)
    rewrite(dtype="int8")
    with pytest.raises(ValueError, match="dtype 'int8' is not a floating-point torch dtype"):
        sparsekit.load_saelens(folder)
    rewrite()
    weights = load_file(str(folder / "sae_weights.safetensors"))
    save_file({**weights, "W_skip": torch.zeros(D_IN, D_IN, dtype=torch.float64)}, str(folder / "sae_weights.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected \['W_skip'\]"):
        sparsekit.load_saelens(folder)
    (folder / "cfg.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        sparsekit.load_saelens(folder)
