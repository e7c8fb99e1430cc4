"""bench/gpu_roofline.py (``python bench/gpu.py --predict``): the roofline bounds of the Triton path's
kernels and of a TopK step, without a GPU, with a bench report's measured times beside them."""
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_roofline  # noqa: E402


def random_shape(seed):
    rng = random.Random(seed)
    k = rng.randrange(1, 129)
    return rng.randrange(256, 20000), rng.randrange(64, 5000), rng.randrange(k * 4, 300000), k


@pytest.mark.parametrize("seed", range(5))
def test_the_step_bound_is_at_least_its_encoder_gemm_and_fusing_the_selection_never_exceeds_the_unfused_one(seed):
    B, d, n, k = random_shape(seed)
    for dtype in ("fp32", "bf16"):
        unfused = gpu_roofline.step_kernels(B, d, n, k, dtype, "h100", "unfused")
        fused = gpu_roofline.step_kernels(B, d, n, k, dtype, "h100", "fused")
        for design in (unfused, fused):
            gemm = design[0]
            assert gemm.flops == 2.0 * B * d * n
            assert sum(kern.seconds for kern in design) > gemm.seconds
        # Where auto takes the fused kernel (KT <= 16 of 128 columns), its keys are fewer bytes than
        # pre, and the merge reads them once where the selection reads pre five times.
        if gpu_roofline.fused_kt(n, k)[0] <= 16:
            assert fused[0].bytes < unfused[0].bytes and fused[1].bytes < unfused[1].bytes
    bf16_gemm = gpu_roofline.step_kernels(B, d, n, k, "bf16", "h100", "unfused")[0]
    assert gpu_roofline.bf16_gemm_bound(B, d, n, "h100") == pytest.approx(bf16_gemm.seconds)


@pytest.mark.parametrize("shape", [(4096, 768, 32768, 32), (8192, 2048, 131072, 64), (16384, 4096, 262144, 128)])
def test_the_fused_encoder_is_priced_with_its_epilogue_rounds_and_expected_reruns(shape):
    B, d, n, k = shape
    kt, rerun = gpu_roofline.fused_kt(n, k)
    assert 1 <= kt < k and 0 < rerun <= 0.01
    gemm, merge, again = gpu_roofline.fused_kernels(B, d, n, k, "bf16", "h100")
    tiles = -(-n // gpu_roofline.FUSED_BLOCK_N)
    assert merge.bytes == B * tiles * (kt + 1) * 8 + B * k * (2 + 8)
    # bf16: packed keys, 3 operations per round, 3 for the next key, 4 for the key itself, on the
    # CUDA cores' integer pipes of the GEMM's own kernel
    assert gemm.int_ops == B * n * (3 * kt + 3 + 4) and gemm.int_peak == gpu_roofline.CARDS["h100"]["int32"]
    assert again.flops == pytest.approx(rerun * 2.0 * B * d * n)
    assert again.int_ops == pytest.approx(rerun * B * n * (3 * min(k, 128, 4 * kt) + 4))
    # float32 keeps the round-by-round epilogue: 6 per round, next included
    fp32_gemm = gpu_roofline.fused_kernels(B, d, n, k, "fp32", "h100")[0]
    assert fp32_gemm.int_ops == B * n * (6 * (kt + 1) + 6)


def test_a_kernels_bound_is_its_busiest_unit_and_its_serial_time_adds_the_integer_work_to_the_flops():
    kern = gpu_roofline.Kernel("k", flops=10.0, bytes=3.0, peak=1.0, bandwidth=1.0, int_ops=4.0, int_peak=1.0)
    assert kern.seconds == 10.0 and kern.limit == "compute" and kern.serial_seconds == 14.0
    busy = gpu_roofline.Kernel("k", flops=2.0, bytes=3.0, peak=1.0, bandwidth=1.0, int_ops=8.0, int_peak=2.0)
    assert busy.seconds == 4.0 and busy.limit == "int32" and busy.serial_seconds == 6.0
    memory = gpu_roofline.Kernel("k", flops=2.0, bytes=30.0, peak=1.0, bandwidth=1.0, int_ops=8.0, int_peak=2.0)
    assert memory.seconds == memory.serial_seconds == 30.0 and memory.limit == "memory"
    # the fused bf16 GEMM at d=768: the epilogue's rounds take 0.7x the MMAs' time; the bound is the MMAs'
    gemm = gpu_roofline.fused_kernels(4096, 768, 32768, 32, "bf16", "h100")[0]
    assert gemm.limit == "compute" and gemm.seconds == pytest.approx(2 * 4096 * 768 * 32768 / 989e12)
    assert gemm.serial_seconds == pytest.approx(gemm.seconds + gemm.int_ops / 16.7e12)


def test_the_step_counts_grad_x_and_its_transposed_copy_only_when_x_requires_grad():
    plain = [kern.name for kern in gpu_roofline.step_kernels(4096, 768, 32768, 32, "bf16")]
    with_x = [kern.name for kern in gpu_roofline.step_kernels(4096, 768, 32768, 32, "bf16", grad_x=True)]
    assert not any("grad x" in name or "transposed copy" in name for name in plain)
    assert with_x[:len(plain)] == plain
    assert with_x[len(plain):] == ["encoder bwd: W_enc transposed copy", "encoder bwd: grad x (gathered W_enc columns)"]


def test_bench_gpus_step_asks_the_encoder_backward_for_no_grad_x(monkeypatch):
    # What the model leaves out must be what the step skips: bench/gpu.py's step (x is data) runs the
    # sparse encoder's backward with need_x False, so neither the copy nor the gather happens.
    pytest.importorskip("triton")
    from helpers.triton_device import on_device, spy_on_grad_x_requests

    import sparsekit

    asked = spy_on_grad_x_requests(monkeypatch)
    monkeypatch.setenv("SPARSEKIT_BACKEND", "triton")
    gen = torch.Generator().manual_seed(0)
    x, W_enc, b_enc, W_dec, b_dec = on_device(  # CUDA where there is one, else the interpreter
        torch.randn(8, 16, generator=gen), torch.randn(16, 32, generator=gen), torch.randn(32, generator=gen),
        torch.randn(32, 16, generator=gen), torch.randn(16, generator=gen))
    for needs in (False, True):
        leaves = [t.clone().requires_grad_() for t in (W_enc, b_enc, W_dec, b_dec)]
        inputs = x.clone().requires_grad_(needs)
        codes = sparsekit.topk_encode(inputs, leaves[0], leaves[1], 4)
        y = sparsekit.sparse_decode(codes.values, codes.indices, leaves[2], leaves[3])
        (y - inputs).float().pow(2).sum(-1).mean().backward()
    assert asked == [False, True]


@pytest.mark.parametrize("shape", [(4096, 768, 32768, 32), (8192, 2048, 131072, 64), (16384, 4096, 262144, 128)])
def test_the_fused_screen_replaces_the_passes_over_a_with_keys_and_epilogue_rounds(shape):
    B, d, n, k = shape
    fused = gpu_roofline.step_kernels(B, d, n, k, "fp32", "h100", "screened")
    passes = gpu_roofline.step_kernels(B, d, n, k, "fp32", "h100", "screened passes")
    gemm, merge, again = fused[:3]
    kt = gpu_roofline._screen_kt(n, k)
    tiles = -(-n // gpu_roofline.FUSED_BLOCK_N)
    assert gemm.peak == gpu_roofline.CARDS["h100"]["bf16"] and gemm.flops == 2.0 * B * d * n
    assert gemm.bytes == 2 * (B * d + d * n) + B * tiles * (kt + 1) * 8  # a [B, n] is never written
    assert gemm.int_ops == B * n * (3 * kt + 3 + 3)
    assert not any("passes over a" in kern.name for kern in fused)
    assert any("passes over a" in kern.name for kern in passes)
    # both designs do the same work around the selection: the recompute, the backward; the inputs'
    # norms and bf16 copies in one pass each where fused
    assert [kern.name for kern in fused[5:]] == [kern.name for kern in passes[4:]]
    assert fused[3].name == passes[2].name and fused[4].bytes == (B * d + d * n) * 6 < passes[3].bytes
    assert sum(kern.seconds for kern in fused) < sum(kern.seconds for kern in passes)
    c, _ = gpu_roofline.screen_candidates(d, n, k)
    assert 0 <= gpu_roofline._overflow_share(n, c, kt) <= 0.02
    assert len(gpu_roofline._encoder_part(fused, "screened")) == 5


def test_the_default_design_follows_the_screen_rule_for_float32_and_is_fused_otherwise():
    assert gpu_roofline.default_encoder(2048, 131072, 64, 8192, "fp32") == "screened"
    assert gpu_roofline.default_encoder(2048, 131072, 64, 8192, "bf16") == "fused"
    assert gpu_roofline.default_encoder(64, 1000, 32, 16, "fp32") == "fused"  # n < 64 k: no screen
    with pytest.raises(ValueError, match="encoder must be"):
        gpu_roofline.step_kernels(16, 8, 64, 4, "bf16", "h100", "sideways")


def test_a_gemm_bound_is_its_flops_over_the_peak_when_compute_limits():
    kern = gpu_roofline.step_kernels(16384, 4096, 262144, 128, "bf16", "h100", "unfused")[0]
    assert kern.limit == "compute"
    assert kern.seconds == pytest.approx(2 * 16384 * 4096 * 262144 / 989e12)


def test_the_h200_bounds_memory_kernels_lower_than_the_h100_and_compute_kernels_the_same():
    h100 = {kern.name: kern for kern in gpu_roofline.step_kernels(4096, 768, 32768, 32, "bf16", "h100", "unfused")}
    h200 = {kern.name: kern for kern in gpu_roofline.step_kernels(4096, 768, 32768, 32, "bf16", "h200", "unfused")}
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
    screened = gpu_roofline.step_kernels(B, d, n, k, "fp32", "h100", "screened")
    plain = gpu_roofline.step_kernels(B, d, n, k, "fp32", "h100", "unfused")
    assert screened[0].peak == gpu_roofline.CARDS["h100"]["bf16"] and screened[0].flops == 2.0 * B * d * n
    assert sum(kern.seconds for kern in screened) < sum(kern.seconds for kern in plain)
    assert sum(kern.seconds for kern in screened) > gpu_roofline.bf16_gemm_bound(B, d, n, "h100")
    candidates, measured = gpu_roofline.screen_candidates(d, n, k)
    assert k <= candidates <= n and measured == ((d, n, k) in gpu_roofline.SCREEN_CANDIDATES)


def _aot_row(registers, shared, value_f32=False, block_m=128, warps=8, target="sm_90"):
    constexprs = [["KT", 3], ["NEXT", True], ["PACK", True], ["RESTORE", not value_f32], ["VALUE_F32", value_f32],
                  ["BLOCK_K", 64], ["BLOCK_M", block_m], ["BLOCK_N", 128], ["GROUP_M", 8]]
    variant = dict(kernel="fused_topk._gemm_topk_kernel", signature=[["a_ptr", "*bf16"], ["keys_ptr", "*i64"]],
                   constexprs=constexprs, divisible=[], num_warps=warps, num_stages=3, first_config=True)
    return dict(variant=variant, target=target, registers=registers, shared_bytes=shared, error=None)


def test_the_occupancy_note_reads_the_fused_kernels_default_tile_from_the_newest_compile_report(tmp_path):
    assert "no AOT compile report" in gpu_roofline.occupancy_note(tmp_path)
    old = [_aot_row(115, 96 * 1024), _aot_row(116, 96 * 1024, value_f32=True)]
    (tmp_path / "2026-01-01-aot-compile.json").write_text(json.dumps({"results": old}))
    # the newest report wins; its default tile (128 x 128, 8 warps) over another config; sm_80 ignored
    new = [_aot_row(60, 40 * 1024, block_m=64, warps=4), _aot_row(200, 96 * 1024), _aot_row(90, 8, target="sm_80"),
           _aot_row(116, 96 * 1024, value_f32=True)]
    (tmp_path / "2026-02-01-aot-compile-quick.json").write_text(json.dumps({"results": new}))
    got = gpu_roofline.compiled_fused_kernel(False, "sm_90", tmp_path)
    assert got["report"] == "2026-02-01-aot-compile-quick.json" and got["registers"] == 200
    assert got["blocks_per_sm"] == 1 and "BLOCK_M=128" in got["config"]
    assert gpu_roofline.compiled_fused_kernel(True, "sm_90", tmp_path)["blocks_per_sm"] == 2
    note = gpu_roofline.occupancy_note(tmp_path).splitlines()
    assert "1 blocks per SM" in note[0] and "serial column" in note[0]
    assert "2 blocks per SM" in note[1] and "the bound column" in note[1]


def test_an_saes_step_adds_only_the_centring_pass_and_one_gemv_over_w_enc_for_b_dec():
    # ops.autograd.centered_input: x - b_dec, and b_dec's gradient -W_enc @ grad b_enc; no dense
    # [d, n] gradient, no grad x
    B, d, n, k = 4096, 768, 32768, 32
    plain = gpu_roofline.step_kernels(B, d, n, k, "bf16")
    sae = gpu_roofline.step_kernels(B, d, n, k, "bf16", pre_bias=True)
    extra = [kern for kern in sae if kern.name not in {p.name for p in plain}]
    assert [kern.name for kern in extra] == ["pre_bias: x - b_dec", "pre_bias bwd: -W_enc @ grad b_enc (GEMV)"]
    assert extra[0].bytes == 2 * B * d * 2 and extra[1].bytes == d * n * 2 + n * 2
    assert sum(kern.seconds for kern in extra) < 0.1 * gpu_roofline.bf16_gemm_bound(B, d, n)
