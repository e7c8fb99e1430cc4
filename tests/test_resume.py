"""A run killed with SIGKILL and resumed ends bit-identical to one that never stopped."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("resume_worker.py")


def _run(directory, *flags, wait=True):
    env = {**os.environ, "PYTHONPATH": str(WORKER.parent)}
    process = subprocess.Popen([sys.executable, str(WORKER), str(directory), *flags], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if wait:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
        return out
    return process


def _checkpoints(directory: Path):
    return sorted(p for p in directory.glob("step_*") if p.is_dir()) if directory.exists() else []


def test_killed_run_resumes_to_bit_identical_parameters(tmp_path):
    uninterrupted, interrupted = tmp_path / "uninterrupted", tmp_path / "interrupted"
    _run(uninterrupted)

    process = _run(interrupted, "slow", wait=False)
    deadline = time.time() + 120
    while time.time() < deadline and not any(int(p.name[5:]) >= 10 for p in _checkpoints(interrupted)):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (interrupted / "final").exists(), "the run finished before it could be killed"
    killed_at = max(int(p.name[5:]) for p in _checkpoints(interrupted))
    assert 10 <= killed_at < 60

    out = _run(interrupted, "resume")
    assert "resumed from" in out and "done 60" in out
    a = load_file(str(uninterrupted / "final" / "sae.safetensors"))
    b = load_file(str(interrupted / "final" / "sae.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert (uninterrupted / "metrics.jsonl").read_text() == (interrupted / "metrics.jsonl").read_text()


def test_resume_without_checkpoints_starts_fresh_and_matches(tmp_path):
    _run(tmp_path / "a")
    _run(tmp_path / "b", "resume")
    a = load_file(str(tmp_path / "a" / "final" / "sae.safetensors"))
    b = load_file(str(tmp_path / "b" / "final" / "sae.safetensors"))
    assert all(torch.equal(a[n], b[n]) for n in a)
