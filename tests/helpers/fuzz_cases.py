"""Random fuzz cases for every op and backend, and a runner that checks seeds, in worker processes if asked.

``random_case(op, seed, backend)`` draws everything from one seed: shapes from 1 up, k from 1 to n
(k=1 and k=n often), integer-valued data (exact, full of ties: the lower index must win) or
real-valued data with enforced gaps, magnitudes scaled by powers of two, and every tensor passed
contiguous, transposed, strided or at a storage offset.

Per backend:
- ``cpp``: float32 or float64, shapes up to B=64, d=48, n=300, magnitudes 2**±40 (float32) and
  2**±400 (float64).
- ``triton``: float32 (the Triton kernels take 32- and 16-bit floats; float64 goes to the
  reference), and small shapes, because without a GPU the kernels run under Triton's interpreter,
  which executes every program in Python: each axis is usually within one interpreter tile
  (B <= 8, d <= 16, n <= 16) and with probability 0.15 spans several (B up to 24: GEMM row tiles
  of 16; d up to 40: K steps of 16; n up to 80: column tiles of 32, selection blocks of 64,
  BatchTopK blocks of 256 entries). The interpreter tiles are kernels/sparsekit_kernels/_config.py's small configs.

``check_seeds(op, backend, seeds)`` runs the cases and returns the failures, each with its seed;
``check_seeds_in_pool`` spreads chunks of seeds over ``worker_pool``'s processes (the interpreter
is single-threaded Python: two workers use two cores).
"""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import random
import time

import pytest
import torch

from helpers.op_cases import LAYOUTS, compare_backends, make_case, scale_magnitudes, with_layouts

TENSOR_ARGUMENTS = {
    "topk_encode": ("x", "W_enc", "b_enc"), "batchtopk_encode": ("x", "W_enc", "b_enc"),
    "relu_encode": ("x", "W_enc", "b_enc"), "jumprelu_encode": ("x", "W_enc", "b_enc", "log_threshold"),
    "sparse_decode": ("values", "indices", "W_dec", "b_dec"),
    "sparse_decode_coo": ("values", "rows", "cols", "W_dec", "b_dec"),
    "ghost_grad_loss": ("x", "W_enc", "b_enc", "W_dec", "dead_idx", "residual"),
}
SEVERAL_TILES = 0.15  # triton: chance that an axis spans several interpreter tiles


def _triton_shape(rng: random.Random) -> dict:
    several = lambda: rng.random() < SEVERAL_TILES  # noqa: E731
    n = rng.randint(17, 80) if several() else rng.choice([1, 2, 3, rng.randint(4, 16)])
    shape = dict(batch=rng.randint(9, 24) if several() else rng.choice([1, 2, rng.randint(3, 8)]),
                 d_in=rng.randint(17, 40) if several() else rng.choice([1, rng.randint(2, 16)]),
                 n=n, k=rng.choice([1, n, rng.randint(1, n)]))
    if rng.random() < 0.3:
        shape["d_out"] = rng.randint(17, 40) if several() else rng.randint(1, 16)
    return shape


def _cpp_shape(rng: random.Random) -> dict:
    n = rng.choice([1, 2, 3, rng.randint(4, 40), rng.randint(40, 300)])
    shape = dict(batch=rng.choice([1, 2, rng.randint(3, 64)]), d_in=rng.choice([1, rng.randint(2, 48)]),
                 n=n, k=rng.choice([1, n, rng.randint(1, n)]))
    if rng.random() < 0.3:
        shape["d_out"] = rng.randint(1, 40)
    return shape


# Fuzz backends beyond the real ones: "cpp-bf16" is the C++ backend with the bf16-screened TopK
# encoder forced on (SPARSEKIT_BF16_SCREEN=on, sparsekit.ops.cpu.screen), float32 cases of the ops it
# serves.
SCREENED_OPS = ("topk_encode", "batchtopk_encode")


def random_case(op: str, seed: int, backend: str = "cpp"):
    """The fuzz case of `op` drawn from `seed` for `backend` ("cpp", "cpp-bf16" or "triton")."""
    rng = random.Random(seed)
    shape = _triton_shape(rng) if backend == "triton" else _cpp_shape(rng)
    integer = rng.random() < 0.5
    dtype = (torch.float32 if backend in ("triton", "cpp-bf16")
             else rng.choice([torch.float32, torch.float64]))
    case = make_case(op, seed, dtype=dtype, integer=integer, n_dead=rng.randint(1, shape["n"]), **shape)
    if rng.random() < 0.4:
        limit = 20 if dtype == torch.float32 else 200
        case = scale_magnitudes(case, rng.randint(-limit, limit), rng.randint(-limit, limit))
    if rng.random() < 0.5:
        case = with_layouts(case, {name: rng.choice(LAYOUTS) for name in TENSOR_ARGUMENTS[op]})
    return case


def replay_command(op: str, backend: str, seed: int) -> str:
    return (f"SPARSEKIT_FUZZ_SEED={seed} SPARSEKIT_FUZZ_CASES=1 SPARSEKIT_TRITON_FUZZ_CASES=1 "
            f"pytest tests/ops/test_fuzz.py -k 'fuzz_backend and [{op}-{backend}]'")


def check_seeds(op: str, backend: str, seeds) -> tuple[list[tuple[int, str]], float]:
    """((seed, error) for every seed whose case does not match the reference on `backend`, the
    CPU seconds this process spent on them: on a shared machine, a figure load does not inflate)."""
    failures = []
    start = time.process_time()
    with pytest.MonkeyPatch.context() as monkeypatch:
        if backend == "cpp-bf16":
            monkeypatch.setenv("SPARSEKIT_BF16_SCREEN", "on")
        for seed in seeds:
            try:
                compare_backends(random_case(op, seed, backend), monkeypatch, backend.removesuffix("-bf16"))
            except Exception as error:  # every failure is reported with its seed, none stops the run
                failures.append((seed, f"{type(error).__name__}: {error}"))
    return failures, time.process_time() - start


def _start_worker() -> None:
    torch.set_num_threads(1)  # one core per worker


def worker_pool(workers: int) -> concurrent.futures.ProcessPoolExecutor:
    """Worker processes for check_seeds_in_pool, spawned: they inherit the environment
    (TRITON_INTERPRET included) and import torch, Triton and sparsekit once each."""
    return concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                  initializer=_start_worker)


def check_seeds_in_pool(pool, op: str, backend: str, seeds: list[int],
                        chunk: int = 25) -> tuple[list[tuple[int, str]], float]:
    """check_seeds on `pool`'s workers, `chunk` seeds at a time (or here when pool is None):
    (failures in seed order, CPU seconds of all workers)."""
    if pool is None:
        return check_seeds(op, backend, seeds)
    chunks = [seeds[i:i + chunk] for i in range(0, len(seeds), chunk)]
    results = list(pool.map(check_seeds, [op] * len(chunks), [backend] * len(chunks), chunks))
    return sorted(failure for part, _ in results for failure in part), sum(cpu for _, cpu in results)
