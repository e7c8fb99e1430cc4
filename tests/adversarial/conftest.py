"""What the hostile-world cases share: a small activation file to point `sparsekit train --data` at."""
import pytest


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """x.npy [128, 8] float32 of fresh random values: valid data, so a case's refusal is the flag's or file's."""
    import numpy as np
    folder = tmp_path_factory.mktemp("data")
    np.save(folder / "x.npy", np.random.default_rng().standard_normal((128, 8)).astype("float32"))
    return folder / "x.npy"
