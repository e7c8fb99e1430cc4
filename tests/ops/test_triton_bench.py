"""bench/gpu.py: every code path runs (tiny shapes; Triton's interpreter without a GPU), and without
a GPU the full benchmark refuses with a message, not a traceback."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
FLOORS = ["cuBLAS encoder GEMM (floor)", "device copy (floor)"]
TOPK_ROWS = ["topk_encode fwd", "topk_encode fwd, fused (screen off)",
             "topk_encode fwd, bf16 screen through a written a (passes)",
             "topk_encode fwd, unfused (GEMM writes pre + radix select)"]
STEP_ROWS = ["TopK step (encode+decode+MSE+backward)", "TopK step, fused (screen off)",
             "TopK step, bf16 screen through a written a (SPARSEKIT_GPU_SCREEN_SELECT=passes)",
             "TopK step, unfused (GEMM writes pre + radix select)"]
EXPECTED_OPS = FLOORS + TOPK_ROWS + [
    "batchtopk_encode fwd", "relu_encode fwd", "jumprelu_encode fwd", "sparse_decode fwd", "sparse_decode_coo fwd",
    "sparse_decode fwd+bwd (deterministic)", "sparse_decode fwd+bwd (atomic)", "ghost_grad_loss fwd+bwd (|D|=1)",
] + STEP_ROWS


def _bench(*args, tmp_path=None):
    env = {k: v for k, v in os.environ.items() if k not in ("SPARSEKIT_BACKEND", "TRITON_INTERPRET")}
    return subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), *args], capture_output=True, text=True,
                          env=env, timeout=600, cwd=ROOT)


def test_gpu_bench_runs_every_row_on_tiny_shapes(tmp_path):
    out = tmp_path / "bench.json"
    result = _bench("--tiny", "--shapes", "6:5:40:3", "--dtypes", "fp32", "--repeats", "1", "--json", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert [r["name"] for r in rows] == EXPECTED_OPS
    assert all(r["seconds"] and r["seconds"] > 0 for r in rows), rows
    # Notes only where the fused TopK ran (its rerun share); the unfused design never runs it. (The
    # screen's passes row runs fused here: auto screens CUDA tensors only.)
    fused = {"topk_encode fwd", "topk_encode fwd, fused (screen off)",
             "topk_encode fwd, bf16 screen through a written a (passes)"}
    assert all(r["note"].startswith("fused: ") and r["note"].endswith("% rows rerun") if r["name"] in fused
               else r["note"] == "" for r in rows), rows
    assert report["meta"]["interpreter"] == (not torch.cuda.is_available())
    step = rows[-4]
    assert step["vs_floor"] > 0 and step["vs_torch"] > 0 and step["vs_embedding_bag"] > 0
    # The table comes last: its final line is the TopK step's row.
    assert result.stdout.rstrip().splitlines()[-1].startswith("TopK step")


def test_gpu_bench_topk_only_times_the_floors_and_every_topk_design(tmp_path):
    out = tmp_path / "bench.json"
    result = _bench("--tiny", "--topk-only", "--shapes", "6:5:40:3", "--dtypes", "fp32", "--repeats", "1", "--json",
                    str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["name"] for r in rows] == FLOORS + TOPK_ROWS + STEP_ROWS
    assert all(r["seconds"] and r["seconds"] > 0 for r in rows), rows


def test_gpu_bench_without_a_gpu_says_so_instead_of_a_traceback():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the no-GPU message cannot show")
    result = _bench()
    assert result.returncode == 2
    assert "needs a CUDA device" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_gpu_bench_rejects_bad_shapes():
    result = _bench("--tiny", "--shapes", "4:3:2:5")
    assert result.returncode == 2 and "k <= n" in result.stderr
