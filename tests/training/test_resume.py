"""A run killed with SIGKILL and resumed ends bit-identical to one that never stopped."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

WORKER = Path(__file__).parents[1] / "helpers" / "resume_worker.py"


def _run(directory, *flags, wait=True):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(WORKER.parent), str(WORKER.parents[2])])}  # this tree's code
    process = subprocess.Popen([sys.executable, str(WORKER), str(directory), *flags], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if wait:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
        return out + err  # library messages ("resumed from ...") go to stderr
    return process


def _checkpoints(directory: Path):
    return sorted(p for p in directory.glob("step_*") if p.is_dir()) if directory.exists() else []


KILLS = int(os.environ.get("SPARSEKIT_RESUME_KILLS", "3"))  # `make fuzz` raises it


def _newest_step(directory: Path) -> int:
    found = _checkpoints(directory)
    return int(found[-1].name[5:]) if found else 0


def _writing(directory: Path) -> bool:
    return directory.exists() and any(".tmp-" in p.name for p in directory.iterdir())


def _kill(process, directory: Path, during_write: bool, delay: float) -> None:
    """SIGKILL the worker once it has passed its starting checkpoint: inside a checkpoint write
    (a temporary folder exists), or `delay` seconds later."""
    start_step, deadline = _newest_step(directory), time.time() + 120
    while time.time() < deadline and _newest_step(directory) <= start_step and process.poll() is None:
        time.sleep(0.01)
    moment = time.time() + delay
    while time.time() < deadline and process.poll() is None and (not _writing(directory) if during_write
                                                                 else time.time() < moment):
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"


def test_run_killed_several_times_resumes_to_bit_identical_parameters(tmp_path):
    uninterrupted, interrupted = tmp_path / "uninterrupted", tmp_path / "interrupted"
    _run(uninterrupted)

    seed = random.SystemRandom().randrange(2**31)
    rng = random.Random(seed)
    kill_steps = []
    for kill in range(KILLS):  # every other kill lands inside a checkpoint write
        flags = ("slow",) if kill == 0 else ("slow", "resume")
        _kill(_run(interrupted, *flags, wait=False), interrupted, during_write=kill % 2 == 1,
              delay=rng.uniform(0.0, 0.6))
        kill_steps.append(_newest_step(interrupted))
        assert not (interrupted / "final").exists()
    assert kill_steps == sorted(kill_steps) and kill_steps[-1] < 60, f"seed {seed}: {kill_steps}"

    out = _run(interrupted, "resume")
    assert "resumed from" in out and "done 60" in out
    a = load_file(str(uninterrupted / "final" / "sae.safetensors"))
    b = load_file(str(interrupted / "final" / "sae.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} (kill seed {seed}, newest steps at the kills {kill_steps})"
    assert (uninterrupted / "metrics.jsonl").read_text() == (interrupted / "metrics.jsonl").read_text()
    assert not [p.name for p in interrupted.iterdir() if p.name.startswith(".step_")]  # no leftovers
    print(f"\nresume: {KILLS} SIGKILLs survived (newest checkpoint at each: {kill_steps}), bit-identical")


def test_resume_without_checkpoints_starts_fresh_and_matches(tmp_path):
    _run(tmp_path / "a")
    _run(tmp_path / "b", "resume")
    a = load_file(str(tmp_path / "a" / "final" / "sae.safetensors"))
    b = load_file(str(tmp_path / "b" / "final" / "sae.safetensors"))
    assert all(torch.equal(a[n], b[n]) for n in a)
