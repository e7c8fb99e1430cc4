"""`sparsekit tune`'s measurements: each crossover of ``sparsekit.ops.cpu.tuning`` timed on this machine.

Each pair of paths runs ``topk_encode`` (its C++ custom op) on the same Gaussian x [B, d] and
W_enc [d, n] / sqrt(d) at a ladder of sizes, in interleaved rounds, the fastest round kept. A
crossover is where the new path wins by MARGIN at that size and every larger one (``crossover``);
the rows per bf16 GEMM block are the fastest of a few (``fastest``), the default kept unless beaten
by MARGIN. The whole-row selection (heap or threshold, csrc/topk_select.hpp) is timed on Gaussian
pre-activations over a ladder of k at one width; its crossover in k becomes a share of the width.
The screen's knobs are measured only on CPUs with native bf16, the OpenBLAS crossover only where
NumPy's OpenBLAS can be controlled; what is skipped is said. A full tune takes about 30 s on
2 cores (at most TIME_BUDGET: a stage begun after it is skipped and keeps its default); ``quick``,
a few seconds.
"""
from __future__ import annotations

import contextlib
import datetime
import math
import os
import time
from typing import Callable

from . import gemm, screen, tuning
from .encode import topk_encode_cpu
from .tuning import KNOBS, default

MARGIN = 0.03         # a path must be this much faster to count as a win (timing noise on a shared machine)
TIME_BUDGET = 60.0    # seconds for a full tune; stages left when it is spent keep their defaults


def first_win(rungs: list[tuple[int, float, float]], margin: float = MARGIN) -> int | None:
    """The index of the smallest rung from which the new path wins at every larger rung, or None.
    rungs: (size, new path's seconds, old path's seconds), sizes ascending; a win is new <= (1 - margin) * old."""
    found = None
    for index in range(len(rungs) - 1, -1, -1):
        _, new, old = rungs[index]
        if new > (1 - margin) * old:
            break
        found = index
    return found


def crossover(rungs: list[tuple[int, float, float]], default: int, margin: float = MARGIN) -> int:
    """The threshold ``first_win`` implies: the geometric mean of the first winning rung's size and
    the one below (the crossing lies between them). Outside what was measured, the default where it
    agrees: winning from the smallest rung, the smaller of it and the default; winning at no rung,
    the larger of the default and twice the largest rung (not seen to win up to there)."""
    index = first_win(rungs, margin)
    if index is None:
        return max(default, 2 * int(rungs[-1][0]))
    if index == 0:
        return min(default, int(rungs[0][0]))
    return int(math.sqrt(rungs[index - 1][0] * rungs[index][0]))


def fastest(times: dict, keep, margin: float = MARGIN):
    """The key of the smallest time in ``times``; ``keep`` (the default) unless another beats it by margin."""
    best = min(times, key=times.get)
    if keep in times and times[best] > (1 - margin) * times[keep]:
        return keep
    return best


@contextlib.contextmanager
def _environment(**variables):
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _under(call: Callable, context, **settings) -> Callable:
    """``call`` run inside ``context(**settings)`` (an environment or a trial of knob values)."""
    def run():
        with context(**settings):
            call()
    return run


def _fastest_times(calls: dict[str, Callable], rounds: int) -> dict[str, float]:
    """Seconds per call of each: the fastest of ``rounds`` interleaved rounds (each starting one call
    later than the one before), after one warm-up call each. The fastest, not the median: on a
    shared machine other processes only ever add time, and a crossover is a property of the code."""
    for call in calls.values():
        call()
    names, times = list(calls), {name: [] for name in calls}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in times.items()}


def _encoder(batch: int, d: int, n: int, k: int, seed: int = 0):
    """A call of ops.topk_encode on Gaussian x [batch, d] and W_enc [d, n] / sqrt(d)."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, d, generator=gen)
    W = torch.randn(d, n, generator=gen) / math.sqrt(d)
    b = torch.zeros(n)

    def call():
        with torch.no_grad():
            topk_encode_cpu(x, W, b, k)
    return call


# (batch, d, n) rungs of each stage, full and quick; k per rung as noted.
GEMM_RUNGS = {False: [(256, 256, 2048), (512, 256, 4096), (1024, 256, 4096), (1024, 256, 8192),
                      (2048, 256, 8192), (4096, 256, 8192)],
              True: [(128, 128, 1024), (256, 256, 2048), (512, 256, 4096)]}
SCREEN_RUNGS = {False: [(64, 256, 2048), (128, 256, 2048), (256, 256, 2048), (256, 256, 4096), (512, 256, 4096),
                        (1024, 256, 4096)],
                True: [(64, 128, 1024), (128, 256, 2048), (256, 256, 4096)]}
N_OVER_K = [16, 32, 64, 128, 256]
SCREEN_RATIO_SHAPE = {False: (1024, 256, 4096), True: (256, 256, 4096)}
SCREEN_ROW_CHOICES = {False: ((2048, 256, 8192), [256, 512, 1024, 2048]), True: ((512, 256, 4096), [128, 256, 512])}
# (B, d, q) rungs of the dense remedy products: the three layouts of one ([B, q] @ [q, d], [B, d] @ [q, d]^T,
# [B, d]^T @ [B, q]) timed together on torch.mm and on gemm.matmul's pool.
POOLED_MM_RUNGS = {False: [(1024, 256, 256), (2048, 256, 512), (4096, 256, 1024), (4096, 512, 1024), (4096, 512, 2048)],
                   True: [(512, 128, 256), (1024, 256, 512), (2048, 256, 1024)]}
# (rows, width) of Gaussian pre-activations and the k ladder of the whole-row selection stage.
SELECT_RUNGS = {False: ((1024, 2048), [8, 16, 32, 64, 128, 256]), True: ((256, 1024), [8, 32, 128])}


def tune(quick: bool = False, progress: bool = True, budget: float | None = None, say=print) -> dict:
    """Measure every knob this machine has a choice for and return the cache record (``save`` writes
    it): {"format", "key", "values", "quick", "written", "seconds", "measured", "notes"}.
    quick: few small rungs, 2 rounds (a few seconds; for tests and a first look); else 5 rounds
    within ``budget`` seconds (TIME_BUDGET), a stage started after it is spent skipped (its knobs
    keep their defaults, said in "notes"). ``say``: where each chosen value's line goes."""
    from tqdm.auto import tqdm
    budget = TIME_BUDGET if budget is None else budget
    rounds = 2 if quick else 5
    start = time.perf_counter()
    values, measured, notes = {}, {}, {}
    stages = [("parallel_min_flop", len(GEMM_RUNGS[quick])), ("screen_min_flop", len(SCREEN_RUNGS[quick])),
              ("screen_min_n_over_k", len(N_OVER_K)), ("screen_rows", len(SCREEN_ROW_CHOICES[quick][1])),
              ("select_threshold_min_share", len(SELECT_RUNGS[quick][1])),
              ("pooled_mm_min_flop", len(POOLED_MM_RUNGS[quick]))]
    bar = tqdm(total=sum(count for _, count in stages), disable=not progress, unit="size", desc="sparsekit tune",
               dynamic_ncols=True)

    def over_budget(name: str) -> bool:
        if time.perf_counter() - start <= budget:
            return False
        notes[name] = f"skipped: the {budget:g} s budget was spent"
        return True

    with bar:
        # 1. OpenBLAS row tiles against torch's GEMM, the screen off.
        if not gemm.openblas_available():
            notes["parallel_min_flop"] = "skipped: NumPy's OpenBLAS cannot be controlled here (torch's GEMM always)"
        elif not over_budget("parallel_min_flop"):
            with _environment(SPARSEKIT_BF16_SCREEN="off"):
                values["parallel_min_flop"], measured["parallel_min_flop"] = _openblas_crossover(
                    "parallel_min_flop", [(2 * batch * d * n, _encoder(batch, d, n, 32))
                                          for batch, d, n in GEMM_RUNGS[quick]], rounds, bar)
        # 1b. The dense remedy products on OpenBLAS row tiles against torch.mm.
        if not gemm.openblas_available():
            notes["pooled_mm_min_flop"] = "skipped: NumPy's OpenBLAS cannot be controlled here (torch.mm always)"
        elif not over_budget("pooled_mm_min_flop"):
            values["pooled_mm_min_flop"], measured["pooled_mm_min_flop"] = _openblas_crossover(
                "pooled_mm_min_flop", [(2 * batch * d * q, _remedy_products(batch, d, q))
                                       for batch, d, q in POOLED_MM_RUNGS[quick]], rounds, bar)
        # 2. Whole-row top-k: a heap against selection by threshold, over a ladder of k.
        if not over_budget("select_threshold_min_share"):
            values["select_threshold_min_share"], measured["select_threshold_min_share"] = _tune_select(
                quick, rounds, bar)
        # 3-5. The bf16 screen: only where bf16 is native (elsewhere it is emulated and never chosen).
        if not screen.cpu_has_native_bf16():
            for name in ("screen_min_flop", "screen_min_n_over_k", "screen_rows"):
                notes[name] = "skipped: this CPU has no native bf16 (avx512_bf16 or amx_bf16): the screen stays off"
        else:
            with tuning.trying(**values):  # the float32 side as it would now run
                _tune_screen(quick, rounds, values, measured, bar, over_budget)
    key = tuning.cache_key()
    seconds = time.perf_counter() - start
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    if load > 0.5 * (os.cpu_count() or 1):
        say(f"the machine was busy (load average {load:.2f} on {os.cpu_count()} CPUs): these crossovers are "
            "noisy; run `sparsekit tune` again when it is idle")
    for name in KNOBS:
        if name in values:
            say(f"{name} = {tuning.shown(values[name])} (default {tuning.shown(default(name))}): {KNOBS[name].what}")
        else:
            say(f"{name}: {notes.get(name, 'not measured')}; default {tuning.shown(default(name))} applies")
    return {"format": tuning.FORMAT, "key": key, "values": values, "quick": quick,
            "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(seconds, 2), "load_average": round(load, 2), "measured": measured, "notes": notes}


def select_share_from(rungs: list[tuple[int, float, float]], width: int, default_share: int) -> int:
    """The share k * share >= width from which selection by threshold is used, from rungs (k,
    threshold seconds, heap seconds) at one width, k ascending: the crossover in k (``crossover``,
    the default's k where the measurements leave it open) turned into a share of the width."""
    default_k = max(1, -(-width // default_share)) if default_share else 2 * int(rungs[-1][0])
    return max(1, -(-width // crossover(rungs, default_k)))


def _tune_select(quick: bool, rounds: int, bar) -> tuple[int, list]:
    import numpy as np

    from sparsekit.ops.backend import _C
    (rows, width), ladder = SELECT_RUNGS[quick]
    pre = np.random.default_rng(0).standard_normal((rows, width), dtype=np.float32)
    bias = np.zeros(width, np.float32)
    rungs = []
    for k in ladder:
        values, indices = np.empty((rows, k), np.float32), np.empty((rows, k), np.int64)

        def select(share, k=k, values=values, indices=indices):
            return lambda: _C.topk_select_block(pre, bias, 0, k, True, True, values, indices, 0, share)
        times = _fastest_times({"threshold": select(2**24), "heap": select(0)}, rounds)
        rungs.append((k, times["threshold"], times["heap"]))
        bar.update()
    share = select_share_from(rungs, width, default("select_threshold_min_share"))
    return share, [{"k": k, "width": width, "threshold_s": a, "heap_s": b} for k, a, b in rungs]


def _remedy_products(batch: int, d: int, q: int, seed: int = 0):
    """A call of gemm.matmul on the three layouts of a dense remedy product at [B, q] codes, [q, d] rows."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    codes, rows, grad = torch.randn(batch, q, generator=gen), torch.randn(q, d, generator=gen), torch.randn(
        batch, d, generator=gen)

    def call():
        gemm.matmul(codes, rows)
        gemm.matmul(grad, rows.t())
        gemm.matmul(grad.t(), codes)
    return call


def _openblas_crossover(knob: str, calls: list[tuple[int, Callable]], rounds: int, bar) -> tuple[int, list]:
    """Knob ``knob``'s crossover from (flop, call) rungs, sizes ascending, each call timed under
    SPARSEKIT_CPU_GEMM=numpy (OpenBLAS row tiles) and =torch; and what was measured."""
    rungs = []
    for flop, call in calls:
        times = _fastest_times({library: _under(call, _environment, SPARSEKIT_CPU_GEMM=library)
                                for library in ("numpy", "torch")}, rounds)
        rungs.append((flop, times["numpy"], times["torch"]))
        bar.update()
    return crossover(rungs, default(knob)), [{"flop": f, "openblas_s": a, "torch_s": b} for f, a, b in rungs]


def _pair(call, rounds: int) -> tuple[float, float]:
    """(screened, float32) fastest seconds of ``call``."""
    times = _fastest_times({mode: _under(call, _environment, SPARSEKIT_BF16_SCREEN=mode) for mode in ("on", "off")},
                          rounds)
    return times["on"], times["off"]


def _tune_screen(quick: bool, rounds: int, values: dict, measured: dict, bar, over_budget) -> None:
    if not over_budget("screen_min_flop"):
        rungs = []
        for batch, d, n in SCREEN_RUNGS[quick]:
            rungs.append((2 * batch * d * n, *_pair(_encoder(batch, d, n, max(1, n // 256)), rounds)))
            bar.update()
        values["screen_min_flop"] = crossover(rungs, default("screen_min_flop"))
        measured["screen_min_flop"] = [{"flop": f, "screened_s": a, "float32_s": b} for f, a, b in rungs]
    if not over_budget("screen_min_n_over_k"):
        batch, d, n = SCREEN_RATIO_SHAPE[quick]
        rungs = []
        with tuning.trying(screen_min_flop=0):
            for ratio in N_OVER_K:
                rungs.append((ratio, *_pair(_encoder(batch, d, n, n // ratio), rounds)))
                bar.update()
        values["screen_min_n_over_k"] = crossover(rungs, default("screen_min_n_over_k"))
        measured["screen_min_n_over_k"] = [{"n_over_k": r, "screened_s": a, "float32_s": b} for r, a, b in rungs]
    if not over_budget("screen_rows"):
        (batch, d, n), choices = SCREEN_ROW_CHOICES[quick]
        call = _encoder(batch, d, n, max(1, n // 256))
        with _environment(SPARSEKIT_BF16_SCREEN="on"):
            times = _fastest_times({rows: _under(call, tuning.trying, screen_rows=rows) for rows in choices}, rounds)
        bar.update(len(choices))
        keep = default("screen_rows")
        values["screen_rows"] = int(fastest(times, keep if keep in times else min(times, key=times.get)))
        measured["screen_rows"] = [{"rows": r, "screened_s": s} for r, s in times.items()]
