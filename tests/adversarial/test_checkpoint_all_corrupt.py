"""Issue 21, class 4: every checkpoint corrupt. A resume that finds checkpoints but none valid
stops with NoValidCheckpoint (naming the folder, each reason, and how to start over) instead of
silently starting from the beginning; clean-up never deletes a valid checkpoint because invalid
ones carry higher step numbers, and never counts an invalid one as kept.

In-process, but for the CLI case (a child process under a memory cap and a timeout)."""
import random
import shutil

import numpy as np
import pytest
from helpers import hostile

from sparsekit.errors import NoValidCheckpoint
from sparsekit.training import checkpoint as ckpt

SEED = hostile.fresh_seed()


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A finished 10-step run (checkpoints 8 and 10), its final dictionary, and checkpoint 10's contents."""
    directory = tmp_path_factory.mktemp("template") / "run"
    result = hostile.train(directory, SEED)
    tensors, state = ckpt.read(directory / "step_000000010")
    return directory, result.sae, tensors, state


def listing(directory):
    return sorted((str(p.relative_to(directory)), p.stat().st_size if p.is_file() else -1)
                  for p in directory.rglob("*"))


@pytest.mark.parametrize("how", hostile.DAMAGES)
def test_resume_with_every_checkpoint_corrupt_stops_and_says_how_to_start_over(template, tmp_path, capsys, how):
    run = tmp_path / "run"
    shutil.copytree(template[0], run)
    rng = random.Random(SEED)
    for step in (8, 10):
        hostile.damage(run / f"step_{step:09d}", how, rng)
    before = listing(run)
    with pytest.raises(NoValidCheckpoint) as raised:
        hostile.train(run, SEED, resume=True)
    message = str(raised.value)
    assert message.startswith(f"cannot resume: none of the 2 checkpoint(s) in {run} is valid (")
    assert "step_000000010" in message and "step_000000008" in message
    assert "to start over, move or delete the step_* folders there (or choose another checkpoint_dir)" in message
    assert listing(run) == before, "a refused resume must not write or delete anything in the folder"
    assert capsys.readouterr().err.count("skipping invalid checkpoint") == 2


@pytest.mark.parametrize("contents", ["nothing", "a lock and notes"])
def test_resume_with_no_checkpoint_at_all_still_starts_fresh(template, tmp_path, contents):
    run = tmp_path / "run"
    run.mkdir()
    if contents != "nothing":
        (run / ".lock").write_text("")
        (run / "notes.txt").write_text("not a checkpoint")
    result = hostile.train(run, SEED, resume=True)
    assert hostile.same_parameters(result.sae, template[1]) and hostile.steps_in(run) == [8, 10]


def test_the_cli_refuses_to_resume_from_only_corrupt_checkpoints_in_one_line(tmp_path):
    rng = np.random.default_rng(SEED)
    data = tmp_path / "x.npy"
    np.save(data, rng.standard_normal((640, hostile.D)).astype(np.float32))
    flags = ["-m", "sparsekit", "train", "--data", str(data), "--architecture", "topk", "--n-latents", "16", "--k", "2",
             "--batch-size", "32", "--total-tokens", "320", "--eval-tokens", "64", "--checkpoint-dir",
             str(tmp_path / "ckpt"), "--checkpoint-every-tokens", "64", "--out", str(tmp_path / "out"), "--no-progress",
             "--device", "cpu"]
    assert hostile.run_capped(flags).returncode == 0
    for path in ckpt.checkpoint_folders(tmp_path / "ckpt"):
        hostile.damage(path, "tensor bit flipped", random.Random(SEED))
    done = hostile.run_capped(flags + ["--resume"])
    errors = [line for line in done.stderr.strip().splitlines() if "skipping invalid checkpoint" not in line]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert len(errors) == 1 and errors[0].startswith("sparsekit train: cannot resume: none of the 2 checkpoint(s)")
    assert "to start over" in errors[0]


@pytest.mark.parametrize("how", hostile.DAMAGES)
def test_invalid_checkpoints_with_higher_steps_never_cost_the_valid_ones(template, tmp_path, capsys, how):
    """Stale invalid checkpoints above a fresh run's steps: the run keeps its own two newest, and
    the invalid ones are neither counted as kept nor touched; a resume skips them."""
    rng = random.Random(SEED)
    run = tmp_path / "run"
    run.mkdir()
    stale = sorted(rng.sample(range(12, 400, 2), rng.randrange(1, 4)))
    for step in stale:
        shutil.copytree(template[0] / "step_000000010", run / f"step_{step:09d}")
        hostile.damage(run / f"step_{step:09d}", how, rng)
    hostile.train(run, SEED)
    assert hostile.steps_in(run) == [8, 10] + stale, f"seed {SEED}"
    for step in (8, 10):
        ckpt.verify(run / f"step_{step:09d}")
    resumed = hostile.train(run, SEED, resume=True)
    assert f"resumed from {run / 'step_000000010'}" in capsys.readouterr().err
    assert hostile.same_parameters(resumed.sae, template[1]) and resumed.metrics["step"] == 10


def write_valid(template, directory, step):
    state = {k: v for k, v in template[3].items() if k not in ("step", "tensors_sha256", "format", "state_sha256")}
    state["tokens"] = step * hostile.B
    ckpt.write(directory, step, template[2], state, keep=10**6)


@pytest.mark.parametrize("draw", range(8))
def test_clean_up_keeps_the_newest_valid_checkpoints_on_random_layouts(template, tmp_path, draw):
    """Fresh random folders of valid and invalid checkpoints, then one more written with a random
    `keep`: every checkpoint above the new step survives; at or below it, exactly the `keep` newest
    valid ones and everything newer than them survive, and nothing older."""
    seed = hostile.fresh_seed()
    rng = random.Random(seed)
    run = tmp_path / "run"
    steps = sorted(rng.sample(range(1, 60), rng.randrange(2, 9)))
    valid = {}
    for step in steps:
        write_valid(template, run, step)
        valid[step] = rng.random() < 0.5
        if not valid[step]:
            hostile.damage(run / f"step_{step:09d}", rng.choice(hostile.DAMAGES), rng)
    new, keep = rng.randrange(1, 64), rng.randrange(1, 4)
    if new in valid:
        del valid[new]
    state = {k: v for k, v in template[3].items() if k not in ("step", "tensors_sha256", "format", "state_sha256")}
    ckpt.write(run, new, template[2], {**state, "tokens": new * hostile.B}, keep=keep)
    valid[new] = True
    below = sorted(s for s in valid if s <= new)
    valid_below = [s for s in below if valid[s]]
    cutoff = valid_below[-keep] if len(valid_below) >= keep else below[0]
    expected = sorted([s for s in below if s >= cutoff] + [s for s in valid if s > new])
    assert hostile.steps_in(run) == expected, f"seed {seed}: layout {valid}, new {new}, keep {keep}"
    kept_valid = [s for s in expected if s <= new and valid[s]]
    assert len(kept_valid) == min(keep, len(valid_below)), f"seed {seed}"
    for step in kept_valid:
        ckpt.verify(run / f"step_{step:09d}")
