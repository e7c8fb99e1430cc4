"""Data-parallel training on torch.distributed: launch with ``torchrun``, the trainer does the rest.

    torchrun --nproc-per-node 8 -m sparsekit train --data acts/ --n-latents 1048576 --k 32 ...

``train`` asks ``data_parallel(batch_size)`` for the run's context (through
``parallel.training_context``). Without a process group (and with WORLD_SIZE unset or 1) that is
``SingleProcess`` (``parallel.single``), whose methods do nothing extra; under
torchrun the process group is set up from its environment (``init_distributed``: NCCL on GPUs,
gloo on CPUs, timeouts set) and every rank gets a ``DataParallel`` context:

- ``batch_size`` stays the *global* batch (tokens per optimizer step, summed over ranks). Every
  rank reads the same stream (so the source state, held-out split and carried rows in a
  checkpoint are the same on every rank) and keeps its own contiguous block of each batch:
  rank r of W computes rows [r*B/W, (r+1)*B/W). A W-rank run with batch B therefore computes on
  exactly the rows of a 1-process run with batch B.
- Gradients are averaged by an explicit bucketed all-reduce after ``backward`` and before the
  dictionary's own gradient surgery (``remove_parallel_decoder_grad``), clipping and the Adam
  step, so the projection, clipping and decoder renormalisation see the averaged gradient and
  every rank takes the identical step.
- BatchTopK selects the top B*k activations of the *global* batch: each rank all-gathers its
  local top-B*k candidates, all ranks pick the same global set (ties: lower global flat index,
  as in ``ops.batchtopk_encode``), and each keeps its own entries.
- Fire counts (dead-latent counters) and the logged metrics are all-reduced before use.
- Only rank 0 writes checkpoints, metrics and plots; every rank resumes from them.

- AuxK and ghost grads use the global batch's statistics: AuxK divides by the variance of the
  whole batch's residual (its sums all-reduced), ghost grads scale by the whole batch's mse_main
  over its ghost loss; with the reduced dead set both equal one process's terms (tested).
- A failure on one rank stops every rank promptly with its message: a non-finite loss is checked
  collectively (every rank raises TrainingDiverged naming the rank), and any other exception is
  published in the process group's store before the failing rank exits, so a peer whose
  collective breaks raises ``PeerRankFailed`` with that rank's error instead of waiting for
  the timeout (``failures_propagated``, around every ``train`` call).

What is guaranteed against one process with the same batch_size (docs/reliability.md, class 10):
the same rows, the same selections and the same update rules, summed in another order. Each rank
sums its own block and the all-reduce adds the W partial sums (gradients, metric sums, AuxK's and
ghost grads' normalisers), where one process sums the whole batch at once; floating-point addition
is not associative, so the results differ by rounding, not by method. Every rank ends bit-identical
to every other rank (the same averaged gradient, the same step). Measured (2 gloo ranks on the CPU,
TopK, BatchTopK, each with AuxK, and ReLU with ghost grads, d_in=12, n=48, batch 64, 300 steps):
parameters within 8.5e-16 of one process's in float64 and within 3.7e-7 in float32, relative to
each tensor's largest entry, the final metrics within 4e-16 and 1.1e-7; the tests hold float64 to
1e-12 and float32 to 2e-6 (tests/training/test_distributed.py). Rounding differences can change a
TopK or BatchTopK selection where two pre-activations tie to within it, after which the runs part
by more than rounding: not seen in these runs, and not excluded for long float32 runs.

Not exact across world sizes (documented, not hidden): resampling draws its inputs from rank 0's
rows (the result is broadcast, so ranks never diverge).

What the run prints (``ranks``): rank 0 alone logs and prints (the progress bar, the run report of
``describe()`` at the start: world size, backend, global and per-rank batch, what each rank reads;
"saved to" and the final metrics of ``sparsekit train``); another rank prints only when something
fails on it, naming itself ("rank 1 of 2: ...").

Latent sharding (model parallel) lives in ``sparsekit.training.parallel.sharded``.
"""
from __future__ import annotations

import contextlib
import datetime
import math
import os
import time
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from sparsekit import ops
from sparsekit.errors import TrainingDiverged
from sparsekit.sae import registry
from sparsekit.sae.base import SAEOutput
from sparsekit.training import guards
from sparsekit.training.dead_latents import auxk_loss

from .ranks import quiet_other_ranks
from .single import SingleProcess

TIMEOUT_ENV = "SPARSEKIT_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600.0           # a collective that waits longer than this raises
BUCKET_BYTES = 25 * 2 ** 20         # gradient all-reduce bucket (DDP's default size)
REQUIRED_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class DistributedInfo(NamedTuple):
    """Where this process sits: rank of world_size, local_rank on its node, backend, device."""
    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device


def launched_by_torchrun() -> bool:
    """True when the environment describes more than one rank (torchrun sets WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def init_distributed(backend: str | None = None, timeout_s: float | None = None) -> DistributedInfo:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT); a no-op returning the current group when one exists already.

    backend: None picks NCCL when CUDA is available (and binds this process to GPU LOCAL_RANK),
    gloo otherwise. timeout_s: how long a collective may wait for the other ranks before it
    raises (default SPARSEKIT_DIST_TIMEOUT_S or 600 s), so a dead peer never hangs the job.
    """
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed")
    if dist.is_initialized():
        return current_info()
    missing = [name for name in REQUIRED_ENV if name not in os.environ]
    if missing:
        raise ValueError(f"init_distributed needs the environment torchrun sets; missing {', '.join(missing)} "
                         f"(launch with `torchrun --nproc-per-node N -m sparsekit train ...`)")
    if timeout_s is None:
        timeout_s = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be nccl or gloo, got {backend!r}")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    kwargs = {}
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        kwargs["device_id"] = torch.device("cuda", local_rank)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    quiet_other_ranks()
    return current_info()


def shutdown_distributed() -> None:
    """Leave the process group cleanly: a barrier, then destroy it. Without the barrier a rank that
    destroys its gloo group while a peer still talks to it can abort at exit ("terminate called
    without an active exception", seen about 1 run in 7 here). Call it only on success: a peer that
    failed never reaches the barrier."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class PeerRankFailed(RuntimeError):
    """Another rank of the run raised; this rank stopped too, with that rank's error in the message."""


def selects_over_the_batch(architecture) -> bool:
    """Whether a registered architecture picks its codes over the whole batch (BatchTopK codes): data
    parallel then selects over the global batch, all ranks' candidates gathered."""
    cls = registry.ARCHITECTURES.get(architecture)
    return cls is not None and cls.code_kind == "batchtopk"


FAILURE_KEY = "sparsekit/failure"
PEER_FAILURE_WAIT_S = 2.0           # how long a broken collective waits for the failed peer's message
_runs_started = 0                   # train calls in this process; the same count on every rank


def _in_multi_rank_group() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextlib.contextmanager
def failures_propagated():
    """Run a multi-rank step sequence (a ``train`` call) so that an error on one rank stops every rank.

    The rank that raises writes "rank r failed: Type: message" to the process group's store under
    this run's key and re-raises. When its process ends (as a torchrun worker does on an uncaught
    error) its connections close and every peer's pending or next collective breaks at once (gloo)
    instead of after the timeout; the peer finds the message and raises ``PeerRankFailed`` with it.
    The group is kept, so a caller that catches the error may train again in the same processes
    (as the resume test does); while such a caller keeps the failed process alive its peers wait
    for their timeout. On NCCL a peer blocked in a collective may only stop at the timeout
    (SPARSEKIT_DIST_TIMEOUT_S): not run here. Without a multi-rank process group this does nothing.
    """
    global _runs_started
    _runs_started += 1
    run = _runs_started
    try:
        yield
    except BaseException as error:
        if not _in_multi_rank_group():
            raise
        rank, world = dist.get_rank(), dist.get_world_size()
        # A broken collective is a DistError or (gloo) a plain RuntimeError; any other error is this rank's own.
        broken = isinstance(error, dist.DistError) or type(error) is RuntimeError
        peer = _peer_failure(run, rank, world) if broken else None
        if peer is not None:
            raise PeerRankFailed(f"stopped because {peer}") from error
        _publish_failure(run, rank, error)
        raise


def _store():
    return dist.distributed_c10d._get_default_store()


def _publish_failure(run: int, rank: int, error: BaseException) -> None:
    try:
        _store().set(f"{FAILURE_KEY}/{run}/{rank}", f"rank {rank} failed: {type(error).__name__}: {error}")
    except Exception:  # the store is gone too (its server was rank 0): the peers see the broken collective
        pass


def _peer_failure(run: int, rank: int, world: int) -> str | None:
    """Another rank's published failure for this run, or None after PEER_FAILURE_WAIT_S."""
    keys = [f"{FAILURE_KEY}/{run}/{r}" for r in range(world) if r != rank]
    deadline = time.monotonic() + PEER_FAILURE_WAIT_S
    try:
        store = _store()
        while True:
            for key in keys:
                if store.check([key]):
                    return store.get(key).decode(errors="replace")
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)
    except Exception:
        return None


def current_info() -> DistributedInfo:
    """The process group's rank, size and device (rank 0 of 1 on the CPU when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistributedInfo(0, 1, 0, "none", torch.device("cpu"))
    backend = dist.get_backend()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    return DistributedInfo(dist.get_rank(), dist.get_world_size(), local_rank, backend, device)


def check_same_everywhere(fingerprint, group=None) -> None:
    """ValueError unless every rank passed an equal fingerprint (e.g. batch size and configuration).
    Also a barrier: no rank starts (or reads a checkpoint) before every rank got here."""
    fingerprints = [None] * dist.get_world_size(group)
    dist.all_gather_object(fingerprints, fingerprint, group=group)
    if any(f != fingerprints[0] for f in fingerprints):
        differing = [r for r, f in enumerate(fingerprints) if f != fingerprints[0]]
        raise ValueError(f"ranks {differing} were started with a different batch size or configuration "
                         f"than rank 0: every rank must run the same command")


def data_parallel(batch_size: int, fingerprint: str = ""):
    """The trainer's context: SingleProcess, or DataParallel over the process group (set up from
    torchrun's environment when needed). batch_size is the global batch; it must split evenly.
    fingerprint: text every rank must agree on (e.g. the config); a mismatch raises ValueError."""
    if not (dist.is_available() and (dist.is_initialized() or launched_by_torchrun())):
        return SingleProcess()
    init_distributed()
    if dist.get_world_size() == 1:
        return SingleProcess()
    return DataParallel(batch_size, fingerprint)


class DataParallel(SingleProcess):
    """One rank of a data-parallel run (see the module docstring)."""

    shares_encoder_pass = False  # its AuxK and ghost terms use the global batch's statistics

    def __init__(self, batch_size: int, fingerprint: str = "", group=None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.is_writer = self.rank == 0
        if batch_size % self.world_size:
            raise ValueError(f"TrainConfig.batch_size={batch_size} must be a multiple of the world size "
                             f"{self.world_size}: it is the global batch, split evenly across ranks")
        self.batch_size = batch_size
        check_same_everywhere((batch_size, fingerprint), group)

    def describe(self, sae) -> str:
        """What ran: world size, backend and device, the global and per-rank batch, what each rank reads."""
        rows = self.batch_size // self.world_size
        return (f"data parallel, world size {self.world_size} ({dist.get_backend(self.group)}, {sae.W_enc.device}): "
                f"global batch {self.batch_size:,} rows a step, per-rank batch {rows:,}; every rank reads the whole "
                f"stream and computes on its own block of each batch (rank r: rows [{rows:,}r, {rows:,}(r+1))); "
                f"gradients are averaged, and rank 0 alone writes checkpoints, metrics and the dictionary")

    # --- data ------------------------------------------------------------------------------

    def local_rows(self, t: Tensor | None) -> Tensor | None:
        """This rank's block of a global batch: rows [rank*B/W, (rank+1)*B/W) of t [B, ...]."""
        if t is None:
            return None
        rows = t.shape[0] // self.world_size
        return t[self.rank * rows:(self.rank + 1) * rows]

    # --- the step --------------------------------------------------------------------------

    def forward(self, sae, x: Tensor, y: Tensor | None):
        """sae(x, y) on this rank's rows; a BatchTopK dictionary in training selects globally."""
        if selects_over_the_batch(getattr(sae, "architecture", None)) and sae.training:
            return self._batchtopk_forward(sae, x, y)
        return sae(x, y)

    def _batchtopk_forward(self, sae, x: Tensor, y: Tensor | None):
        """BatchTopK over the global batch. x [b, d_in] is this rank's block of B = b*W rows.

        Each rank's share of the global top B*k is at most min(B*k, b*n) entries, so its local top
        b*min(W*k, n) (``ops.batchtopk_encode``, row-major, differentiable) are the candidates;
        their values are all-gathered (W * B*k numbers per rank) and a stable descending sort of
        the concatenation (which is in global row-major order) picks the same B*k on every rank.
        """
        if sae.transcoder and y is None:
            raise ValueError("a transcoder needs its target y [B, d_out]")
        target = y if sae.transcoder else x
        rows = x.shape[0]
        per_row = min(self.world_size * sae.k, sae.n_latents)
        candidates = ops.batchtopk_encode(x, sae.W_enc, sae.encoder_bias(), per_row)
        gathered = [torch.empty_like(candidates.values) for _ in range(self.world_size)]
        dist.all_gather(gathered, candidates.values.detach().contiguous(), group=self.group)
        everyone = torch.cat(gathered)
        order = torch.sort(everyone, descending=True, stable=True).indices[:rows * self.world_size * sae.k]
        chosen = torch.zeros(everyone.shape[0], dtype=torch.bool, device=everyone.device)
        chosen[order] = True
        segment = candidates.values.shape[0]
        mine = chosen[self.rank * segment:(self.rank + 1) * segment]
        codes = ops.BatchTopKCodes(candidates.values[mine], candidates.rows[mine], candidates.cols[mine])
        sae.update_threshold(everyone[order])  # the global batch's smallest kept value, same on all ranks
        x_hat = ops.sparse_decode_coo(codes.values, codes.rows, codes.cols, sae.W_dec, sae.b_dec, rows)
        losses = {"mse": (x_hat - target).pow(2).sum(-1).mean(), **sae.sparsity_losses(codes, x)}
        return SAEOutput(x_hat, codes, losses)

    @torch.no_grad()
    def average_gradients(self, params) -> None:
        """Average .grad over ranks in buckets of BUCKET_BYTES. A parameter with a gradient on
        some rank but not another counts as zero there; one without a gradient anywhere keeps none."""
        params = list(params)
        device = params[0].device
        present = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
        dist.all_reduce(present, op=dist.ReduceOp.MAX, group=self.group)
        grads = []
        for p, anywhere in zip(params, present.tolist()):
            if anywhere:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                grads.append(p.grad)
        for bucket in _buckets(grads, BUCKET_BYTES):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat, group=self.group)
            flat /= self.world_size
            offset = 0
            for g in bucket:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()

    def sum(self, t: Tensor) -> Tensor:
        """The sum of t over ranks (a new tensor; e.g. fire counts [n] int64)."""
        total = t.clone()
        dist.all_reduce(total, group=self.group)
        return total

    @torch.no_grad()
    def add_to_window(self, window, losses: dict, target: Tensor, x_hat: Tensor, counts: Tensor, rows: int) -> None:
        """Add the global batch to the logging window: loss terms averaged over ranks, squared
        error and variance (about the global batch mean) summed, as the single-process window does.
        counts are already global; rows is the global batch."""
        names = list(losses)
        local = torch.cat([
            torch.stack([torch.as_tensor(losses[name], dtype=torch.float64).detach().to(target.device).reshape(())
                         for name in names]) / self.world_size,
            (x_hat - target).double().pow(2).sum().reshape(1),
            target.double().pow(2).sum().reshape(1),
            target.double().sum(0)])
        dist.all_reduce(local, group=self.group)
        loss_means, sq_err, sum_sq, column_sums = local[:len(names)], local[len(names)], local[len(names) + 1], \
            local[len(names) + 2:]
        window.steps += 1
        for name, value in zip(names, loss_means.tolist()):
            window.sums[name] = window.sums.get(name, 0.0) + value
        window.sq_err += float(sq_err)
        window.variance += float(sum_sq - column_sums.pow(2).sum() / rows)
        window.active += float(counts.sum())
        window.rows += rows

    def check_loss(self, step: int, loss: Tensor, losses: dict, config) -> None:
        """TrainingDiverged on every rank when the loss is NaN or Inf on any rank (one all-reduce of
        W numbers): the diverging rank's message names its loss terms, the others name that rank."""
        everyone = torch.zeros(self.world_size, dtype=torch.float64, device=loss.device)
        everyone[self.rank] = loss.detach().double()
        dist.all_reduce(everyone, group=self.group)
        values = everyone.tolist()
        bad = [r for r, value in enumerate(values) if not math.isfinite(value)]
        if not bad:
            return
        if self.rank in bad:
            try:
                guards.check_loss(step, loss, losses, config)
            except TrainingDiverged as error:
                raise TrainingDiverged(f"rank {self.rank} of {self.world_size}: {error}", step + 1) from None
        raise TrainingDiverged(
            f"rank {self.rank} of {self.world_size}: training diverged at step {step + 1}: the loss is "
            f"{values[bad[0]]} on rank {bad[0]} (ranks {bad} non-finite; this rank's loss {values[self.rank]:.4g}); "
            f"{guards.how_to_resume(config)}", step + 1)

    def auxk_loss(self, sae, x: Tensor, residual: Tensor, dead: Tensor, k_aux: int) -> Tensor:
        """AuxK normalised by the global batch's residual variance: the mean over ranks of this
        value is one process's AuxK on the whole batch, and so are the averaged gradients."""
        return auxk_loss(sae, x, residual, dead, k_aux, variance=self.residual_variance(residual))

    @torch.no_grad()
    def residual_variance(self, residual: Tensor) -> Tensor:
        """The global batch's residual variance (as ``auxk_loss`` computes it on one batch) from
        this rank's block residual [b, d_out]: sums of squares and column sums all-reduced. 0-d."""
        sums = torch.cat([residual.double().pow(2).sum().reshape(1), residual.double().sum(0)])
        dist.all_reduce(sums, group=self.group)
        rows = residual.shape[0] * self.world_size
        return ((sums[0] - sums[1:].pow(2).sum() / rows) / rows).to(residual.dtype)

    @torch.no_grad()
    def ghost_factor(self, loss: Tensor, mse_main: Tensor, eps: float = 1e-8) -> Tensor:
        """mse_main / (L + eps) of the global batch from this rank's ghost loss L and mse_main (0-d each)."""
        means = torch.stack([loss.detach(), mse_main.detach()]).double()
        dist.all_reduce(means, group=self.group)
        means /= self.world_size
        return (means[1] / (means[0] + eps)).to(loss.dtype)

    def ghost_loss(self, sae, x: Tensor, residual: Tensor, dead: Tensor, mse_main: Tensor,
                   eps: float = 1e-8) -> Tensor:
        """Ghost grads scaled by the global batch's statistics. The term (``reference.ghost_grad_loss``)
        is L * mse_main / (L + eps) with the factor detached; here L is this rank's ghost loss and
        the factor uses L and mse_main averaged over ranks (one all-reduce of 2 numbers), so the
        averaged gradient and the mean value equal one process's on the whole batch."""
        if dead.numel() == 0:
            return x.new_zeros(())
        pre_dead = x @ sae.W_enc[:, dead] + sae.encoder_bias(dead)
        ghost = torch.exp(pre_dead) @ sae.W_dec[dead].detach()
        r = residual.detach()
        scale = (r.norm(dim=-1, keepdim=True) / (2 * ghost.norm(dim=-1, keepdim=True) + eps)).detach()
        loss = (ghost * scale - r).pow(2).sum(-1).mean()
        return loss * self.ghost_factor(loss, mse_main, eps)

    @torch.no_grad()
    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Copy rank 0's parameters and buffers to every rank (after an update made from local data)."""
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=dist.get_global_rank(self.group, 0) if self.group else 0, group=self.group)

    def barrier(self) -> None:
        dist.barrier(group=self.group)


def _buckets(tensors: list[Tensor], max_bytes: int):
    """Consecutive groups of same-dtype tensors of at most max_bytes each (a larger tensor alone)."""
    bucket, size = [], 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if bucket and (size + nbytes > max_bytes or t.dtype != bucket[0].dtype):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += nbytes
    if bucket:
        yield bucket


def step_communication_bytes(d_in: int, n_latents: int, d_out: int | None = None, batch_size: int = 4096,
                             k: int = 32, world_size: int = 8, bytes_per_value: int = 4,
                             architecture: str = "topk") -> dict:
    """Bytes each rank sends per optimizer step in a data-parallel run (ring all-reduce sends
    2(W-1)/W of the buffer; an all-gather sends the rank's own block to W-1 peers, ring-relayed).

    Gradients: W_enc, b_enc, W_dec, b_dec (+ b_in for a transcoder). BatchTopK adds the candidate
    all-gather: each rank's B*k values, relayed around the ring. Fire counts: n int64 per step.
    """
    d_out = d_in if d_out is None else d_out
    W = world_size
    params = d_in * n_latents + n_latents + n_latents * d_out + d_out
    ring = 2 * (W - 1) / W
    result = {"gradient_allreduce": ring * params * bytes_per_value,
              "fire_count_allreduce": ring * n_latents * 8,
              "metrics_allreduce": ring * (d_out + 8) * 8}
    if selects_over_the_batch(architecture):
        result["batchtopk_allgather"] = (W - 1) * min(batch_size * k, batch_size // W * n_latents) * bytes_per_value
    result["total"] = sum(result.values())
    return result
