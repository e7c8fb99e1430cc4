"""sparsify (eai-sparsify 1.3) both ways: sparsekit -> sparsify -> sparsekit round trips for every form
sparsify has (TopK SAE, TopK transcoder, with and without its skip path); sparsify's own
SparseCoder.load_from_disk reads the export and computes sparsekit's outputs; a coder sparsify itself
saved loads through sparsekit.load (same file names as sparsekit's: told apart by cfg.json); bad
folders are one clear error."""
import json
import os
import secrets

import pytest
import torch
from safetensors.torch import load_file, save_file

import sparsekit
from sparsekit.sae.sparsify_format import export_sparsify, load_sparsify

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # sparsify's Triton decoder needs CUDA tensors
sparsify = pytest.importorskip("sparsify")

D, N, K = 12, 40, 5
FORMS = [(False, False), (True, False), (True, True)]  # (transcoder, skip)
IDS = ["sae", "transcoder", "skip transcoder"]


def random_topk(transcoder: bool, skip: bool, dtype=torch.float64, scales=(1.0, 1.0), b_in=False):
    """A TopK dictionary with fresh random parameters (b_in zero unless asked: sparsify has none)."""
    seed = secrets.randbelow(2**31)
    if transcoder:
        sae = sparsekit.Transcoder(D, N, D, k=K, skip=skip, dtype=dtype, seed=seed)
    else:
        sae = sparsekit.TopKSAE(D, N, k=K, dtype=dtype, seed=seed)
    with torch.no_grad():
        for name, param in sae.named_parameters():
            if name != "b_in" or b_in:
                param.add_(0.3 * torch.randn_like(param))
    sae.input_scale, sae.output_scale = scales
    sae.metadata = {"hook": f"layers.{secrets.randbelow(30)}", "tokens_trained": secrets.randbelow(10**9)}
    return sae.eval()


def sparsify_output(coder, x):
    with torch.no_grad():
        return coder(x).sae_out


@pytest.mark.parametrize("transcoder,skip", FORMS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_round_trip_through_sparsify_is_exact(tmp_path, transcoder, skip, dtype):
    sae = random_topk(transcoder, skip, dtype)
    export_sparsify(sae, tmp_path)
    back = sparsekit.load(tmp_path)
    assert type(back) is type(sae) and back.config() == sae.config() and back.metadata == sae.metadata
    for name, tensor in sae.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    x = torch.randn(20, D, dtype=dtype)
    assert torch.equal(back.reconstruct(x), sae.reconstruct(x))


@pytest.mark.parametrize("transcoder,skip", FORMS, ids=IDS)
def test_sparsify_reads_the_export_and_computes_reconstruct(tmp_path, transcoder, skip):
    sae = random_topk(transcoder, skip, scales=(1.9, 1.9 if not transcoder else 0.4), b_in=transcoder)
    export_sparsify(sae, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert {key: cfg[key] for key in ("d_in", "num_latents", "k", "transcode", "skip_connection", "activation")} == \
        {"d_in": D, "num_latents": N, "k": K, "transcode": transcoder, "skip_connection": skip, "activation": "topk"}
    coder = sparsify.SparseCoder.load_from_disk(tmp_path)
    assert coder.dtype == torch.float64
    x = torch.randn(64, D, dtype=torch.float64) * 3
    torch.testing.assert_close(sparsify_output(coder, x), sae.reconstruct(x), rtol=1e-10, atol=1e-10)
    back = sparsekit.load(tmp_path)  # scales and b_in folded: the same function, scale 1
    assert back.input_scale == back.output_scale == 1.0
    torch.testing.assert_close(back.reconstruct(x), sae.reconstruct(x), rtol=1e-10, atol=1e-10)


def test_an_sae_with_unequal_scales_exports_exactly(tmp_path):
    sae = random_topk(False, False, scales=(0.35, 3.1))
    export_sparsify(sae, tmp_path)
    x = torch.randn(64, D, dtype=torch.float64)
    torch.testing.assert_close(sparsify_output(sparsify.SparseCoder.load_from_disk(tmp_path), x), sae.reconstruct(x),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("transcoder,skip", FORMS, ids=IDS)
def test_a_coder_sparsify_saved_loads_with_its_outputs(tmp_path, transcoder, skip):
    cfg = sparsify.SparseCoderConfig(num_latents=N, k=K, transcode=transcoder, skip_connection=skip)
    coder = sparsify.SparseCoder(D, cfg, dtype=torch.float64)
    with torch.no_grad():
        for param in coder.parameters():
            param.copy_(torch.randn_like(param))
    coder.save_to_disk(tmp_path / "layers.4")
    sae = sparsekit.load(tmp_path / "layers.4")  # the same file names as sparsekit's own folders
    assert isinstance(sae, sparsekit.TopKSAE) and sae.transcoder == transcoder and sae.skip == skip and sae.k == K
    x = torch.randn(64, D, dtype=torch.float64)
    torch.testing.assert_close(sae.reconstruct(x), sparsify_output(coder, x), rtol=1e-10, atol=1e-10)
    assert sparsekit.load(tmp_path, subfolder="layers.4").config() == sae.config()


def test_expansion_factor_sets_the_latent_count_when_num_latents_is_zero(tmp_path):
    coder = sparsify.SparseCoder(D, sparsify.SparseCoderConfig(expansion_factor=3, k=K), dtype=torch.float64)
    coder.save_to_disk(tmp_path)
    assert sparsekit.load(tmp_path).n_latents == 3 * D


def test_export_refuses_what_sparsify_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match="sparsify holds TopK dictionaries only, got architecture 'relu'"):
        export_sparsify(sparsekit.ReLUSAE(D, N, l1_coeff=1e-3), tmp_path)
    with pytest.raises(ValueError, match="d_out=7 differs from d_in=12"):
        export_sparsify(sparsekit.Transcoder(D, N, 7, k=K), tmp_path)
    assert not any(tmp_path.iterdir())


def saved_coder(directory, **cfg):
    coder = sparsify.SparseCoder(D, sparsify.SparseCoderConfig(num_latents=N, k=K, **cfg))
    coder.save_to_disk(directory)
    return directory


def edit_cfg(**fields):
    def edit(directory):
        cfg = json.loads((directory / "cfg.json").read_text())
        cfg.update(fields)
        (directory / "cfg.json").write_text(json.dumps(cfg))
    return edit


def edit_tensors(change):
    def edit(directory):
        tensors = load_file(str(directory / "sae.safetensors"))
        change(tensors)
        save_file(tensors, str(directory / "sae.safetensors"))
    return edit


def nan_at_random(tensors):
    flat = tensors["W_dec"].view(-1)
    flat[secrets.randbelow(flat.numel())] = float("nan")


BAD = {
    "groupmax": (edit_cfg(activation="groupmax"), "activation='groupmax' has no sparsekit equivalent"),
    "skip on an SAE": (edit_cfg(skip_connection=True), "a sparsify SAE with a skip connection"),
    "k above the latents": (edit_cfg(k=N + 1), f"k must be an int in [1, {N}]"),
    "d_in a string": (edit_cfg(d_in="12"), "d_in must be a positive int, got '12'"),
    "num_latents negative": (edit_cfg(num_latents=-3), "num_latents must be an int >= 0"),
    "transcode a string": (edit_cfg(transcode="yes"), "transcode must be true or false"),
    "metadata not an object": (edit_cfg(metadata=[1]), "metadata must be a dict"),
    "latents disagree": (edit_cfg(num_latents=N - 1), f"encoder.weight has shape ({N}, {D}), expected ({N - 1}, {D})"),
    "W_dec transposed": (edit_tensors(lambda t: t.update(W_dec=t["W_dec"].t().contiguous())), "W_dec has shape"),
    "tensor missing": (edit_tensors(lambda t: t.pop("b_dec")), "missing ['b_dec']"),
    "extra tensor": (edit_tensors(lambda t: t.update(W_skip=torch.zeros(D, D))), "unexpected ['W_skip']"),
    "NaN weight": (edit_tensors(nan_at_random), "W_dec holds non-finite values"),
    "integer weight": (edit_tensors(lambda t: t.update(b_dec=t["b_dec"].long())), "b_dec must be floating point"),
    "mixed dtypes": (edit_tensors(lambda t: t.update(b_dec=t["b_dec"].double())), "must share one dtype"),
    "not safetensors": (lambda d: (d / "sae.safetensors").write_bytes(b"\x00" * 64), "not a readable safetensors file"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_sparsify_folder_is_one_error_naming_the_file(tmp_path, case):
    edit, fragment = BAD[case]
    folder = saved_coder(tmp_path / "coder")
    edit(folder)
    with pytest.raises(ValueError) as raised:
        sparsekit.load(folder)
    message = str(raised.value)
    assert fragment in message and str(folder) in message and "\n" not in message


def test_load_sparsify_names_a_missing_file(tmp_path):
    (saved_coder(tmp_path) / "sae.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="sae.safetensors does not exist"):
        load_sparsify(tmp_path)
