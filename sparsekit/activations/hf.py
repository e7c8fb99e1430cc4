"""Activations of Hugging Face ``transformers`` models (or any ``nn.Module``), no TransformerLens.

    source = HFModuleSource(model, tokens, "model.layers.3.mlp")                 # MLP outputs
    source = HFModuleSource(model, tokens, "model.layers.3.mlp:input",           # transcoder pairs
                            target="model.layers.3.mlp")
    sparsekit.train(sae, source, cfg)

A path is a module's dotted name in ``model.named_modules()``, optionally with ``:input`` (what the
module receives: its first positional argument, or its ``hidden_states`` keyword) or ``:output``
(the default: what it returns, the first element when it returns a tuple). Each dot-separated part
may be a glob (``*``, ``?``, ``[...]``, matched within one part: ``model.layers.*.mlp`` matches
``model.layers.0.mlp`` but not ``model.layers.0.x.mlp``); several matched modules are
concatenated along the feature axis in model order (crosscoder-style inputs).

Activations are captured by forward hooks registered for each forward pass and removed after it;
the pass stops (by an exception the source catches) once every hooked module has run, so later
layers cost nothing. Position 0 (BOS, whose activations are outliers) is dropped by default, and
with ``special_ids`` (e.g. ``text.special_token_ids(tokenizer)``) every position holding one of
those tokens (EOS or pad between documents, ...) is dropped too, wherever it is in the context.
"""
from __future__ import annotations

import difflib
import fnmatch
from typing import Iterator

import torch
from torch import Tensor, nn

from sparsekit._util.seeding import permutation
from sparsekit._util.validate import check_epochs, check_seed, check_state, positive_int, state_int

from .text import check_special_ids, kept_positions

SIDES = ("input", "output")


class _StopForward(Exception):
    """Raised by the last hook of a pass: the remaining layers need not run."""


def split_side(path: str) -> tuple[str, str]:
    """'model.layers.0.mlp:input' -> ('model.layers.0.mlp', 'input'); no suffix means output."""
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"path must be a non-empty string such as 'model.layers.0.mlp', got {path!r}")
    name, _, side = path.partition(":")
    side = side or "output"
    if side not in SIDES:
        raise ValueError(f"path {path!r}: the part after ':' must be 'input' or 'output', got {side!r}")
    return name, side


def find_modules(model: nn.Module, pattern: str) -> list[str]:
    """Names of the modules of ``model`` whose dotted name matches ``pattern`` part by part (globs
    allowed in each part), in ``named_modules`` order. ValueError listing close names if none."""
    parts = pattern.split(".")
    names = [name for name, _ in model.named_modules() if name]
    matched = [name for name in names
               if len(name.split(".")) == len(parts)
               and all(fnmatch.fnmatchcase(got, want) for got, want in zip(name.split("."), parts))]
    if not matched:
        probe = pattern.replace("*", "0").replace("?", "0")
        close = difflib.get_close_matches(probe, names, n=6, cutoff=0.5)
        hint = f"close module names: {', '.join(close)}" if close else f"top-level modules: " \
            f"{', '.join(n for n in names if '.' not in n)}"
        raise ValueError(f"path {pattern!r} matches no module of {type(model).__name__}; {hint}")
    return matched


def _first_tensor(value, where: str) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], Tensor):
        return value[0]
    if hasattr(value, "to_tuple"):  # a transformers ModelOutput
        return _first_tensor(value.to_tuple(), where)
    raise ValueError(f"{where} is a {type(value).__name__}, not a tensor (or a tuple starting with one)")


class HFModuleSource:
    """An ActivationSource over a model's modules, run on token contexts.

    model: an ``nn.Module`` called as ``model(input_ids)`` (a transformers model, put in eval mode);
    tokens: int64 [N, T] contexts (e.g. ``token_contexts``); path: a module path (see the module
    docstring); target: a second path whose activations become y, for transcoders (both paths are
    captured in the same forward pass). Each iteration runs ``batch_contexts`` contexts and yields
    x [rows, d] (and y [rows, d_y]): one row per kept position of the batch_contexts contexts, that is
    every position but 0 (when exclude_bos) and those whose token is in special_ids (default none).

    Contexts are visited in ``permutation(N, seed, epoch)`` order when shuffle, else in order;
    epochs=None repeats forever. State: {"epoch", "position"} (contexts of this epoch consumed),
    so a resumed run reads exactly the contexts that would have come next.
    """

    def __init__(self, model: nn.Module, tokens: Tensor, path: str, target: str | None = None,
                 batch_contexts: int = 8, exclude_bos: bool = True, shuffle: bool = False, seed: int = 0,
                 epochs: int | None = None, dtype: torch.dtype | None = None, special_ids=None):
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.dtype != torch.int64 or tokens.numel() == 0:
            raise ValueError(f"tokens must be a non-empty int64 tensor [contexts, context_len], got "
                             f"{tokens.dtype if isinstance(tokens, Tensor) else type(tokens).__name__} "
                             f"{tuple(tokens.shape) if isinstance(tokens, Tensor) else ''}")
        self.exclude_bos = bool(exclude_bos)
        if self.exclude_bos and tokens.shape[1] < 2:
            raise ValueError(f"tokens has context length {tokens.shape[1]}: exclude_bos needs at least 2 positions")
        self.special_ids = check_special_ids(special_ids)
        self.model, self.tokens = model.eval(), tokens
        self.paths = [path] + ([target] if target is not None else [])
        self.hooks = []  # (module names, side) for x, then y
        for p in self.paths:
            name, side = split_side(p)
            self.hooks.append((find_modules(model, name), side))
        self.batch_contexts = positive_int("batch_contexts", batch_contexts)
        self.shuffle = bool(shuffle)
        self.seed = check_seed(seed)
        self.epochs = check_epochs(epochs)
        self.dtype = dtype
        self.epoch = 0
        self.position = 0

    @property
    def module_names(self) -> list[list[str]]:
        """The modules each path matched: [x's] or [x's, y's]."""
        return [names for names, _ in self.hooks]

    def _settings(self) -> dict:
        return {"contexts": self.tokens.shape[0], "context_len": self.tokens.shape[1],
                "batch_contexts": self.batch_contexts, "shuffle": self.shuffle, "seed": self.seed,
                "exclude_bos": self.exclude_bos, "paths": list(self.paths),
                # only when set: states saved before special_ids existed still resume
                **({"special_ids": list(self.special_ids)} if self.special_ids else {})}

    def state_dict(self) -> dict:
        return {"kind": "HFModuleSource", "epoch": self.epoch, "position": self.position, **self._settings()}

    def load_state_dict(self, state: dict) -> None:
        check_state("HFModuleSource", state, self._settings())
        epoch, position = state_int(state, "epoch"), state_int(state, "position")
        if position > self.tokens.shape[0]:
            raise ValueError(f"state field 'position' is {position}, beyond the {self.tokens.shape[0]} contexts")
        self.epoch, self.position = epoch, position

    def __iter__(self) -> Iterator:
        n = self.tokens.shape[0]
        while self.epochs is None or self.epoch < self.epochs:
            if self.position >= n:
                self.epoch, self.position = self.epoch + 1, 0
                continue
            stop = min(self.position + self.batch_contexts, n)
            if self.shuffle:
                rows = torch.from_numpy(permutation(n, self.seed, self.epoch)[self.position:stop])
            else:
                rows = torch.arange(self.position, stop)
            self.position = stop  # before yielding: a state taken now counts this batch as consumed
            captured = self.activations(self.tokens[rows])
            yield captured[0] if len(captured) == 1 else tuple(captured)

    @torch.no_grad()
    def activations(self, input_ids: Tensor) -> list[Tensor]:
        """Run the model on input_ids [b, T] and return each path's activations at the kept positions
        [rows, d] (context-major; see the class docstring)."""
        modules = dict(self.model.named_modules())
        wanted = {(name, side) for names, side in self.hooks for name in names}
        store: dict[tuple[str, str], Tensor] = {}
        handles = []

        def keep(key, value):
            store[key] = _first_tensor(value, f"the {key[1]} of module {key[0]!r}").detach()
            if len(store) == len(wanted):
                raise _StopForward

        for name, side in wanted:
            module = modules[name]
            if side == "input":
                def pre_hook(mod, args, kwargs, key=(name, side)):
                    keep(key, args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()), None)))
                handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(lambda mod, args, out, key=(name, side): keep(key, out)))
        device = next(iter(self.model.parameters()), input_ids).device
        try:
            self.model(input_ids.to(device))
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        missing = sorted(key[0] for key in wanted if key not in store)
        if missing:
            raise ValueError(f"modules {missing} did not run in the model's forward pass: nothing to capture there")
        kept = kept_positions(input_ids, self.special_ids, drop_first=self.exclude_bos)
        return [self._rows([store[(name, side)] for name in names], kept) for names, side in self.hooks]

    def _rows(self, tensors: list[Tensor], keep: Tensor) -> Tensor:
        batch, length = keep.shape
        flat = []
        for t in tensors:
            if t.dim() < 2 or t.shape[0] != batch or t.shape[1] != length:
                raise ValueError(f"a hooked activation has shape {tuple(t.shape)}, expected [batch={batch}, "
                                 f"positions={length}, ...]: hook a module that works per position")
            flat.append(t.reshape(batch, length, -1))
        x = torch.cat(flat, -1) if len(flat) > 1 else flat[0]
        x = x[keep.to(x.device)]
        return x.to(self.dtype) if self.dtype is not None else x
