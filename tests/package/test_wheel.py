"""The wheel anyone can install: built from the sdist alone, manylinux-tagged with its OpenMP
runtime inside, installed into a fresh venv outside the repository, where it trains a dictionary
on whichever instruction-set level the CPU runs (and on each lower one when forced).

One test, ~3 minutes on 2 cores: tools/build-wheel (the same script `make wheel` runs), a venv with
the locked CPU torch, `pip install` of the wheel, then a training run from a folder outside the repo.
"""
import json
import os
import re
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

from sparsekit.ops import backend
from sparsekit.ops.cpu.isa import ISA_LEVELS

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements" / "lock.txt"

TRAIN_OUTSIDE = textwrap.dedent("""
    import json, sys, torch, sparsekit
    from sparsekit.activations import TensorSource
    torch.manual_seed(0)
    features = torch.randn(64, 16)
    codes = torch.rand(4096, 64) * (torch.rand(4096, 64) < 0.05)
    x = codes @ features
    cfg = sparsekit.TrainConfig(batch_size=256, total_tokens=4096 * 16, eval_tokens=512, progress=False,
                                log_every=10**9)
    result = sparsekit.train(sparsekit.TopKSAE(16, 128, k=4), TensorSource(x), cfg)
    reference = sparsekit.ops.reference.topk_encode(x[:64], result.sae.W_enc, result.sae.encoder_bias(), 4)
    fast = sparsekit.topk_encode(x[:64], result.sae.W_enc, result.sae.encoder_bias(), 4)
    print(json.dumps({"file": sparsekit.__file__, "backends": sparsekit.backends(),
                      "fvu": float(result.metrics["fvu"]),
                      "matches_reference": bool(torch.equal(fast[1], reference[1])
                                                and torch.allclose(fast[0], reference[0]))}))
""")


def _run(command, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, command))}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="manylinux wheels are built on Linux")
def test_the_portable_wheel_installs_outside_the_repo_and_trains(tmp_path):
    dist = tmp_path / "dist"
    _run(["bash", str(ROOT / "tools" / "build-wheel"), str(dist)], env={**os.environ, "PYTHON": sys.executable},
         timeout=1500)
    (sdist,) = dist.glob("sparsekit-*.tar.gz")
    (wheel,) = dist.glob("sparsekit-*.whl")
    assert re.search(r"manylinux_\d+_\d+_" + os.uname().machine, wheel.name), wheel.name
    with tarfile.open(sdist) as archive:  # the sdist builds on its own: sources and CMake project inside
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert {"CMakeLists.txt", "setup.py", "csrc/module.cpp", "csrc/cpu_features.hpp", "LICENSE"} <= names
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    for level in ISA_LEVELS if os.uname().machine == "x86_64" else ("baseline",):
        assert any(re.fullmatch(rf"sparsekit/_C_{level}\..*\.so", name) for name in names), (level, names)
    assert any(re.fullmatch(r"sparsekit\.libs/libgomp.*\.so.*", name) for name in names), names  # OpenMP inside
    assert "sparsekit/kernels/encode.py" in names and not any(name.startswith("kernels/") for name in names)

    # Without PYTHONPATH throughout: one pointing at a checkout (its sparsekit.egg-info) makes pip
    # think sparsekit is installed already, so it skips the wheel and the import then fails.
    env = {k: v for k, v in os.environ.items() if k not in ("SPARSEKIT_ISA", "SPARSEKIT_BACKEND", "PYTHONPATH")}
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], env=env, timeout=300)
    python = venv / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "-q", "-c", str(LOCK)]
    _run(pip + ["torch"], env=env, timeout=900)  # the locked CPU torch first
    _run(pip + [str(wheel)], env=env, timeout=900)

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    script = outside / "train_tiny.py"
    script.write_text(TRAIN_OUTSIDE)
    for level in backend.CPU_ISA_LEVELS:  # the best (chosen by itself), then each lower one, forced
        run_env = dict(env, SPARSEKIT_ISA=level) if level != backend.CPU_ISA_LEVELS[0] else env
        report = _run([str(python), str(script)], cwd=outside, env=run_env, timeout=600).stdout
        found = json.loads(report.strip().splitlines()[-1])
        assert found["file"].startswith(str(venv)), found["file"]  # the installed wheel, not the repo
        assert found["backends"]["cpu"] == "cpp" and found["backends"]["cpu_isa"] == level
        assert found["matches_reference"]
        assert found["fvu"] < 0.6, found  # it learned: 0.43 measured here after 256 steps
