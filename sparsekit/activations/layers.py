"""Several consecutive layers' (MLP input, MLP output) pairs from one forward pass, for cross-layer
transcoders (``sparsekit.sae.clt``).

    pairs = cache_layer_pairs(model, contexts, range(3, 9), "acts/clt")   # LayerPairSource
    for x, y in pairs: ...                                                 # x, y [b, 6, 576]

``cache_layer_pairs`` caches ``blocks.l.ln2.hook_normalized`` and ``blocks.l.hook_mlp_out`` of every
layer with ``store.cache_layer_activations`` (one forward per batch of contexts, stopping after the
last layer; one shard folder per hook, reused when it already holds them). ``LayerPairSource`` reads
the 2L folders in step: every folder has the same rows in the same shards, so ShardSources with the
same seed visit the same rows in the same order; it checks the folders agree and stacks each batch
into x [b, L, d_in], y [b, L, d_out] (float32).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import Tensor

from sparsekit._util.validate import is_int

from .shards import ShardSource
from .store import cache_layer_activations


def mlp_hooks(layer: int) -> tuple[str, str]:
    """(MLP input, MLP output) hook names of block ``layer`` in TransformerLens's naming."""
    return f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out"


def check_layers(layers, n_layers: int | None = None) -> list[int]:
    """layers: consecutive ints >= 0 (a range or a list), below n_layers when given -> a list."""
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise ValueError(f"layers must be consecutive layer numbers (e.g. range(3, 9)), got {layers!r}")
    found = list(layers)
    if not found or not all(is_int(layer) and layer >= 0 for layer in found):
        raise ValueError(f"layers must be a non-empty list of layer numbers >= 0, got {found!r}")
    if found != list(range(found[0], found[0] + len(found))):
        raise ValueError(f"layers must be consecutive and increasing (e.g. 3, 4, 5), got {found!r}")
    if n_layers is not None and found[-1] >= n_layers:
        raise ValueError(f"layers go up to {found[-1]}, but the model has layers 0..{n_layers - 1}")
    return found


class LayerPairSource:
    """(x [b, L, d_in], y [b, L, d_out]) float32 batches from 2L shard folders read in step
    (``inputs`` and ``targets``: one folder per layer, written from the same contexts). shuffle,
    seed, epochs, batch_size, buffer_shards: as ShardSource's. Attributes: layers (L), d_in, d_out,
    tokens (rows per epoch)."""

    def __init__(self, inputs: Sequence, targets: Sequence, batch_size: int = 4096, shuffle: bool = True,
                 seed: int = 0, epochs: int | None = None, buffer_shards: int = 8):
        if len(inputs) != len(targets) or not inputs:
            raise ValueError(f"inputs and targets must name one folder per layer each, got {len(inputs)} and "
                             f"{len(targets)}")
        kwargs = dict(batch_size=batch_size, shuffle=shuffle, seed=seed, epochs=epochs, buffer_shards=buffer_shards)
        self.inputs = [ShardSource(folder, **kwargs) for folder in inputs]
        self.targets = [ShardSource(folder, **kwargs) for folder in targets]
        first = self.inputs[0]
        layout = [s["rows"] for s in first.shards]
        for source in self.inputs + self.targets:
            if [s["rows"] for s in source.shards] != layout or source.d_out is not None:
                raise ValueError(f"{source.directory} does not hold single-hook shards laid out like "
                                 f"{first.directory} ({first.tokens} rows in {len(layout)} shards): cache the layers "
                                 f"together (cache_layer_pairs)")
        for group, name in ((self.inputs, "inputs"), (self.targets, "targets")):
            if len({s.d for s in group}) != 1:
                raise ValueError(f"{name}: every layer must have the same width, got {[s.d for s in group]}")
        self.layers = len(self.inputs)
        self.d_in, self.d_out, self.tokens = first.d, self.targets[0].d, first.tokens

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        streams = [iter(s) for s in self.inputs + self.targets]
        for batches in zip(*streams):
            x = torch.stack([b.float() for b in batches[:self.layers]], 1)
            y = torch.stack([b.float() for b in batches[self.layers:]], 1)
            yield x, y

    def state_dict(self) -> dict:
        return {"kind": "LayerPairSource", "sources": [s.state_dict() for s in self.inputs + self.targets]}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("kind") != "LayerPairSource" or \
                len(state.get("sources", ())) != 2 * self.layers:
            raise ValueError(f"state must be a LayerPairSource state over {self.layers} layers")
        for source, saved in zip(self.inputs + self.targets, state["sources"]):
            source.load_state_dict(saved)


def cache_layer_pairs(model, tokens: Tensor, layers, directory, batch_size: int = 4096, dtype: str = "float32",
                      progress: bool = True, overwrite: bool = False, special_ids="tokenizer",
                      **source_kwargs) -> LayerPairSource:
    """Every layer's (MLP input, MLP output) on tokens [N, T] (BOS-first contexts), cached once under
    ``directory`` (one folder per hook, ``store.cache_layer_activations``'s format; reused when it
    already holds these activations) -> a LayerPairSource over them. model: a HookedTransformer;
    layers: consecutive layer numbers. source_kwargs: shuffle, seed, epochs, buffer_shards."""
    layers = check_layers(layers, getattr(getattr(model, "cfg", None), "n_layers", None))
    hooks = [hook for layer in layers for hook in mlp_hooks(layer)]
    sources = cache_layer_activations(model, tokens, hooks, Path(directory), batch_size=batch_size, dtype=dtype,
                                      progress=progress, overwrite=overwrite, special_ids=special_ids)
    folders = {hook: source.directory for hook, source in sources.items()}
    return LayerPairSource([folders[mlp_hooks(layer)[0]] for layer in layers],
                           [folders[mlp_hooks(layer)[1]] for layer in layers], batch_size=batch_size, **source_kwargs)
