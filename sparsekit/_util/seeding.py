"""Seeds derived from keys alone, so a shuffle is a position (seed, epoch, ...) and never a
snapshot of an RNG: what makes an activation stream resume exactly."""
from __future__ import annotations

import numpy as np


def derive_seed(*keys: int) -> int:
    """A 64-bit seed mixed from non-negative ints (numpy's SeedSequence): (seed, epoch) -> seed."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0])


def permutation(n: int, *keys: int) -> np.ndarray:
    """A permutation of range(n) [n] int64, determined by keys alone."""
    return np.random.default_rng(derive_seed(*keys)).permutation(n)
