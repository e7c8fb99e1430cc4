"""The exceptions a training run stops with, each carrying what to do next in its message.

(``SymlinkRefused``, for a symbolic link inside a run folder, lives beside the code that raises it,
in ``sparsekit._util.atomic``: the two bottom layers do not import each other.)"""
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
    """Writing a checkpoint failed (a full disk, say), whatever raised it (an OSError, or
    safetensors' own SafetensorError): the half-written folder was removed and nothing written
    before was touched. ``errno`` is the cause's (ENOSPC for a full disk), or None when it had none."""

    def __init__(self, errno: int | None, message: str):
        super().__init__(errno, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class NoValidCheckpoint(ValueError):
    """A resume found checkpoints, but none of them valid (each one's reason is in the message,
    which also says how to start over): it stops rather than silently start from the beginning."""



class InsufficientMemory(MemoryError):
    """A configuration's estimated memory exceeds what the device has available; ``estimate``
    holds the breakdown (sparsekit.training.memory.MemoryEstimate)."""

    def __init__(self, message: str, estimate=None, available: int | None = None):
        super().__init__(message)
        self.estimate, self.available = estimate, available


class SourceExhausted(ValueError):
    """The activation source stopped yielding batches before the run had what it needed."""


class SourceStalled(ValueError):
    """The activation source kept yielding empty batches (``EMPTY_BATCHES_IN_A_ROW`` in a row,
    ``sparsekit.training.batches``): it stalled, and the run stops instead of hanging."""


class BackendUnavailable(RuntimeError):
    """SPARSEKIT_BACKEND or SPARSEKIT_ISA asks for an implementation that cannot run here (an
    unknown name, a level this CPU lacks, an extension that was not built); the message names the
    variable and what can run."""
