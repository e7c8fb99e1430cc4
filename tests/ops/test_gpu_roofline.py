"""bench/gpu_roofline.py (``python bench/gpu.py --predict``): the roofline bounds of the Triton path's
kernels and of a TopK step, without a GPU, with a bench report's measured times beside them."""
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_roofline  # noqa: E402


def random_shape(seed):
    rng = random.Random(seed)
    k = rng.randrange(1, 129)
    return rng.randrange(256, 20000), rng.randrange(64, 5000), rng.randrange(k * 4, 300000), k


@pytest.mark.parametrize("seed", range(5))
def test_the_step_bound_is_at_least_its_encoder_gemm_and_the_fused_design_never_exceeds_it(seed):
    B, d, n, k = random_shape(seed)
    for dtype in ("fp32", "bf16"):
        built = gpu_roofline.step_kernels(B, d, n, k, dtype, "h100")
        fused = gpu_roofline.step_kernels(B, d, n, k, dtype, "h100", fused=True)
        gemm = built[0]
        assert gemm.flops == 2.0 * B * d * n
        assert sum(kern.seconds for kern in built) > gemm.seconds
        assert sum(kern.seconds for kern in fused) <= sum(kern.seconds for kern in built)
    bf16_gemm = gpu_roofline.step_kernels(B, d, n, k, "bf16", "h100")[0]
    assert gpu_roofline.bf16_gemm_bound(B, d, n, "h100") == pytest.approx(bf16_gemm.seconds)


def test_a_gemm_bound_is_its_flops_over_the_peak_when_compute_limits():
    kern = gpu_roofline.step_kernels(16384, 4096, 262144, 128, "bf16", "h100")[0]
    assert kern.limit == "compute"
    assert kern.seconds == pytest.approx(2 * 16384 * 4096 * 262144 / 989e12)


def test_the_h200_bounds_memory_kernels_lower_than_the_h100_and_compute_kernels_the_same():
    h100 = {kern.name: kern for kern in gpu_roofline.step_kernels(4096, 768, 32768, 32, "bf16", "h100")}
    h200 = {kern.name: kern for kern in gpu_roofline.step_kernels(4096, 768, 32768, 32, "bf16", "h200")}
    assert h200["sparse decode"].seconds == pytest.approx(h100["sparse decode"].seconds * 3.35 / 4.8)
    assert h200["encoder GEMM (writes pre)"].seconds == h100["encoder GEMM (writes pre)"].seconds


def test_predict_prints_the_table_with_measured_times_beside_the_bounds(tmp_path):
    report = {"meta": {}, "rows": [
        {"name": "TopK step (encode+decode+MSE+backward)", "shape": "B=64 d=32 n=256 k=4", "dtype": "bf16",
         "seconds": 0.002},
        {"name": "sparse_decode fwd", "shape": "B=64 d=32 n=256 k=4", "dtype": "fp32", "seconds": None}]}
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps(report))
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--predict", "--shapes", "64:32:256:4",
                             "--measured", str(path)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    step = [line for line in result.stdout.splitlines() if line.startswith("= TopK step (encode") and "bf16" in line]
    assert len(step) == 1 and "2000" in step[0], result.stdout
    rows = gpu_roofline.prediction_rows([(64, 32, 256, 4)], ["bf16"], "h100", {
        ("B=64 d=32 n=256 k=4", "bf16", "TopK step (encode+decode+MSE+backward)"): 0.002})
    as_built = next(r for r in rows if r["name"].startswith("= TopK step (encode"))
    assert as_built["measured_over_bound"] == pytest.approx(0.002 / (as_built["bound_us"] / 1e6))


def test_predict_refuses_a_file_that_is_not_a_bench_report(tmp_path):
    path = tmp_path / "notes.json"
    path.write_text("[1, 2")
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--predict", "--measured", str(path)],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.startswith(f"bench/gpu.py: --measured {path}: not a bench/gpu.py JSON report")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("shape", [(4096, 768, 32768, 32), (8192, 2048, 131072, 64), (16384, 4096, 262144, 128)])
def test_the_screened_float32_step_is_bounded_by_the_bf16_gemm_not_the_fma_units(shape):
    B, d, n, k = shape
    screened = gpu_roofline.step_kernels(B, d, n, k, "fp32", "h100", screened=True)
    plain = gpu_roofline.step_kernels(B, d, n, k, "fp32", "h100")
    assert screened[0].peak == gpu_roofline.CARDS["h100"]["bf16"] and screened[0].flops == 2.0 * B * d * n
    assert sum(kern.seconds for kern in screened) < sum(kern.seconds for kern in plain)
    assert sum(kern.seconds for kern in screened) > gpu_roofline.bf16_gemm_bound(B, d, n, "h100")
    candidates, measured = gpu_roofline.screen_candidates(d, n, k)
    assert k <= candidates <= n and measured == ((d, n, k) in gpu_roofline.SCREEN_CANDIDATES)
