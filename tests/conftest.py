import os

# Triton reads TRITON_INTERPRET when a kernel is first jitted, so it must be set before any
# kernel module is imported; only without CUDA, so a GPU machine runs the kernels natively.
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover - torch is a hard dependency
    pass

import atexit
import shutil
import tempfile

import pytest

# The suite never reads a developer's `sparsekit tune` cache: the crossovers are the defaults unless a
# test writes its own cache (sparsekit.ops.cpu.tuning). The folder goes when the session ends.
os.environ["SPARSEKIT_TUNING_CACHE"] = tempfile.mkdtemp(prefix="sparsekit-tuning-")
atexit.register(shutil.rmtree, os.environ["SPARSEKIT_TUNING_CACHE"], ignore_errors=True)


@pytest.fixture(autouse=True)
def _crossovers_unpinned_after_each_test():
    """A test that resumed a run (which pins its checkpoint's CPU crossovers) leaves none pinned."""
    yield
    from sparsekit.ops.cpu import tuning
    tuning.unpin()


@pytest.fixture
def backend(monkeypatch):
    """Returns a function that forces SPARSEKIT_BACKEND for the rest of the test."""

    def force(name: str) -> None:
        monkeypatch.setenv("SPARSEKIT_BACKEND", name)

    return force


def _torch_threads(count: int):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def two_torch_threads():
    """torch (and so the CPU GEMM's row-tile pool) on 2 threads for the test, restored after."""
    yield from _torch_threads(2)


@pytest.fixture
def one_thread():
    """torch on one thread for the test, restored after: tiny models, where a second thread only
    adds contention on a shared machine."""
    yield from _torch_threads(1)
