"""Per-latent statistics of a dictionary's codes, collected batch by batch in memory that does not
grow with the number of tokens: fire counts and sums, the top-k contexts, histograms and token sums.

    stats, top = LatentStats(n), TopContexts(n, k=8)
    for start, values, rows, cols in lm_features.codes_by_batch(model, sae, tokens, hook):  # positive_codes per batch
        stats.add(values, cols)
        top.add(values, cols, contexts=start + rows // (T - 1), positions=1 + rows % (T - 1))

Codes enter as flat COO entries (value > 0, row, latent): TopK and BatchTopK dictionaries give them
without a dense [rows, n_latents] matrix; dense codes (ReLU, JumpReLU, Gated, BatchTopK at inference)
are encoded in row chunks of at most ``DENSE_CHUNK`` elements and turned into entries chunk by chunk.
Memory: ``LatentStats`` O(n), ``TopContexts`` O(n * k), ``Histograms`` O(m * bins) and ``TokenSums``
O(min(vocab * m, entries)) for the m latents they follow.

Orders are total, so the result does not depend on how the contexts were batched: a context's
example for a latent is its first position with the largest activation; a latent's top contexts
are ordered by that activation, then by the lower context index.
"""
from __future__ import annotations

import torch
from torch import Tensor

from sparsekit import ops
from sparsekit.sae.base import SparseDictionary

DENSE_CHUNK = 1 << 22  # elements of a dense [rows, n_latents] code block (16 MiB of float32)


def positive_codes(sae: SparseDictionary, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """x [B, d_in] (already scaled by ``sae.input_scale``; the dictionary in eval mode) -> its
    positive codes as flat COO entries: values [E] float32, rows [E] int64, latents [E] int64, in
    row-major order. Encoded in row chunks whose [rows, n_latents] block (the pre-activations every
    encoder computes) holds at most DENSE_CHUNK elements; each chunk's codes become entries at once."""
    chunk = max(1, DENSE_CHUNK // sae.n_latents)
    parts = [(torch.zeros(0), torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))]
    for start in range(0, x.shape[0], chunk):
        codes = sae.encode(x[start:start + chunk])
        parts.append(_sparse_entries(codes, start) if isinstance(codes, (ops.TopKCodes, ops.BatchTopKCodes,
                                                                       ops.SparseCodes))
                     else _dense_entries(codes, start))
    values, rows, cols = (torch.cat(p) for p in zip(*parts))
    return values, rows, cols


def _sparse_entries(codes, offset: int) -> tuple[Tensor, Tensor, Tensor]:
    if isinstance(codes, ops.TopKCodes):
        k = codes.values.shape[1]
        rows = torch.arange(codes.values.shape[0], device=codes.values.device).repeat_interleave(k)
        values, cols = codes.values.reshape(-1), codes.indices.reshape(-1)
    else:
        values, rows, cols = codes.values, codes.rows, codes.cols
    keep = values > 0
    return values[keep].float().cpu(), rows[keep].cpu() + offset, cols[keep].cpu()


def _dense_entries(dense: Tensor, offset: int) -> tuple[Tensor, Tensor, Tensor]:
    rows, cols = torch.nonzero(dense > 0, as_tuple=True)
    return dense[rows, cols].float().cpu(), rows.cpu() + offset, cols.cpu()


def _order(primary: Tensor, secondary: Tensor, tertiary: Tensor, descending_secondary: bool = True) -> Tensor:
    """The permutation sorting by primary ascending, then secondary (descending by default), then
    tertiary ascending: three stable sorts, last key first."""
    order = torch.argsort(tertiary, stable=True)
    order = order[torch.argsort(secondary[order], descending=descending_secondary, stable=True)]
    return order[torch.argsort(primary[order], stable=True)]


def _ranks(sorted_keys: Tensor) -> Tensor:
    """For keys sorted ascending [E]: each entry's rank within its run of equal keys [E]."""
    index = torch.arange(sorted_keys.numel())
    first = torch.ones_like(sorted_keys, dtype=torch.bool)
    first[1:] = sorted_keys[1:] != sorted_keys[:-1]
    return index - torch.where(first, index, torch.zeros_like(index)).cummax(0).values


class LatentStats:
    """Per latent: fires (entries > 0) [n] int64, the sum of its activations [n] float64, its
    maximum [n] float32 (0 where it never fired)."""

    def __init__(self, n_latents: int):
        self.fires = torch.zeros(n_latents, dtype=torch.int64)
        self.sums = torch.zeros(n_latents, dtype=torch.float64)
        self.maxima = torch.zeros(n_latents, dtype=torch.float32)

    def add(self, values: Tensor, latents: Tensor) -> None:
        """values [E] > 0, latents [E] int64."""
        self.fires += torch.bincount(latents, minlength=self.fires.numel())
        self.sums.index_add_(0, latents, values.double())
        self.maxima.scatter_reduce_(0, latents, values.float(), reduce="amax")


class TopContexts:
    """Per latent, the k contexts where it fires most: values [n, k] (0: empty slot), contexts
    [n, k] and positions [n, k] (-1: empty), best first.

    ``add`` takes every entry of a group of whole contexts (a context never spans two calls)."""

    def __init__(self, n_latents: int, k: int):
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"examples must be a positive int, got {k!r}")
        self.values = torch.zeros(n_latents, k, dtype=torch.float32)
        self.contexts = torch.full((n_latents, k), -1, dtype=torch.int64)
        self.positions = torch.full((n_latents, k), -1, dtype=torch.int64)

    def add(self, values: Tensor, latents: Tensor, contexts: Tensor, positions: Tensor) -> None:
        """values [E] > 0; latents, contexts (global indices), positions [E] int64."""
        if values.numel() == 0:
            return
        k = self.values.shape[1]
        # each (latent, context): its first position with the largest value
        pair = latents * (int(contexts.max()) + 1) + contexts
        order = _order(pair, values, positions)
        best = order[_ranks(pair[order]) == 0]
        latents, values, contexts, positions = latents[best], values[best], contexts[best], positions[best]
        # merged with the kept entries of the latents this batch touched
        touched = torch.unique(latents)
        held = self.contexts[touched] >= 0                                          # [t, k]
        all_latents = torch.cat([touched[:, None].expand(-1, k)[held], latents])
        all_values = torch.cat([self.values[touched][held], values.float()])
        all_contexts = torch.cat([self.contexts[touched][held], contexts])
        all_positions = torch.cat([self.positions[touched][held], positions])
        order = _order(all_latents, all_values, all_contexts)
        rank = _ranks(all_latents[order])
        keep = order[rank < k]
        slot = rank[rank < k]
        self.values[touched], self.contexts[touched], self.positions[touched] = 0.0, -1, -1
        where = (all_latents[keep], slot)
        self.values[where] = all_values[keep]
        self.contexts[where] = all_contexts[keep]
        self.positions[where] = all_positions[keep]


class Histograms:
    """Counts of the followed latents' activations in ``bins`` equal bins over [0, maximum] (the
    maximum known beforehand, from a first pass): counts [m, bins] int64. A value goes where
    ``torch.histc(values, bins, 0, maximum)`` puts it (the maximum itself into the last bin)."""

    def __init__(self, maxima: Tensor, bins: int):
        if not isinstance(bins, int) or bins < 1:
            raise ValueError(f"bins must be a positive int, got {bins!r}")
        self.maxima = maxima.float()
        self.highs = torch.where(self.maxima > 0, self.maxima, torch.ones_like(self.maxima))
        self.counts = torch.zeros(maxima.numel(), bins, dtype=torch.int64)

    def add(self, values: Tensor, slots: Tensor) -> None:
        """values [E] > 0 (float32), slots [E] int64: which followed latent each value belongs to."""
        bins = self.counts.shape[1]
        high = self.highs[slots]
        # histc's arithmetic in float32: (value - 0) * bins / (max - 0), truncated, the max inclusive
        where = (values.float() * bins / high).long().clamp_max(bins - 1)
        inside = values.float() <= high
        self.counts.view(-1).index_add_(0, (slots * bins + where)[inside],
                                        torch.ones(int(inside.sum()), dtype=torch.int64))

    def edges(self, slot: int) -> list[float]:
        """The bins + 1 edges of one followed latent's histogram (rounded to 5 digits)."""
        return [round(float(e), 5) for e in torch.linspace(0.0, float(self.highs[slot]), self.counts.shape[1] + 1)]


class TokenSums:
    """Per followed latent, the sum of its activations on each token id, kept as a sparse table
    (only the (token, latent) pairs that occurred): ``shares()`` is the fraction of each latent's
    total activation on its most-activating token id [m] float64 (0 for a latent that never fired)."""

    def __init__(self, n_followed: int):
        self.m = n_followed
        self.keys = torch.zeros(0, dtype=torch.int64)       # token * m + slot
        self.sums = torch.zeros(0, dtype=torch.float64)

    def add(self, values: Tensor, slots: Tensor, token_ids: Tensor) -> None:
        """values [E] > 0, slots [E] int64 (followed latent), token_ids [E] int64."""
        keys = torch.cat([self.keys, token_ids.long() * self.m + slots])
        sums = torch.cat([self.sums, values.double()])
        self.keys, inverse = torch.unique(keys, return_inverse=True)
        self.sums = torch.zeros(self.keys.numel(), dtype=torch.float64).index_add_(0, inverse, sums)

    def shares(self) -> Tensor:
        slots = self.keys % self.m
        total = torch.zeros(self.m, dtype=torch.float64).index_add_(0, slots, self.sums)
        top = torch.zeros(self.m, dtype=torch.float64).scatter_reduce_(0, slots, self.sums, reduce="amax")
        return torch.where(total > 0, top / total.clamp_min(1e-300), torch.zeros_like(total))
