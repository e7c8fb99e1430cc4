"""Issue 21, class 2: a full disk while checkpointing. safetensors reports ENOSPC as its own
SafetensorError (not an OSError); every failure while writing a checkpoint, whatever its type and
wherever it strikes, must become CheckpointWriteFailed (with the cause's errno), leave no
half-written folder, keep every earlier checkpoint valid, and let a resume after freeing space end
bit-identical to a run that never failed.

Injected failures run in-process (the writer is monkeypatched); a real full disk (a 2 MiB tmpfs,
mounted where the suite runs as root) runs in child processes under a memory cap and a timeout."""
import errno
import os
import shutil
import subprocess
import textwrap

import numpy as np
import pytest
from helpers import hostile
from safetensors import SafetensorError

from sparsekit.errors import CheckpointWriteFailed
from sparsekit.training import checkpoint as ckpt

SEED = hostile.fresh_seed()

FAILURES = {  # what the writer raises -> the errno CheckpointWriteFailed must carry
    "OSError ENOSPC": (lambda: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), errno.ENOSPC),
    "SafetensorError ENOSPC": (lambda: SafetensorError("Error while serializing: I/O error: No space left on device "
                                                       "(os error 28)"), errno.ENOSPC),
    "OSError EDQUOT": (lambda: OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)), errno.EDQUOT),
    "OSError EIO": (lambda: OSError(errno.EIO, os.strerror(errno.EIO)), errno.EIO),
    "SafetensorError without errno": (lambda: SafetensorError("Error while serializing: something odd"), None),
}
PLACES = ("save_file", "write_new_file", "fsync_path", "os.replace")


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A finished 10-step run (checkpoints 8 and 10), its final dictionary, and checkpoint 10's contents."""
    directory = tmp_path_factory.mktemp("template") / "run"
    result = hostile.train(directory, SEED)
    tensors, state = ckpt.read(directory / "step_000000010")
    return directory, result.sae, tensors, state


def fail_on_call(monkeypatch, target, name, make_error, call=1):
    original = getattr(target, name)
    count = [0]

    def failing(*args, **kwargs):
        count[0] += 1
        if count[0] == call:
            raise make_error()
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, failing)


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("failure", list(FAILURES))
def test_any_failure_while_writing_is_checkpoint_write_failed_and_leaves_nothing_half_written(
        template, tmp_path, monkeypatch, failure, place):
    run = tmp_path / "run"
    shutil.copytree(template[0], run)
    make_error, expected_errno = FAILURES[failure]
    target, name = (os, "replace") if place == "os.replace" else (ckpt, place)
    fail_on_call(monkeypatch, target, name, make_error)
    state = {k: v for k, v in template[3].items() if k not in ("step", "tensors_sha256", "format", "state_sha256")}
    state["tokens"] = 12 * hostile.B
    with pytest.raises(CheckpointWriteFailed) as raised:
        ckpt.write(run, 12, template[2], state)
    monkeypatch.undo()
    message = str(raised.value)
    assert raised.value.errno == expected_errno
    assert message.startswith(f"could not write checkpoint step_000000012 in {run}: ")
    assert "nothing already written was touched (newest checkpoint: step_000000010)" in message
    assert ("free space and resume" if expected_errno in (errno.ENOSPC, errno.EDQUOT) else "fix the cause") in message
    if expected_errno is not None:
        assert os.strerror(expected_errno) in message
    assert hostile.leftovers(run) == [] and hostile.steps_in(run) == [8, 10]
    for step in (8, 10):
        ckpt.verify(run / f"step_{step:09d}")


def test_an_interrupt_while_writing_propagates_and_leaves_no_temporary_folder(template, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(template[0], run)
    fail_on_call(monkeypatch, ckpt, "save_file", KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        ckpt.write(run, 12, template[2], {**template[3], "tokens": 12 * hostile.B})
    assert hostile.leftovers(run) == [] and hostile.steps_in(run) == [8, 10]


@pytest.mark.parametrize("failing_checkpoint", [2, 3, 5])
def test_a_safetensors_enospc_mid_run_stops_cleanly_and_resume_ends_bit_identical(template, tmp_path, monkeypatch,
                                                                                   capsys, failing_checkpoint):
    run = tmp_path / "run"
    fail_on_call(monkeypatch, ckpt, "save_file", FAILURES["SafetensorError ENOSPC"][0], call=failing_checkpoint)
    with pytest.raises(CheckpointWriteFailed) as raised:
        hostile.train(run, SEED)
    assert raised.value.errno == errno.ENOSPC
    written = [2 * i for i in range(1, failing_checkpoint)][-2:]
    assert hostile.steps_in(run) == written and hostile.leftovers(run) == []
    monkeypatch.undo()
    resumed = hostile.train(run, SEED, resume=True)
    assert f"resumed from {run / f'step_{written[-1]:09d}'}" in capsys.readouterr().err
    assert hostile.same_parameters(resumed.sae, template[1]), f"seed {SEED}"


# --- a real full disk ------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs mounted at tmp_path/disk (root only), unmounted after the test."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and mount permission): {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


FILL = """
import os
def fill_leaving(disk, free_bytes):
    # A filler file that leaves about free_bytes free on disk.
    stats = os.statvfs(disk)
    size = stats.f_bavail * stats.f_frsize - free_bytes
    with open(os.path.join(disk, "filler"), "wb") as handle:
        handle.write(b"\\0" * max(size, 0))
"""


def test_a_real_full_disk_stops_with_checkpoint_write_failed_and_resume_after_freeing_space_is_exact(small_disk):
    script = FILL + textwrap.dedent(f"""
        import errno, os, sys
        from pathlib import Path
        from helpers import hostile
        from sparsekit.errors import CheckpointWriteFailed
        from sparsekit.training import checkpoint as ckpt
        disk, reference_dir = Path({str(small_disk)!r}), Path({str(small_disk.parent / "reference")!r})
        reference = hostile.train(reference_dir, {SEED})
        size = sum(f.stat().st_size for f in (reference_dir / "step_000000010").iterdir())
        run = disk / "run"
        run.mkdir()
        (run / ".lock").touch()
        fill_leaving(disk, int(2.5 * size) + 8192)  # room for two checkpoints, not for a third beside them
        try:
            hostile.train(run, {SEED}, output_dir=str(disk.parent / "metrics"))
            sys.exit("the run did not fill the disk")
        except CheckpointWriteFailed as error:
            assert error.errno == errno.ENOSPC, error
            assert "No space left on device" in str(error) and "free space and resume" in str(error), error
            print("failed at", str(error).split()[4])
        assert hostile.leftovers(run) == [], hostile.leftovers(run)
        steps = hostile.steps_in(run)
        assert len(steps) == 2, steps
        for step in steps:
            ckpt.verify(run / f"step_{{step:09d}}")
        os.unlink(disk / "filler")
        resumed = hostile.train(run, {SEED}, resume=True, output_dir=str(disk.parent / "metrics"))
        assert hostile.same_parameters(resumed.sae, reference.sae), "resume after freeing space differs"
        print("exact after", steps)
    """)
    done = hostile.run_capped(["-c", script])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "failed at step_000000006" in done.stdout and "exact after [2, 4]" in done.stdout, done.stdout


def test_the_cli_on_a_real_full_disk_prints_one_line_and_no_traceback(small_disk):
    rng = np.random.default_rng(SEED)
    data = small_disk.parent / "x.npy"
    np.save(data, rng.standard_normal((4096, 32)).astype(np.float32))
    run = small_disk / "ckpt"
    flags = ["-m", "sparsekit", "train", "--data", str(data), "--architecture", "topk", "--n-latents", "512", "--k", "4",
             "--batch-size", "64", "--total-tokens", "1280", "--eval-tokens", "256", "--checkpoint-dir", str(run),
             "--checkpoint-every-tokens", "128", "--out", str(small_disk.parent / "out"), "--output-dir",
             str(small_disk.parent / "metrics"), "--no-progress", "--device", "cpu"]
    done = hostile.run_capped(["-c", FILL + textwrap.dedent(f"""
        import sys
        fill_leaving({str(small_disk)!r}, 150_000)  # less than one checkpoint of this dictionary (~200 kB)
        sys.argv = ["sparsekit"] + {flags[2:]!r}
        from sparsekit.cli import main
        main()
    """)])
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and len(lines) == 1, done.stderr
    assert lines[0].startswith(f"sparsekit train: could not write checkpoint step_000000002 in {run}: No space left")
    assert hostile.leftovers(run) == []

