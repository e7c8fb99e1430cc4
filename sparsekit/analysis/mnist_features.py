"""What a dictionary trained on an MNIST MLP's hidden layer represents: images, digits, logits.

Per feature j of a dictionary (codes f [N, n] on N images, raw decoder direction d_j [hidden]):

- top images: the `count` images with the largest positive f_j (fewer if it fires on fewer);
- mean image: the activation-weighted mean sum_i f_ij x_i / sum_i f_ij over all images;
- majority label: the most common label among its top images (ties: the smaller digit), and the
  fraction of top images carrying it (purity);
- logit weights [10]: for the last hidden layer the direct path W_readout @ d_j (logits per unit of
  feature activation); for an earlier layer, the mean change in logits when m_j * d_j is added to
  that layer's activation on a set of base images, divided by m_j (m_j: the feature's mean positive
  activation, so the probe has a typical size and passes through the later ReLUs as features do);
- top logit class: argmax of the logit weights;
- template score: the fraction of alive features (those firing on at least one image) whose top
  logit class equals their majority label: how often a feature that looks like a digit also votes
  for it. Chance is about 0.1.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sparsekit._util.validate import is_int
from sparsekit.toys.mnist_mlp import CLASSES, MNISTMLP

NO_LABEL = -1  # majority label of a feature that never fires


def _codes_matrix(codes: Tensor) -> Tensor:
    if not isinstance(codes, Tensor) or codes.dim() != 2 or not codes.is_floating_point():
        raise ValueError(f"codes must be a float tensor [N, n_latents], got "
                         f"{tuple(codes.shape) if isinstance(codes, Tensor) else type(codes).__name__}")
    return codes


def top_activating(codes: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """codes [N, n] -> (indices [n, count] int64, values [n, count]) of each feature's largest
    activations, descending. Entries past a feature's positive activations have value 0 and index -1."""
    codes = _codes_matrix(codes)
    if not is_int(count) or not 1 <= count <= codes.shape[0]:
        raise ValueError(f"count must be an int in [1, {codes.shape[0]}] (the number of images), got {count!r}")
    values, indices = codes.t().topk(count, dim=1)
    positive = values > 0
    return torch.where(positive, indices, torch.full_like(indices, -1)), torch.where(positive, values, 0.0)


def mean_images(codes: Tensor, images: Tensor) -> Tensor:
    """codes [N, n], images [N, P] -> activation-weighted mean image per feature [n, P] (zeros for a
    feature that never fires)."""
    codes = _codes_matrix(codes)
    images = images.reshape(images.shape[0], -1).to(codes.dtype)
    if images.shape[0] != codes.shape[0]:
        raise ValueError(f"images has {images.shape[0]} rows but codes has {codes.shape[0]}")
    weights = codes.clamp_min(0)
    totals = weights.sum(0)
    return (weights.t() @ images) / totals.clamp_min(1e-30)[:, None]


def majority_labels(top_indices: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """top_indices [n, count] (-1 = none), labels [N] in 0..9 -> (majority label [n] int64, NO_LABEL
    where a feature has no top image; purity [n] = share of its top images with that label)."""
    if top_indices.dim() != 2:
        raise ValueError(f"top_indices must be [n, count], got {tuple(top_indices.shape)}")
    valid = top_indices >= 0
    picked = labels[top_indices.clamp_min(0)]
    votes = torch.zeros(top_indices.shape[0], CLASSES, dtype=torch.int64)
    votes.scatter_add_(1, picked, valid.to(torch.int64))
    counts, majority = votes.max(1)  # max returns the first (smallest) digit on ties
    have = valid.sum(1)
    majority = torch.where(have > 0, majority, torch.full_like(majority, NO_LABEL))
    return majority, counts.double() / have.clamp_min(1).double()


def rest_of_network(model: MNISTMLP, layer: int):
    """h [M, hidden] at hidden layer `layer` (post-ReLU) -> logits [M, 10]: the layers after it."""
    if not is_int(layer) or not 0 <= layer < model.depth:
        raise ValueError(f"layer must be an int in [0, {model.depth}), got {layer!r}")

    def forward(h: Tensor) -> Tensor:
        for block in model.layers[layer + 1:]:
            h = block(h)
        return model.readout(h)

    return forward


@torch.no_grad()
def logit_weights(model: MNISTMLP, layer: int, directions: Tensor, base: Tensor | None = None,
                  magnitudes: Tensor | None = None, chunk: int = 64) -> Tensor:
    """Logit effect per unit of feature activation [n, 10] for raw directions [n, hidden] at `layer`.

    Last hidden layer: W_readout @ d_j (exact; base and magnitudes unused). Earlier layer:
    mean over base [M, hidden] of (rest(h + m_j d_j) - rest(h)) / m_j, magnitudes m [n] > 0.
    """
    rest = rest_of_network(model, layer)
    if directions.dim() != 2 or directions.shape[1] != model.hidden:
        raise ValueError(f"directions must be [n, hidden={model.hidden}], got {tuple(directions.shape)}")
    directions = directions.to(model.readout.weight.dtype)
    if layer == model.depth - 1:
        return directions @ model.readout.weight.t()
    if base is None or magnitudes is None:
        raise ValueError("an earlier layer's logit weights need base activations and magnitudes")
    if base.dim() != 2 or base.shape[1] != model.hidden:
        raise ValueError(f"base must be [M, hidden={model.hidden}], got {tuple(base.shape)}")
    if magnitudes.shape != (directions.shape[0],) or not bool((magnitudes > 0).all()):
        raise ValueError(f"magnitudes must be [n={directions.shape[0]}] of positive numbers")
    clean = rest(base)
    out = []
    for start in range(0, directions.shape[0], chunk):
        step = (directions[start:start + chunk] * magnitudes[start:start + chunk, None])  # [c, hidden]
        shifted = rest((base[None] + step[:, None]).reshape(-1, model.hidden)).reshape(step.shape[0], -1, CLASSES)
        out.append((shifted - clean[None]).mean(1) / magnitudes[start:start + chunk, None])
    return torch.cat(out)


def features_per_digit(majority: Tensor, alive: Tensor) -> list[int]:
    """How many alive features have each digit as their majority label: [10] counts."""
    return torch.bincount(majority[alive & (majority >= 0)], minlength=CLASSES).tolist()


def template_score(logit_class: Tensor, majority: Tensor, alive: Tensor) -> float | None:
    """Fraction of alive features whose top logit class equals their majority label (None if none alive)."""
    if not (logit_class.shape == majority.shape == alive.shape):
        raise ValueError(f"logit_class {tuple(logit_class.shape)}, majority {tuple(majority.shape)} and alive "
                         f"{tuple(alive.shape)} must have the same shape [n]")
    if not bool(alive.any()):
        return None
    return float((logit_class[alive] == majority[alive]).double().mean())


@dataclass
class FeatureAnalysis:
    """Everything above for one dictionary; tensors have n_latents rows."""
    top_indices: Tensor     # [n, count] int64, -1 = none
    top_values: Tensor      # [n, count]
    mean_images: Tensor     # [n, 784]
    majority: Tensor        # [n] int64, NO_LABEL for dead features
    purity: Tensor          # [n] float64
    logit_weights: Tensor   # [n, 10]
    logit_class: Tensor     # [n] int64
    alive: Tensor           # [n] bool: fires on at least one image
    fire_rate: Tensor       # [n] fraction of images it fires on
    per_digit: list         # [10] alive features per majority digit
    template_score: float | None


@torch.no_grad()
def feature_codes(sae, activations: Tensor, batch_size: int = 4096) -> Tensor:
    """Raw activations [N, d_in] -> dense codes [N, n] (inference path, normalised units)."""
    was_training = sae.training
    sae.eval()
    try:
        return torch.cat([sae.dense_codes(sae.encode(activations[i:i + batch_size] * sae.input_scale))
                          for i in range(0, activations.shape[0], batch_size)])
    finally:
        sae.train(was_training)


@torch.no_grad()
def analyse_features(model: MNISTMLP, layer: int, sae, activations: Tensor, images: Tensor, labels: Tensor,
                     count: int = 9, base_images: int = 256) -> FeatureAnalysis:
    """Run every analysis of this module on a dictionary trained at hidden layer `layer`.

    activations [N, hidden] (that layer's raw activations of images [N, 784] with labels [N]).
    """
    if not activations.shape[0] == images.shape[0] == labels.shape[0]:
        raise ValueError(f"activations, images and labels must have the same rows, got {activations.shape[0]}, "
                         f"{images.shape[0]}, {labels.shape[0]}")
    codes = feature_codes(sae, activations)
    top_indices, top_values = top_activating(codes, min(count, codes.shape[0]))
    majority, purity = majority_labels(top_indices, labels)
    fires = (codes > 0).sum(0)
    alive = fires > 0
    directions = sae.W_dec.detach() / sae.output_scale  # raw activation per unit of (normalised) code
    positive_mean = codes.clamp_min(0).sum(0) / fires.clamp_min(1)
    magnitudes = torch.where(alive, positive_mean, torch.ones_like(positive_mean))
    weights = logit_weights(model, layer, directions, activations[:base_images], magnitudes)
    logit_class = weights.argmax(1)
    return FeatureAnalysis(top_indices, top_values, mean_images(codes, images), majority, purity, weights,
                           logit_class, alive, fires.double() / codes.shape[0], features_per_digit(majority, alive),
                           template_score(logit_class, majority, alive))
