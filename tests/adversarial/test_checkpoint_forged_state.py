"""Issue 21, class 3: forged or damaged run state. state.json checksums its own fields and is checked
against a schema, so an edited counter, scale or source position, a missing key or a wrong type makes
the checkpoint invalid: resume falls back to the previous checkpoint with a warning naming the file
and the reason, and never resumes to different parameters or crashes.

Each case damages the newest of two real checkpoints (steps 8 and 10 of a 10-step run, copied from
one run per module) and asks ``checkpoint.latest`` for the checkpoint a resume would use (in-process:
a child adds nothing to a JSON check); two cases resume all the way, one of them through the CLI in
a child process under a memory cap and a timeout."""
import json
import random
import shutil

import numpy as np
import pytest
import torch
from helpers import hostile

import sparsekit
from sparsekit.training import checkpoint as ckpt

SEED = hostile.fresh_seed()


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A finished 10-step run's checkpoint folder (steps 8 and 10) and its final dictionary."""
    directory = tmp_path_factory.mktemp("template") / "run"
    result = hostile.train(directory, SEED)
    assert hostile.steps_in(directory) == [8, 10], f"seed {SEED}"
    return directory, result.sae


@pytest.fixture
def run(template, tmp_path):
    directory = tmp_path / "run"
    shutil.copytree(template[0], directory)
    return directory


def resume_target(directory, capsys):
    """(step of the checkpoint a resume would load, the warnings printed)."""
    path, _, state = ckpt.latest(directory)
    assert state["step"] == ckpt.step_of(path)
    return ckpt.step_of(path), capsys.readouterr().err


def newest(directory):
    return directory / "step_000000010"


# Edits a careless hand or a forger makes, the checksum left as it was: each must be caught by it.
EDITS = {
    "counters advanced": lambda s, r: s.update(step=s["step"] + 2, tokens=s["tokens"] + 2 * hostile.B),
    "input scale": lambda s, r: s.update(input_scale=s["input_scale"] * r.uniform(1.01, 4)),
    "output scale": lambda s, r: s.update(output_scale=s["output_scale"] * r.uniform(0.25, 0.99)),
    "source position": lambda s, r: s["source_state"].update(position=s["source_state"]["position"] + r.randrange(1, 50)),
    "source epoch": lambda s, r: s["source_state"].update(epoch=s["source_state"]["epoch"] + r.randrange(1, 5)),
    "generator byte": lambda s, r: s["generator"].__setitem__(r.randrange(len(s["generator"])), r.randrange(256)),
    "optimizer lr": lambda s, r: s["optimizer_groups"][0].update(lr=r.uniform(1e-2, 1.0)),
    "optimizer betas": lambda s, r: s["optimizer_groups"][0].update(betas=[r.uniform(0, 0.5), 0.5]),
    "log window rows": lambda s, r: s["log_window"].update(rows=s["log_window"]["rows"] + r.randrange(1, 99)),
    "log window sums": lambda s, r: s["log_window"]["sums"].update(mse=r.uniform(0, 9)),
    "config seed": lambda s, r: s["config"].update(seed=r.randrange(1, 2**31)),
    "sae_config k": lambda s, r: s["sae_config"].update(k=r.randrange(4, 9)),
    "tensor checksum of another file": lambda s, r: s.update(tensors_sha256=f"{r.getrandbits(256):064x}"),
    "a field added": lambda s, r: s.update(extra=r.random()),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_an_edited_field_fails_its_checksum_and_resume_falls_back_with_a_warning(run, capsys, edit):
    rng = random.Random(SEED)
    hostile.rewrite_state(newest(run), lambda s: EDITS[edit](s, rng), rechecksum=False)
    step, warnings = resume_target(run, capsys)
    assert step == 8, f"seed {SEED}"
    assert "skipping invalid checkpoint" in warnings and str(newest(run) / "state.json") in warnings
    assert "do not match their checksum state_sha256" in warnings


def _drop(key):
    return lambda s: s.pop(key)


# Missing keys and wrong types with the checksum recomputed (a forger who knows the format): the
# schema must refuse each before a resume touches it.
SCHEMA_BREAKS = {**{f"missing {key}": (_drop(key), f"missing field '{key}'")
                    for key in ckpt.STATE_SCHEMA if key != "state_sha256"},
                 "step a string": (lambda s: s.update(step="10"), "field 'step' must be a non-negative int"),
                 "step negative": (lambda s: s.update(step=-1), "field 'step' must be a non-negative int"),
                 "step a bool": (lambda s: s.update(step=True), "field 'step' must be a non-negative int"),
                 "tokens a float": (lambda s: s.update(tokens=640.5), "field 'tokens' must be a non-negative int"),
                 "input_scale zero": (lambda s: s.update(input_scale=0), "'input_scale' must be a positive finite"),
                 "input_scale a string": (lambda s: s.update(input_scale="1.0"), "'input_scale' must be a positive"),
                 "input_scale NaN": (lambda s: s.update(input_scale=float("nan")), "'input_scale' must be a positive"),
                 "output_scale inf": (lambda s: s.update(output_scale=float("inf")), "'output_scale' must be a positive"),
                 "generator empty": (lambda s: s.update(generator=[]), "'generator' must be a list of"),
                 "generator value 256": (lambda s: s["generator"].__setitem__(7, 256), "'generator' must be a list of"),
                 "generator a string": (lambda s: s.update(generator="abc"), "'generator' must be a list of"),
                 "optimizer_groups empty": (lambda s: s.update(optimizer_groups=[]), "'optimizer_groups' must be"),
                 "optimizer lr a string": (lambda s: s["optimizer_groups"][0].update(lr="x"), "'optimizer_groups' must"),
                 "log_window a list": (lambda s: s.update(log_window=[]), "'log_window' must be an object"),
                 "log_window steps negative": (lambda s: s["log_window"].update(steps=-3), "whose steps is"),
                 "log_window without sums": (lambda s: s["log_window"].pop("sums"), "an object with sums"),
                 "source_state a string": (lambda s: s.update(source_state="pos"), "'source_state' must be an object"),
                 "source_state without kind": (lambda s: s["source_state"].pop("kind"), "'source_state' must be an"),
                 "config batch_size zero": (lambda s: s["config"].update(batch_size=0), "positive int batch_size"),
                 "sae_config a list": (lambda s: s.update(sae_config=[]), "'sae_config' must be an object"),
                 "tensors_sha256 short": (lambda s: s.update(tensors_sha256="abc"), "'tensors_sha256' must be a SHA-256"),
                 "format 1": (lambda s: s.update(format=1), "'format' must be 2"),
                 "tokens not step times batch": (lambda s: s.update(tokens=s["tokens"] + 1), "is not step=10 times"),
                 "step of another folder": (lambda s: s.update(step=12, tokens=12 * hostile.B), "but the folder is"),
                 }


@pytest.mark.parametrize("case", list(SCHEMA_BREAKS))
def test_a_missing_or_mistyped_field_is_refused_and_resume_falls_back(run, capsys, case):
    edit, reason = SCHEMA_BREAKS[case]
    hostile.rewrite_state(newest(run), edit, rechecksum=True)
    step, warnings = resume_target(run, capsys)
    assert step == 8 and str(newest(run) / "state.json") in warnings and reason in warnings, warnings


# state.json files that are not a state at all.
NOT_STATES = {
    "empty": (b"", "is not valid JSON"),
    "random bytes": (None, "is not UTF-8 text"),
    "a JSON list": (b"[1, 2, 3]", "expected a JSON object, got list"),
    "a JSON number": (b"12", "expected a JSON object, got int"),
    "cut in half": ("half", "is not valid JSON"),
    "nested 100000 deep": (b"[" * 100000 + b"]" * 100000, "JSON nested 100000 levels deep, more than the 64 allowed"),
    "a directory": ("dir", "is unreadable"),
}


@pytest.mark.parametrize("case", list(NOT_STATES))
def test_a_state_json_that_is_no_state_falls_back_with_one_line(run, capsys, case):
    data, reason = NOT_STATES[case]
    state_file = newest(run) / "state.json"
    if data is None:
        data = bytes([random.randrange(128, 256) for _ in range(random.randrange(1, 300))])
    if data == "half":
        text = state_file.read_bytes()
        data = text[: random.randrange(1, len(text) - 1)]
    state_file.unlink()
    if data == "dir":
        state_file.mkdir()
    else:
        state_file.write_bytes(data)
    step, warnings = resume_target(run, capsys)
    assert step == 8 and reason in warnings and len(warnings.strip().splitlines()) == 1, warnings


def test_a_state_json_above_its_size_limit_is_refused_before_it_is_read(run, capsys, monkeypatch):
    size = (newest(run) / "state.json").stat().st_size
    monkeypatch.setattr(ckpt, "STATE_JSON_LIMIT", size - 1)
    step, warnings = resume_target(run, capsys)
    assert step == 8 or step is None
    assert f"holds {size:,} bytes, more than the {size - 1:,} it may" in warnings


def test_the_schema_names_every_field_a_run_state_writes(template):
    """The schema and RunState.checkpoint_json cannot drift apart: a real checkpoint holds exactly its fields."""
    state = json.loads((template[0] / "step_000000010" / "state.json").read_text())
    assert set(state) == set(ckpt.STATE_SCHEMA) | set(ckpt.OPTIONAL_SCHEMA)
    ckpt.check_state(state, "real")


def test_resume_past_a_forged_newest_checkpoint_ends_bit_identical(run, template, capsys):
    hostile.rewrite_state(newest(run), lambda s: s.update(input_scale=s["input_scale"] * 2), rechecksum=False)
    resumed = hostile.train(run, SEED, resume=True)
    assert "skipping invalid checkpoint" in capsys.readouterr().err
    assert hostile.same_parameters(resumed.sae, template[1]), f"seed {SEED}"
    assert resumed.metrics["step"] == 10 and hostile.steps_in(run) == [8, 10]


def test_the_cli_resumes_from_the_previous_checkpoint_when_the_newest_has_a_wrong_type(tmp_path):
    """In a child under a memory cap: a wrong type used to crash `sparsekit train --resume` with a traceback."""
    rng = np.random.default_rng(SEED)
    data = tmp_path / "x.npy"
    np.save(data, rng.standard_normal((640, hostile.D)).astype(np.float32))
    flags = ["-m", "sparsekit", "train", "--data", str(data), "--architecture", "topk", "--n-latents", "16", "--k", "2",
             "--batch-size", "32", "--total-tokens", "320", "--eval-tokens", "64", "--checkpoint-dir",
             str(tmp_path / "ckpt"), "--checkpoint-every-tokens", "64", "--out", str(tmp_path / "out"), "--no-progress",
             "--device", "cpu"]
    first = hostile.run_capped(flags)
    assert first.returncode == 0, first.stderr
    found = hostile.steps_in(tmp_path / "ckpt")
    hostile.rewrite_state(tmp_path / "ckpt" / f"step_{found[-1]:09d}", lambda s: s.update(tokens="many"), rechecksum=True)
    second = hostile.run_capped(flags + ["--resume"])
    assert second.returncode == 0, second.stderr
    assert "Traceback" not in second.stderr and "skipping invalid checkpoint" in second.stderr
    assert f"step_{found[-1]:09d}/state.json: field 'tokens' must be a non-negative int" in second.stderr
    assert f"resumed from {tmp_path / 'ckpt' / f'step_{found[-2]:09d}'}" in second.stderr
    loaded = sparsekit.load(tmp_path / "out")
    assert all(torch.isfinite(p).all() for p in loaded.parameters())
