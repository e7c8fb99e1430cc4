"""What the CPU benchmark scripts share: thread pinning before import, interleaved timing, the
share of the CPU other processes took meanwhile, peak RSS from one subprocess per variant, the
CPU's name and where a result file goes.

Nothing here imports torch or numpy at module level: a script calls ``pin_thread_env`` first,
and BLAS/OpenMP runtimes read their thread counts when they load.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

THREAD_ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
BUSY_SHARE = 0.05  # more of the CPU than this used by other processes during timing: warn
RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Pause before each timed call: OpenBLAS's worker keeps spinning for up to ~0.1 s after a GEMM,
# which would slow whatever variant is timed next; a variant's own spinning stays in its time.
SETTLE_SECONDS = 0.25


def pin_thread_env(threads: int) -> None:
    """Set OMP/OpenBLAS/MKL thread counts; call before torch or numpy is first imported."""
    for var in THREAD_ENV_VARS:
        os.environ[var] = str(threads)


def add_shape_arguments(parser) -> None:
    """--quick, --batch, --d-in, --n-latents and --k on an argparse parser (bench/peers.py's and
    bench/cpu_passes.py's; step_table.shapes_from reads them)."""
    parser.add_argument("--quick", action="store_true", help="small shapes (B=512, d=128, n=4096, k=16)")
    parser.add_argument("--batch", type=int, help="rows per step B (default 4096, 512 with --quick)")
    parser.add_argument("--d-in", type=int, help="input width d (default 512, 128 with --quick)")
    parser.add_argument("--n-latents", type=int, help="latents n (default 16384, 4096 with --quick)")
    parser.add_argument("--k", type=int, help="active latents per row k (default 32, 16 with --quick)")


def time_round_robin(fns: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each fn: one warm-up call each, then ``rounds`` rounds in which every
    fn runs once; each round starts one fn later than the previous so no fn always follows the same one."""
    for fn in fns.values():
        fn()
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            time.sleep(SETTLE_SECONDS)
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def busy_cpu_seconds() -> tuple[float, float]:
    """(CPU seconds all processes have spent busy since boot, CPU seconds this process has spent),
    from /proc/stat and os.times(): their growth over a run shows how much of the machine others used."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return float("nan"), float("nan")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    own = os.times()
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK"), own.user + own.system


def time_with_cpu_share(fns: dict, rounds: int) -> tuple[dict[str, list[float]], float]:
    """time_round_robin, plus the share of the machine's CPU that other processes used meanwhile."""
    busy_before, own_before = busy_cpu_seconds()
    wall_before = time.perf_counter()
    times = time_round_robin(fns, rounds)
    busy_after, own_after = busy_cpu_seconds()
    others = (busy_after - busy_before) - (own_after - own_before)
    return times, max(0.0, others / ((time.perf_counter() - wall_before) * (os.cpu_count() or 1)))


def peak_rss_gib() -> float:
    """This process's peak resident set size so far, in GiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def peak_rss_in_subprocesses(script: Path, variants, extra_args: list[str]) -> dict[str, float]:
    """Peak RSS in GiB of each variant, each from a fresh ``script --peak-rss-of VARIANT`` process
    that prints ``{"variant": ..., "peak_rss_gib": ...}`` as its last line of output."""
    peaks = {}
    for variant in variants:
        command = [sys.executable, str(script), "--peak-rss-of", variant, *extra_args]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"peak RSS subprocess for {variant!r} failed ({result.returncode}):\n{result.stderr}")
        peaks[variant] = json.loads(result.stdout.strip().splitlines()[-1])["peak_rss_gib"]
    return peaks


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def output_path(option: str, now: datetime.datetime, suffix: str = "") -> Path:
    """``option`` itself, or for 'auto' bench/results/<date>-<cpu>{suffix}.md, or -2, -3, ... after
    it when that day's file exists (a second run the same day keeps the first)."""
    if option != "auto":
        return Path(option)
    slug = re.sub(r"[^a-z0-9]+", "-", cpu_model().lower()).strip("-") or "cpu"
    path, count = RESULTS_DIR / f"{now:%Y-%m-%d}-{slug}{suffix}.md", 2
    while path.exists():
        path, count = RESULTS_DIR / f"{now:%Y-%m-%d}-{slug}{suffix}-{count}.md", count + 1
    return path


@contextlib.contextmanager
def env_set(variable: str, value: str | None):
    """os.environ[variable] = value for the duration (nothing when value is None); sparsekit reads
    its SPARSEKIT_* settings per op."""
    if value is None:
        yield
        return
    before = os.environ.get(variable)
    os.environ[variable] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[variable]
        else:
            os.environ[variable] = before


def backend_forced_to(name: str | None):
    """SPARSEKIT_BACKEND=name for the duration (nothing when name is None)."""
    return env_set("SPARSEKIT_BACKEND", name)
