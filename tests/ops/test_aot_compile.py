"""bench/aot_compile.py: every Triton kernel variant the launchers produce compiles for sm_80 and
sm_90 (Triton's own ptxas, no GPU), within each target's shared memory, without register spills in
the hot kernels beyond the known ones (``KNOWN_SPILLS``, each with its issue and figures).

The compile check itself runs in quick mode (one variant per kernel and dtype, a fresh Triton
cache: a cold run, as in CI); ``make gpu-check`` runs every variant and config. The other tests pin
the pieces it reads its verdict from: the launch capture, ptxas's report, the PTX scan, the verdict.
"""
import ast
import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "aot_compile.py"
KERNEL_DIR = ROOT / "kernels" / "sparsekit_kernels"


def _load_script():
    spec = importlib.util.spec_from_file_location("aot_compile", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("aot_compile", module)
    spec.loader.exec_module(module)
    return module


aot = _load_script()


def launched_kernels() -> set[str]:
    """Every @triton.jit function some launcher launches (``name[grid](...)``), read from the source:
    "<module>.<name>" for each kernel module. Helpers called inside kernels are not launched."""
    found = set()
    for path in KERNEL_DIR.glob("*.py"):
        tree = ast.parse(path.read_text())
        jitted = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
                  and any("jit" in ast.unparse(d) for d in node.decorator_list)}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id in jitted):
                found.add(f"{path.stem}.{node.func.value.id}")
    return found


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "report.json"
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--workers", "2", "--json", str(out)],
                            capture_output=True, text=True, cwd=ROOT, timeout=900)
    report = json.loads(out.read_text()) if out.exists() else None
    return result, report


def test_quick_check_compiles_every_launched_kernel_for_both_targets_without_problems(quick_report):
    result, report = quick_report
    assert report is not None, result.stderr[-3000:]
    print(result.stdout)  # the table, for `pytest -s`
    assert report["problems"] == [], "\n".join(report["problems"])
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [aot.result_from_json(r) for r in report["results"]]
    assert {r.variant.kernel for r in rows} == launched_kernels()
    # each float kernel once per dtype (the histogram chooser is int64 only; the screen's input pass
    # runs for float32 encoders only)
    for dtype in ("fp32", "bf16", "fp16"):
        assert {r.variant.kernel for r in rows if r.variant.dtype == dtype} == launched_kernels() - {
            "select._batch_choose_kernel"} - ({"screen._split_norms_kernel"} if dtype != "fp32" else set()), dtype
    per_variant = {}
    for r in rows:
        per_variant.setdefault(r.variant.key(), []).append(r.target)
        assert r.error is None and r.registers > 0 and 0 <= r.shared_bytes <= r.shared_limit
    assert all(sorted(targets) == ["sm_80", "sm_90"] for targets in per_variant.values())
    assert len(per_variant) == len({aot.quick_kind(r.variant) for r in rows})  # quick: one each
    # the fused TopK in each body: rounds (float32), packed keys (16-bit), the fused screen (bf16, float32 a)
    fused = {aot.quick_kind(r.variant) for r in rows if r.variant.kernel == "fused_topk._gemm_topk_kernel"}
    assert {("fused_topk._gemm_topk_kernel", "fp32", False, False), ("fused_topk._gemm_topk_kernel", "bf16", True, False),
            ("fused_topk._gemm_topk_kernel", "fp16", True, False),
            ("fused_topk._gemm_topk_kernel", "bf16", True, True)} <= fused


def test_16_bit_gemm_runs_on_tensor_cores_on_both_targets(quick_report):
    _, report = quick_report
    rows = [aot.result_from_json(r) for r in report["results"]]
    gemm = {(r.variant.dtype, r.target): r.tensor_cores for r in rows if r.variant.kernel == "gemm._gemm_kernel"}
    for dtype in ("bf16", "fp16"):
        assert gemm[dtype, "sm_90"] == "wgmma" and gemm[dtype, "sm_80"] == "mma"


def test_the_fused_topks_16_bit_bodies_run_on_tensor_cores_on_both_targets(quick_report):
    # packed keys (bf16, fp16) and the fused screen (bf16 inputs, float32 a): the epilogue must not
    # push the K loop off the tensor cores
    _, report = quick_report
    rows = [aot.result_from_json(r) for r in report["results"]]
    fused = [r for r in rows if r.variant.kernel == "fused_topk._gemm_topk_kernel" and r.variant.dtype != "fp32"]
    assert {aot.quick_kind(r.variant)[1:] for r in fused} >= {("bf16", True, False), ("fp16", True, False),
                                                             ("bf16", True, True)}
    for r in fused:
        assert r.tensor_cores == ("wgmma" if r.target == "sm_90" else "mma"), (aot.quick_kind(r.variant), r.target)


def test_the_roofline_prices_the_fused_epilogue_within_one_instruction_per_entry_of_its_sm90_sass(
        quick_report, tmp_path):
    # bench/gpu_roofline.py counts the fused kernel's integer work per tile entry; here that count
    # meets the compiled code at the bench shapes' KT = 3 with the next key: the bf16 TopK's variant
    # and the fp32 screen's, their integer/logic instructions after the K loop read off nvdisasm.
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_roofline

    _, report = quick_report
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    result = subprocess.run([sys.executable, str(SCRIPT), "--epilogue-of", str(path), "--kt", "3"],
                            capture_output=True, text=True, cwd=ROOT, timeout=600, env=aot._child_env(False))
    assert result.returncode == 0, result.stderr[-2000:]
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    assert {c["value_f32"] for c in counts} == {False, True}
    for c in counts:
        model = gpu_roofline.packed_epilogue_ops(3, 1, screen=c["value_f32"])
        assert abs(c["per_entry"]["alu"] - model) <= 1.0, (c, model)
        assert c["counts"]["total"] > c["counts"]["alu"] > 0


def test_the_fused_topks_16_bit_bodies_fit_two_blocks_per_sm_on_sm90(quick_report):
    # The roofline's bound column lets one block's epilogue run during another's MMAs: that needs two
    # blocks of the fused kernel resident per SM (bench/gpu_roofline.compiled_fused_kernel).
    _, report = quick_report
    rows = [aot.result_from_json(r) for r in report["results"]]
    fused = [r for r in rows if r.variant.kernel == "fused_topk._gemm_topk_kernel" and r.target == "sm_90"
             and r.variant.dtype in ("bf16", "fp16")]
    assert fused
    for r in fused:
        assert r.blocks_per_sm >= 2, (aot.quick_kind(r.variant), r.registers, r.shared_bytes)


def test_blocks_per_sm_follows_registers_warps_and_shared_memory():
    # the fused bf16 kernel's sm_90 figures (115 registers, 8 warps, 96 KB): two blocks per SM
    assert aot.blocks_per_sm(115, 8, 96 * 1024, "sm_90") == 2
    assert aot.blocks_per_sm(190, 8, 64 * 1024, "sm_80") == 1    # registers: 192 x 256 = 49,152 of 65,536
    assert aot.blocks_per_sm(32, 4, 120 * 1024, "sm_90") == 1    # shared memory
    assert aot.blocks_per_sm(32, 4, 0, "sm_90") == 16            # warps: 64 per SM
    assert aot.blocks_per_sm(16, 1, 0, "sm_90") == 32            # the block limit
    assert aot.blocks_per_sm(129, 8, 0, "sm_90") == 1            # 136 x 32 per warp, rounded to 256


def test_the_table_has_one_row_per_compile_and_every_column(quick_report):
    result, report = quick_report
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("| kernel |"))
    for column in ("dtype", "config", "target", "registers", "spills", "shared memory", "tensor cores", "blocks/SM"):
        assert column in header
    rows = [line for line in lines if line.startswith("| ") and line.split("|")[1].strip().count(".") == 1]
    assert len(rows) == len(report["results"])


def _toy_kernel(x_ptr, n, m, scale, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(x_ptr + offsets, tl.load(x_ptr + offsets) * scale, mask=offsets < n + m)


def test_capture_types_each_argument_as_triton_would_on_a_gpu():
    rng = random.Random()
    recorder = aot.LaunchRecorder()
    dtype = rng.choice([torch.float32, torch.bfloat16, torch.float16])
    n = 16 * rng.randrange(1, 1000)
    m = 16 * rng.randrange(1, 1000) + rng.randrange(2, 16)  # never a multiple of 16, never 1
    block = rng.choice([64, 128, 256])
    x = torch.zeros(64, dtype=dtype)
    recorder.record(_toy_kernel, (x, n, m, 0.5), dict(BLOCK=block, num_warps=2, num_stages=1), first_config=True)
    recorder.record(_toy_kernel, (x, n, 1, 0.5), dict(BLOCK=block, num_warps=2, num_stages=1), first_config=False)
    first, second = recorder.variants.values()
    triton_dtype = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    assert dict(first.signature) == dict(x_ptr=f"*{triton_dtype}", n="i32", m="i32", scale="fp32", BLOCK="constexpr")
    assert dict(first.constexprs) == dict(BLOCK=block) and first.divisible == ("x_ptr", "n")
    assert first.dtype == triton_dtype and first.config == f"BLOCK={block} w2 s1" and first.flags == "ragged:m"
    assert dict(second.signature)["m"] == "constexpr" and dict(second.constexprs) == dict(m=1, BLOCK=block)
    x_offset = x[1:]  # 2 or 4 bytes past a 16-byte boundary: the pointer loses its alignment
    recorder.record(_toy_kernel, (x_offset, n, m, 0.5), dict(BLOCK=block, num_warps=2, num_stages=1),
                    first_config=True)
    assert list(recorder.variants.values())[-1].divisible == ("n",)


def test_quick_selection_keeps_the_first_config_of_each_kernel_and_dtype():
    def variant(kernel, dtype, warps, first):
        return aot.Variant(kernel, (("a", f"*{dtype}"),), (), (), warps, 3, first)

    order = [variant("m.k1", "fp32", 8, True), variant("m.k1", "fp32", 4, False), variant("m.k1", "bf16", 4, True),
             variant("m.k2", "fp32", 2, True), variant("m.k1", "fp32", 2, True)]
    assert aot.quick_selection(order) == [order[0], order[2], order[3]]


def test_ptxas_report_gives_registers_spills_and_stack():
    rng = random.Random()
    registers, stores, loads, stack = rng.randrange(16, 256), rng.randrange(1, 4096), rng.randrange(1, 4096), \
        rng.randrange(0, 8192)
    log = ("ptxas info    : 0 bytes gmem\nptxas info    : Compiling entry function '_k' for 'sm_80'\n"
           "ptxas info    : Function properties for _k\n"
           f"    {stack} bytes stack frame, {stores} bytes spill stores, {loads} bytes spill loads\n"
           f"ptxas info    : Used {registers} registers, used 1 barriers, {stack} bytes cumulative stack size\n")
    assert aot.parse_ptxas_report(log) == dict(registers=registers, spill_stores=stores, spill_loads=loads,
                                               stack_bytes=stack)
    with pytest.raises(ValueError, match="register count"):
        aot.parse_ptxas_report("")  # a cache hit runs no ptxas: no report, no silent zeros


def test_tensor_core_scan_reads_instructions_not_comments():
    wgmma = "\twgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {%f1}, %rd1, %rd2, p, 1, 1, 0, 1;"
    mma = "\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1}, {%r1}, {%r2}, {%f2};"
    fma = "\tfma.rn.f32 %f3, %f1, %f2, %f3;"
    assert aot.tensor_core_instructions("\n".join([fma, wgmma, mma])) == "wgmma"
    assert aot.tensor_core_instructions("\n".join([fma, mma])) == "mma"
    assert aot.tensor_core_instructions("\n".join([fma, "// no mma.sync here", "\t// wgmma.mma_async"])) == "no"


def test_verdict_flags_errors_shared_overflow_and_hot_spills_only():
    rng = random.Random()
    hot = sorted(aot.HOT_KERNELS)[rng.randrange(len(aot.HOT_KERNELS))]

    def result(kernel, target="sm_90", **fields):
        variant = aot.Variant(kernel, (("a", "*bf16"),), (("PRECISION", "ieee"),), (), 4, 3, True)
        base = dict(registers=rng.randrange(16, 255), spill_stores=0, spill_loads=0, stack_bytes=0,
                    shared_bytes=rng.randrange(0, 160 * 1024), tensor_cores="no")
        return aot.Result(variant, target, **{**base, **fields})

    limit = aot.TARGETS["sm_80"][1]
    fine = [result(hot), result("ghost._ghost_rows_kernel", spill_stores=rng.randrange(1, 999)),
            result(hot, "sm_80", shared_bytes=limit)]
    bad = [result(hot, spill_stores=rng.randrange(1, 999)), result(hot, "sm_80", shared_bytes=limit + 1),
           aot.Result(fine[0].variant, "sm_80", error="CompilationError: out of resources")]
    problems, known = aot.check(fine + bad)
    assert len(problems) == 3 and known == []
    assert "spilled in a hot kernel" in problems[0] and "shared memory" in problems[1] and "compile error" in problems[2]


def test_verdict_accepts_a_known_spill_up_to_its_figure(monkeypatch):
    rng = random.Random()
    allowed = rng.randrange(8, 2048)
    monkeypatch.setattr(aot, "KNOWN_SPILLS", {("gemm._gemm_kernel", "fp32", "ieee", "aligned"): {"sm_90": allowed}})
    variant = aot.Variant("gemm._gemm_kernel", (("a", "*fp32"),), (("PRECISION", "ieee"),), (), 8, 3, True)
    within, beyond = (aot.Result(variant, "sm_90", 255, spill, spill, spill, 0, "no") for spill in (allowed, allowed + 1))
    elsewhere = aot.Result(variant, "sm_80", 255, 4, 4, 4, 0, "no")  # the entry names sm_90 only
    problems, known = aot.check([within, beyond, elsewhere])
    assert len(known) == 1 and len(problems) == 2 and "known issue allows" in problems[0]


def test_a_known_spill_that_no_compile_shows_any_more_is_called_stale(monkeypatch):
    # KNOWN_SPILLS never hides a fixed kernel: an entry whose compiles all came out clean is named.
    rng = random.Random()
    key = ("sparse._segment_sum_kernel", "fp32", "-", "ragged")
    monkeypatch.setattr(aot, "KNOWN_SPILLS", {key: {"sm_80": 96, "sm_90": 64}})
    ragged = aot.Variant(key[0], (("out_ptr", "*fp32"), ("S", "i32")), (), ("out_ptr",), 4, 3, True)
    assert ragged.known_key == key
    spill = rng.randrange(1, 64)
    results = [aot.Result(ragged, "sm_80", 64, 0, 0, 0, 0, "no"), aot.Result(ragged, "sm_80", 64, 0, 0, 0, 0, "no"),
               aot.Result(ragged, "sm_90", 64, 0, 0, 0, 0, "no"), aot.Result(ragged, "sm_90", 64, spill, 0, 0, 0, "no")]
    assert aot.stale_known(results) == [f"{' '.join(key)} sm_80: no spill any more"]
    aligned = aot.Variant(key[0], (("out_ptr", "*fp32"), ("S", "i32")), (), ("out_ptr", "S"), 4, 3, True)
    assert aligned.layout == "aligned" and aot.stale_known([aot.Result(aligned, "sm_80", 64, 0, 0, 0, 0, "no")]) == []


def test_bad_arguments_are_refused_by_name():
    with pytest.raises(ValueError, match="workers"):
        aot.run_check(quick=True, workers=0)
    with pytest.raises(ValueError, match="targets"):
        aot.run_check(quick=True, targets=("sm_75",))
    result = subprocess.run([sys.executable, str(SCRIPT), "--workers", "0"], capture_output=True, text=True,
                            cwd=ROOT, timeout=60)
    assert result.returncode == 2 and "--workers" in result.stderr and "Traceback" not in result.stderr
