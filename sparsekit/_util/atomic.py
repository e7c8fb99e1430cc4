"""Crash-safe files: write beside the target, fsync, rename over it, fsync the folder.

A process killed at any moment leaves either the old file or the new one, never part of one.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def fsync_path(path) -> None:
    """fsync a file or a folder (a folder's fsync makes a rename in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, write: Callable) -> None:
    """Call write(binary file) on a temporary file beside path, fsync it, rename it over path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
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
