"""The exceptions a training run stops with, each carrying what to do next in its message."""
from __future__ import annotations


class TrainingDiverged(RuntimeError):
    """NaN or Inf in the loss, the parameters or the optimizer state: the run stopped at ``step``
    without writing the bad state; the message names the cause, the last good checkpoint and how
    to resume."""

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


class CheckpointDirBusy(RuntimeError):
    """Another live run holds the checkpoint folder's lock."""


class CheckpointWriteFailed(OSError):
    """Writing a checkpoint failed (a full disk, say); nothing written before was touched."""


class InsufficientMemory(MemoryError):
    """A configuration's estimated memory exceeds what the device has available; ``estimate``
    holds the breakdown (sparsekit.training.memory.MemoryEstimate)."""

    def __init__(self, message: str, estimate=None, available: int | None = None):
        super().__init__(message)
        self.estimate, self.available = estimate, available


class SourceExhausted(ValueError):
    """The activation source stopped yielding batches before the run had what it needed."""


class BackendUnavailable(RuntimeError):
    """SPARSEKIT_BACKEND or SPARSEKIT_ISA asks for an implementation that cannot run here (an
    unknown name, a level this CPU lacks, an extension that was not built); the message names the
    variable and what can run."""
