"""bench/gpu_fused_tune.py: the fused TopK's tile configs, pruned without a GPU and timed on one. Here,
without a GPU: the prune's discovery (one launch per grid config, as the launcher builds it), the
ranking and the winners it prints, the bad-argument lines and the no-GPU exit."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_fused_tune.py"
sys.path.insert(0, str(ROOT / "bench"))
import gpu_fused_tune  # noqa: E402

from sparsekit.kernels import fused_topk  # noqa: E402


def child_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SPARSEKIT_BACKEND")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return dict(env, OMP_NUM_THREADS="1", **extra)


def test_the_prune_discovers_one_fused_launch_per_grid_config_at_the_middle_shapes_kt(tmp_path):
    out = tmp_path / "variants.json"
    result = subprocess.run([sys.executable, str(SCRIPT), "--discover-to", str(out)], capture_output=True, text=True,
                            env=child_env(TRITON_INTERPRET="1"), cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    variants = json.loads(out.read_text())
    assert len(variants) == len(fused_topk.GRID) == 72
    seen = set()
    _, _, n, k = gpu_fused_tune.PRUNE_SHAPE
    for v in variants:
        meta = dict(v["constexprs"])
        assert v["kernel"] == "fused_topk._gemm_topk_kernel"
        assert dict(v["signature"])["a_ptr"] == "*bf16"
        assert meta["UPCAST"] is False and meta["NEXT"] is True  # as on a GPU, with the overflow check
        assert meta["KT"] == fused_topk.choose_kt(n, k, meta["BLOCK_N"])
        assert {"M", "N", "K"} <= set(v["divisible"])  # aligned, as the real shapes are
        seen.add((meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"], v["num_warps"], v["num_stages"]))
    assert seen == {tuple(t.values()) for t in fused_topk.GRID}


def fake_result(rows, gemm_ms=10.0):
    return dict(shape=dict(B=8192, d=2048, n=131072, k=64), tune_key=["bfloat16", "ieee", 3, 8192, 131072, 2048],
                gemm_ms=gemm_ms, compile_s=1.0, rows=rows)


def fake_row(tile, ms, default=False):
    return dict(config=gpu_fused_tune.config_name(tile), tile=tile, default=default, kt=3, rows_rerun=0.001, ms=ms,
                x_gemm=ms / 10.0, rows_differing=0, rows_wrong=0, note="")


def test_the_table_ranks_by_time_and_the_winner_is_the_fastest_config_whose_check_was_exact():
    rng = random.Random()
    tiles = rng.sample(fused_topk.CANDIDATES, 6)
    times = rng.sample(range(100, 1000), 6)
    rows = [fake_row(t, ms / 10, default=i == 0) for i, (t, ms) in enumerate(zip(tiles, times))]
    fastest = min(range(6), key=lambda i: times[i])
    rows[fastest]["rows_differing"] = rows[fastest]["rows_wrong"] = 3  # a wrong selection: never the winner
    rounding = next(i for i in range(6) if i != fastest)
    rows[rounding]["rows_differing"] = 2  # other rounding than the default tile, selection exact: may win
    rows.append(dict(config="untimed", tile=tiles[0], ms=None, note="not timed: --budget-s spent"))
    table = gpu_fused_tune.ranked_table(fake_result(rows))
    ranked = [float(line.split()[5]) for line in table.splitlines()[2:] if line.split()[0].isdigit()]
    assert len(ranked) == 6 and ranked == sorted(ranked)  # rank, config (3 words), KT, ms
    assert "3 rows WRONG" in table and "exact; 2 rows round unlike the default tile" in table
    assert "not timed: --budget-s spent" in table and "<- default" in table
    (line,) = gpu_fused_tune.winners([fake_result(rows)])
    second = min((i for i in range(6) if i != fastest), key=lambda i: times[i])
    assert f"dict({', '.join(f'{k}={v}' for k, v in tiles[second].items())})" in line
    assert line.strip().startswith("('bfloat16', 'ieee', 3, 8192, 131072, 2048):")
    tuned = eval("{" + line.split("#")[0] + "}")  # the printed line is the TUNED entry as Python
    assert tuned == {("bfloat16", "ieee", 3, 8192, 131072, 2048): tiles[second]}


def test_each_tile_is_warmed_at_its_first_pass_and_its_rerun():
    shape = (8192, 2048, 131072, 64)
    jobs = gpu_fused_tune.warm_jobs(shape, fused_topk.CANDIDATES)
    assert len(jobs) == 2 * len(fused_topk.CANDIDATES)
    for first, rerun in zip(jobs[::2], jobs[1::2]):
        kt = fused_topk.choose_kt(131072, 64, first["tile"]["BLOCK_N"])
        assert (first["kt"], first["next"], rerun["kt"]) == (kt, True, min(64, first["tile"]["BLOCK_N"], 4 * kt))


@pytest.mark.parametrize("argv, message", [
    (["--shapes", "8192:2048:131072"], "B:d:n:k"),
    (["--shapes", "4:8:16:32"], "k=32 exceeds n=16"),
    (["--budget-s", "0"], "--budget-s must be positive"),
])
def test_bad_arguments_get_one_line_naming_them(argv, message, capsys):
    with pytest.raises(SystemExit):
        gpu_fused_tune.parse_args(argv)
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this pins the message given where there is no GPU")
def test_without_a_gpu_the_run_exits_2_saying_prune_needs_none():
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=child_env(), cwd=ROOT,
                            timeout=120)
    assert result.returncode == 2 and "--prune` needs no GPU" in result.stderr
