"""Activations of a language model, streamed from hook points or cached as shards.

    contexts = corpus_contexts(model, "shakespeare", context_len=128)          # [N, 128], BOS first
    source = LMActivationSource(model, contexts, "blocks.3.hook_resid_post")   # x [b, 576] batches
    source = LMActivationSource(model, contexts, ("blocks.3.ln2.hook_normalized", "blocks.3.hook_mlp_out"))
    shards = cache_activations(model, contexts, hooks, "acts/l3")              # ShardSource; reused next time

The model is a TransformerLens ``HookedTransformer`` (hooks: its hook names) or a Hugging Face
``transformers`` model (hooks: dotted module paths, ``:input`` allowed, captured by ``hf.HFModuleSource``).

Rows are tokens: position 0 (BOS) of every context is excluded (its activations are outliers that
carry no information about the text), and so is every position whose token is special
(``special_ids``: by default the model's tokenizer's BOS, EOS, pad and other special tokens, from
``text.special_token_ids``), wherever it is in the context: the EOS or BOS that separate documents.
``special_ids=None`` excludes position 0 only (the behaviour before; a state or cache that recorded
no special ids was made that way). Activations shaped [batch, pos, heads, d_head]
(``attn.hook_z``) are flattened to [batch, pos, heads * d_head]. The forward pass stops after the
last block a hook needs (``stop_at_layer``), so an early layer costs a fraction of the model.

Shuffle buffer: consecutive groups of ``buffer_contexts`` contexts (in an order permuted per epoch
by (seed, epoch)) form windows; a window's activations are computed in one go and its rows
permuted by (seed, epoch, window). The state is just (epoch, position): a resumed source recomputes
the current window (forward passes are deterministic) and continues exactly where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from sparsekit._util.atomic import atomic_write_bytes
from sparsekit._util.seeding import permutation
from sparsekit._util.validate import check_epochs, check_seed, check_state, positive_int, state_int

from .hf import HFModuleSource
from .shards import MANIFEST, ShardSource, write_shards
from .source import Batch
from .text import check_special_ids, kept_positions, load_documents, special_token_ids, token_contexts

STORE_RECORD = "lm_store.json"
_LAYER = re.compile(r"^blocks\.(\d+)\.")


def corpus_contexts(model, corpus: str = "shakespeare", context_len: int = 128, max_contexts: int | None = None,
                    bos_id: int | None = None) -> Tensor:
    """A text corpus (see ``text.py``) tokenised by model.tokenizer -> contexts [N, context_len] int64,
    each BOS (``bos_id``, default the tokenizer's BOS) followed by the next context_len - 1 tokens.
    Documents are tokenised in order and joined; only as many as ``max_contexts`` needs are read."""
    tokenizer = getattr(model, "tokenizer", model)
    if tokenizer is None or not callable(getattr(tokenizer, "encode", None)):
        raise ValueError("model must be a HookedTransformer with a tokenizer (or a tokenizer itself)")
    bos = tokenizer.bos_token_id if bos_id is None else bos_id
    if bos is None:
        raise ValueError("the tokenizer has no BOS token: pass bos_id")
    needed = None if max_contexts is None else positive_int("max_contexts", max_contexts) * (context_len - 1)
    ids: list[int] = []
    for _, document in load_documents(corpus):
        ids.extend(tokenizer.encode(document + "\n\n", add_special_tokens=False))
        if needed is not None and len(ids) >= needed:
            break
    return token_contexts(ids, context_len, bos, max_contexts)


def check_contexts(tokens) -> Tensor:
    if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
        what = f"{tuple(tokens.shape)} {tokens.dtype}" if isinstance(tokens, Tensor) else type(tokens).__name__
        raise ValueError(f"tokens must be an integer tensor [contexts, context_len] (see corpus_contexts), got {what}")
    if tokens.shape[0] == 0 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must hold at least one context of >= 2 positions (BOS is excluded), "
                         f"got shape {tuple(tokens.shape)}")
    return tokens.long()


def check_hooks(model, hooks) -> tuple[str, ...]:
    """hooks: one hook name (an SAE's input) or a pair (transcoder input, target) -> tuple of names."""
    names = (hooks,) if isinstance(hooks, str) else tuple(hooks) if isinstance(hooks, (tuple, list)) else None
    if names is None or not 1 <= len(names) <= 2 or not all(isinstance(n, str) for n in names):
        raise ValueError(f"hooks must be a hook name or a (input, target) pair of names, got {hooks!r}")
    hook_dict = getattr(model, "hook_dict", None)
    if hook_dict is None:
        raise ValueError(f"model must be a TransformerLens HookedTransformer, got {type(model).__name__}")
    for name in names:
        if name not in hook_dict:
            close = [h for h in hook_dict if h.split(".")[-1] == name.split(".")[-1]][:3]
            raise ValueError(f"hooks: {name!r} is not a hook point of this model" +
                             (f" (e.g. {', '.join(close)})" if close else ""))
    return names


def stop_layer(model, hooks: Sequence[str]) -> int | None:
    """The stop_at_layer that still runs every block the hooks read (None: the whole model)."""
    layers = []
    for name in hooks:
        match = _LAYER.match(name)
        if match is None:  # embed / ln_final / unembed hooks: embed needs no block, the rest all of them
            if name.startswith(("hook_embed", "hook_pos_embed")):
                layers.append(-1)
                continue
            return None
        layers.append(int(match.group(1)))
    last = max(layers) + 1
    return None if last >= model.cfg.n_layers else last


def flatten_positions(activation: Tensor) -> Tensor:
    """[batch, pos, ...] -> [batch, pos, d] (e.g. hook_z's heads x d_head flattened)."""
    return activation.reshape(activation.shape[0], activation.shape[1], -1)


def resolve_special_ids(model, special_ids) -> tuple[int, ...]:
    """special_ids "tokenizer" -> the model's tokenizer's special ids (none without a tokenizer);
    None -> (); a collection of ids -> those, checked."""
    if isinstance(special_ids, str) and special_ids == "tokenizer":
        tokenizer = getattr(model, "tokenizer", None)
        return special_token_ids(tokenizer) if tokenizer is not None else ()
    return check_special_ids(special_ids)


@torch.no_grad()
def hook_activations(model, tokens: Tensor, hooks: Sequence[str], stop_at_layer: int | None = None,
                     drop_first: bool = True, keep: Tensor | None = None) -> list[Tensor]:
    """One forward pass over tokens [b, T]: per hook the activations [b * (T - 1), d] (position 0
    dropped when drop_first) as float32 CPU tensors, in context-major order. keep: bool [b, T]
    (``text.kept_positions``) -> only those positions' rows [keep.sum(), d] (drop_first is then ignored)."""
    _, cache = model.run_with_cache(tokens.to(model.cfg.device), names_filter=list(hooks), stop_at_layer=stop_at_layer,
                                    return_type=None)
    out = []
    for name in hooks:
        act = flatten_positions(cache[name])
        if keep is not None:
            act = act[keep.to(act.device)]
        elif drop_first:
            act = act[:, 1:]
        out.append(act.reshape(-1, act.shape[-1]).float().cpu())
    return out


def is_hooked_transformer(model) -> bool:
    return getattr(model, "hook_dict", None) is not None


def _hf_hooks(hooks) -> tuple[str, ...]:
    names = (hooks,) if isinstance(hooks, str) else tuple(hooks) if isinstance(hooks, (tuple, list)) else None
    if names is None or not 1 <= len(names) <= 2 or not all(isinstance(n, str) for n in names):
        raise ValueError(f"hooks must be a module path or a (input, target) pair of paths, got {hooks!r}")
    return names


class LMActivationSource:
    """An ActivationSource over a language model's activations at ``hooks`` on token contexts.

    model: a HookedTransformer (hooks: hook names; forward passes stop after the last block the
    hooks need) or a transformers model (hooks: module paths, see ``hf``). hooks: one name -> x [b, d]
    batches; (input, target) -> (x [b, d_in], y [b, d_out]) for a transcoder. tokens: [N, T] contexts
    starting with BOS; each gives one row per kept position (``text.kept_positions``: not position 0,
    not a special token; ``special_ids`` as in the module docstring). Forward passes run
    ``batch_contexts`` contexts at a time. See the module docstring for the shuffle buffer and the
    state. epochs=None repeats forever (each epoch in a new order).
    """

    def __init__(self, model, tokens: Tensor, hooks, batch_size: int = 4096, shuffle: bool = True, seed: int = 0,
                 epochs: int | None = 1, buffer_contexts: int = 256, batch_contexts: int = 16,
                 stop_at_layer: int | None | str = "auto", progress: bool = False, special_ids="tokenizer"):
        self.model = model
        self.tokens = check_contexts(tokens)
        self.special_ids = resolve_special_ids(model, special_ids)
        if is_hooked_transformer(model):
            self.hooks = check_hooks(model, hooks)
            self.stop_at_layer = stop_layer(model, self.hooks) if stop_at_layer == "auto" else stop_at_layer
            self._hf = None
        else:
            self.hooks = _hf_hooks(hooks)
            self.stop_at_layer = None
            self._hf = HFModuleSource(model, self.tokens[:1], self.hooks[0], self.hooks[1] if len(self.hooks) > 1
                                      else None, special_ids=self.special_ids)
        self.batch_size = positive_int("batch_size", batch_size)
        self.shuffle = bool(shuffle)
        self.seed = check_seed(seed)
        self.epochs = check_epochs(epochs)
        self.buffer_contexts = positive_int("buffer_contexts", buffer_contexts)
        self.batch_contexts = positive_int("batch_contexts", batch_contexts)
        keep = kept_positions(self.tokens, self.special_ids)
        self.context_rows = keep.sum(1).numpy()                 # [N] rows each context gives
        self.rows = int(self.context_rows.sum())                # rows per epoch
        if self.rows == 0:
            raise ValueError(f"tokens: every position of the {self.tokens.shape[0]} contexts is position 0 or a "
                             f"special token (special_ids): no activation rows")
        # recorded (state, cache) only when they drop positions besides 0, so older states still match
        self.drops_special = bool((~keep[:, 1:]).any())
        self.progress = progress
        self.epoch = 0
        self.position = 0
        self._starts: tuple[int, np.ndarray] | None = None      # (epoch, each window's first row [windows + 1])
        self._window: tuple[int, int, list[Tensor]] | None = None  # (epoch, window, activations in window order)
        self._bar = None

    @property
    def d(self) -> int:
        return self._widths()[0]

    @property
    def d_out(self) -> int | None:
        widths = self._widths()
        return widths[1] if len(widths) > 1 else None

    def _widths(self) -> list[int]:
        return [a.shape[1] for a in self._capture(self.tokens[:1, :2])]

    def _capture(self, batch: Tensor) -> list[Tensor]:
        """Activations at the kept positions of contexts batch [b, T]: per hook [rows, d] float32 on the CPU."""
        if self._hf is not None:
            return [a.float().cpu() for a in self._hf.activations(batch)]
        keep = kept_positions(batch, self.special_ids)
        return hook_activations(self.model, batch, self.hooks, self.stop_at_layer, keep=keep)

    def _context_order(self) -> np.ndarray:
        n = self.tokens.shape[0]
        return permutation(n, self.seed, self.epoch) if self.shuffle else np.arange(n)

    def _window_starts(self) -> np.ndarray:
        """Each window's first row in this epoch's order, and the epoch's row count last [windows + 1]."""
        if self._starts is None or self._starts[0] != self.epoch:
            counts = self.context_rows[self._context_order()]
            sizes = np.add.reduceat(counts, np.arange(0, counts.shape[0], self.buffer_contexts))
            self._starts = (self.epoch, np.concatenate([[0], np.cumsum(sizes)]))
        return self._starts[1]

    def _window_activations(self, window: int) -> list[Tensor]:
        """The window's activations [rows, d] per hook, rows already in the window's shuffled order."""
        if self._window is not None and self._window[:2] == (self.epoch, window):
            return self._window[2]
        contexts = self._context_order()[window * self.buffer_contexts:(window + 1) * self.buffer_contexts]
        pieces: list[list[Tensor]] = [[] for _ in self.hooks]
        for start in range(0, len(contexts), self.batch_contexts):
            batch = self.tokens[torch.from_numpy(contexts[start:start + self.batch_contexts])]
            for store, act in zip(pieces, self._capture(batch)):
                store.append(act)
            self._count(batch.numel())
        acts = [torch.cat(p) for p in pieces]
        if self.shuffle:
            order = torch.from_numpy(permutation(acts[0].shape[0], self.seed, self.epoch, window))
            acts = [a[order] for a in acts]
        self._window = (self.epoch, window, acts)
        return acts

    def _count(self, tokens: int) -> None:
        if not self.progress:
            return
        if self._bar is None:
            from tqdm.auto import tqdm
            self._bar = tqdm(unit="tok", unit_scale=True, dynamic_ncols=True, desc=f"activations {self.hooks[-1]}")
        self._bar.update(tokens)

    def __iter__(self) -> Iterator[Batch]:
        while self.epochs is None or self.epoch < self.epochs:
            if self.position >= self.rows:
                self.epoch, self.position = self.epoch + 1, 0
                continue
            starts = self._window_starts()
            window = int(np.searchsorted(starts, self.position, side="right")) - 1
            offset = self.position - int(starts[window])
            acts = self._window_activations(window)
            stop = min(offset + self.batch_size, acts[0].shape[0])
            self.position += stop - offset  # before yielding: a state taken now counts this batch as consumed
            batch = [a[offset:stop] for a in acts]
            yield batch[0] if len(batch) == 1 else (batch[0], batch[1])
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _settings(self) -> dict:
        return {"contexts": int(self.tokens.shape[0]), "context_len": int(self.tokens.shape[1]),
                "tokens_sha256": tokens_digest(self.tokens), "hooks": list(self.hooks), "batch_size": self.batch_size,
                "shuffle": self.shuffle, "seed": self.seed, "buffer_contexts": self.buffer_contexts,
                **({"special_ids": list(self.special_ids)} if self.drops_special else {})}

    def state_dict(self) -> dict:
        return {"kind": "LMActivationSource", "epoch": self.epoch, "position": self.position, **self._settings()}

    def load_state_dict(self, state: dict) -> None:
        check_state("LMActivationSource", state, self._settings())
        epoch, position = state_int(state, "epoch"), state_int(state, "position")
        if position > self.rows:
            raise ValueError(f"state field 'position' is {position}, beyond the {self.rows} rows of an epoch")
        self.epoch, self.position = epoch, position


def tokens_digest(tokens: Tensor) -> str:
    """SHA-256 of the contexts' int64 bytes: which text a cache was computed on."""
    return hashlib.sha256(np.ascontiguousarray(tokens.cpu().numpy().astype(np.int64)).tobytes()).hexdigest()


def model_name(model) -> str:
    """A HookedTransformer's cfg.model_name, a transformers model's config.name_or_path, else the class name."""
    cfg = getattr(model, "cfg", None) or getattr(model, "config", None)
    name = getattr(cfg, "model_name", "") or getattr(cfg, "name_or_path", "")
    return str(name or type(model).__name__)


def _store_record(model, names, tokens: Tensor, dtype: str, special_ids: tuple = ()) -> dict:
    record = {"model": model_name(model), "hooks": list(names), "contexts": int(tokens.shape[0]),
              "context_len": int(tokens.shape[1]), "tokens_sha256": tokens_digest(tokens), "bos_excluded": True,
              "dtype": dtype}
    if special_ids and bool((~kept_positions(tokens, special_ids)[:, 1:]).any()):
        record["special_ids"] = list(special_ids)  # only when they drop rows: older caches stay valid
    return record


def _cached(directory: Path, record: dict, overwrite: bool) -> bool:
    """True when directory already holds the activations record describes; raises when it holds
    others (unless overwrite: then the old record is removed and False returned)."""
    record_path = directory / STORE_RECORD
    if (directory / MANIFEST).is_file() and record_path.is_file():
        found = json.loads(record_path.read_text())
        if found == record:
            return True
        if not overwrite:
            differs = sorted(k for k in set(record) | set(found) if found.get(k) != record.get(k))
            raise ValueError(f"directory {directory} caches other activations (differs in {', '.join(differs)}); "
                             f"pass overwrite=True or another directory")
    record_path.unlink(missing_ok=True)
    return False


def cache_activations(model, tokens: Tensor, hooks, directory, batch_size: int = 4096, shard_rows: int = 65536,
                      dtype: str = "float32", progress: bool = True, overwrite: bool = False,
                      special_ids="tokenizer", **source_kwargs) -> ShardSource:
    """Activations at hooks on tokens, written once as shards to ``directory`` -> a ShardSource over them.

    model, hooks, special_ids: as for ``LMActivationSource``. Rows are the kept positions in context
    order (without special tokens: row r is context r // (T - 1), position r % (T - 1) + 1);
    ShardSource shuffles on reading. dtype "bfloat16" halves the disk (shards as safetensors; train
    in float32, converting each batch). ``lm_store.json`` records the model, hooks and a digest of the
    tokens: a second call with the same inputs reuses the folder without running the model; one with
    different inputs raises unless overwrite=True. source_kwargs go to ShardSource (seed, shuffle,
    epochs, buffer_shards).
    """
    directory = Path(directory)
    names = check_hooks(model, hooks) if is_hooked_transformer(model) else _hf_hooks(hooks)
    tokens = check_contexts(tokens)
    special = resolve_special_ids(model, special_ids)
    record = _store_record(model, names, tokens, dtype, special)
    if not _cached(directory, record, overwrite):
        stream = LMActivationSource(model, tokens, names, batch_size=batch_size, shuffle=False, epochs=1,
                                    progress=progress, special_ids=special)
        write_shards(directory, stream, model=record["model"], hook=" -> ".join(names), dtype=dtype,
                     shard_rows=shard_rows, overwrite=overwrite)
        atomic_write_bytes(directory / STORE_RECORD, json.dumps(record, indent=1).encode())
    return ShardSource(directory, batch_size=batch_size, **source_kwargs)


def cache_layer_activations(model, tokens: Tensor, hooks: Sequence[str], directory, batch_size: int = 4096,
                            batch_contexts: int = 16, shard_rows: int = 65536, dtype: str = "float32",
                            progress: bool = True, overwrite: bool = False, special_ids="tokenizer",
                            **source_kwargs) -> dict[str, ShardSource]:
    """Several hook points (e.g. one per layer) cached from ONE forward pass per batch of contexts
    (``names_filter`` = every hook, ``stop_at_layer`` after the last block they need) ->
    {hook: ShardSource}. Each hook gets its own folder ``directory/<hook>`` in ``cache_activations``'s
    format and record (rows in context order, BOS and special_ids excluded), so a folder cached either way is reused;
    only the hooks not cached yet are computed. Each folder is written by its own thread while the
    model runs the next batch.
    """
    import queue
    import threading

    directory = Path(directory)
    if isinstance(hooks, str) or not isinstance(hooks, (list, tuple)) or not hooks or len(set(hooks)) != len(hooks):
        raise ValueError(f"hooks must be a non-empty list of distinct hook names, got {hooks!r}")
    names = [check_hooks(model, name)[0] for name in hooks]
    tokens = check_contexts(tokens)
    batch_contexts = positive_int("batch_contexts", batch_contexts)
    special = resolve_special_ids(model, special_ids)
    records = {name: _store_record(model, (name,), tokens, dtype, special) for name in names}
    missing = [name for name in names if not _cached(directory / name, records[name], overwrite)]
    if missing:
        stop = stop_layer(model, missing)
        queues = {name: queue.Queue(maxsize=2) for name in missing}
        errors: list[BaseException] = []

        def writer(name: str) -> None:
            q = queues[name]
            try:
                write_shards(directory / name, iter(q.get, None), model=records[name]["model"], hook=name, dtype=dtype,
                             shard_rows=shard_rows, overwrite=overwrite)
            except BaseException as error:  # reported by the caller's thread; keep draining so it never blocks
                errors.append(error)
                while q.get() is not None:
                    pass

        threads = [threading.Thread(target=writer, args=(name,), daemon=True) for name in missing]
        for thread in threads:
            thread.start()
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=tokens.numel(), unit="tok", unit_scale=True, dynamic_ncols=True,
                       desc=f"activations at {len(missing)} hooks")
        try:
            for start in range(0, tokens.shape[0], batch_contexts):
                batch = tokens[start:start + batch_contexts]
                keep = kept_positions(batch, special)
                for name, act in zip(missing, hook_activations(model, batch, missing, stop, keep=keep)):
                    queues[name].put(act)
                if bar is not None:
                    bar.update(batch.numel())
                if errors:
                    break
        finally:
            for name in missing:
                queues[name].put(None)
            for thread in threads:
                thread.join()
            if bar is not None:
                bar.close()
        if errors:
            raise errors[0]
        for name in missing:
            atomic_write_bytes(directory / name / STORE_RECORD, json.dumps(records[name], indent=1).encode())
    return {name: ShardSource(directory / name, batch_size=batch_size, **source_kwargs) for name in names}
