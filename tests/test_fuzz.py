"""Fresh random cases on every run: each backend against the reference, every op, forward and backward.

Each case draws from one seed: shapes from 1 up, k from 1 to n (k=1 and k=n often), float32 or
float64, integer-valued data (exact, full of ties: the lower index must win) or real-valued data
with enforced gaps, magnitudes scaled by powers of two (huge and tiny: 2**±40 in float32,
2**±400 in float64), and every tensor passed contiguous, transposed, strided or at a storage
offset. A failure names its seed: SPARSEKIT_FUZZ_SEED=<seed> SPARSEKIT_FUZZ_CASES=1 replays it.

`make test` runs SPARSEKIT_FUZZ_CASES per op and backend (default 150: about 40 s on 2 busy
cores); `make fuzz` runs 1,000 and prints how many cases ran and how long they took.
"""
import os
import random
import time

import pytest
import torch

from op_cases import LAYOUTS, OPS, compare_backends, make_case, scale_magnitudes, with_layouts
from sparsekit.backend import _C

CASES = int(os.environ.get("SPARSEKIT_FUZZ_CASES", "150"))
FIRST_SEED = int(os.environ.get("SPARSEKIT_FUZZ_SEED", random.SystemRandom().randrange(2**31)))
# Fast paths compared with the reference on CPU tensors: the C++ kernels. (Triton runs on CUDA
# tensors only, and is not built yet: see sparsekit.backend.)
BACKENDS = ["cpp"] if _C is not None else []
TENSOR_ARGUMENTS = {
    "topk_encode": ("x", "W_enc", "b_enc"), "batchtopk_encode": ("x", "W_enc", "b_enc"),
    "relu_encode": ("x", "W_enc", "b_enc"), "jumprelu_encode": ("x", "W_enc", "b_enc", "log_threshold"),
    "sparse_decode": ("values", "indices", "W_dec", "b_dec"),
    "sparse_decode_coo": ("values", "rows", "cols", "W_dec", "b_dec"),
    "ghost_grad_loss": ("x", "W_enc", "b_enc", "W_dec", "dead_idx", "residual"),
}


def random_case(op: str, seed: int):
    rng = random.Random(seed)
    n = rng.choice([1, 2, 3, rng.randint(4, 40), rng.randint(40, 300)])
    shape = dict(batch=rng.choice([1, 2, rng.randint(3, 64)]), d_in=rng.choice([1, rng.randint(2, 48)]),
                 n=n, k=rng.choice([1, n, rng.randint(1, n)]))
    if rng.random() < 0.3:
        shape["d_out"] = rng.randint(1, 40)
    integer = rng.random() < 0.5
    dtype = rng.choice([torch.float32, torch.float64])
    case = make_case(op, seed, dtype=dtype, integer=integer, n_dead=rng.randint(1, n), **shape)
    if rng.random() < 0.4:
        limit = 20 if dtype == torch.float32 else 200
        case = scale_magnitudes(case, rng.randint(-limit, limit), rng.randint(-limit, limit))
    if rng.random() < 0.5:
        case = with_layouts(case, {name: rng.choice(LAYOUTS) for name in TENSOR_ARGUMENTS[op]})
    return case


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_fuzz_backend_against_reference(op, backend, monkeypatch):
    start = time.perf_counter()
    for i in range(CASES):
        seed = FIRST_SEED + i
        try:
            case = random_case(op, seed)
            compare_backends(case, monkeypatch, backend)
        except Exception as error:
            raise AssertionError(f"fuzz case failed: SPARSEKIT_FUZZ_SEED={seed} SPARSEKIT_FUZZ_CASES=1 "
                                 f"({op} on {backend}): {error}") from error
    print(f"\nfuzz: {CASES} cases of {op} on {backend} matched the reference in {time.perf_counter() - start:.1f} s "
          f"(seeds {FIRST_SEED}..{FIRST_SEED + CASES - 1})")


def test_fuzz_draws_every_kind_of_case():
    # The generator must actually produce the cases it promises (k=1, k=n, one row, both dtypes,
    # both data kinds, scaled magnitudes, every layout), not just be able to.
    seen = set()
    for seed in range(300):
        case = random_case("topk_encode", seed)
        x = case.arguments(case.leaves)["x"]
        k, n = case.fixed["k"], case.leaves["b_enc"].shape[0] if "b_enc" not in case.views else None
        seen.add(("dtype", x.dtype))
        seen.add(("k=1",) if k == 1 else ("k=n",) if n is not None and k == n else ("k other",))
        seen.add(("rows=1",) if x.shape[0] == 1 else ("rows>1",))
        seen.add(("scaled",) if "scale=" in case.description else ("unscaled",))
        seen.add(("integer", "integer=True" in case.description))
        for layout in LAYOUTS[1:]:
            if f"x:{layout}" in case.description:
                seen.add(("layout", layout))
        if not x.is_contiguous() or x.storage_offset():
            seen.add(("non-contiguous or offset x",))
    for item in [("dtype", torch.float32), ("dtype", torch.float64), ("k=1",), ("k=n",), ("rows=1",),
                 ("scaled",), ("integer", True), ("integer", False), ("layout", "transposed"),
                 ("layout", "strided"), ("layout", "offset"), ("non-contiguous or offset x",)]:
        assert item in seen, item
