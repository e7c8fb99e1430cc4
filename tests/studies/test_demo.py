"""The synthetic demo (`sparsekit demo --synthetic`) trains a TopK dictionary that learns, and the
command line reports bad flags clearly. The default demo, the MNIST study, is tested in test_mnist_study.py."""
import subprocess
import sys

from sparsekit.studies import synthetic as demo
from sparsekit.studies.mnist_scan import one_thread


def test_synthetic_demo_training_reduces_unexplained_variance_and_recovers_directions(capsys, tmp_path):
    with one_thread():  # small matrices: a second OpenMP thread on a busy 2-core machine only slows it down
        metrics = demo.run_synthetic(d=32, n_true=64, n_latents=128, k=6, batch=512, lr=5e-3, total_tokens=512 * 300,
                                     log_every=100, seed=3, output_dir=str(tmp_path), progress=False)
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("step")]
    first_fvu = float(lines[0].split("fvu")[1].split()[0])
    assert metrics["step"] == 300 and metrics["l0"] <= 6
    assert metrics["fvu"] < 0.5 * first_fvu, (first_fvu, metrics)
    assert metrics["recovered"] >= 48, metrics  # of 64
    assert (tmp_path / "feature_density.png").is_file()


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "sparsekit", *args], capture_output=True, text=True, timeout=120)


def test_cli_rejects_unknown_commands_and_bad_demo_flags():
    unknown = _cli("nonsense")
    assert unknown.returncode == 2 and "unknown command 'nonsense'" in unknown.stderr
    bad_tokens = _cli("demo", "--synthetic", "--tokens", "0")
    assert bad_tokens.returncode == 2 and "--tokens must be at least one batch" in bad_tokens.stderr
    assert _cli().returncode == 2


def test_cli_prints_backends():
    result = _cli("backends")
    assert result.returncode == 0 and "'cpu'" in result.stdout
