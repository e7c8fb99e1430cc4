"""Run metadata in cfg.json: saved and read back, checked both ways, never touching the weights or the
architecture; the format stamp and its version (older files load, newer ones ask for an upgrade);
sparsekit.train records what it knows."""
import json
import random
import string

import pytest
import torch
from helpers.dictionary_cases import ARCHITECTURES, D_IN, make_dictionary

import sparsekit
from sparsekit.sae.metadata import FORMAT_VERSION, MAX_DEPTH, MAX_METADATA_BYTES, check_metadata


def random_metadata(rng: random.Random) -> dict:
    """Provenance as the CLI fills it, with fresh random values (nested, unicode, every plain type)."""
    word = lambda: "".join(rng.choice(string.ascii_letters + "äß→ ") for _ in range(rng.randint(1, 12)))
    return {"model": word(), "hook": f"blocks.{rng.randint(0, 40)}.hook_resid_post", "input_hook": None,
            "dataset": {"path": word(), "text_field": "text", "splits": [word() for _ in range(rng.randint(0, 3))]},
            "context_len": rng.randint(1, 4096), "exclude_special_tokens": rng.random() < 0.5,
            "metrics": {"fvu": rng.random(), "l0": rng.uniform(0, 100)}}


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("transcoder", [False, True])
def test_metadata_survives_save_and_load(tmp_path, architecture, transcoder):
    sae = make_dictionary(architecture, transcoder)
    sae.metadata = random_metadata(random.Random())
    sae.save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["format"] == "sparsekit" and cfg["format_version"] == FORMAT_VERSION
    assert cfg["metadata"] == sae.metadata
    loaded = sparsekit.load(tmp_path)
    assert loaded.metadata == sae.metadata and loaded.metadata is not sae.metadata
    assert loaded.config() == sae.config()


def test_metadata_never_changes_the_weights_or_the_architecture(tmp_path):
    sae = make_dictionary("topk")
    sae.save(tmp_path / "plain")
    # keys that look like the architecture's fields stay metadata
    sae.metadata = {"k": 1, "architecture": "relu", "d_in": 3, "input_scale": 99.0, "dtype": "float64"}
    sae.save(tmp_path / "with")
    assert (tmp_path / "with/sae.safetensors").read_bytes() == (tmp_path / "plain/sae.safetensors").read_bytes()
    loaded = sparsekit.load(tmp_path / "with")
    assert type(loaded) is sparsekit.TopKSAE and loaded.config() == sparsekit.load(tmp_path / "plain").config()
    x = torch.randn(9, D_IN)
    assert torch.equal(loaded.reconstruct(x), sae.reconstruct(x))


def strip_to_format_0(directory):
    """cfg.json as sparsekit wrote it before format_version existed."""
    cfg = json.loads((directory / "cfg.json").read_text())
    for key in ("format", "format_version", "metadata"):
        del cfg[key]
    (directory / "cfg.json").write_text(json.dumps(cfg))


def test_a_cfg_without_format_version_still_loads(tmp_path):
    sae = make_dictionary("gated")
    sae.save(tmp_path)
    strip_to_format_0(tmp_path)
    loaded = sparsekit.load(tmp_path)
    assert loaded.metadata == {} and loaded.config() == sae.config()


def set_field(directory, **fields):
    cfg = json.loads((directory / "cfg.json").read_text())
    cfg.update(fields)
    (directory / "cfg.json").write_text(json.dumps(cfg))


def test_a_newer_format_version_asks_for_an_upgrade(tmp_path):
    make_dictionary("relu").save(tmp_path)
    newer = FORMAT_VERSION + random.randint(1, 5)
    set_field(tmp_path, format_version=newer)
    with pytest.raises(ValueError, match=f"format {newer}, newer than .* upgrade sparsekit") as raised:
        sparsekit.load(tmp_path)
    assert "\n" not in str(raised.value)


def deep(levels: int) -> dict:
    value = {}
    for _ in range(levels):
        value = {"a": value}
    return value


@pytest.mark.parametrize("fields,fragment", [
    (dict(format_version="1"), "format_version must be a non-negative int"),
    (dict(format_version=-1), "format_version must be a non-negative int"),
    (dict(format="sae_lens"), "format 'sae_lens' is not 'sparsekit'"),
    (dict(metadata=["model"]), "metadata must be a dict"),
    (dict(metadata={"metrics": {"fvu": float("nan")}}), "metadata['metrics']['fvu'] must be finite"),
    (dict(metadata={"notes": "x" * (MAX_METADATA_BYTES + 1)}), "more than the 65,536 allowed"),
    (dict(metadata=deep(MAX_DEPTH + 2)), "nested deeper than"),
], ids=["version a string", "version negative", "another format", "metadata a list", "metadata NaN",
        "metadata too large", "metadata too deep"])
def test_a_forged_stamp_or_metadata_is_one_error_naming_the_file(tmp_path, fields, fragment):
    make_dictionary("topk").save(tmp_path)
    set_field(tmp_path, **fields)
    with pytest.raises(ValueError) as raised:
        sparsekit.load(tmp_path)
    message = str(raised.value)
    assert str(tmp_path / "cfg.json") in message and fragment in message and "\n" not in message


@pytest.mark.parametrize("metadata,fragment", [
    ({"model": torch.zeros(2)}, "sae.metadata['model'] must hold plain JSON values"),
    ({1: "a"}, "has a key 1 that is not a string"),
    ({"metrics": {"l0": float("inf")}}, "sae.metadata['metrics']['l0'] must be finite"),
    ({"blob": "y" * MAX_METADATA_BYTES}, "more than the"),
], ids=["a tensor", "an int key", "an infinite metric", "too large"])
def test_save_refuses_bad_metadata_before_writing_anything(tmp_path, metadata, fragment):
    sae = make_dictionary("relu")
    sae.metadata = metadata
    with pytest.raises(ValueError, match="sae.metadata") as raised:
        sae.save(tmp_path / "out")
    assert fragment in str(raised.value) and not (tmp_path / "out").exists()


def test_check_metadata_copies_and_normalises_tuples():
    original = {"layers": (1, 2), "nested": {"a": [True, None, 1.5]}}
    checked = check_metadata(original)
    assert checked == {"layers": [1, 2], "nested": {"a": [True, None, 1.5]}}
    checked["nested"]["a"].append(0)
    assert original["nested"]["a"] == [True, None, 1.5]


@pytest.mark.parametrize("normalize_inputs", [True, False])
def test_train_records_tokens_version_normalisation_and_metrics(normalize_inputs):
    rows = 64 * random.randint(6, 10)
    x = torch.randn(rows + 128, 8) * 3
    sae = sparsekit.TopKSAE(8, 32, k=4)
    sae.metadata["hook"] = "blocks.0.hook_resid_post"  # set by whoever trains: kept
    cfg = sparsekit.TrainConfig(batch_size=64, total_tokens=rows, eval_tokens=128, progress=False,
                                normalize_inputs=normalize_inputs)
    result = sparsekit.train(sae, x, cfg)
    meta = result.sae.metadata
    assert meta["hook"] == "blocks.0.hook_resid_post"
    assert meta["tokens_trained"] == rows and meta["sparsekit_version"] == sparsekit.__version__
    assert meta["normalisation"]["input_scale"] == sae.input_scale == meta["normalisation"]["output_scale"]
    assert (sae.input_scale != 1.0) == normalize_inputs
    assert ("normalize_inputs" in meta["normalisation"]["method"]) and \
        (meta["normalisation"]["method"].startswith("none") != normalize_inputs)
    assert meta["metrics"]["fvu"] == result.metrics["fvu"] and meta["metrics"]["l0"] == result.metrics["l0"]
    check_metadata(meta)  # what train records always saves
