"""sae.save / sparsekit.load: exact round trips for every architecture, and bad files rejected with
an error that names the file and the field."""
import json

import pytest
import torch
from helpers.dictionary_cases import ARCHITECTURES, D_IN, make_dictionary
from safetensors.torch import load_file, save_file

import sparsekit

CASES = [(arch, transcoder) for arch in ARCHITECTURES for transcoder in (False, True)]


@pytest.mark.parametrize("architecture,transcoder", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_save_load_round_trip_is_exact(tmp_path, architecture, transcoder, dtype):
    sae = make_dictionary(architecture, transcoder, dtype=dtype, input_scale=1.7, output_scale=0.3)
    sae.save(tmp_path)
    loaded = sparsekit.load(tmp_path).eval()

    assert type(loaded) is type(sae) and loaded.config() == sae.config()
    assert loaded.input_scale == 1.7 and loaded.output_scale == 0.3
    state, loaded_state = sae.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    for name in state:
        assert loaded_state[name].dtype == dtype
        assert torch.equal(loaded_state[name], state[name]), name
    x = torch.randn(16, D_IN, dtype=dtype)
    assert torch.equal(loaded.reconstruct(x), sae.reconstruct(x))


def test_batchtopk_threshold_and_transcoder_bias_survive(tmp_path):
    sae = make_dictionary("batchtopk", transcoder=True)
    sae.save(tmp_path)
    loaded = sparsekit.load(tmp_path)
    assert float(loaded.threshold) == pytest.approx(0.4)
    assert torch.equal(loaded.b_in, sae.b_in)


def test_save_leaves_no_temporary_files(tmp_path):
    make_dictionary("topk").save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.json", "sae.safetensors"]


# --- bad files ---------------------------------------------------------------------------------

def edit_config(**fields):
    """Set (or with ..., delete) cfg.json fields."""
    def edit(directory):
        config = json.loads((directory / "cfg.json").read_text())
        for key, value in fields.items():
            if value is ...:
                config.pop(key)
            else:
                config[key] = value
        (directory / "cfg.json").write_text(json.dumps(config))
    return edit


def edit_weights(**tensors):
    """Replace tensors in sae.safetensors (a function of the old tensor)."""
    def edit(directory):
        state = load_file(str(directory / "sae.safetensors"))
        for name, change in tensors.items():
            state[name] = change(state[name])
        save_file(state, str(directory / "sae.safetensors"))
    return edit


def drop_weight(name):
    def edit(directory):
        state = load_file(str(directory / "sae.safetensors"))
        del state[name]
        save_file(state, str(directory / "sae.safetensors"))
    return edit


def rewrite(name, transform):
    def edit(directory):
        path = directory / name
        path.write_bytes(transform(path.read_bytes()))
    return edit


def corrupt_header(data: bytes) -> bytes:
    return data[:8] + b"\xff" * 12 + data[20:]


def with_nan(t):
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


# (edit of a saved topk SAE, exception, substrings the message must hold besides the file name)
BAD_FILES = {
    "no cfg.json": (lambda d: (d / "cfg.json").unlink(), FileNotFoundError, "cfg.json", ["does not exist"]),
    "no weights": (lambda d: (d / "sae.safetensors").unlink(), FileNotFoundError, "sae.safetensors",
                   ["does not exist"]),
    "cfg not JSON": (rewrite("cfg.json", lambda b: b"{architecture: topk"), ValueError, "cfg.json", ["not valid JSON"]),
    "cfg not UTF-8": (rewrite("cfg.json", lambda b: b"\xff\xfe"), ValueError, "cfg.json", ["is not UTF-8 text"]),
    "cfg a list": (rewrite("cfg.json", lambda b: b"[]"), ValueError, "cfg.json", ["JSON object"]),
    "unknown architecture": (edit_config(architecture="sparse"), ValueError, "cfg.json", ["architecture", "'sparse'"]),
    "architecture missing": (edit_config(architecture=...), ValueError, "cfg.json", ["architecture", "None"]),
    "architecture a list": (edit_config(architecture=["topk"]), ValueError, "cfg.json", ["architecture"]),
    "d_in a string": (edit_config(d_in="12"), ValueError, "cfg.json", ["d_in", "'12'"]),
    "k a float": (edit_config(k=6.0), ValueError, "cfg.json", ["k must be a positive int", "6.0"]),
    "k above n_latents": (edit_config(k=1000), ValueError, "cfg.json", ["k=1000"]),
    "n_latents zero": (edit_config(n_latents=0), ValueError, "cfg.json", ["n_latents"]),
    "k missing": (edit_config(k=...), ValueError, "cfg.json", ["'k'"]),
    "unknown field": (edit_config(colour="red"), ValueError, "cfg.json", ["colour"]),
    "transcoder a string": (edit_config(transcoder="no"), ValueError, "cfg.json", ["transcoder", "'no'"]),
    "dtype unknown": (edit_config(dtype="float31"), ValueError, "cfg.json", ["dtype", "float31"]),
    "dtype a number": (edit_config(dtype=32), ValueError, "cfg.json", ["dtype", "32"]),
    "input_scale negative": (edit_config(input_scale=-1.0), ValueError, "cfg.json", ["input_scale", "-1.0"]),
    "input_scale a string": (edit_config(input_scale="2"), ValueError, "cfg.json", ["input_scale", "'2'"]),
    "output_scale infinite": (edit_config(output_scale=float("inf")), ValueError, "cfg.json", ["output_scale", "inf"]),
    "n_latents disagrees with weights": (edit_config(n_latents=24), ValueError, "sae.safetensors",
                                         ["W_enc", "(12, 48)", "(12, 24)"]),
    "d_in disagrees with weights": (edit_config(d_in=10, d_out=10), ValueError, "sae.safetensors", ["W_enc"]),
    "transcoder without b_in": (edit_config(transcoder=True), ValueError, "sae.safetensors", ["missing", "b_in"]),
    "truncated weights": (rewrite("sae.safetensors", lambda b: b[:len(b) // 2]), ValueError, "sae.safetensors",
                          ["not a readable safetensors file"]),
    "empty weights": (rewrite("sae.safetensors", lambda b: b""), ValueError, "sae.safetensors",
                      ["not a readable safetensors file"]),
    "corrupted header": (rewrite("sae.safetensors", corrupt_header), ValueError, "sae.safetensors",
                         ["not a readable safetensors file"]),
    "weights not safetensors": (rewrite("sae.safetensors", lambda b: b"PK\x03\x04 a zip, say" * 10), ValueError,
                                "sae.safetensors", ["not a readable safetensors file"]),
    "tensor missing": (drop_weight("b_enc"), ValueError, "sae.safetensors", ["missing", "b_enc"]),
    "tensor shape": (edit_weights(b_dec=lambda t: t[:-1]), ValueError, "sae.safetensors", ["b_dec", "(11,)", "(12,)"]),
    "tensor dtype": (edit_weights(W_dec=lambda t: t.double()), ValueError, "sae.safetensors",
                     ["W_dec", "float64", "float32"]),
    "tensor NaN": (edit_weights(W_enc=with_nan), ValueError, "sae.safetensors", ["W_enc", "non-finite"]),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_is_rejected_naming_file_and_field(tmp_path, case):
    edit, error, file_name, fragments = BAD_FILES[case]
    make_dictionary("topk").save(tmp_path)
    edit(tmp_path)
    with pytest.raises(error) as raised:
        sparsekit.load(tmp_path)
    message = str(raised.value)
    assert str(tmp_path / file_name) in message
    for fragment in fragments:
        assert fragment in message


def test_missing_directory_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        sparsekit.load(tmp_path / "nowhere")
