"""Crash-safe files: write beside the target, fsync, rename over it, fsync the folder.

A process killed at any moment leaves either the old file or the new one, never part of one.

Never through a link: a temporary file is created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` (an
``lstat`` check first where the platform has no ``O_NOFOLLOW``), so a symbolic link planted under
its name is refused (SymlinkRefused) instead of having its target overwritten; a target that is
itself a link is refused too. ``refuse_symlinks`` checks a whole run folder before a run writes.
"""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Callable


class SymlinkRefused(ValueError):
    """A symbolic link inside a run folder (a checkpoint or output folder): sparsekit never reads or
    writes through one; the message names the link."""


O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # 0 where the platform lacks it (Windows): lstat checks instead
O_BINARY = getattr(os, "O_BINARY", 0)


def fsync_path(path) -> None:
    """fsync a file or a folder (a folder's fsync makes a rename in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def symlink_refused(path, folder=None) -> SymlinkRefused:
    """The error for the link at path (inside the run folder `folder`, when given)."""
    try:
        target = os.readlink(path)
    except OSError:
        target = "?"
    inside = f" inside the run folder {folder}" if folder is not None else ""
    return SymlinkRefused(f"{path} is a symbolic link (to {target}){inside}: sparsekit never reads or writes "
                          f"through links in run folders; remove the link, or choose another folder")


def _is_link(path) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except OSError:
        return False


def refuse_symlinks(directory) -> None:
    """SymlinkRefused naming the first symbolic link inside `directory`: among its entries, and among
    the entries of its checkpoint folders (``step_*`` and ``.step_*``). The folder itself may be a
    link (a run kept on another disk is the user's choice); nothing is followed below it. A folder
    that does not exist yet holds nothing."""
    directory = Path(directory)
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        if entry.is_symlink():
            raise symlink_refused(entry.path, directory)
        if entry.name.lstrip(".").startswith("step_") and entry.is_dir(follow_symlinks=False):
            for inner in os.scandir(entry.path):
                if inner.is_symlink():
                    raise symlink_refused(inner.path, directory)


def open_new(path) -> int:
    """A file descriptor for a new file at path, opened for writing, never through a link:
    SymlinkRefused if path is a link, FileExistsError if anything else is there."""
    if not O_NOFOLLOW and _is_link(path):
        raise symlink_refused(path)
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NOFOLLOW | O_BINARY, 0o644)
    except FileExistsError:
        if _is_link(path):
            raise symlink_refused(path) from None
        raise


def open_nofollow(path, flags: int, mode: int = 0o644) -> int:
    """os.open(path, flags | O_NOFOLLOW): a file descriptor, never through a link (SymlinkRefused
    where path is one; an lstat check first where the platform has no O_NOFOLLOW)."""
    if not O_NOFOLLOW and _is_link(path):
        raise symlink_refused(path)
    try:
        return os.open(path, flags | O_NOFOLLOW | O_BINARY, mode)
    except OSError as error:
        if error.errno == errno.ELOOP or _is_link(path):
            raise symlink_refused(path) from None
        raise


def write_new_file(path, data: bytes) -> None:
    """Write data to a file that must not exist yet (see open_new); no fsync."""
    fd = open_new(path)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def read_file_nofollow(path, limit: int) -> bytes:
    """The bytes of the regular file at path, opened without following a link (SymlinkRefused), and
    checked against `limit` bytes before anything is read (ValueError naming the size)."""
    if not O_NOFOLLOW and _is_link(path):
        raise symlink_refused(path)
    try:
        fd = os.open(path, os.O_RDONLY | O_NOFOLLOW | O_BINARY)
    except OSError:
        if _is_link(path):
            raise symlink_refused(path) from None
        raise
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{path} is not a regular file")
        if info.st_size > limit:
            raise ValueError(f"{path} holds {info.st_size:,} bytes, more than the {limit:,} it may")
        return handle.read(limit + 1)


def atomic_write(path, write: Callable) -> None:
    """Call write(binary file) on a temporary file beside path, fsync it, rename it over path.
    SymlinkRefused if path or the temporary name is a symbolic link."""
    path = Path(path)
    if _is_link(path):
        raise symlink_refused(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = open_new(tmp)
    except FileExistsError:  # a dead process with our pid left it: it is no link (open_new checked)
        tmp.unlink()
        fd = open_new(tmp)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def atomic_write_bytes(path, data: bytes) -> None:
    atomic_write(path, lambda handle: handle.write(data))


def atomic_save_tensors(tensors: dict, path, metadata: dict | None = None) -> None:
    """safetensors file of CPU copies of tensors, written atomically."""
    from safetensors.torch import save
    data = save({name: t.detach().contiguous().cpu() for name, t in tensors.items()}, metadata=metadata)
    atomic_write_bytes(path, data)
