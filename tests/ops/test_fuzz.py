"""Fresh random cases on every run: each backend against the reference, every op, forward and backward.

The cases (tests/helpers/fuzz_cases.py) draw from one seed each: shapes from 1 up, k=1 and k=n often,
float32 or float64 (float32 only on Triton), integer data full of exact ties or real data with
enforced gaps, magnitudes scaled by powers of two, every tensor contiguous, transposed, strided or
at a storage offset. A failure names its seed and the command that replays it.

Cases per op: SPARSEKIT_FUZZ_CASES on cpp and cpp-bf16 (default 150: about 40 s on 2 busy cores) and
SPARSEKIT_TRITON_FUZZ_CASES on Triton (default 8: without a GPU the kernels run under Triton's
interpreter, a few seconds in all); SPARSEKIT_FUZZ_WORKERS processes share them (default 1: here).
`make fuzz` runs 1,000 per op on each backend with 2 workers and prints how many cases ran and how
long they took.
"""
import os
import random
import time

import pytest
import torch
from helpers.fuzz_cases import SCREENED_OPS, check_seeds_in_pool, random_case, replay_command, worker_pool
from helpers.op_cases import LAYOUTS, OPS

from sparsekit.ops.backend import _C, backend_for_device, triton_installed

CASES = {"cpp": int(os.environ.get("SPARSEKIT_FUZZ_CASES", "150")),
         "triton": int(os.environ.get("SPARSEKIT_TRITON_FUZZ_CASES", "8"))}
CASES["cpp-bf16"] = CASES["cpp"]
WORKERS = int(os.environ.get("SPARSEKIT_FUZZ_WORKERS", "1"))
FIRST_SEED = int(os.environ.get("SPARSEKIT_FUZZ_SEED", random.SystemRandom().randrange(2**31)))


def _triton_runs_here() -> bool:
    """Triton runs the cases: on CUDA (op_cases.run moves them there) or interpreted on CPU."""
    if not triton_installed():
        return False
    if torch.cuda.is_available():
        return True
    try:
        with pytest.MonkeyPatch.context() as monkeypatch:
            monkeypatch.setenv("SPARSEKIT_BACKEND", "triton")
            return backend_for_device("cpu") == "triton"
    except RuntimeError:
        return False


# Fast paths compared with the reference: the C++ kernels (also with the bf16-screened TopK
# encoder forced on: "cpp-bf16"), and the Triton kernels (under the interpreter on CPU tensors
# without a GPU: tests/conftest.py sets TRITON_INTERPRET=1).
BACKENDS = (["cpp", "cpp-bf16"] if _C is not None else []) + (["triton"] if _triton_runs_here() else [])
OP_BACKENDS = [(op, backend) for backend in BACKENDS for op in OPS
               if backend != "cpp-bf16" or op in SCREENED_OPS]


@pytest.fixture(scope="module")
def pool():
    """SPARSEKIT_FUZZ_WORKERS worker processes shared by every op's fuzz test (None: run here)."""
    if WORKERS <= 1:
        yield None
        return
    with worker_pool(WORKERS) as workers:
        yield workers


@pytest.mark.parametrize("op,backend", OP_BACKENDS, ids=[f"{op}-{backend}" for op, backend in OP_BACKENDS])
def test_fuzz_backend_against_reference(op, backend, pool):
    cases = CASES[backend]
    seeds = list(range(FIRST_SEED, FIRST_SEED + cases))
    start = time.perf_counter()
    failures, cpu_seconds = check_seeds_in_pool(pool, op, backend, seeds)
    seconds = time.perf_counter() - start
    assert not failures, f"{len(failures)} of {cases} fuzz cases of {op} on {backend} failed:\n" + "\n".join(
        f"  {replay_command(op, backend, seed)}\n    {error[:2000]}" for seed, error in failures[:10])
    print(f"\nfuzz: {cases} cases of {op} on {backend} matched the reference in {seconds:.1f} s wall "
          f"({WORKERS} worker(s)), {cpu_seconds:.1f} s CPU ({1000 * cpu_seconds / max(cases, 1):.0f} ms CPU a case); "
          f"seeds {FIRST_SEED}..{seeds[-1]}")


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_fuzz_draws_every_kind_of_case(backend):
    # The generator must actually produce the cases it promises (k=1, k=n, one row, its dtypes,
    # both data kinds, scaled magnitudes, every layout; on Triton, one and several interpreter
    # tiles on every axis), not just be able to.
    seen = set()
    for seed in range(300):
        case = random_case("topk_encode", seed, backend)
        args = case.arguments(case.leaves)
        x, k, (d_in, n) = args["x"], args["k"], args["W_enc"].shape
        seen.add(("dtype", x.dtype))
        seen.add(("k=1",) if k == 1 else ("k=n",) if k == n else ("k other",))
        seen.add(("rows=1",) if x.shape[0] == 1 else ("rows>1",))
        seen.add(("scaled",) if "scale=" in case.description else ("unscaled",))
        seen.add(("integer", "integer=True" in case.description))
        for layout in LAYOUTS[1:]:
            if f"x:{layout}" in case.description:
                seen.add(("layout", layout))
        if not x.is_contiguous() or x.storage_offset():
            seen.add(("non-contiguous or offset x",))
        # Interpreter tiles (kernels/sparsekit_kernels/_config.py's small configs): GEMM 16 rows x 32 columns, K by
        # 16; row selection by 64 columns.
        seen.update({("rows", x.shape[0] > 16), ("d_in", d_in > 16), ("n", n > 32), ("n>64", n > 64)})
    dtypes = [torch.float32] if backend == "triton" else [torch.float32, torch.float64]
    expected = [("dtype", dtype) for dtype in dtypes] + [
        ("k=1",), ("k=n",), ("rows=1",), ("scaled",), ("integer", True), ("integer", False),
        ("layout", "transposed"), ("layout", "strided"), ("layout", "offset"), ("non-contiguous or offset x",),
        ("rows", True), ("rows", False), ("d_in", True), ("d_in", False), ("n", True), ("n", False), ("n>64", True)]
    for item in expected:
        assert item in seen, item
    assert ("dtype", torch.float64) not in seen or backend == "cpp"
