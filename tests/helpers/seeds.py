"""Fresh random seeds: tests draw new inputs on every run, and print the seed when they fail."""
import numpy as np


def fresh_seed() -> int:
    """A seed from the OS's entropy, below 2**31 (what every seeded API here accepts)."""
    return int(np.random.SeedSequence().generate_state(1)[0]) % 2**31
