"""How a training run spreads over processes: one process (``single``), data parallel (``data``),
latents sharded over ranks, or a 2-D mesh of both (``sharded``).

``training_context(sae, config)`` is the trainer's entry: the context whose methods run each
step's work on this rank (the plain step on one process) and exchange what the ranks must share.
"""
from __future__ import annotations

from .data import data_parallel
from .ranks import quiet_other_ranks
from .sharded import MeshTraining, ShardedTraining
from .single import SingleProcess

__all__ = ["SingleProcess", "training_context"]


def training_context(sae, config, fingerprint: str = ""):
    """The trainer's context for `sae`: ``ShardedTraining`` for a latent-sharded dictionary (its
    process group must exist; ``MeshTraining`` on a 2-D mesh), else
    ``data_parallel(config.batch_size, fingerprint)``: ``SingleProcess`` or ``DataParallel``.
    fingerprint: text every rank must agree on (e.g. the config); a mismatch raises ValueError.
    From here on the "sparsekit" logger speaks from rank 0 alone (``ranks.quiet_other_ranks``)."""
    quiet_other_ranks()
    if getattr(sae, "latent_sharded", False):
        return (ShardedTraining if sae.data_group is None else MeshTraining)(sae, config, fingerprint)
    return data_parallel(config.batch_size, fingerprint)
