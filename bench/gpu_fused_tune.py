"""Tile configs of the fused TopK kernel (``kernels/sparsekit_kernels/fused_topk.py``), pruned and timed.

Two modes:

- ``--prune`` (no GPU: Triton's own ptxas, as ``bench/aot_compile.py``): compiles every config of the
  grid BLOCK_M 64/128 x BLOCK_N 64/128/256 x BLOCK_K 32/64 x num_warps 4/8 x num_stages 3/4/5 (72) for
  sm_90, bfloat16, at the KT each BLOCK_N gets at B=8192 d=2048 n=131072 k=64 with the overflow check on
  (the variant every call launches), and keeps those with no register spill and shared memory within the
  227 KB sm_90 limit. It prints the table and the list to paste as ``fused_topk.CANDIDATES``.
- default (a CUDA GPU): for each shape (default the middle, largest and small shapes of bench/gpu.py,
  bfloat16) and each config of ``fused_topk.CANDIDATES`` (plus the dtype's default, if not among them),
  compiles every config first (``--compile-processes`` children filling Triton's cache), then times ``topk_encode_fused`` at that
  tile (``triton.testing.do_bench``, median, L2 flushed between runs) beside the cuBLAS GEMM
  (``torch.addmm``), counts the rows the overflow check ran again, and checks that every row's values and
  indices equal the unfused path's (the Triton GEMM at the same BLOCK_K, writing pre, then the radix select).
  It prints a ranked table per shape, the winner per size bucket as lines to paste into
  ``fused_topk.TUNED``, and writes JSON after every shape (a run cut short keeps what it measured).

The default mode shares ``--budget-s`` (default 170 s) among the shapes: a shape's configs left untimed
when its share (what is left over the shapes left) has passed are listed as such. The default config
is timed first.

Run from the repository root with the machine's python3, no install (as bench/gpu_fused_check.sh):

    SPARSEKIT_ISA=none PYTHONPATH=$PWD python3 bench/gpu_fused_tune.py --json bench/results/gpu-fused-tune.json

Usage: python bench/gpu_fused_tune.py [--shapes B:d:n:k,...] [--budget-s S] [--json PATH] [--compile-processes N]
       python bench/gpu_fused_tune.py --prune [--workers N] [--json PATH]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))  # the tree's sparsekit, uninstalled

SHAPES = [(8192, 2048, 131072, 64), (16384, 4096, 262144, 128), (4096, 768, 32768, 32)]  # (B, d, n, k)
PRUNE_SHAPE = SHAPES[0]  # the KT each BLOCK_N gets here is the one the prune compiles
SHARED_LIMIT_SM90 = 227 * 1024


def config_name(tile: dict) -> str:
    return (f"{tile['BLOCK_M']}x{tile['BLOCK_N']}x{tile['BLOCK_K']} w{tile['num_warps']} s{tile['num_stages']}")


def parse_shapes(text: str) -> list[tuple[int, int, int, int]]:
    shapes = []
    for part in text.split(","):
        fields = part.split(":")
        if len(fields) != 4 or not all(f.isdigit() and int(f) > 0 for f in fields):
            raise argparse.ArgumentTypeError(f"--shapes takes B:d:n:k with positive integers, got {part!r}")
        batch, d, n, k = map(int, fields)
        if k > n:
            raise argparse.ArgumentTypeError(f"--shapes {part!r}: k={k} exceeds n={n}")
        shapes.append((batch, d, n, k))
    return shapes


# --- prune: compile the grid for sm_90 without a GPU ------------------------------------------------

def fused_topk_grid() -> list[dict]:
    """fused_topk.GRID: every config --prune compiles (BLOCK_M 64/128 x BLOCK_N 64/128/256 x BLOCK_K
    32/64 x num_warps 4/8 x num_stages 3/4/5)."""
    from sparsekit.kernels import fused_topk

    return fused_topk.GRID


def discover_grid(grid: list[dict]) -> list:
    """In this process, under the interpreter: the aot_compile Variant of each config's launch at
    PRUNE_SHAPE's KT (sizes small but aligned to 16, as at the real shape; nothing runs)."""
    import importlib

    import aot_compile
    import torch

    config = importlib.import_module("sparsekit.kernels._config")
    config.INTERPRETING = False  # the launch is built as on a GPU (16-bit tiles fed to tl.dot as they are)
    from sparsekit.kernels import fused_topk

    _, _, n, k = PRUNE_SHAPE
    x, W, b = torch.zeros(64, 64, dtype=torch.bfloat16), torch.zeros(64, 1024, dtype=torch.bfloat16), \
        torch.zeros(1024, dtype=torch.bfloat16)
    recorder = aot_compile.LaunchRecorder()
    kernel = fused_topk._gemm_topk_kernel.fn
    for tile in grid:
        kt = fused_topk.choose_kt(n, k, tile["BLOCK_N"])
        _, args, kwargs, _, _ = fused_topk.launch(x, W, b, kt, True, tile)
        recorder.record(kernel, args, kwargs, first_config=True)
    return list(recorder.variants.values())


def prune(workers: int, json_path: str | None) -> int:
    import subprocess

    import aot_compile

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sparsekit-fused-prune-") as scratch:
        scratch = Path(scratch)
        found = scratch / "variants.json"
        env = aot_compile._child_env(True)
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--discover-to", str(found)],
                              env=env, cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"discovery failed (exit {done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}", file=sys.stderr)
            return 1
        variants = [aot_compile.variant_from_json(v) for v in json.loads(found.read_text())]
        print(f"{len(variants)} configs discovered; compiling for sm_90 in {workers} processes ...", flush=True)
        results = aot_compile.compile_all(variants, ("sm_90",), workers, scratch)
    kept, rows = [], []
    for r in results:
        meta = dict(r.variant.constexprs)
        tile = dict(BLOCK_M=meta["BLOCK_M"], BLOCK_N=meta["BLOCK_N"], BLOCK_K=meta["BLOCK_K"],
                    num_warps=r.variant.num_warps, num_stages=r.variant.num_stages)
        if r.error:
            verdict = f"error: {r.error[:80]}"
        elif r.spill_stores or r.spill_loads:
            verdict = f"spills {r.spill_stores}/{r.spill_loads} B"
        elif r.shared_bytes > SHARED_LIMIT_SM90:
            verdict = "shared memory over the limit"
        else:
            verdict = "kept"
            kept.append(tile)
        rows.append(dict(tile=tile, KT=meta["KT"], registers=r.registers, spill_stores=r.spill_stores,
                         shared_bytes=r.shared_bytes, tensor_cores=r.tensor_cores, verdict=verdict,
                         compile_s=round(r.seconds, 1)))
    print(f"{'config':<22} {'KT':>3} {'regs':>5} {'shared':>9} {'tc':>6}  verdict")
    for row in rows:
        shared = f"{row['shared_bytes'] / 1024:.0f} KB" if row["shared_bytes"] is not None else "-"
        print(f"{config_name(row['tile']):<22} {row['KT']:>3} {row['registers'] or '-':>5} {shared:>9} "
              f"{row['tensor_cores'] or '-':>6}  {row['verdict']}")
    print(f"\n{len(kept)} of {len(rows)} configs kept (no spill, shared memory <= 227 KB on sm_90), "
          f"{time.perf_counter() - started:.0f} s. fused_topk.CANDIDATES:")
    for tile in kept:
        print(f"    dict({', '.join(f'{k}={v}' for k, v in tile.items())}),")
    if json_path:
        Path(json_path).write_text(json.dumps(dict(grid=len(rows), kept=kept, rows=rows), indent=1))
    return 0


# --- the GPU run ------------------------------------------------------------------------------------

def warm_jobs(shape, tiles: list[dict]) -> list[dict]:
    """The launches each tile makes at this shape, as compile jobs: the first pass (KT from choose_kt,
    the overflow check on unless KT is exact) and an overflow rerun's (4x KT, a ragged row count)."""
    from sparsekit.kernels import fused_topk

    _, _, n, k = shape
    jobs = []
    for tile in tiles:
        exact = min(k, tile["BLOCK_N"])
        kt = fused_topk.choose_kt(n, k, tile["BLOCK_N"])
        rerun = min(exact, 4 * kt)
        jobs += [dict(tile=tile, kt=kt, next=kt < exact, rows=64), dict(tile=tile, kt=rerun, next=rerun < exact, rows=3)]
    return jobs


def warm(jobs: list[dict]) -> None:
    """Compile each job's kernel into Triton's cache without running it (``--warm-from``: a child). Small
    tensors with the real shapes' alignment (every size and stride a multiple of 16) key the same
    specialisation as the real launch; a mismatch would only make the timed run compile again."""
    import torch

    from sparsekit.kernels import fused_topk

    W, b = (torch.zeros(*size, dtype=torch.bfloat16, device="cuda") for size in ((64, 1024), (1024,)))
    for job in jobs:
        x = torch.zeros(job["rows"], 64, dtype=torch.bfloat16, device="cuda")
        grid, args, kwargs, _, _ = fused_topk.launch(x, W, b, job["kt"], job["next"], job["tile"])
        fused_topk._gemm_topk_kernel.warmup(*args, grid=grid, **kwargs)


def precompile(shape, tiles: list[dict], processes: int) -> float:
    """Compile every tile's launches at this shape in ``processes`` children sharing Triton's cache
    (compiling is CPU work; the timed runs then load from the cache). Seconds taken."""
    import subprocess

    started = time.perf_counter()
    jobs = warm_jobs(shape, tiles)
    with tempfile.TemporaryDirectory(prefix="sparsekit-fused-warm-") as scratch:
        children = []
        for i in range(processes):
            share = jobs[i::processes]
            if share:
                todo = Path(scratch) / f"jobs-{i}.json"
                todo.write_text(json.dumps(share))
                children.append(subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--warm-from",
                                                  str(todo)], cwd=ROOT, stdout=subprocess.PIPE,
                                                 stderr=subprocess.STDOUT, text=True))
        for child in children:
            out, _ = child.communicate()
            if child.returncode != 0:  # not fatal: the timed run compiles what is missing
                print(f"  a compile worker failed (exit {child.returncode}): {out.strip()[-300:]}", flush=True)
    return time.perf_counter() - started


def measure_shape(torch, triton, shape, tiles: list[dict], default: dict, deadline: float, processes: int) -> dict:
    from sparsekit.kernels import fused_topk
    from sparsekit.kernels.gemm import gemm
    from sparsekit.kernels.select import topk_rows

    batch, d, n, k = shape
    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(*size, scale=1.0):
        return (torch.randn(*size, generator=gen, device="cuda") * scale).to(torch.bfloat16)

    x, W, b = randn(batch, d), randn(d, n, scale=d ** -0.5), randn(n, scale=0.1)  # as bench/gpu.py draws them

    def bench(fn) -> float:
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    gemm_ms = bench(lambda: torch.addmm(b, x, W))
    compile_s = precompile(shape, tiles, processes)
    print(f"  cuBLAS GEMM {gemm_ms:.3f} ms; {len(tiles)} configs compiled in {processes} processes in "
          f"{compile_s:.0f} s", flush=True)
    references: dict[int, tuple] = {}  # BLOCK_K -> the unfused path's (values, indices)
    rows = []
    for tile in tiles:
        if time.perf_counter() > deadline:
            rows.append(dict(config=config_name(tile), tile=tile, ms=None, note="not timed: --budget-s spent"))
            continue
        row = dict(config=config_name(tile), tile=tile, default=tile == default,
                   kt=fused_topk.choose_kt(n, k, tile["BLOCK_N"]))
        try:
            before = dict(fused_topk.stats)
            got = fused_topk.topk_encode_fused(x, W, b, k, tile=tile)
            row["rows_rerun"] = (fused_topk.stats["overflow_rows"] - before["overflow_rows"]) / batch
            block = tile["BLOCK_K"]
            if block not in references:
                reference_tile = dict(default, BLOCK_K=block)
                references[block] = topk_rows(gemm(x, W, b, tile=reference_tile), k)
            want = references[block]
            differ = (got[1] != want[1]).any(dim=1) | (got[0] != want[0]).any(dim=1)
            row["rows_differing"] = int(differ.sum())  # from the unfused path at the default tile, this BLOCK_K
            row["rows_wrong"] = 0
            if row["rows_differing"]:  # a wrong selection, or only other rounding at another tile?
                same_tile = topk_rows(gemm(x, W, b, tile=tile), k)
                row["rows_wrong"] = int(((got[1] != same_tile[1]).any(dim=1) | (got[0] != same_tile[0]).any(dim=1)).sum())
            del got
            row["ms"] = bench(lambda: fused_topk.topk_encode_fused(x, W, b, k, tile=tile))
            row["x_gemm"] = row["ms"] / gemm_ms
            row["note"] = ""
        except Exception as error:  # noqa: BLE001 - a config that fails to run is a finding, reported per row
            row["ms"], row["note"] = None, f"{type(error).__name__}: {str(error).splitlines()[0][:100]}"
            torch.cuda.empty_cache()
        rows.append(row)
    key = fused_topk.tune_key(torch.bfloat16, batch, n, d)
    return dict(shape=dict(B=batch, d=d, n=n, k=k), tune_key=list(key), gemm_ms=gemm_ms, compile_s=compile_s,
                rows=rows)


def ranked_table(result: dict) -> str:
    shape = result["shape"]
    lines = [f"B={shape['B']} d={shape['d']} n={shape['n']} k={shape['k']} bf16: cuBLAS GEMM "
             f"{result['gemm_ms']:.3f} ms; tune key {tuple(result['tune_key'])}",
             f"{'rank':>4}  {'config':<22} {'KT':>3} {'ms':>9} {'x GEMM':>7} {'rows rerun':>10}  check"]
    timed = sorted((r for r in result["rows"] if r.get("ms") is not None), key=lambda r: r["ms"])
    for rank, r in enumerate(timed, 1):
        check = f"{r['rows_wrong']} rows WRONG" if r["rows_wrong"] else "exact" + (
            f"; {r['rows_differing']} rows round unlike the default tile" if r["rows_differing"] else "")
        mark = "  <- default" if r.get("default") else ""
        lines.append(f"{rank:>4}  {r['config']:<22} {r['kt']:>3} {r['ms']:>9.3f} {r['x_gemm']:>7.3f} "
                     f"{100 * r['rows_rerun']:>9.3f}%  {check}{mark}")
    lines += [f"   -  {r['config']:<22} {'':>3} {'-':>9} {'-':>7} {'':>10}  {r['note']}"
              for r in result["rows"] if r.get("ms") is None]
    return "\n".join(lines)


def winners(results: list[dict]) -> list[str]:
    """Lines to paste into fused_topk.TUNED: each shape's fastest config whose check was exact."""
    lines = []
    for result in results:
        exact = [r for r in result["rows"] if r.get("ms") is not None and r["rows_wrong"] == 0]
        if not exact:
            continue
        best = min(exact, key=lambda r: r["ms"])
        default = next((r for r in exact if r.get("default")), None)
        gain = f", {default['ms'] / best['ms']:.2f}x faster than the default" if default else ""
        lines.append(f"    {tuple(result['tune_key'])}: dict({', '.join(f'{k}={v}' for k, v in best['tile'].items())}),"
                     f"  # {best['ms']:.3f} ms = {best['x_gemm']:.2f}x cuBLAS{gain}")
    return lines


def tune(args) -> int:
    import torch

    if not torch.cuda.is_available():
        print("bench/gpu_fused_tune.py times the fused TopK on a CUDA GPU, and torch.cuda.is_available() is False "
              "here; `--prune` needs no GPU.", file=sys.stderr)
        return 2
    import triton
    import triton.testing  # noqa: F401 - do_bench

    from sparsekit.kernels import fused_topk

    default = fused_topk.tile_config(torch.bfloat16)
    tiles = [default] + [dict(t) for t in fused_topk.CANDIDATES if t != default]
    started = time.perf_counter()
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                device=torch.cuda.get_device_name(0), torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version(), configs=len(tiles), budget_s=args.budget_s)
    print(f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}: {len(tiles)} configs "
          f"(fused_topk.CANDIDATES and the default) x {len(args.shapes)} shapes, bf16", flush=True)
    path = Path(args.json) if args.json else ROOT / "bench" / "results" / f"gpu-fused-tune-{meta['date'][:10]}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    results = []
    for i, shape in enumerate(args.shapes):
        deadline = time.perf_counter() + (started + args.budget_s - time.perf_counter()) / (len(args.shapes) - i)
        print(f"measuring B={shape[0]} d={shape[1]} n={shape[2]} k={shape[3]} ...", flush=True)
        shape_started = time.perf_counter()
        results.append(measure_shape(torch, triton, shape, tiles, default, deadline, args.compile_processes))
        torch.cuda.empty_cache()  # this shape's operands and references are gone with measure_shape's frame
        path.write_text(json.dumps(dict(meta=meta, shapes=results), indent=1))
        print(f"  done in {time.perf_counter() - shape_started:.0f} s", flush=True)
    print()
    for result in results:
        print(ranked_table(result))
        print()
    bad = [(r["config"], res["shape"]) for res in results for r in res["rows"] if r.get("rows_wrong")]
    print("check: " + ("every timed config gave the unfused path's selection at its own tile exactly" if not bad
                       else f"{len(bad)} config-shape pairs selected WRONG rows: {bad}"))
    lines = winners(results)
    if lines:
        print("fastest exact config per size bucket (paste into fused_topk.TUNED = {...}):")
        print("\n".join(lines))
    print(f"total {time.perf_counter() - started:.0f} s; JSON: {path}")
    return 1 if bad else 0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prune", action="store_true", help="compile the grid for sm_90 (no GPU) and keep the "
                                                             "configs without spills")
    parser.add_argument("--shapes", type=parse_shapes, default=SHAPES, help="B:d:n:k,... (default: the middle, "
                                                                            "largest and small GPU shapes)")
    parser.add_argument("--budget-s", type=float, default=170.0, help="stop timing new configs after this long")
    parser.add_argument("--compile-processes", type=int, default=min(os.cpu_count() or 1, 16),
                        help="processes compiling the configs before timing")
    parser.add_argument("--workers", type=int, default=2, help="--prune: compile processes")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--discover-to", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--warm-from", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("budget_s", "compile_processes", "workers"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.discover_to:  # child of --prune, under the interpreter
        import aot_compile  # noqa: F401 - on sys.path above

        Path(args.discover_to).write_text(json.dumps([asdict(v) for v in discover_grid(fused_topk_grid())]))
        return 0
    if args.prune:
        return prune(args.workers, args.json)
    if args.warm_from:  # child of the GPU run: compile into Triton's cache
        warm(json.loads(Path(args.warm_from).read_text()))
        return 0
    os.environ.setdefault("SPARSEKIT_ISA", "none")  # no C++ extension needed (as bench/gpu_fused_check.sh)
    link = ROOT / "sparsekit" / "kernels"
    if not link.exists():  # a checkout without the build step: the kernels package is a folder beside it
        link.symlink_to(Path("..") / "kernels" / "sparsekit_kernels")
    return tune(args)


if __name__ == "__main__":
    sys.exit(main())
