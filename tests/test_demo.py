"""The demo trains a TopK dictionary that learns, and the command line reports bad flags clearly."""
import subprocess
import sys

from sparsekit import demo


def test_demo_training_reduces_unexplained_variance_and_recovers_directions(capsys):
    metrics = demo.run(d=32, n_true=64, n_latents=128, k=6, batch=512, lr=5e-3, max_steps=300, log_every=100, seed=3)
    first = capsys.readouterr().out.splitlines()[1]
    first_fvu = float(first.split("fvu")[1].split()[0])
    assert metrics["step"] == 300 and metrics["l0"] <= 6
    assert metrics["fvu"] < 0.5 * first_fvu, (first_fvu, metrics)
    assert metrics["recovered"] >= 48, metrics  # of 64


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "sparsekit", *args], capture_output=True, text=True, timeout=120)


def test_cli_rejects_unknown_commands_and_bad_demo_flags():
    unknown = _cli("nonsense")
    assert unknown.returncode == 2 and "unknown command 'nonsense'" in unknown.stderr
    bad_steps = _cli("demo", "--steps", "0")
    assert bad_steps.returncode == 2 and "--steps must be at least 1" in bad_steps.stderr
    assert _cli().returncode == 2


def test_cli_prints_backends():
    result = _cli("backends")
    assert result.returncode == 0 and "'cpu'" in result.stdout
