"""Reading sparse MLP neurons: facets, their disambiguation, and magnitude codes.

Building blocks (plain tensors in, numbers out; each tested on planted data):
- ``kmeans(x [M, d], k)``: Lloyd's algorithm from a k-means++ start (seeded), squared Euclidean.
- ``silhouette(x, labels)``: mean over points of (b - a) / max(a, b), a = mean distance to the own
  cluster, b = least mean distance to another cluster (Euclidean; points alone in a cluster score 0).
- ``facets(x, k_max)``: k-means for k = 2..k_max, keep the k with the best silhouette; when even that
  silhouette is below ``min_silhouette`` the contexts form one facet (k = 1).
- ``adjusted_rand_index(a, b)``: agreement of two labelings, 1 = identical partitions, ~0 = chance
  (Hubert & Arabie 1985): (sum_ij C(n_ij,2) - E) / (mean(sum_i C(a_i,2), sum_j C(b_j,2)) - E), with
  E = sum_i C(a_i,2) sum_j C(b_j,2) / C(n,2).
- ``facet_predictability(features [M, f], labels [M])``: a ridge classifier (one-hot targets,
  W = (X^T X + lam I)^-1 X^T Y on standardised features with a bias column) fitted on the even rows,
  scored on the odd rows by balanced accuracy (mean recall over facets; chance = 1 / k).
- ``jensen_shannon(distributions [K, V], weights [K])``: H(sum_k w_k P_k) - sum_k w_k H(P_k) in bits;
  0 when the P_k agree, at most H(w) (log2 K bits for equal weights) when their supports are disjoint.
- ``magnitude_bands(a [M], n_bands)``: equal-count bands of a neuron's firing activations (rank-based,
  ties to the lower band).
- ``magnitude_code_score(a [M], distributions [M, V], n_bands)``: how different the mean next-token
  distribution is between the neuron's magnitude bands:

      score = (JSD(band means) - mean_r JSD(band means under shuffled bands r)) / log2(n_bands)

  with equal band weights; the shuffled term removes the divergence that finite samples give to bands
  with no relation to the tokens, so a neuron whose bands predict the same tokens scores ~0 and one whose
  bands predict disjoint tokens scores ~1. Beside it, ``top_token_disagreement``: the fraction of band
  pairs whose most probable token differs (0 = every band's top token is the same, 1 = all differ).

``analyse_neuron`` applies them to one neuron of a trained ``SparseBaseModel`` (see ``collect``).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from sparsekit._util.seeding import derive_seed
from sparsekit._util.validate import positive_int


def kmeans(x: Tensor, k: int, seed: int = 0, iterations: int = 50) -> tuple[Tensor, Tensor]:
    """x [M, d] -> (labels [M] int64, centroids [k, d]); k-means++ start from seed, Lloyd iterations."""
    x = x.double()
    M = x.shape[0]
    if not 1 <= positive_int("k", k) <= M:
        raise ValueError(f"k={k} must be at most the number of points {M}")
    gen = torch.Generator().manual_seed(derive_seed(seed, k))
    centroids = x[torch.randint(M, (1,), generator=gen)]
    for _ in range(1, k):
        d2 = torch.cdist(x, centroids).pow(2).min(1).values
        pick = torch.multinomial(d2 / d2.sum(), 1, generator=gen) if d2.sum() > 0 else torch.randint(M, (1,), generator=gen)
        centroids = torch.cat([centroids, x[pick]])
    labels = torch.cdist(x, centroids).argmin(1)
    for _ in range(iterations):
        for j in range(k):
            members = labels == j
            if members.any():
                centroids[j] = x[members].mean(0)
        new = torch.cdist(x, centroids).argmin(1)
        if torch.equal(new, labels):
            break
        labels = new
    return labels, centroids.float()


def silhouette(x: Tensor, labels: Tensor) -> float:
    """Mean silhouette (Euclidean) of x [M, d] under labels [M]; needs at least 2 clusters."""
    x = x.double()
    clusters = labels.unique()
    if clusters.numel() < 2:
        raise ValueError("silhouette needs at least 2 clusters")
    dist = torch.cdist(x, x)
    means = torch.stack([dist[:, labels == c].mean(1) for c in clusters], 1)  # [M, k]
    sizes = torch.stack([(labels == c).sum() for c in clusters])
    own = (labels[:, None] == clusters[None, :])
    own_size = sizes[own.float().argmax(1)]
    a = (means * own).sum(1) * own_size / (own_size - 1).clamp(min=1)  # exclude the point itself
    b = means.masked_fill(own, math.inf).min(1).values
    s = (b - a) / torch.maximum(a, b).clamp(min=1e-12)
    s[own_size == 1] = 0.0
    return float(s.mean())


def facets(x: Tensor, k_max: int = 4, min_silhouette: float = 0.1, seed: int = 0,
           max_points: int = 1500) -> dict:
    """Cluster x [M, d] into facets: {"k", "labels" [M], "silhouette" (of the kept k; None for k=1),
    "silhouettes" {k: s}}. The silhouette is computed on at most max_points rows (a seeded subsample)."""
    M = x.shape[0]
    gen = torch.Generator().manual_seed(derive_seed(seed, 1))
    sub = torch.randperm(M, generator=gen)[:max_points] if M > max_points else torch.arange(M)
    scores, labelings = {}, {}
    for k in range(2, min(k_max, M - 1) + 1):
        labels, _ = kmeans(x, k, seed)
        if labels[sub].unique().numel() < 2:
            continue
        scores[k], labelings[k] = silhouette(x[sub], labels[sub]), labels
    if not scores or max(scores.values()) < min_silhouette:
        return {"k": 1, "labels": torch.zeros(M, dtype=torch.int64), "silhouette": None, "silhouettes": scores}
    best = max(scores, key=scores.get)
    return {"k": best, "labels": labelings[best], "silhouette": scores[best], "silhouettes": scores}


def adjusted_rand_index(a: Tensor, b: Tensor) -> float:
    """Adjusted Rand index of two labelings [M] (formula in the module docstring); 1.0 if both are trivial."""
    _, a = a.unique(return_inverse=True)
    _, b = b.unique(return_inverse=True)
    table = torch.zeros(int(a.max()) + 1, int(b.max()) + 1, dtype=torch.float64)
    table.index_put_((a, b), torch.ones(a.numel(), dtype=torch.float64), accumulate=True)
    pairs = lambda n: n * (n - 1) / 2  # noqa: E731
    both, rows, cols = pairs(table).sum(), pairs(table.sum(1)).sum(), pairs(table.sum(0)).sum()
    expected = rows * cols / pairs(torch.tensor(float(a.numel())))
    top = (rows + cols) / 2 - expected
    return 1.0 if top == 0 else float((both - expected) / top)


def facet_predictability(features: Tensor, labels: Tensor, lam: float = 1.0) -> float:
    """Held-out balanced accuracy of a ridge classifier predicting labels [M] from features [M, f]
    (fit on even rows, score on odd rows; see the module docstring)."""
    x = features.double()
    x = (x - x.mean(0)) / x.std(0).clamp(min=1e-8)
    x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
    _, y = labels.unique(return_inverse=True)
    k = int(y.max()) + 1
    train, test = torch.arange(0, x.shape[0], 2), torch.arange(1, x.shape[0], 2)
    targets = torch.nn.functional.one_hot(y[train], k).double()
    gram = x[train].T @ x[train] + lam * torch.eye(x.shape[1], dtype=x.dtype)
    weights = torch.linalg.solve(gram, x[train].T @ targets)
    predicted = (x[test] @ weights).argmax(1)
    recalls = [float((predicted[y[test] == c] == c).double().mean()) for c in range(k) if (y[test] == c).any()]
    return sum(recalls) / len(recalls)


def entropy_bits(p: Tensor) -> Tensor:
    """Entropy in bits along the last axis of distributions p [..., V]."""
    p = p.double()
    return -(p * torch.log2(p.clamp(min=1e-300))).sum(-1)


def jensen_shannon(distributions: Tensor, weights: Tensor | None = None) -> float:
    """Generalised Jensen-Shannon divergence (bits) of distributions [K, V] with weights [K] (default equal)."""
    p = distributions.double()
    w = torch.full((p.shape[0],), 1.0 / p.shape[0], dtype=p.dtype) if weights is None else weights.double() / weights.sum()
    return float(entropy_bits(w @ p) - (w * entropy_bits(p)).sum())


def magnitude_bands(activations: Tensor, n_bands: int) -> Tensor:
    """Band index [M] in 0..n_bands-1 by rank of activations [M] (equal counts; band 0 = weakest)."""
    M = activations.shape[0]
    if M < positive_int("n_bands", n_bands):
        raise ValueError(f"n_bands={n_bands} exceeds the number of activations {M}")
    ranks = torch.empty(M, dtype=torch.int64)
    ranks[activations.argsort(stable=True)] = torch.arange(M)
    return ranks * n_bands // M


def band_means(bands: Tensor, distributions: Tensor, n_bands: int) -> Tensor:
    """Mean distribution per band [n_bands, V]."""
    sums = torch.zeros(n_bands, distributions.shape[1], dtype=torch.float64).index_add_(0, bands, distributions.double())
    return sums / torch.bincount(bands, minlength=n_bands).clamp(min=1)[:, None]


def magnitude_code_score(activations: Tensor, distributions: Tensor, n_bands: int = 3, shuffles: int = 8,
                         seed: int = 0) -> dict:
    """activations [M] of one neuron where it fires, distributions [M, V] (next-token probabilities at
    those positions) -> {"score", "jsd_bits", "shuffled_bits", "bands": [{"low", "high", "count"}],
    "top_token_disagreement", "band_means" [n_bands, V]}; formula in the module docstring."""
    if distributions.shape[0] != activations.shape[0]:
        raise ValueError(f"distributions has {distributions.shape[0]} rows but activations has {activations.shape[0]}")
    bands = magnitude_bands(activations, n_bands)
    means = band_means(bands, distributions, n_bands)
    jsd = jensen_shannon(means)
    gen = torch.Generator().manual_seed(derive_seed(seed, 2))
    shuffled = [jensen_shannon(band_means(bands[torch.randperm(bands.numel(), generator=gen)], distributions, n_bands))
                for _ in range(positive_int("shuffles", shuffles))]
    baseline = sum(shuffled) / len(shuffled)
    info = [{"low": float(activations[bands == b].min()), "high": float(activations[bands == b].max()),
             "count": int((bands == b).sum())} for b in range(n_bands)]
    tops = means.argmax(1)
    pairs = [(b, c) for b in range(n_bands) for c in range(b + 1, n_bands)]
    disagreement = sum(int(tops[b] != tops[c]) for b, c in pairs) / len(pairs) if pairs else 0.0
    return {"score": (jsd - baseline) / math.log2(n_bands), "jsd_bits": jsd, "shuffled_bits": baseline,
            "top_token_disagreement": disagreement, "bands": info, "band_means": means}
