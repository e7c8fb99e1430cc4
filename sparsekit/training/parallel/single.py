"""The trainer's context on one process (``SingleProcess``): every method is the plain
single-process step. ``DataParallel`` (``parallel.data``) and ``ShardedTraining``
(``parallel.sharded``) override the methods whose work spreads over ranks.
"""
from __future__ import annotations

import torch
from torch import Tensor

from sparsekit.training import guards
from sparsekit.training.dead_latents import auxk_loss, ghost_loss
from sparsekit.training.metrics import evaluate


class SingleProcess:
    """The context of a run on one process: every method is the plain single-process step."""

    rank, world_size, is_writer = 0, 1, True
    # Whether a TopK dictionary's encoder pass may hand the dead latents' pre-activations to AuxK and
    # ghost grads (training.dead_latents.shared_pass_k): contexts whose remedy terms differ say no.
    shares_encoder_pass = True

    def describe(self, sae) -> str | None:
        """What ran where, for rank 0's report at the start of a multi-rank run (None: one process)."""
        return None

    def local_rows(self, t: Tensor | None) -> Tensor | None:
        return t

    def forward(self, sae, x: Tensor, y: Tensor | None):
        return sae(x, y)

    def average_gradients(self, params) -> None:
        pass

    def sum(self, t: Tensor) -> Tensor:
        return t

    def add_to_window(self, window, losses: dict, target: Tensor, x_hat: Tensor, counts: Tensor, rows: int) -> None:
        window.add(losses, target, x_hat, counts, rows)

    def check_loss(self, step: int, loss: Tensor, losses: dict, config) -> None:
        guards.check_loss(step, loss, losses, config)

    def tracked_latents(self, sae) -> int:
        """How many latents this rank counts (dead-latent counters, fire counts)."""
        return sae.n_latents

    def any_dead(self, dead: Tensor) -> bool:
        return dead.numel() > 0

    def clip_grad_norm(self, sae, params, max_norm: float) -> None:
        torch.nn.utils.clip_grad_norm_(params, max_norm)

    def whole(self, t: Tensor) -> Tensor:
        """A per-latent tensor over every latent of the dictionary (it already is, here)."""
        return t

    def whole_tracker(self, tracker):
        return tracker

    def checkpoint_tensors(self, sae, tensors: dict) -> dict:
        return tensors

    def local_checkpoint(self, sae, tensors: dict) -> dict:
        return tensors

    def evaluate(self, sae, x: Tensor, y: Tensor | None = None, batch_size: int = 4096) -> dict:
        return evaluate(sae, x, y, batch_size)

    def auxk_loss(self, sae, x: Tensor, residual: Tensor, dead: Tensor, k_aux: int) -> Tensor:
        return auxk_loss(sae, x, residual, dead, k_aux)

    def ghost_loss(self, sae, x: Tensor, residual: Tensor, dead: Tensor, mse_main: Tensor) -> Tensor:
        return ghost_loss(sae, x, residual, dead, mse_main)

    def broadcast_module(self, module: torch.nn.Module) -> None:
        pass

    def barrier(self) -> None:
        pass
