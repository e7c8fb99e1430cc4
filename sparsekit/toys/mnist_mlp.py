"""A small ReLU MLP trained on MNIST: the model whose hidden activations the MNIST study decomposes.

784 pixels -> [Linear -> ReLU] x depth (each `hidden` wide) -> Linear -> 10 logits. Every post-ReLU
activation is the output of module ``layers.<i>.act`` (an ``nn.ReLU``), so it is a hook name for
``sparsekit.splice`` and ``model.get_submodule``. ``train_mlp`` is deterministic given the config
(seed included) and caches the trained weights as ``<cache>/mnist_mlp/<key>.safetensors`` plus a
JSON sidecar, keyed by a hash of the config; a second call loads them in milliseconds.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from sparsekit._util.atomic import atomic_save_tensors, atomic_write_bytes
from sparsekit._util.log import logger
from sparsekit._util.seeding import permutation
from sparsekit._util.validate import check_seed, is_int, positive_int, positive_number
from sparsekit.activations.mnist import PIXELS, default_cache_dir, load_mnist

CLASSES = 10
# Part of the cache key: bump it when training changes, so stale weights are never loaded.
TRAINING_VERSION = 1


@dataclass(frozen=True)
class MLPConfig:
    """hidden units per layer, depth hidden layers; Adam at lr (cosine-decayed to 0 over all steps)
    for `epochs` passes over the 60,000 training images in shuffled batches of batch_size."""
    hidden: int = 64
    depth: int = 1
    epochs: int = 10
    lr: float = 3e-3
    batch_size: int = 128
    seed: int = 0

    def __post_init__(self):
        for name in ("hidden", "depth", "epochs", "batch_size"):
            positive_int(name, getattr(self, name))
        positive_number("lr", self.lr)
        check_seed(self.seed)

    def key(self) -> str:
        """A short hash of every field and TRAINING_VERSION: the cache file's name."""
        fields = json.dumps({**dataclasses.asdict(self), "version": TRAINING_VERSION}, sort_keys=True)
        return f"mlp_h{self.hidden}_d{self.depth}_s{self.seed}_" + hashlib.sha256(fields.encode()).hexdigest()[:12]


class HiddenLayer(nn.Module):
    """x [N, d_in] -> relu(linear(x)) [N, hidden]; ``act`` is the hook point of the activation."""

    def __init__(self, d_in: int, hidden: int):
        super().__init__()
        self.linear = nn.Linear(d_in, hidden)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.linear(x))


class MNISTMLP(nn.Module):
    """images [N, 784] (or [N, 28, 28]) in [0, 1] -> logits [N, 10]."""

    def __init__(self, hidden: int = 64, depth: int = 1):
        super().__init__()
        self.hidden, self.depth = positive_int("hidden", hidden), positive_int("depth", depth)
        self.layers = nn.ModuleList(HiddenLayer(PIXELS if i == 0 else hidden, hidden) for i in range(depth))
        self.readout = nn.Linear(hidden, CLASSES)

    def hook_names(self) -> list[str]:
        """The post-ReLU activations, input side first: ["layers.0.act", ...]."""
        return [f"layers.{i}.act" for i in range(self.depth)]

    def forward(self, images: Tensor) -> Tensor:
        x = images.reshape(images.shape[0], PIXELS)
        for layer in self.layers:
            x = layer(x)
        return self.readout(x)


def _batched(fn, images: Tensor, batch_size: int = 8192) -> Tensor:
    with torch.no_grad():
        return torch.cat([fn(images[i:i + batch_size]) for i in range(0, images.shape[0], batch_size)])


def hidden_activations(model: MNISTMLP, images: Tensor, layer: int | str) -> Tensor:
    """The post-ReLU activation of hidden layer `layer` (0-based) [N, hidden], or the pixels
    themselves [N, 784] for layer="pixels". No gradients; forward hooks on the layers still run."""
    flat = images.reshape(images.shape[0], PIXELS)
    if layer == "pixels":
        return flat
    if not is_int(layer) or not 0 <= layer < model.depth:
        raise ValueError(f"layer must be \"pixels\" or an int in [0, {model.depth}) for this depth-{model.depth} MLP, "
                         f"got {layer!r}")

    def upto(x: Tensor) -> Tensor:
        for block in model.layers[:layer + 1]:
            x = block(x)
        return x

    return _batched(upto, flat)


def accuracy(model: nn.Module, images: Tensor, labels: Tensor) -> float:
    """Fraction of images whose argmax logit is the label."""
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"images has {images.shape[0]} rows but labels has {labels.shape[0]}")
    predictions = _batched(lambda x: model(x).argmax(-1), images)
    return float((predictions == labels).float().mean())


def _cache_paths(config: MLPConfig, cache_dir) -> tuple[Path, Path]:
    folder = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / "mnist_mlp"
    return folder / f"{config.key()}.safetensors", folder / f"{config.key()}.json"


def _load_cached(config: MLPConfig, weights: Path, sidecar: Path) -> tuple[MNISTMLP, float] | None:
    if not (weights.exists() and sidecar.exists()):
        return None
    from safetensors.torch import load_file
    record = json.loads(sidecar.read_text())
    if record.get("config") != dataclasses.asdict(config):
        raise ValueError(f"{sidecar} records config {record.get('config')} but its name is the key of "
                         f"{dataclasses.asdict(config)}; delete the pair {weights.name} / {sidecar.name}")
    model = MNISTMLP(config.hidden, config.depth)
    model.load_state_dict(load_file(weights))
    return model.eval(), float(record["test_accuracy"])


def train_mlp(config: MLPConfig = MLPConfig(), progress: bool = True, cache_dir=None) -> tuple[MNISTMLP, float]:
    """Train (or load the cached) MNISTMLP for config -> (model in eval mode, test accuracy).

    Cross-entropy, Adam, cosine learning-rate decay. Initialisation under torch.manual_seed(config.seed)
    inside fork_rng (the caller's RNG is untouched); batch order ``permutation(60000, seed, epoch)``.
    """
    weights, sidecar = _cache_paths(config, cache_dir)
    cached = _load_cached(config, weights, sidecar)
    if cached is not None:
        return cached
    train_x, train_y = load_mnist("train", cache_dir)
    test_x, test_y = load_mnist("test", cache_dir)
    threads = torch.get_num_threads()
    # [128, 784] x [784, 64] products are too small to gain from a second thread, and OpenMP threads
    # that share a core with another busy process slow training ten- to fiftyfold; one thread also
    # makes the result independent of the machine's core count.
    torch.set_num_threads(1)
    try:
        model, test_accuracy, seconds = _train(config, train_x, train_y, test_x, test_y, progress)
    finally:
        torch.set_num_threads(threads)
    weights.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(model.state_dict(), weights)
    record = {"config": dataclasses.asdict(config), "test_accuracy": test_accuracy, "train_seconds": seconds,
              "version": TRAINING_VERSION}
    atomic_write_bytes(sidecar, json.dumps(record, indent=1).encode())  # written last: its presence marks a complete pair
    return model, test_accuracy


def _train(config: MLPConfig, train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
           progress: bool) -> tuple[MNISTMLP, float, float]:
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = MNISTMLP(config.hidden, config.depth)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    rows = train_x.shape[0]
    steps_per_epoch = math.ceil(rows / config.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / (config.epochs * steps_per_epoch))))
    model.train()
    for epoch in range(config.epochs):
        order = torch.from_numpy(permutation(rows, config.seed, epoch))
        total = 0.0
        for i in range(0, rows, config.batch_size):
            batch = order[i:i + config.batch_size]
            loss = nn.functional.cross_entropy(model(train_x[batch]), train_y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * batch.shape[0]
        if progress:
            logger.info("mnist mlp %s: epoch %d/%d train loss %.4f (%.1fs)", config.key(), epoch + 1, config.epochs,
                        total / rows, time.perf_counter() - start)
    model.eval()
    test_accuracy = accuracy(model, test_x, test_y)
    if progress:
        logger.info("mnist mlp %s: test accuracy %.4f", config.key(), test_accuracy)
    return model, test_accuracy, time.perf_counter() - start
