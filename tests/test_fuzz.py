"""Fresh random cases on every run: the C++ backend against the reference, every op.

Each case draws its own shapes (1 up), k (1 up to n), dtype, integer-valued (exact, with ties) or
real-valued (with enforced gaps) data and non-contiguous layouts from one seed; a failure names
the seed, and SPARSEKIT_FUZZ_SEED=<seed> SPARSEKIT_FUZZ_CASES=1 replays it.
SPARSEKIT_FUZZ_CASES sets the number of cases per op (default 400, a few seconds in all).
"""
import os
import random

import pytest
import torch

from op_cases import OPS, compare_backends, make_case

CASES = int(os.environ.get("SPARSEKIT_FUZZ_CASES", "400"))
FIRST_SEED = int(os.environ.get("SPARSEKIT_FUZZ_SEED", random.SystemRandom().randrange(2**31)))


def random_case(op: str, seed: int):
    rng = random.Random(seed)
    n = rng.choice([1, 2, 3, rng.randint(4, 40), rng.randint(40, 300)])
    shape = dict(batch=rng.choice([1, 2, rng.randint(3, 64)]), d_in=rng.choice([1, rng.randint(2, 48)]),
                 n=n, k=rng.choice([1, n, rng.randint(1, n)]))
    if rng.random() < 0.3:
        shape["d_out"] = rng.randint(1, 40)
    integer = rng.random() < 0.5
    noncontiguous = op not in ("sparse_decode_coo", "ghost_grad_loss") and rng.random() < 0.3
    dtype = rng.choice([torch.float32, torch.float64])
    return make_case(op, seed, dtype=dtype, integer=integer, noncontiguous=noncontiguous,
                     n_dead=rng.randint(1, n), **shape)


@pytest.mark.parametrize("op", OPS)
def test_fuzz_cpp_against_reference(op, monkeypatch):
    for i in range(CASES):
        seed = FIRST_SEED + i
        try:
            case = random_case(op, seed)
            compare_backends(case, monkeypatch)
        except Exception as error:
            raise AssertionError(f"fuzz case failed: SPARSEKIT_FUZZ_SEED={seed} SPARSEKIT_FUZZ_CASES=1 "
                                 f"({op}): {error}") from error
