"""dictionary_learning (saprmarks/dictionary_learning) both ways: ae.pt + config.json.

The package cannot be installed here (it pulls a CUDA build of torch), so its layout and forward
passes are written out below from its source at commit 60ec6bf5264944d64a4ca271f45a29ebfb9d4946:
dictionary_learning/dictionary.py (AutoEncoder, GatedAutoEncoder, JumpReluAutoEncoder),
trainers/top_k.py (AutoEncoderTopK), trainers/batch_top_k.py (BatchTopKSAE), training.py (ae.pt is
the state dict, config.json {"trainer": {...}}) and utils.py (load_dictionary reads dict_class and k).
Round trips sparsekit -> dictionary_learning -> sparsekit for every architecture; their forward
on our export equals reconstruct; a state dict shaped as their classes build it loads with their
outputs; hostile and broken files (a pickle payload among them) are one clear error, never unpickled."""
import json
import pickle
import secrets

import pytest
import torch

import sparsekit
from sparsekit.sae.dictionary_learning_format import export_dictionary_learning, load_dictionary_learning

D, N, K = 10, 36, 4
ARCHITECTURES = ("relu", "topk", "batchtopk", "jumprelu", "gated")
DICT_CLASS = {"relu": "AutoEncoder", "topk": "AutoEncoderTopK", "batchtopk": "BatchTopKSAE",
              "jumprelu": "JumpReluAutoEncoder", "gated": "GatedAutoEncoder"}


def random_dictionary(architecture: str, dtype=torch.float64, scales=(1.0, 1.0)):
    """Fresh random parameters; decoder rows at unit norm where the architecture keeps them so (as trained)."""
    hyper = {"relu": dict(l1_coeff=float(torch.rand(1)) + 0.01, decoder_norm_penalty=True), "topk": dict(k=K),
             "batchtopk": dict(k=K, threshold_momentum=0.95), "jumprelu": dict(l0_coeff=0.02, bandwidth=0.07),
             "gated": dict(l1_coeff=0.03)}[architecture]
    sae = sparsekit.sae.ARCHITECTURES[architecture](D, N, dtype=dtype, seed=secrets.randbelow(2**31), **hyper)
    with torch.no_grad():
        for param in sae.parameters():
            param.add_(0.3 * torch.randn_like(param))
        sae.normalize_decoder()
        if architecture == "jumprelu":
            sae.log_threshold.uniform_(-3.0, 0.0)
        if architecture == "batchtopk":
            sae.threshold.fill_(float(torch.rand(1)) + 0.05)
    sae.input_scale, sae.output_scale = scales
    sae.metadata = {"model": "pythia-70m", "hook": f"gpt_neox.layers.{secrets.randbelow(6)}"}
    return sae.eval()


def their_forward(dict_class: str, s: dict, x: torch.Tensor) -> torch.Tensor:
    """dictionary_learning's forward (x -> x_hat) for each class, as its source computes it."""
    relu = torch.relu
    if dict_class == "AutoEncoder":
        f = relu((x - s["bias"]) @ s["encoder.weight"].T + s["encoder.bias"])
        return f @ s["decoder.weight"].T + s["bias"]
    if dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        post = relu((x - s["b_dec"]) @ s["encoder.weight"].T + s["encoder.bias"])
        if dict_class == "AutoEncoderTopK":  # encode(): top k per row, scattered
            top = post.topk(int(s["k"]), dim=-1, sorted=False)
            f = torch.zeros_like(post).scatter_(-1, top.indices, top.values)
        else:  # encode(use_threshold=True), the default
            f = post * (post > s["threshold"])
        return f @ s["decoder.weight"].T + s["b_dec"]
    if dict_class == "JumpReluAutoEncoder":  # apply_b_dec_to_input=False
        pre = x @ s["W_enc"] + s["b_enc"]
        return relu(pre * (pre > s["threshold"])) @ s["W_dec"] + s["b_dec"]
    x_enc = (x - s["decoder_bias"]) @ s["encoder.weight"].T
    f = (x_enc + s["gate_bias"] > 0).to(x.dtype) * relu(s["r_mag"].exp() * x_enc + s["mag_bias"])
    return f @ s["decoder.weight"].T + s["decoder_bias"]


def their_state(dict_class: str, dtype=torch.float64) -> dict:
    """A random state dict with the names, shapes and dtypes dictionary_learning's classes register."""
    r = lambda *shape: torch.randn(*shape, dtype=dtype)
    if dict_class == "AutoEncoder":
        return {"bias": r(D), "encoder.weight": r(N, D), "encoder.bias": r(N), "decoder.weight": r(D, N)}
    if dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        return {"k": torch.tensor(K, dtype=torch.int), "threshold": torch.tensor(0.3), "encoder.weight": r(N, D),
                "encoder.bias": r(N), "decoder.weight": r(D, N), "b_dec": r(D)}
    if dict_class == "JumpReluAutoEncoder":
        return {"W_enc": r(D, N), "b_enc": r(N), "W_dec": r(N, D), "b_dec": r(D), "threshold": r(N).abs()}
    return {"decoder_bias": r(D), "encoder.weight": r(N, D), "r_mag": r(N) * 0.1, "gate_bias": r(N),
            "mag_bias": r(N), "decoder.weight": r(D, N)}


def write_theirs(directory, dict_class: str, state: dict, **trainer):
    """What dictionary_learning's training.py leaves: config.json, then ae.pt (torch.save of the state dict)."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {"trainer": {"dict_class": dict_class, "activation_dim": D, "dict_size": N, **trainer},
              "buffer": {"d_submodule": D}}
    (directory / "config.json").write_text(json.dumps(config, indent=4))
    torch.save(state, directory / "ae.pt")
    return directory


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_round_trip_through_dictionary_learning(tmp_path, architecture, dtype):
    sae = random_dictionary(architecture, dtype)
    export_dictionary_learning(sae, tmp_path)
    back = sparsekit.load(tmp_path)
    assert type(back) is type(sae) and back.config() == sae.config() and back.metadata == sae.metadata
    x = torch.randn(32, D, dtype=dtype)
    if architecture == "jumprelu":  # b_dec folded into b_enc and back, log(exp(.)): one rounding each
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
        for name, tensor in sae.state_dict().items():
            torch.testing.assert_close(back.state_dict()[name], tensor, **tol)
        torch.testing.assert_close(back.reconstruct(x), sae.reconstruct(x), **tol)
    else:
        for name, tensor in sae.state_dict().items():
            assert torch.equal(back.state_dict()[name], tensor), name
        assert torch.equal(back.reconstruct(x), sae.reconstruct(x))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("scales", [(1.0, 1.0), (2.3, 2.3), (0.4, 3.7)])
def test_their_forward_on_the_export_is_reconstruct(tmp_path, architecture, scales):
    sae = random_dictionary(architecture, scales=scales)
    export_dictionary_learning(sae, tmp_path)
    state = torch.load(tmp_path / "ae.pt", weights_only=True)
    config = json.loads((tmp_path / "config.json").read_text())
    dict_class = config["trainer"]["dict_class"]
    assert dict_class == DICT_CLASS[architecture] and config["trainer"]["activation_dim"] == D
    if architecture in ("topk", "batchtopk"):  # utils.load_dictionary passes config["trainer"]["k"]
        assert config["trainer"]["k"] == int(state["k"]) == K and state["k"].dtype == torch.int32
    x = torch.randn(64, D, dtype=torch.float64) * 2
    torch.testing.assert_close(their_forward(dict_class, state, x), sae.reconstruct(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dict_class", list(DICT_CLASS.values()))
def test_a_dictionary_they_saved_loads_with_their_outputs(tmp_path, dict_class):
    state = their_state(dict_class)
    write_theirs(tmp_path, dict_class, state, k=K, l1_penalty=0.04, sparsity_penalty=0.2, bandwidth=0.01,
                 lm_name="EleutherAI/pythia-70m-deduped")
    sae = sparsekit.load(tmp_path)
    architecture = {v: k for k, v in DICT_CLASS.items()}[dict_class]
    assert sae.architecture == architecture and (sae.d_in, sae.n_latents) == (D, N)
    assert sae.metadata == {"model": "EleutherAI/pythia-70m-deduped"}  # lm_name; submodule_name was not set
    x = torch.randn(64, D, dtype=torch.float64) * 2
    torch.testing.assert_close(sae.reconstruct(x), their_forward(dict_class, state, x), rtol=1e-10, atol=1e-10)
    if dict_class == "AutoEncoder":  # random decoder rows are not unit norm: April-update penalty, rows left free
        assert sae.decoder_norm_penalty and sae.l1_coeff == 0.04
    if dict_class == "JumpReluAutoEncoder":  # JumpReluTrainer.config's bandwidth and sparsity_penalty
        assert sae.bandwidth == 0.01 and sae.l0_coeff == 0.2
    if dict_class == "GatedAutoEncoder":  # sparsekit keeps rows at unit norm: the norms moved into the magnitudes
        torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(N, dtype=torch.float64))


def test_their_topk_threshold_buffer_is_kept_only_for_batchtopk(tmp_path):
    state = their_state("BatchTopKSAE")
    state["threshold"] = torch.tensor(float(torch.rand(1)) + 0.1)
    sae = sparsekit.load(write_theirs(tmp_path, "BatchTopKSAE", state, k=K))
    assert float(sae.threshold) == float(state["threshold"])


def test_export_refuses_transcoders(tmp_path):
    with pytest.raises(ValueError, match="dictionary_learning has no transcoders"):
        export_dictionary_learning(sparsekit.Transcoder(D, N, 6, k=K), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- hostile and broken files --------------------------------------------------------------------

class Payload:
    """Unpickling this object would create ``marker``: a stand-in for code run by a malicious ae.pt."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_payload_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    state = their_state("AutoEncoder")
    state["encoder.bias"] = Payload(marker)
    write_theirs(tmp_path / "evil", "AutoEncoder", state)
    with pytest.raises(ValueError, match="is not a plain state dict of tensors that torch.load") as raised:
        sparsekit.load(tmp_path / "evil")
    assert "\n" not in str(raised.value) and not marker.exists()
    # and a plain pickle file (not torch's zip format) with the same payload
    (tmp_path / "evil" / "ae.pt").write_bytes(pickle.dumps({"bias": Payload(marker)}))
    with pytest.raises(ValueError, match="is not a plain state dict"):
        sparsekit.load(tmp_path / "evil")
    assert not marker.exists()


def replace(name, value):
    return lambda state: state.__setitem__(name, value(state[name]) if callable(value) else value)


def with_nan(t):
    t = t.clone()
    t.view(-1)[secrets.randbelow(t.numel())] = float("nan")
    return t


BAD = {  # dict_class, edit of the state dict, edit of config.json's trainer, message fragment
    "NaN weight": ("AutoEncoder", replace("decoder.weight", with_nan), {}, "decoder.weight holds non-finite values"),
    "inf threshold": ("JumpReluAutoEncoder", replace("threshold", lambda t: t.fill_(float("inf"))), {},
                      "threshold holds non-finite"),
    "wrong shape": ("GatedAutoEncoder", replace("r_mag", lambda t: t[:-1]), {}, f"r_mag has shape ({N - 1},), expected ({N},)"),
    "transposed decoder": ("AutoEncoderTopK", replace("decoder.weight", lambda t: t.T.contiguous()), {},
                           "decoder.weight has shape"),
    "missing tensor": ("BatchTopKSAE", lambda s: s.pop("b_dec"), {}, "missing ['b_dec']"),
    "extra tensor": ("AutoEncoder", replace("W_skip", torch.zeros(D, D)), {}, "unexpected ['W_skip']"),
    "k a float": ("AutoEncoderTopK", replace("k", torch.tensor(4.0)), {}, "k must hold an integer"),
    "k too large": ("AutoEncoderTopK", replace("k", torch.tensor(N + 1, dtype=torch.int)), {}, f"k={N + 1} must be in"),
    "integer weights": ("AutoEncoder", replace("bias", lambda t: t.long()), {}, "bias must be floating point"),
    "encoder not 2-D": ("AutoEncoder", replace("encoder.weight", lambda t: t.reshape(-1)), {},
                        "encoder.weight must be a non-empty 2-D tensor"),
    "a tensor, not a dict": ("AutoEncoder", None, {}, "must hold a dict of tensor names to tensors"),
    "unknown dict_class": ("AutoEncoderNew", None, {}, "dict_class 'AutoEncoderNew' has no sparsekit equivalent"),
    "trainer not an object": ("AutoEncoder", None, {"trainer": ["AutoEncoder"]}, "trainer must be a JSON object"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_dictionary_learning_folder_is_one_error_naming_the_file(tmp_path, case):
    dict_class, edit, trainer_edit, fragment = BAD[case]
    state = their_state(dict_class if dict_class in DICT_CLASS.values() else "AutoEncoder")
    if edit is not None:
        edit(state)
    folder = write_theirs(tmp_path / "dl", dict_class, torch.zeros(3) if case == "a tensor, not a dict" else state, k=K)
    if trainer_edit:
        (folder / "config.json").write_text(json.dumps(trainer_edit))
    with pytest.raises(ValueError) as raised:
        sparsekit.load(folder)
    message = str(raised.value)
    assert fragment in message and str(folder) in message and "\n" not in message


def test_a_run_folder_names_its_trainer_folders(tmp_path):
    for i in range(2):
        write_theirs(tmp_path / f"trainer_{i}", "AutoEncoder", their_state("AutoEncoder"))
    with pytest.raises(FileNotFoundError, match=r"holds dictionaries in folders \(trainer_0, trainer_1\)"):
        sparsekit.load(tmp_path)
    assert sparsekit.load(tmp_path, subfolder="trainer_1").architecture == "relu"


def test_a_missing_config_is_named(tmp_path):
    folder = write_theirs(tmp_path / "dl", "AutoEncoder", their_state("AutoEncoder"))
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json does not exist"):
        load_dictionary_learning(folder)
