"""What keeps a long training run safe: one run per checkpoint folder (a lock), a memory check
before anything large is allocated, and a stop at the first NaN or Inf that names the step, the
cause and the checkpoint to resume from.

``train`` is wrapped with :func:`guard_run`; its loop calls :func:`check_loss` and
:func:`check_parameters`.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import inspect
import os
import socket
import warnings
from pathlib import Path

import torch

from sparsekit._util.atomic import open_nofollow
from sparsekit.errors import CheckpointDirBusy, TrainingDiverged
from sparsekit.ops import checks
from sparsekit.sae.base import SparseDictionary

from . import checkpoint as ckpt
from . import memory
from .config import TrainConfig
from .parallel import ranks

try:
    import fcntl
except ImportError:  # Windows: the lock goes through the filelock package instead
    fcntl = None

LOCK_FILE = ".lock"
FILELOCK_FILE = ".lock.filelock"  # the file filelock locks where fcntl is missing; LOCK_FILE names the holder


def _busy(directory: Path, holder: str) -> CheckpointDirBusy:
    return CheckpointDirBusy(f"checkpoint_dir {directory} is in use by another run ({holder or 'another process'}); "
                             f"wait for it to finish or stop it, or choose another checkpoint_dir")


def _holder_line() -> bytes:
    return f"pid {os.getpid()} on {socket.gethostname()}\n".encode()


@contextlib.contextmanager
def _flock(directory: Path, path: Path):
    """The exclusive flock on directory/.lock, which also names its holder."""
    fd = open_nofollow(path, os.O_RDWR | os.O_CREAT)  # a planted .lock link is refused, its target untouched
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise _busy(directory, os.pread(fd, 200, 0).decode(errors="replace").strip()) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, _holder_line(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock


@contextlib.contextmanager
def _filelock(directory: Path, path: Path):
    """Where fcntl is missing (Windows): filelock's lock on directory/.lock.filelock (the OS's lock
    on Windows, dropped when its holder dies; elsewhere filelock's soft lock, whose owner record lets
    it break a lock left by a dead process), and the holder's name written to directory/.lock."""
    with warnings.catch_warnings():  # off Windows, filelock without fcntl warns that its lock is a soft one
        warnings.filterwarnings("ignore", message="only soft file lock is available")
        import filelock  # a dependency of torch; imported here, where it is needed

    lock = filelock.FileLock(str(directory / FILELOCK_FILE), timeout=0)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        try:
            holder = path.read_bytes()[:200].decode(errors="replace").strip()
        except OSError:
            holder = ""
        raise _busy(directory, holder) from None
    try:
        with open(path, "wb") as f:
            f.write(_holder_line())
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def checkpoint_dir_lock(directory):
    """Hold an exclusive lock on the checkpoint folder for the duration; CheckpointDirBusy naming the
    holder (directory/.lock: "pid N on HOST") if a live process holds it. The lock is an fcntl.flock
    on directory/.lock, or, where fcntl does not exist (Windows), a ``filelock.FileLock``. The OS
    drops either when its holder dies, so a lock left by a killed run never blocks the next one; the
    files stay (unlinking them would race)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    with (_flock if fcntl is not None else _filelock)(directory, path):
        ckpt.remove_stale_temporaries(directory)  # only a dead run can have left them: we hold the lock
        yield path


def guard_run(train):
    """Decorator for sparsekit.train: checks the memory a run needs before it allocates the
    optimizer and buffers, and holds the checkpoint folder's lock while it runs."""
    signature = inspect.signature(train)

    @functools.wraps(train)
    def guarded(*args, **kwargs):
        bound = signature.bind_partial(*args, **kwargs)
        sae, config = bound.arguments.get("sae"), bound.arguments.get("config")
        config = TrainConfig() if config is None else config
        if not (isinstance(sae, SparseDictionary) and isinstance(config, TrainConfig)):
            return train(*args, **kwargs)  # train reports the wrong types itself
        config.validate()
        params = sum(p.numel() * p.element_size() for p in sae.parameters())
        memory.check_fits(memory.estimate_for(sae, config), sae.W_enc.device, already_allocated=params,
                          what=f"training this {sae.architecture} dictionary (n_latents={sae.n_latents}, "
                               f"batch_size={config.batch_size})")
        if config.checkpoint_dir is None or not ranks.speaks():  # rank 0 owns the folder
            return train(*args, **kwargs)
        with checkpoint_dir_lock(config.checkpoint_dir):
            return train(*args, **kwargs)

    return guarded


def how_to_resume(config) -> str:
    """What to do after a divergence: resume from the newest checkpoint, or start again, with a lower LR."""
    lr = config.lr
    advice = f"a lower TrainConfig.lr (now {lr:g}; try {lr / 10:g})"
    found = ckpt.complete_checkpoints(config.checkpoint_dir) if config.checkpoint_dir else []
    if found:
        return (f"nothing was written after the last good checkpoint, {found[-1]}: resume from it with "
                f"train(..., resume=True) (sparsekit train --resume) and {advice}")
    where = "no checkpoint was written yet" if config.checkpoint_dir else "no checkpoint_dir was set"
    return f"{where}: start again with {advice}, and a checkpoint_dir to keep progress"


def check_loss(step: int, loss: torch.Tensor, losses: dict, config) -> None:
    """TrainingDiverged when the loss is NaN or Inf. ``step``: updates done before this one; the
    message counts like the checkpoints (step N is the N-th update)."""
    if torch.isfinite(loss):
        return
    terms = ", ".join(f"{name}={float(torch.as_tensor(value).detach()):.4g}" for name, value in losses.items())
    raise TrainingDiverged(f"training diverged at step {step + 1}: the loss is {float(loss.detach())} ({terms}); "
                           f"{how_to_resume(config)}", step + 1)


def check_parameters(step: int, sae, config) -> None:
    """TrainingDiverged when the update after ``step`` earlier ones left a NaN or Inf in a parameter."""
    named = list(sae.named_parameters())
    if all(checks.all_finite(p.detach()) for _, p in named):
        return
    bad = [name for name, p in named if not checks.all_finite(p.detach())]
    raise TrainingDiverged(f"training diverged at step {step + 1}: the update left NaN or Inf in {', '.join(bad)}; "
                           f"{how_to_resume(config)}", step + 1)

