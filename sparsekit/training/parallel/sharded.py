"""Latent sharding (model parallel) of a dictionary too wide for one device (TopK, BatchTopK, ReLU).

Rank r of W holds latents [r*n/W, (r+1)*n/W): W_enc [d_in, n/W], b_enc [n/W], W_dec [n/W, d_out]
and their Adam moments, so parameter and optimizer memory per rank falls as 1/W; b_dec (and a
transcoder's b_in) are replicated. Every rank sees the same batch x [B, d_in].

Forward, for a batch:
1. each rank encodes against its shard and keeps its local top-k per row (``ops.topk_encode``);
2. the k candidate values per row are all-gathered ([W, B, k], W*B*k numbers) and every rank picks
   the same global top-k per row (a stable descending sort over the candidates in rank order is
   the ties-to-lower-global-index rule of ``ops.topk_encode``);
3. each rank decodes its kept entries into a partial reconstruction [B, d_out]; an all-reduce sums
   the partials (``_SumShards``: all-reduce forward, identity backward, since the loss after it is
   computed identically on every rank).
The pre-encoder bias enters the encoder through ``_CopyToShards`` (identity forward, all-reduce
backward), so its gradient sums every shard's contribution; sharded parameters need no gradient
communication at all. Gradient clipping takes the norm over all shards (``clip_grad_norm_``).

Per step and rank this communicates B*k values (all-gather) and B*d_out values (all-reduce), and
nothing proportional to n. Tested against one process in float64 (tests/training/test_distributed.py).

AuxK works across shards (``auxk_loss``: the same global top-k over every shard's dead latents);
dead-latent counters are naturally sharded (each rank counts its own latents over the whole batch).

BatchTopK works across shards in training (``LatentShardedBatchTopK``: the top B*k of the whole
batch over every shard, from each shard's local top B*k).

``sparsekit.train`` drives a shard like a dictionary: every rank calls
``train(shard, source, config)`` on the same stream (``ShardedTraining`` is the trainer's context).
Adam moments, the decoder projection and renormalisation stay per shard; clipping uses the global
norm; dead-latent counters are per shard and gathered only for the logged fractions; AuxK runs
over every shard's dead latents. Checkpoints: rank 0 gathers the shards (``dist.gather``, one
tensor at a time) and writes the *full* dictionary's checkpoint, the same file a one-process run
writes, so a run resumes with any number of shards or none (each rank slices its latents out);
the price is one full tensor (and its Adam moment) in rank 0's memory while it is written.
Held-out evaluation runs sharded (BatchTopK through its threshold) and gathers the fire counts.
Not supported for a shard: resampling (ValueError), and the checkpoint folder's lock and memory
check that ``train`` applies to a whole dictionary.

Ghost grads work across shards (``ghost_loss``: the ghost reconstruction summed over shards,
scaled as one process scales it), with ``LatentShardedReLU`` (ReLU + L1) as well as TopK shards.

The 2-D mesh (data x latent): ``mesh(latent_shards)`` splits the world into latent groups (the
ranks holding one dictionary's shards) and data groups (the ranks holding the same shard); a shard
built with ``data_group`` trains through ``MeshTraining``: data parallel over its data group
around latent sharding over its latent group. BatchTopK on a mesh selects over the global batch
and every shard at once (``LatentShardedBatchTopK``: candidates all-gathered over both groups).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from sparsekit import ops
from sparsekit._util.validate import positive_int, positive_number
from sparsekit.sae.base import SAEOutput, SparseDictionary, init_parameters
from sparsekit.sae.batchtopk import BatchTopKSAE
from sparsekit.sae.relu import ReLUSAE
from sparsekit.sae.topk import TopKSAE
from sparsekit.training.dead_latents import DeadLatentTracker

from .data import DataParallel, check_same_everywhere, init_distributed
from .single import SingleProcess


class _CopyToShards(torch.autograd.Function):
    """Identity forward; backward sums the gradient over ranks (a replicated input used by shards)."""

    @staticmethod
    def forward(ctx, t: Tensor, group) -> Tensor:
        ctx.group = group
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _SumShards(torch.autograd.Function):
    """All-reduce sum forward; identity backward (what follows is replicated on every rank)."""

    @staticmethod
    def forward(ctx, t: Tensor, group) -> Tensor:
        total = t.contiguous().clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class LatentShardedTopK(nn.Module):
    """This rank's shard of a TopK SAE or transcoder with n_latents latents (n divisible by W).

    Build it from a full dictionary that every rank constructed identically (``from_dictionary``),
    or directly (``__init__``), which allocates only the shard. ``forward(x, y)`` returns
    SAEOutput(x_hat [B, d_out], codes, losses) like a dictionary; codes are this rank's
    TopKCodes(values [B, k] with non-kept entries zeroed, local indices [B, k]).
    """

    architecture = "topk"
    unit_norm_decoder = True
    dictionary_class = TopKSAE
    latent_sharded = True           # sparsekit.train uses ShardedTraining for it

    config = SparseDictionary.config                       # the full dictionary's configuration
    skip = False                                            # no skip path (from_dictionary refuses one)
    init_decoder_bias = SparseDictionary.init_decoder_bias  # b_dec / b_in are replicated

    def hyperparameters(self) -> dict:
        return {"k": self.k}

    def __init__(self, d_in: int, n_latents: int, k: int | None, d_out: int | None = None, transcoder: bool = False,
                 dtype: torch.dtype = torch.float32, device=None, seed: int = 0, group=None, data_group=None):
        super().__init__()  # k: None for a shard without TopK (LatentShardedReLU)
        self.group = group            # the ranks holding the other shards (latent group)
        self.data_group = data_group  # on a 2-D mesh: the ranks holding this same shard (see ``mesh``)
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self.d_in, self.n_latents = positive_int("d_in", d_in), positive_int("n_latents", n_latents)
        self.k = None if k is None else positive_int("k", k)
        self.d_out = self.d_in if d_out is None else positive_int("d_out", d_out)
        self.transcoder = bool(transcoder)
        if self.n_latents % self.world_size:
            raise ValueError(f"n_latents={n_latents} must be a multiple of the world size {self.world_size}")
        if self.k is not None and self.k > self.n_latents:
            raise ValueError(f"k={k} exceeds n_latents={n_latents}")
        self.n_local = self.n_latents // self.world_size
        self.offset = self.rank * self.n_local
        factory = dict(dtype=dtype, device=device)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + self.rank)  # each rank draws its own rows
        init_parameters(self, self.n_local, gen, factory)  # as a whole dictionary's, on this shard's latents

    @classmethod
    @torch.no_grad()
    def from_dictionary(cls, sae: TopKSAE, group=None, data_group=None) -> "LatentShardedTopK":
        """This rank's shard of a full TopK dictionary (identical on every rank). group: the latent
        group (None: every rank); data_group: on a 2-D mesh, this shard's data group."""
        if type(sae) is not cls.dictionary_class:
            raise ValueError(f"sae must be a {cls.dictionary_class.__name__} (or a {cls.architecture} Transcoder), "
                             f"got {type(sae).__name__}")
        if sae.skip:
            raise ValueError("a skip transcoder cannot be latent-sharded yet: W_skip belongs to no latent shard")
        shard = cls(sae.d_in, sae.n_latents, d_out=sae.d_out, transcoder=sae.transcoder, dtype=sae.W_enc.dtype,
                    device=sae.W_enc.device, group=group, data_group=data_group, **sae.hyperparameters())
        latents = slice(shard.offset, shard.offset + shard.n_local)
        shard.W_enc.copy_(sae.W_enc[:, latents])
        shard.b_enc.copy_(sae.b_enc[latents])
        shard.W_dec.copy_(sae.W_dec[latents])
        shard.b_dec.copy_(sae.b_dec)
        if sae.transcoder:
            shard.b_in.copy_(sae.b_in)
        shard.input_scale, shard.output_scale = sae.input_scale, sae.output_scale
        return shard

    @torch.no_grad()
    def gather(self) -> TopKSAE:
        """The full dictionary, assembled on every rank (for saving; needs n * (d_in + d_out) memory)."""
        sae = self.dictionary_class(self.d_in, self.n_latents, d_out=self.d_out, transcoder=self.transcoder,
                                    dtype=self.W_enc.dtype, device=self.W_enc.device, **self.hyperparameters())
        sae.W_enc.copy_(torch.cat(self._all_gather(self.W_enc.t().contiguous())).t())
        sae.b_enc.copy_(torch.cat(self._all_gather(self.b_enc.detach())))
        sae.W_dec.copy_(torch.cat(self._all_gather(self.W_dec.detach())))
        sae.b_dec.copy_(self.b_dec)
        if self.transcoder:
            sae.b_in.copy_(self.b_in)
        sae.input_scale, sae.output_scale = self.input_scale, self.output_scale
        sae.metadata = dict(getattr(self, "metadata", {}))
        return sae

    def sharded_dims(self) -> dict:
        """The latent dimension of each sharded entry of state_dict(): {name: dim}."""
        return {"W_enc": 1, "b_enc": 0, "W_dec": 0}

    def _all_gather(self, t: Tensor) -> list[Tensor]:
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return parts

    def forward(self, x: Tensor, y: Tensor | None = None) -> SAEOutput:
        """x [B, d_in] (normalised, the same on every rank) -> SAEOutput; losses["mse"] as a dictionary's."""
        if self.transcoder and y is None:
            raise ValueError("a transcoder needs its target y [B, d_out]")
        target = y if self.transcoder else x
        codes, partial = self._global_topk(x, self.W_enc, self._encoder_bias(), self.W_dec, self.k)
        x_hat = _SumShards.apply(partial, self.group) + self.b_dec
        losses = {"mse": (x_hat - target).pow(2).sum(-1).mean()}
        return SAEOutput(x_hat, codes, losses)

    def _encoder_bias(self, latents: Tensor | None = None) -> Tensor:
        """b_enc - pre_bias @ W_enc over this shard's latents (or some of them); the pre-encoder
        bias passes through _CopyToShards so its gradient sums every shard's part."""
        pre_bias = _CopyToShards.apply(self.b_in if self.transcoder else self.b_dec, self.group)
        if latents is None:
            return self.b_enc - pre_bias @ self.W_enc
        return self.b_enc[latents] - pre_bias @ self.W_enc[:, latents]

    def _global_topk(self, x: Tensor, W_cols: Tensor, bias: Tensor, W_rows: Tensor, k: int):
        """The global top-k per row over every shard's columns, and this shard's partial decode.

        x [B, d_in], W_cols [d_in, m] (this shard's candidate latents, m may be 0), bias [m],
        W_rows [m, d_out]; k <= the total m over shards. Returns (TopKCodes(values [B, k'] with
        entries kept by another shard zeroed, local indices [B, k']), partial [B, d_out] without
        b_dec). Shards send [B, k] candidates each, padded with -inf when m < k.
        """
        batch, m = x.shape[0], W_cols.shape[1]
        local_k = min(k, m)
        if local_k:
            codes = ops.topk_encode(x, W_cols, bias, local_k)
            values, indices = codes.values, codes.indices
        else:
            values = x.new_zeros(batch, 0)
            indices = torch.zeros(batch, 0, dtype=torch.int64, device=x.device)
        padded = torch.cat([values.detach(), values.new_full((batch, k - local_k), float("-inf"))], dim=1)
        candidates = torch.cat(self._all_gather(padded), dim=1)                 # [B, W * k]
        winners = torch.sort(candidates, dim=1, descending=True, stable=True).indices[:, :k]
        kept = torch.zeros_like(candidates, dtype=torch.bool).scatter_(1, winners, True)
        values = values * kept[:, self.rank * k:self.rank * k + local_k]
        if not local_k:  # still through bias: every rank's backward must run _CopyToShards' all-reduce
            return ops.TopKCodes(values, indices), x.new_zeros(batch, W_rows.shape[1]) + 0 * bias.sum()
        partial = ops.sparse_decode(values, indices, W_rows, torch.zeros_like(self.b_dec))
        return ops.TopKCodes(values, indices), partial

    def auxk_loss(self, x: Tensor, residual: Tensor, dead: Tensor, k_aux: int, data=None) -> Tensor:
        """AuxK over the dead latents of every shard, equal to ``dead_latents.auxk_loss`` on the
        full dictionary: normalised MSE of the top-k_aux dead latents' reconstruction (no b_dec)
        of the detached residual [B, d_out]. dead [m] int64: this shard's dead latents (local
        indices; e.g. from its own fire counts, which need no reduction: every rank sees the whole
        batch). Returns a 0-d tensor, the same on every rank (zero when no shard has dead latents).
        data: on a 2-D mesh, the DataParallel context over this shard's data group; the variance
        is then the global batch's."""
        residual = residual.detach()
        total = torch.tensor([dead.numel()], dtype=torch.int64, device=x.device)
        dist.all_reduce(total, group=self.group)
        if int(total) == 0:
            return x.new_zeros(())
        k = min(k_aux, int(total))
        _, partial = self._global_topk(x, self.W_enc[:, dead], self._encoder_bias(dead), self.W_dec[dead], k)
        reconstruction = _SumShards.apply(partial, self.group)
        mse = (reconstruction - residual).pow(2).sum(-1).mean()
        if data is not None:
            variance = data.residual_variance(residual)
        else:
            variance = (residual - residual.mean(0)).pow(2).sum(-1).mean()
        return mse / variance.clamp_min(1e-12)

    def ghost_loss(self, x: Tensor, residual: Tensor, dead: Tensor, mse_main: Tensor, eps: float = 1e-8,
                   data=None) -> Tensor:
        """Ghost grads over the dead latents of every shard, equal to ``dead_latents.ghost_loss`` on
        the full dictionary (``reference.ghost_grad_loss``): the ghost reconstruction exp(pre_D) @ W_dec[D]
        is a sum over shards (partials all-reduced), then scaled per row to half the residual's norm;
        L * mse_main / (L + eps) with the factor detached. dead [m] int64: this shard's dead latents
        (local indices, m may be 0). Returns a 0-d tensor, the same on every rank. data: on a 2-D
        mesh, the DataParallel context over this shard's data group (the factor is then the global batch's)."""
        total = torch.tensor([dead.numel()], dtype=torch.int64, device=x.device)
        dist.all_reduce(total, group=self.group)
        if int(total) == 0:
            return x.new_zeros(())
        pre_dead = x @ self.W_enc[:, dead] + self._encoder_bias(dead)
        partial = torch.exp(pre_dead) @ self.W_dec[dead].detach()
        ghost = _SumShards.apply(partial + 0 * pre_dead.sum(), self.group)  # + 0: every rank's backward runs
        r = residual.detach()
        scale = (r.norm(dim=-1, keepdim=True) / (2 * ghost.norm(dim=-1, keepdim=True) + eps)).detach()
        loss = (ghost * scale - r).pow(2).sum(-1).mean()
        if data is not None:
            return loss * data.ghost_factor(loss, mse_main, eps)
        return loss * (mse_main.detach() / (loss.detach() + eps))

    def fire_counts(self, codes) -> Tensor:
        """How many rows activated each of this rank's latents: [n_local] int64 (TopKCodes,
        BatchTopKCodes or dense codes [B, n_local])."""
        if isinstance(codes, ops.TopKCodes):
            return torch.bincount(codes.indices[codes.values > 0], minlength=self.n_local)
        if isinstance(codes, ops.BatchTopKCodes):
            return torch.bincount(codes.cols[codes.values > 0], minlength=self.n_local)
        return (codes > 0).sum(0)

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """As SparseDictionary's: each decoder row is local, so nothing is communicated."""
        if not self.unit_norm_decoder or self.W_dec.grad is None:
            return
        rows = nn.functional.normalize(self.W_dec, dim=-1)
        self.W_dec.grad -= (self.W_dec.grad * rows).sum(-1, keepdim=True) * rows

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        if self.unit_norm_decoder:
            self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def sharded_parameters(self) -> list[nn.Parameter]:
        return [self.W_enc, self.b_enc, self.W_dec]

    def replicated_parameters(self) -> list[nn.Parameter]:
        return [self.b_dec] + ([self.b_in] if self.transcoder else [])

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """Scale every gradient so the global norm (all shards, replicated parameters once) is at
        most max_norm, as torch.nn.utils.clip_grad_norm_ on the full dictionary; returns that norm."""
        def sq(params):
            grads = [p.grad for p in params if p.grad is not None]
            return sum((g.double().pow(2).sum() for g in grads), torch.zeros((), dtype=torch.float64,
                                                                                device=self.W_enc.device))
        sharded = sq(self.sharded_parameters()).reshape(1)
        dist.all_reduce(sharded, group=self.group)
        total = (sharded[0] + sq(self.replicated_parameters())).sqrt()
        scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for p in self.parameters():
            if p.grad is not None:
                p.grad.mul_(scale.to(p.grad.dtype))
        return total


class LatentShardedBatchTopK(LatentShardedTopK):
    """This rank's shard of a BatchTopK SAE: in training, the top B*k activations of the whole batch
    over every shard's latents (ties: lower global flat index row * n + latent, as
    ``ops.batchtopk_encode``). On a 2-D mesh (``data_group`` set) the batch is the *global* one:
    B = D*b rows over the D data ranks' blocks of b rows each. A rank's share of the selection is
    at most min(B*k, b*n_local) entries, so it sends its local top b*min(D*k, n_local) (values and
    global flat indices: 12 bytes each in fp32), all-gathered over its latent group, then over its
    data group (every rank of the mesh); codes are this rank's BatchTopKCodes (values, rows, local
    cols), of varying length. The inference threshold (running mean of the smallest kept
    activation) is updated from the global selection, the same on every rank. In evaluation mode
    each shard encodes through that threshold (dense codes [b, n_local], as ``BatchTopKSAE.encode``)
    and the partial reconstructions are summed."""

    architecture = "batchtopk"
    dictionary_class = BatchTopKSAE

    def hyperparameters(self) -> dict:
        return {"k": self.k, "threshold_momentum": self.threshold_momentum}

    def __init__(self, *args, threshold_momentum: float = 0.99, **kwargs):
        super().__init__(*args, **kwargs)
        self.threshold_momentum = float(threshold_momentum)
        self.register_buffer("threshold", torch.tensor(-1.0, dtype=self.W_enc.dtype, device=self.W_enc.device))

    @classmethod
    @torch.no_grad()
    def from_dictionary(cls, sae: BatchTopKSAE, group=None, data_group=None) -> "LatentShardedBatchTopK":
        shard = super().from_dictionary(sae, group, data_group)
        shard.threshold_momentum = sae.threshold_momentum
        shard.threshold.copy_(sae.threshold)
        return shard

    @torch.no_grad()
    def gather(self) -> BatchTopKSAE:
        sae = super().gather()
        sae.threshold_momentum = self.threshold_momentum
        sae.threshold.copy_(self.threshold)
        return sae

    def forward(self, x: Tensor, y: Tensor | None = None) -> SAEOutput:
        if self.transcoder and y is None:
            raise ValueError("a transcoder needs its target y [B, d_out]")
        target = y if self.transcoder else x
        if not self.training:
            if self.threshold < 0:
                raise RuntimeError("LatentShardedBatchTopK has no inference threshold yet: train it first")
            log_threshold = torch.full_like(self.b_enc, math.log(max(float(self.threshold), 1e-30)))
            codes = torch.relu(ops.jumprelu_encode(x, self.W_enc, self._encoder_bias(), log_threshold))
            x_hat = _SumShards.apply(codes @ self.W_dec, self.group) + self.b_dec
            return SAEOutput(x_hat, codes, {"mse": (x_hat - target).pow(2).sum(-1).mean()})
        batch = x.shape[0]
        kept = self._global_batchtopk(x)
        partial = ops.sparse_decode_coo(kept.values, kept.rows, kept.cols, self.W_dec, torch.zeros_like(self.b_dec),
                                        batch)
        x_hat = _SumShards.apply(partial, self.group) + self.b_dec
        return SAEOutput(x_hat, kept, {"mse": (x_hat - target).pow(2).sum(-1).mean()})

    def _global_batchtopk(self, x: Tensor) -> ops.BatchTopKCodes:
        """This rank's entries of the global BatchTopK selection (see the class docstring), and the
        threshold estimate updated from it. x [b, d_in]: this rank's rows (its data rank's block of
        the global batch on a mesh, the whole batch otherwise). Returns BatchTopKCodes(values,
        rows [local], cols [local]), differentiable in the values."""
        batch = x.shape[0]
        data_size = 1 if self.data_group is None else dist.get_world_size(self.data_group)
        data_rank = 0 if self.data_group is None else dist.get_rank(self.data_group)
        keep = batch * data_size * self.k                                       # B*k of the global batch
        codes = ops.batchtopk_encode(x, self.W_enc, self._encoder_bias(), min(data_size * self.k, self.n_local))
        flat = (codes.rows + data_rank * batch) * self.n_latents + codes.cols + self.offset  # global flat indices
        all_values = self._gather_mesh(codes.values.detach())                   # [D * S * b*per_row], rank order
        all_flat = self._gather_mesh(flat)
        by_index = torch.sort(all_flat, stable=True).indices                    # ties: lower flat index first
        by_value = torch.sort(all_values[by_index], descending=True, stable=True).indices[:keep]
        chosen = torch.zeros_like(all_values, dtype=torch.bool)
        chosen[by_index[by_value]] = True
        segment = codes.values.shape[0]                                         # the same on every rank
        start = (data_rank * self.world_size + self.rank) * segment
        mine = chosen[start:start + segment]
        self.update_threshold(all_values[by_index[by_value]])
        return ops.BatchTopKCodes(codes.values[mine], codes.rows[mine], codes.cols[mine])

    def _gather_mesh(self, t: Tensor) -> Tensor:
        """t [m] from every rank holding a shard of this dictionary (and, on a mesh, every data
        rank): all-gathered over the latent group, then the data group; [D * S * m] in the order
        (data rank, shard)."""
        shards = torch.cat(self._all_gather(t))
        if self.data_group is None:
            return shards
        parts = [torch.empty_like(shards) for _ in range(dist.get_world_size(self.data_group))]
        dist.all_gather(parts, shards, group=self.data_group)
        return torch.cat(parts)

    update_threshold = BatchTopKSAE.update_threshold


class LatentShardedReLU(LatentShardedTopK):
    """This rank's shard of a ReLU + L1 SAE (``ReLUSAE``): dense codes [B, n_local] from this shard's
    latents, partial reconstructions summed over shards, and the L1 penalty summed over shards
    (``_SumShards``), so loss and gradients equal the whole dictionary's. With ghost grads
    (``ghost_loss``) for its dead latents. Unit-norm decoder rows unless decoder_norm_penalty."""

    architecture = "relu"
    dictionary_class = ReLUSAE

    def __init__(self, d_in: int, n_latents: int, l1_coeff: float, decoder_norm_penalty: bool = False, **kwargs):
        super().__init__(d_in, n_latents, None, **kwargs)
        self.l1_coeff = positive_number("l1_coeff", l1_coeff)
        self.decoder_norm_penalty = bool(decoder_norm_penalty)
        self.unit_norm_decoder = not self.decoder_norm_penalty
        self.sparsity_weight = 1.0  # the trainer's L1 warm-up scales the penalty through this

    def hyperparameters(self) -> dict:
        return {"l1_coeff": self.l1_coeff, "decoder_norm_penalty": self.decoder_norm_penalty}

    def forward(self, x: Tensor, y: Tensor | None = None) -> SAEOutput:
        """x [B, d_in] -> SAEOutput(x_hat [B, d_out], codes [B, n_local], {"mse", "l1"})."""
        if self.transcoder and y is None:
            raise ValueError("a transcoder needs its target y [B, d_out]")
        target = y if self.transcoder else x
        codes = ops.relu_encode(x, self.W_enc, self._encoder_bias())
        x_hat = _SumShards.apply(codes @ self.W_dec, self.group) + self.b_dec
        weighted = codes * self.W_dec.norm(dim=-1) if self.decoder_norm_penalty else codes
        l1 = _SumShards.apply(weighted.sum(-1).mean(), self.group)
        return SAEOutput(x_hat, codes, {"mse": (x_hat - target).pow(2).sum(-1).mean(),
                                        "l1": self.sparsity_weight * self.l1_coeff * l1})

    def auxk_loss(self, *args, **kwargs):
        raise ValueError("AuxK needs a TopK or BatchTopK dictionary; a ReLU SAE uses ghost grads")


class ShardedTraining(SingleProcess):
    """The trainer's context for a latent-sharded dictionary (see the module docstring): every rank
    computes on the whole batch; the loss, x_hat and replicated parameters are the same on every
    rank, the sharded parameters, their Adam moments and dead counters are each rank's own."""

    def __init__(self, sae: LatentShardedTopK, config, fingerprint: str = ""):
        if "resample" in config.strategies():
            raise ValueError("dead_strategy 'resample' is not supported for a latent-sharded dictionary; "
                             "use 'auxk' (or train the whole dictionary)")
        self.group = sae.group
        self.rank, self.world_size = sae.rank, sae.world_size
        self.is_writer = self.rank == 0
        self.batch_size = config.batch_size
        check_same_everywhere((config.batch_size, fingerprint), self.group)

    def describe(self, sae) -> str:
        """What ran: world size, backend and device, the shards, the batch each rank computes on."""
        return (f"latent sharded, world size {self.world_size} ({dist.get_backend(self.group)}, {sae.W_enc.device}): "
                f"each rank holds {sae.n_local:,} of the {sae.n_latents:,} latents (rank r: latents "
                f"[{sae.n_local:,}r, {sae.n_local:,}(r+1))); global batch {self.batch_size:,} rows a step, "
                f"per-rank batch {self.batch_size:,} (every rank reads the whole stream and computes on the whole "
                f"batch); rank 0 gathers the shards and alone writes checkpoints, metrics and the dictionary")

    def tracked_latents(self, sae) -> int:
        return sae.n_local

    def any_dead(self, dead: Tensor) -> bool:
        total = torch.tensor([dead.numel()], dtype=torch.int64, device=dead.device)
        dist.all_reduce(total, group=self.group)
        return bool(total.item())

    def clip_grad_norm(self, sae, params, max_norm: float) -> None:
        sae.clip_grad_norm_(max_norm)

    def auxk_loss(self, sae, x: Tensor, residual: Tensor, dead: Tensor, k_aux: int) -> Tensor:
        return sae.auxk_loss(x, residual, dead, k_aux)

    def ghost_loss(self, sae, x: Tensor, residual: Tensor, dead: Tensor, mse_main: Tensor) -> Tensor:
        return sae.ghost_loss(x, residual, dead, mse_main)

    @torch.no_grad()
    def add_to_window(self, window, losses: dict, target: Tensor, x_hat: Tensor, counts: Tensor, rows: int) -> None:
        """losses, target and x_hat are the same on every rank; counts [n_local] are summed over shards."""
        active = counts.sum().reshape(1).to(target.device)
        dist.all_reduce(active, group=self.group)
        window.add(losses, target, x_hat, active.cpu(), rows)

    def whole(self, t: Tensor) -> Tensor:
        """Every shard's [n_local, ...] entries concatenated: [n, ...] (all-gathered)."""
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.cat(parts)

    def whole_tracker(self, tracker: DeadLatentTracker) -> DeadLatentTracker:
        whole = DeadLatentTracker(0, tracker.window_tokens)
        whole.tokens_since_fired = self.whole(tracker.tokens_since_fired)
        return whole

    def _sharded_entries(self, sae, tensors: dict) -> dict:
        """{checkpoint entry: latent dim} for the entries of trainer checkpoint `tensors` that are sharded."""
        dims = {f"sae.{name}": dim for name, dim in sae.sharded_dims().items()}
        index = {name: i for i, (name, _) in enumerate(sae.named_parameters())}
        for name, dim in sae.sharded_dims().items():
            if name in index:
                for key in ("exp_avg", "exp_avg_sq"):
                    dims[f"opt.{index[name]}.{key}"] = dim
        dims.update({"tokens_since_fired": 0, "window_counts": 0})
        return {name: dim for name, dim in dims.items() if name in tensors}

    @torch.no_grad()
    def checkpoint_tensors(self, sae, tensors: dict) -> dict:
        """The full dictionary's checkpoint entries on rank 0 (gathered there one tensor at a time,
        kept on the CPU); other ranks get theirs back unchanged (they write nothing)."""
        whole = dict(tensors)
        writer = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        for name, dim in self._sharded_entries(sae, tensors).items():
            mine = tensors[name].contiguous()
            parts = [torch.empty_like(mine) for _ in range(self.world_size)] if self.is_writer else None
            dist.gather(mine, parts, dst=writer, group=self.group)
            if self.is_writer:
                whole[name] = torch.cat(parts, dim).cpu()
                del parts
        return whole

    def local_checkpoint(self, sae, tensors: dict) -> dict:
        """This shard's slice of a full dictionary's checkpoint entries."""
        local = dict(tensors)
        for name, dim in self._sharded_entries(sae, tensors).items():
            local[name] = tensors[name].narrow(dim, sae.offset, sae.n_local).clone()
        return local

    @torch.no_grad()
    def evaluate(self, sae, x: Tensor, y: Tensor | None = None, batch_size: int = 4096) -> dict:
        """As ``sparsekit.training.metrics.evaluate`` on the whole dictionary: mse, fvu, l0, fire_counts [n]."""
        was_training = sae.training
        sae.eval()
        target_all = y if sae.transcoder else x
        mean = target_all.mean(0)
        sq_err = variance = 0.0
        counts = torch.zeros(sae.n_local, dtype=torch.int64)
        for start in range(0, x.shape[0], batch_size):
            out = sae(x[start:start + batch_size], None if y is None else y[start:start + batch_size])
            tb = target_all[start:start + batch_size]
            sq_err += float((out.x_hat - tb).pow(2).sum())
            variance += float((tb - mean).pow(2).sum())
            counts += sae.fire_counts(out.codes).cpu()
        sae.train(was_training)
        counts = self.whole(counts)
        rows = x.shape[0]
        fvu = sq_err / max(variance, 1e-30)
        return {"mse": sq_err / rows, "fvu": fvu, "explained_variance": 1.0 - fvu, "l0": float(counts.sum()) / rows,
                "fire_counts": counts}


class Mesh(NamedTuple):
    """A 2-D mesh of data_size x latent_shards ranks: rank = data_rank * latent_shards + shard_rank.
    latent_group: the latent_shards ranks that hold the shards of one dictionary and see the same
    rows; data_group: the data_size ranks that hold the same shard and see different rows."""
    data_group: object
    latent_group: object
    data_rank: int
    shard_rank: int
    data_size: int
    latent_shards: int


def mesh(latent_shards: int) -> Mesh:
    """Split the process group (set up from torchrun's environment if needed) into a data x latent
    mesh with `latent_shards` shards per dictionary; the world size must be a multiple of it.
    Every rank must call this (it creates every group). Use it as
    ``LatentShardedTopK.from_dictionary(sae, group=m.latent_group, data_group=m.data_group)``."""
    latent_shards = positive_int("latent_shards", latent_shards)
    init_distributed()
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % latent_shards:
        raise ValueError(f"latent_shards={latent_shards} must divide the world size {world}")
    data_size = world // latent_shards
    latent_groups = [dist.new_group([d * latent_shards + s for s in range(latent_shards)]) for d in range(data_size)]
    data_groups = [dist.new_group([d * latent_shards + s for d in range(data_size)]) for s in range(latent_shards)]
    return Mesh(data_groups[rank % latent_shards], latent_groups[rank // latent_shards], rank // latent_shards,
                rank % latent_shards, data_size, latent_shards)


class MeshTraining(ShardedTraining):
    """The trainer's context on a 2-D mesh: data parallel over the shard's data group (each data
    rank its own block of the global batch; gradients, fire counts, metrics, AuxK's variance and
    the ghost-grads factor reduced over it) around latent sharding over its latent group. Rank 0
    of the world writes; the latent group of data rank 0 gathers the checkpoints. A BatchTopK shard
    selects over the global batch and every shard itself (``LatentShardedBatchTopK``)."""

    def __init__(self, sae: LatentShardedTopK, config, fingerprint: str = ""):
        super().__init__(sae, config, fingerprint)
        self.data = DataParallel(config.batch_size, fingerprint, group=sae.data_group)
        self.is_writer = dist.get_rank() == 0

    def describe(self, sae) -> str:
        """What ran: the mesh's two sizes, backend and device, the shards, the global and per-rank batch."""
        data, rows = self.data.world_size, self.batch_size // self.data.world_size
        return (f"2-D mesh, world size {dist.get_world_size()} ({dist.get_backend()}, {sae.W_enc.device}): "
                f"{self.world_size} latent shards x {data} data-parallel replicas; each rank holds {sae.n_local:,} of "
                f"the {sae.n_latents:,} latents; global batch {self.batch_size:,} rows a step, per-rank batch "
                f"{rows:,} (every rank reads the whole stream and computes on its data group's block of each batch: "
                f"data rank d: rows [{rows:,}d, {rows:,}(d+1))); rank 0 gathers the shards and alone writes "
                f"checkpoints, metrics and the dictionary")

    def local_rows(self, t: Tensor | None) -> Tensor | None:
        return self.data.local_rows(t)

    def average_gradients(self, params) -> None:
        self.data.average_gradients(params)

    def sum(self, t: Tensor) -> Tensor:
        return self.data.sum(t)

    def check_loss(self, step: int, loss: Tensor, losses: dict, config) -> None:
        self.data.check_loss(step, loss, losses, config)

    def auxk_loss(self, sae, x: Tensor, residual: Tensor, dead: Tensor, k_aux: int) -> Tensor:
        return sae.auxk_loss(x, residual, dead, k_aux, data=self.data)

    def ghost_loss(self, sae, x: Tensor, residual: Tensor, dead: Tensor, mse_main: Tensor) -> Tensor:
        return sae.ghost_loss(x, residual, dead, mse_main, data=self.data)

    @torch.no_grad()
    def add_to_window(self, window, losses: dict, target: Tensor, x_hat: Tensor, counts: Tensor, rows: int) -> None:
        """counts [n_local] are already summed over the data group; their total over shards is added."""
        active = counts.sum().reshape(1).to(target.device)
        dist.all_reduce(active, group=self.group)
        self.data.add_to_window(window, losses, target, x_hat, active.cpu(), rows)

    def checkpoint_tensors(self, sae, tensors: dict) -> dict:
        if self.data.rank != 0:  # the other data ranks hold the same shards: they write nothing
            return tensors
        return super().checkpoint_tensors(sae, tensors)


def shard_for_cli(sae, latent_shards: int):
    """`sparsekit train --latent-parallel S` under torchrun: this rank's shard of `sae` (built the same
    on every rank) on a mesh of S latent shards x world/S data-parallel replicas."""
    classes = {cls.architecture: cls for cls in (LatentShardedTopK, LatentShardedBatchTopK, LatentShardedReLU)}
    positive_int("--latent-parallel", latent_shards)
    if sae.architecture not in classes:
        raise ValueError(f"--latent-parallel: only topk, batchtopk and relu dictionaries can be sharded, "
                         f"not {sae.architecture}")
    if sae.n_latents % latent_shards:
        raise ValueError(f"--latent-parallel {latent_shards} must divide --n-latents {sae.n_latents}")
    grid = mesh(latent_shards)
    return classes[sae.architecture].from_dictionary(
        sae, group=grid.latent_group, data_group=grid.data_group if grid.data_size > 1 else None)
