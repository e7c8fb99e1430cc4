"""Which rank this process is, and who speaks: under torchrun rank 0 alone prints.

A run on W ranks is one run to the person watching it, so each human-facing line (the progress bar,
"saved to", the final metrics, the run report, warnings about the shared run) comes once, from rank
0. The other ranks say nothing unless something fails on them; then their line names them
(``rank 1 of 2: ...``).

``rank_and_world()`` answers before the process group exists too (torchrun's RANK and WORLD_SIZE),
so the command line can decide what to print before training sets the group up.
``quiet_other_ranks()`` applies the rule to the "sparsekit" logger: on a rank other than 0 it lets
through only errors (logging.ERROR and above), each prefixed with the rank. Every rank runs the same
steps on the same stream and the same checkpoints, so the library's info lines and warnings are the
same on every rank: rank 0's say them for the run.
"""
from __future__ import annotations

import logging
import os

import torch.distributed as dist

from sparsekit._util.log import LOGGER_NAME


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process: the process group's once it exists, else torchrun's RANK
    and WORLD_SIZE, else (0, 1). A malformed variable counts as unset."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    try:
        return int(os.environ.get("RANK", "0") or 0), max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))
    except ValueError:
        return 0, 1


def speaks() -> bool:
    """True on the rank that prints a run's lines: rank 0, or the only process."""
    return rank_and_world()[0] == 0


def rank_prefix() -> str:
    """"rank r of W: " on a multi-rank run (what a failing rank puts before its line), "" otherwise."""
    rank, world = rank_and_world()
    return f"rank {rank} of {world}: " if world > 1 else ""


class _OtherRanksQuiet(logging.Filter):
    """Drops a record below ERROR on ranks other than 0; names the rank on those kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        rank, world = rank_and_world()
        if rank == 0 or world == 1:
            return True
        if record.levelno < logging.ERROR:
            return False
        prefix = f"rank {rank} of {world}: "
        if not str(record.msg).startswith(prefix):
            record.msg = prefix + str(record.msg)
        return True


_FILTER = _OtherRanksQuiet()


def quiet_other_ranks() -> None:
    """Apply the rule of the module docstring to the "sparsekit" logger (once; harmless on one process)."""
    base = logging.getLogger(LOGGER_NAME)
    if _FILTER not in base.filters:
        base.addFilter(_FILTER)
