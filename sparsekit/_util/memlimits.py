"""How many bytes of host memory this process can still allocate: the smallest of every limit that
applies to it, so that a size check refuses what the kernel (or an OOM killer) would refuse later.

The limits read (each a ``Limit(source, available)``, ``available`` in bytes):

- ``MemAvailable`` in /proc/meminfo (the whole machine);
- cgroup v2: ``memory.max - memory.current`` of this process's cgroup (the path in
  /proc/self/cgroup's ``0::`` line) and of every cgroup above it up to the mount root: a parent's
  limit binds its children, so a nested cgroup is held to the tightest of them;
- cgroup v1: ``memory.limit_in_bytes - memory.usage_in_bytes`` the same way, under the memory
  controller's mount (the ``memory`` line of /proc/self/cgroup); a limit of 2^60 or more is v1's
  "unlimited";
- ``ulimit -v`` (RLIMIT_AS): the soft limit minus the address space already mapped (VmSize in
  /proc/self/status), since every allocation maps address space first.

A cgroup's usage counts page cache, which the kernel reclaims before it refuses memory: the
``inactive_file`` bytes of its memory.stat are subtracted from it. Files are read under ``root``
("/" normally; tests point it at a folder of fakes); a file that is missing or unreadable is a
limit that does not apply. Nothing here imports torch (a leaf every layer may use).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

try:
    import resource
except ImportError:  # Windows: no rlimits
    resource = None

UNLIMITED = 2**60  # cgroup v1 writes "no limit" as a huge page-aligned number (9223372036854771712)


class Limit(NamedTuple):
    source: str     # what it is, for messages ("cgroup v2 /sys/fs/cgroup/a/b/memory.max", "ulimit -v")
    available: int  # bytes still allowed


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _number(path: Path) -> int | None:
    text = _read(path)
    try:
        return int(text.strip()) if text is not None else None
    except ValueError:  # "max" (cgroup v2's no limit) or garbage
        return None


def _stat_field(path: Path, name: str) -> int:
    for line in (_read(path) or "").splitlines():
        key, _, value = line.partition(" ")
        if key == name and value.strip().isdigit():
            return int(value)
    return 0


def _cgroup_paths(root: Path) -> dict[str, str]:
    """/proc/self/cgroup -> {"v2": path} and/or {"v1": path of the memory controller}."""
    found = {}
    for line in (_read(root / "proc/self/cgroup") or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            found["v2"] = path
        elif "memory" in controllers.split(","):
            found["v1"] = path
    return found


def _levels(mount: Path, path: str):
    """The cgroup folder for ``path`` under ``mount``, then each parent up to the mount itself."""
    parts = [part for part in path.strip().split("/") if part and part not in (".", "..")]
    for depth in range(len(parts), -1, -1):
        yield mount.joinpath(*parts[:depth])


def cgroup_limits(root="/") -> list[Limit]:
    """Every cgroup memory limit (v2 and v1) on this process's cgroup and the ones above it."""
    root = Path(root)
    limits = []
    paths = _cgroup_paths(root)
    if "v2" in paths:
        for folder in _levels(root / "sys/fs/cgroup", paths["v2"]):
            limit, used = _number(folder / "memory.max"), _number(folder / "memory.current")
            if limit is not None and used is not None:
                used -= min(used, _stat_field(folder / "memory.stat", "inactive_file"))
                limits.append(Limit(f"cgroup v2 {folder / 'memory.max'}", max(0, limit - used)))
    if "v1" in paths:
        for folder in _levels(root / "sys/fs/cgroup/memory", paths["v1"]):
            limit, used = _number(folder / "memory.limit_in_bytes"), _number(folder / "memory.usage_in_bytes")
            if limit is not None and used is not None and limit < UNLIMITED:
                used -= min(used, _stat_field(folder / "memory.stat", "total_inactive_file"))
                limits.append(Limit(f"cgroup v1 {folder / 'memory.limit_in_bytes'}", max(0, limit - used)))
    return limits


def address_space_limit(root="/") -> Limit | None:
    """``ulimit -v``: RLIMIT_AS's soft limit minus the address space mapped now (VmSize); None when unlimited."""
    if resource is None or not hasattr(resource, "RLIMIT_AS"):
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    mapped = 0
    for line in (_read(Path(root) / "proc/self/status") or "").splitlines():
        if line.startswith("VmSize:"):
            mapped = int(line.split()[1]) * 1024
    return Limit("ulimit -v (RLIMIT_AS)", max(0, soft - mapped))


def machine_limit(root="/") -> Limit | None:
    """MemAvailable from /proc/meminfo (else the free pages sysconf reports); None when unknown."""
    for line in (_read(Path(root) / "proc/meminfo") or "").splitlines():
        if line.startswith("MemAvailable:"):
            return Limit("MemAvailable", int(line.split()[1]) * 1024)
    if str(root) != "/":
        return None
    try:
        return Limit("free pages", os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError):
        return None


def host_limits(root="/") -> list[Limit]:
    """Every limit that applies to this process's host memory."""
    found = [machine_limit(root), *cgroup_limits(root), address_space_limit(root)]
    return [limit for limit in found if limit is not None]


def tightest(root="/") -> Limit | None:
    """The limit that leaves the fewest bytes (None when none is known)."""
    limits = host_limits(root)
    return min(limits, key=lambda limit: limit.available) if limits else None


def fmt_bytes(size: int) -> str:
    """'1,234,567,890 bytes (1.15 GiB)'."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size:,} bytes ({size / scale:,.3g} {unit})"
    return f"{size:,} bytes"
