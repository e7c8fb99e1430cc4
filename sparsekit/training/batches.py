"""The training stream: a source's batches (any size) re-chunked into batches of exactly
``batch_size`` rows, checked as they arrive, and the scale that normalises them.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from sparsekit.errors import SourceExhausted, SourceStalled
from sparsekit.ops import checks

# A source may yield an empty batch now and then (a filter that dropped every row); this many in a
# row is a source that has stalled, and training stops with a line saying so instead of hanging.
EMPTY_BATCHES_IN_A_ROW = 1000


class Batches:
    """Re-chunks a source's batches (any size) into batches of exactly batch_size rows; the
    rows left over between chunks (carry_x [r, d_in], carry_y [r, d_out]) are part of the
    checkpointed state.

    A batch stored in a narrower float type than the dictionary's (float16 or bfloat16 shards into a
    float32 dictionary) is widened to it here, exactly, so a 16-bit shard folder trains the same
    through ``sparsekit.train`` and ``sparsekit train``; a wider one is left for the dictionary to
    refuse (narrowing would lose precision silently)."""

    def __init__(self, source, batch_size: int, d_in: int, d_out: int | None, needs_target: bool,
                 dtype: torch.dtype | None = None):
        self.source, self.batch_size = source, batch_size
        self.d_in, self.d_out, self.needs_target = d_in, d_out, needs_target
        self.dtype = dtype  # the dictionary's: narrower float batches (16-bit shards) are widened to it
        self.carry_x: Tensor | None = None
        self.carry_y: Tensor | None = None
        self.iterator = None
        self.chunks_read = 0
        self.empty_in_a_row = 0

    def _next_chunk(self):
        if self.iterator is None:
            self.iterator = iter(self.source)
        try:
            chunk = next(self.iterator)
        except StopIteration:
            raise SourceExhausted(exhausted_message(self.chunks_read)) from None
        self.chunks_read += 1
        x, y = (chunk if isinstance(chunk, (tuple, list)) else (chunk, None))
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != self.d_in or not x.is_floating_point():
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"source batch {self.chunks_read}: x must be a float tensor [rows, d_in={self.d_in}], "
                             f"got {shape}")
        if self.needs_target:
            if y is None:
                raise ValueError(f"source batch {self.chunks_read}: a transcoder needs (x, y) batches")
            if not isinstance(y, Tensor) or y.shape != (x.shape[0], self.d_out):
                shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
                raise ValueError(f"source batch {self.chunks_read}: y must be [rows={x.shape[0]}, d_out={self.d_out}], "
                                 f"got {shape}")
        x, y = self._widen(x), self._widen(y)
        if x.shape[0] == 0:
            self.empty_in_a_row += 1
            if self.empty_in_a_row >= EMPTY_BATCHES_IN_A_ROW:
                raise SourceStalled(f"the source yielded {self.empty_in_a_row} empty batches in a row (batches "
                                 f"{self.chunks_read - self.empty_in_a_row + 1} to {self.chunks_read}): it stalled; "
                                 "a source must yield rows")
        else:
            self.empty_in_a_row = 0
        for name, value in (("x", x), ("y", y)):
            if value is not None and not checks.all_finite(value.contiguous()):
                rows = (~torch.isfinite(value)).any(dim=1).nonzero().flatten()
                more = f" (and {rows.numel() - 1} more rows)" if rows.numel() > 1 else ""
                raise ValueError(f"source batch {self.chunks_read}: {name} row {int(rows[0])}{more} contains NaN or Inf")
        return x, (y if self.needs_target else None)

    def _widen(self, t: Tensor | None) -> Tensor | None:
        if t is None or self.dtype is None or t.dtype == self.dtype or t.dtype.itemsize >= self.dtype.itemsize:
            return t
        return t.to(self.dtype)

    def take(self, rows: int) -> tuple[Tensor, Tensor | None]:
        """The next `rows` rows: x [rows, d_in] and y [rows, d_out] (None unless a target is needed)."""
        xs = [] if self.carry_x is None else [self.carry_x]
        ys = [] if self.carry_y is None else [self.carry_y]
        have = 0 if self.carry_x is None else self.carry_x.shape[0]
        while have < rows:
            x, y = self._next_chunk()
            if x.shape[0] == 0:
                continue
            xs.append(x)
            if y is not None:
                ys.append(y)
            have += x.shape[0]
        x = torch.cat(xs) if len(xs) > 1 else xs[0]
        y = (torch.cat(ys) if len(ys) > 1 else ys[0]) if ys else None
        self.carry_x = x[rows:] if x.shape[0] > rows else None
        self.carry_y = y[rows:] if y is not None and y.shape[0] > rows else None
        return x[:rows], (y[:rows] if y is not None else None)

    def put_back(self, x: Tensor, y: Tensor | None) -> None:
        """Make x [r, d_in] (and y [r, d_out]) the next rows taken, ahead of any carried ones."""
        self.carry_x = x if self.carry_x is None else torch.cat([x, self.carry_x])
        if y is not None:
            self.carry_y = y if self.carry_y is None else torch.cat([y, self.carry_y])


def exhausted_message(batches_read: int) -> str:
    """Why a source that stopped yielding cannot feed the run."""
    if batches_read == 0:
        return ("the source yielded no batches: it is empty, or an iterator or generator that was already consumed "
                "(pass a tensor, a list, or a zero-argument function returning a fresh iterable)")
    return (f"the source ran out after {batches_read} batches, before the held-out split (TrainConfig.eval_tokens) "
            f"and the first training batch were read: lower eval_tokens or let the source repeat")


def normalizing_scale(sample: Tensor) -> float:
    """The factor that makes E||x||^2 = width on this sample [rows, width]."""
    mean_sq = float(sample.double().pow(2).sum(-1).mean())
    return math.sqrt(sample.shape[1] / mean_sq) if mean_sq > 0 else 1.0
