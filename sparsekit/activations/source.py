"""Activation sources: what the trainer reads batches from, and how a run resumes exactly.

An ``ActivationSource`` is a stateful stream. Iterating it yields batches, each either
x [b, d_in] or (x [b, d_in], y [b, d_out]) for a transcoder; b may vary (the trainer re-chunks).
Iterating continues from the current position, and ``state_dict()`` taken after receiving a batch
counts that batch as consumed, so a fresh source given that state yields exactly the batches that
would have come next. States hold only ints, floats, strings, bools, lists and dicts (they go into a
JSON checkpoint).

Shuffles derive from (seed, epoch, ...) alone (``derive_seed``), so a state is a position, not a
snapshot of an RNG.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Iterator, Protocol, Tuple, Union, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from sparsekit._util.seeding import derive_seed, permutation  # noqa: F401  (re-exported: sources shuffle with them)
from sparsekit._util.validate import check_epochs, check_seed, check_state, positive_int, state_int

Batch = Union[Tensor, Tuple[Tensor, Tensor]]


@runtime_checkable
class ActivationSource(Protocol):
    """Iterating yields x [b, d_in] or (x [b, d_in], y [b, d_out]); the state resumes the stream."""

    def __iter__(self) -> Iterator[Batch]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class TensorSource:
    """In-memory activations: x [N, d_in] (and targets y [N, d_out]) in batches of batch_size rows.

    Each epoch visits every row once, in the order ``permutation(N, seed, epoch)`` when shuffle,
    else 0..N-1; the last batch of an epoch is smaller unless drop_last. epochs=None repeats
    forever. State: {"epoch", "position"} (rows of the current epoch already yielded) plus the
    settings it is only valid for.
    """

    def __init__(self, x: Tensor, y: Tensor | None = None, batch_size: int = 4096, shuffle: bool = True,
                 seed: int = 0, epochs: int | None = None, drop_last: bool = False):
        _check_matrix("x", x)
        if y is not None:
            _check_matrix("y", y)
            if y.shape[0] != x.shape[0]:
                raise ValueError(f"y has {y.shape[0]} rows but x has {x.shape[0]}; targets pair with inputs row by row")
        self.x, self.y = x, y
        self.rows = x.shape[0]
        self.batch_size = positive_int("batch_size", batch_size)
        self.shuffle = bool(shuffle)
        self.seed = check_seed(seed)
        self.epochs = check_epochs(epochs)
        self.drop_last = bool(drop_last)
        if self.drop_last and self.batch_size > self.rows:
            raise ValueError(f"batch_size={batch_size} exceeds the {self.rows} rows of x with drop_last=True: "
                             f"no batch would ever be yielded")
        self.epoch = 0
        self.position = 0
        self._order: Tensor | None = None  # the current epoch's order, cached
        self._order_epoch = -1

    def _epoch_order(self) -> Tensor | None:
        if not self.shuffle:
            return None
        if self._order_epoch != self.epoch:
            self._order = torch.from_numpy(permutation(self.rows, self.seed, self.epoch)).to(self.x.device)
            self._order_epoch = self.epoch
        return self._order

    def _epoch_end(self) -> int:
        return self.rows - self.rows % self.batch_size if self.drop_last else self.rows

    def __iter__(self) -> Iterator[Batch]:
        while self.epochs is None or self.epoch < self.epochs:
            if self.position >= self._epoch_end():
                self.epoch, self.position = self.epoch + 1, 0
                continue
            start, stop = self.position, min(self.position + self.batch_size, self.rows)
            order = self._epoch_order()
            rows = slice(start, stop) if order is None else order[start:stop]
            self.position = stop  # before yielding: a state taken now counts this batch as consumed
            yield self.x[rows] if self.y is None else (self.x[rows], self.y[rows])

    def _settings(self) -> dict:
        return {"rows": self.rows, "batch_size": self.batch_size, "shuffle": self.shuffle, "seed": self.seed,
                "drop_last": self.drop_last}

    def state_dict(self) -> dict:
        return {"kind": "TensorSource", "epoch": self.epoch, "position": self.position, **self._settings()}

    def load_state_dict(self, state: dict) -> None:
        check_state("TensorSource", state, self._settings())
        epoch, position = state_int(state, "epoch"), state_int(state, "position")
        if position > self.rows:
            raise ValueError(f"state field 'position' is {position}, beyond the {self.rows} rows of x")
        self.epoch, self.position = epoch, position


def _check_matrix(name: str, t) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, features], got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} has 0 rows; an activation source needs at least one")


def _fingerprint(batch) -> float | None:
    """A float summary of a batch's x, to notice a replay that differs from the original run."""
    x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, Tensor) or not x.is_floating_point():
        return None
    total = float(x.detach().double().sum())
    return total if math.isfinite(total) else None  # NaN is not JSON


class IterableSource:
    """Batches from another framework: a zero-argument factory returning a fresh iterable of x or
    (x, y) batches, or a re-iterable object (list, tuple) used as one.

    Resume is by deterministic replay-and-skip: the state is the number of batches consumed, and a
    resumed source asks the factory for a fresh iterable and discards that many batches. The state
    also records a fingerprint (sum of x) of the last consumed batch; a replay that does not match it
    raises instead of silently training on different data. A one-shot iterator (a generator object)
    can be trained on but not resumed from a non-zero position.
    """

    def __init__(self, factory: Callable[[], Iterable] | Iterable):
        if hasattr(factory, "__next__"):  # an iterator: iterating it again does not start over
            self._factory, self.replayable = (lambda it=factory: it), False
        elif callable(factory):
            self._factory, self.replayable = factory, True
        elif hasattr(factory, "__iter__"):
            self._factory, self.replayable = (lambda obj=factory: obj), True
        else:
            raise ValueError(f"factory must be a zero-argument callable returning an iterable, or a re-iterable "
                             f"(list, tuple), got {type(factory).__name__}")
        self.consumed = 0
        self._iterator: Iterator | None = None
        self._last = None
        self._expected_fingerprint: float | None = None

    def _start(self) -> Iterator:
        iterator = iter(self._factory())
        for index in range(self.consumed):
            try:
                batch = next(iterator)
            except StopIteration:
                raise ValueError(f"replaying to resume: the iterable ended after {index} batches, before the saved "
                                 f"position {self.consumed}; the factory must yield the same batches every time") from None
            if index == self.consumed - 1:
                self._check_replay(batch)
                self._last = batch
        return iterator

    def _check_replay(self, batch) -> None:
        expected, got = self._expected_fingerprint, _fingerprint(batch)
        if expected is None or got is None:
            return
        if abs(got - expected) > 1e-6 * max(1.0, abs(expected)):
            raise ValueError(f"replaying to resume: batch {self.consumed - 1} sums to {got!r}, not {expected!r} as when "
                             f"the state was saved; the factory must yield the same batches every time")

    def __iter__(self) -> Iterator[Batch]:
        while True:
            if self._iterator is None:  # first use, or a state was loaded since
                self._iterator = self._start()
            try:
                batch = next(self._iterator)
            except StopIteration:
                return
            self.consumed += 1
            self._last = batch
            yield batch

    def state_dict(self) -> dict:
        return {"kind": "IterableSource", "consumed": self.consumed, "last_fingerprint": _fingerprint(self._last)}

    def load_state_dict(self, state: dict) -> None:
        check_state("IterableSource", state, {})
        consumed = state_int(state, "consumed")
        fingerprint = state.get("last_fingerprint")
        if fingerprint is not None and not isinstance(fingerprint, (int, float)):
            raise ValueError(f"state field 'last_fingerprint' must be a number or None, got {fingerprint!r}")
        if not self.replayable and (consumed > 0 or self.consumed > 0):
            raise ValueError(f"cannot resume at batch {consumed}: this IterableSource wraps a one-shot iterator "
                             f"(e.g. a generator object), which cannot be replayed; resume needs a re-iterable "
                             f"(list, tuple) or a zero-argument factory returning a fresh iterable")
        self.consumed, self._expected_fingerprint = consumed, fingerprint
        self._iterator, self._last = None, None


def as_source(obj: Any, batch_size: int = 4096, shuffle: bool = True, seed: int = 0) -> ActivationSource:
    """Whatever the trainer was given -> an ActivationSource.

    Tensor x [N, d_in] or numpy array -> TensorSource; a tuple of exactly two tensors (x, y) ->
    TensorSource with targets (pass a list for a sequence of batches); an ActivationSource ->
    itself; a callable or re-iterable (list, tuple, iterator) of batches -> IterableSource.
    batch_size, shuffle and seed apply to in-memory tensors only.
    """
    if isinstance(obj, np.ndarray):
        obj = torch.from_numpy(obj)
    if isinstance(obj, Tensor):
        return TensorSource(obj, batch_size=batch_size, shuffle=shuffle, seed=seed)
    if isinstance(obj, tuple) and len(obj) == 2 and all(isinstance(t, Tensor) for t in obj):
        return TensorSource(obj[0], obj[1], batch_size=batch_size, shuffle=shuffle, seed=seed)
    if isinstance(obj, ActivationSource):
        return obj
    if isinstance(obj, (str, bytes, dict)) or not (callable(obj) or hasattr(obj, "__iter__")):
        hint = "; for a folder of shards use sparsekit.activations.ShardSource(directory)" if isinstance(obj, str) else ""
        raise ValueError(f"cannot read activations from a {type(obj).__name__}: pass a Tensor, an (x, y) tuple of "
                         f"tensors, an ActivationSource, or a callable/iterable of batches{hint}")
    return IterableSource(obj)
