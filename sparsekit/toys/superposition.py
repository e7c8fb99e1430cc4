"""Toy superposition data with known features (Elhage et al. 2022, "Toy Models of Superposition").

n_true unit-norm feature directions live in d dimensions (orthonormal when n_true <= d, random and
nearly orthogonal otherwise). A sample is x = c @ features (+ noise), c [n_true] sparse: each
feature fires with probability p_active, magnitude U(0, 1] (or 1), independently of the others
except within correlated groups, whose members fire together (with their own magnitudes). A good
sparse dictionary trained on x has a decoder row along each feature: ``feature_recovery`` scores that.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import Tensor

from sparsekit._util.seeding import derive_seed
from sparsekit._util.validate import check_seed, check_state, is_int, is_number, positive_int, state_int

MAGNITUDES = ("uniform", "constant")


class SuperpositionData:
    """Ground truth: ``features`` [n_true, d] unit rows; ``groups`` [n_true] int64, the correlated
    group of each feature (-1: fires independently). The first correlated_groups * group_size
    features form the groups."""

    def __init__(self, n_true: int, d: int, p_active: float = 0.02, magnitude: str = "uniform",
                 correlated_groups: int = 0, noise: float = 0.0, seed: int = 0, group_size: int = 2):
        self.n_true = positive_int("n_true", n_true)
        self.d = positive_int("d", d)
        if not is_number(p_active) or not 0 < p_active <= 1:
            raise ValueError(f"p_active must be a probability in (0, 1], got {p_active!r}")
        if magnitude not in MAGNITUDES:
            raise ValueError(f"magnitude must be one of {', '.join(MAGNITUDES)}, got {magnitude!r}")
        if not is_int(correlated_groups) or correlated_groups < 0:
            raise ValueError(f"correlated_groups must be a non-negative int, got {correlated_groups!r}")
        group_size = positive_int("group_size", group_size)
        if correlated_groups * group_size > n_true:
            raise ValueError(f"correlated_groups={correlated_groups} of group_size={group_size} need "
                             f"{correlated_groups * group_size} features but n_true={n_true}")
        if not is_number(noise) or not math.isfinite(noise) or noise < 0:
            raise ValueError(f"noise must be a non-negative finite number, got {noise!r}")
        self.p_active, self.magnitude, self.noise = float(p_active), magnitude, float(noise)
        self.correlated_groups, self.group_size = correlated_groups, group_size
        self.seed = check_seed(seed)

        gen = torch.Generator().manual_seed(self.seed)
        gaussian = torch.randn(self.n_true, self.d, generator=gen, dtype=torch.float64)
        if self.n_true <= self.d:
            gaussian = torch.linalg.qr(gaussian.t()).Q.t()  # orthonormal rows
        self.features = torch.nn.functional.normalize(gaussian, dim=-1).float()

        grouped = correlated_groups * group_size
        self.groups = torch.full((self.n_true,), -1, dtype=torch.int64)
        self.groups[:grouped] = torch.arange(correlated_groups).repeat_interleave(group_size)
        # One coin per firing unit: a group shares one, every other feature has its own.
        self._unit = torch.cat([self.groups[:grouped], correlated_groups + torch.arange(self.n_true - grouped)])
        self._n_units = correlated_groups + self.n_true - grouped

    def sample(self, batch: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """x [batch, d] = coefficients @ features + noise * N(0, I); coefficients [batch, n_true] >= 0."""
        batch = positive_int("batch", batch)
        fires = torch.rand(batch, self._n_units, generator=generator) < self.p_active
        on = fires[:, self._unit]
        if self.magnitude == "uniform":
            magnitudes = 1.0 - torch.rand(batch, self.n_true, generator=generator)  # U(0, 1]
            coefficients = magnitudes * on
        else:
            coefficients = on.float()
        x = coefficients @ self.features
        if self.noise > 0:
            x = x + self.noise * torch.randn(batch, self.d, generator=generator)
        return x, coefficients

    def source(self, batch_size: int = 4096, seed: int = 0) -> "SuperpositionSource":
        """An endless ActivationSource of x [batch_size, d] batches; batch i is drawn from seed (seed, i)."""
        return SuperpositionSource(self, batch_size, seed)


class SuperpositionSource:
    """Endless x batches from SuperpositionData; state = batches drawn (plus the settings)."""

    def __init__(self, data: SuperpositionData, batch_size: int = 4096, seed: int = 0):
        self.data = data
        self.batch_size = positive_int("batch_size", batch_size)
        self.seed = check_seed(seed)
        self.batches = 0

    def __iter__(self) -> Iterator[Tensor]:
        while True:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, self.batches))
            x, _ = self.data.sample(self.batch_size, generator)
            self.batches += 1
            yield x

    def _settings(self) -> dict:
        return {"batch_size": self.batch_size, "seed": self.seed, "data_seed": self.data.seed,
                "n_true": self.data.n_true, "d": self.data.d}

    def state_dict(self) -> dict:
        return {"kind": "SuperpositionSource", "batches": self.batches, **self._settings()}

    def load_state_dict(self, state: dict) -> None:
        check_state("SuperpositionSource", state, self._settings())
        self.batches = state_int(state, "batches")


def _rows(name: str, value, attribute: str) -> Tensor:
    rows = getattr(value, attribute, value)
    if not isinstance(rows, Tensor) or rows.dim() != 2:
        raise ValueError(f"{name} must be a [n, d] tensor or have .{attribute} [n, d], got {type(value).__name__}")
    return rows.detach().to("cpu", torch.float64)


def recovery_per_feature(sae_or_decoder, true_features) -> Tensor:
    """For each true feature, the largest cosine similarity with any decoder row: [n_true] float32.

    sae_or_decoder: a dictionary with .W_dec [n, d] or a tensor [n, d]; true_features: [n_true, d]
    or a SuperpositionData.
    """
    decoder = torch.nn.functional.normalize(_rows("sae_or_decoder", sae_or_decoder, "W_dec"), dim=-1)
    true = torch.nn.functional.normalize(_rows("true_features", true_features, "features"), dim=-1)
    if decoder.shape[1] != true.shape[1]:
        raise ValueError(f"sae_or_decoder has rows of width {decoder.shape[1]} but true_features has width "
                         f"{true.shape[1]}")
    chunk = max(1, 2**23 // decoder.shape[0])  # bounds the [chunk, n] cosine block to 64 MB
    best = [(part @ decoder.t()).max(dim=1).values for part in true.split(chunk)]
    return torch.cat(best).float()


def feature_recovery(sae_or_decoder, true_features) -> float:
    """Mean over true features of the max cosine similarity with any decoder row (1.0: all found)."""
    return float(recovery_per_feature(sae_or_decoder, true_features).mean())
