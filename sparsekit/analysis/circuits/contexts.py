"""Top activating contexts of a cross-layer transcoder's features, for the graph view's click-through:
one bounded pass over text, cached beside the run.

    table = cached_top_contexts(model, clt, tokens, "runs/clt/top_contexts.json")   # [N, T] contexts
    windows = context_windows(table, model, layer=1, latent=37)                     # for one feature

The pass runs the real model over tokens [N, T] (BOS first) up to the last covered layer, encodes
each covered layer's MLP input with the CLT's TopK encoder at the positions the CLT covers (not
position 0, not special tokens), and keeps per feature its ``examples`` best contexts
(``top_examples.TopContexts``: a context's example is its first position with the largest
activation). The cache file holds the contexts' token ids and, per feature, the values, contexts and
positions; its key (the CLT's parameters' SHA-256, the tokens' SHA-256, examples, the special ids)
must match, else the pass runs again and overwrites it.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from sparsekit._util.atomic import atomic_write_bytes
from sparsekit._util.bounded import load_json
from sparsekit._util.validate import positive_int
from sparsekit.activations.layers import mlp_hooks
from sparsekit.activations.store import check_contexts, resolve_special_ids
from sparsekit.activations.text import kept_positions
from sparsekit.analysis.top_examples import TopContexts
from sparsekit.sae.clt import CrossLayerTranscoder

from .attribution import token_strings
from .replacement import check_model_and_clt, clt_pass, encode_layer


class ContextTable(NamedTuple):
    """tokens [N, T] int64; per feature (row layer * latents_per_layer + latent): values [n, k]
    float32 (0: empty slot), contexts [n, k] and positions [n, k] int64 (-1: empty), best first;
    key: what it was computed from."""
    tokens: Tensor
    values: Tensor
    contexts: Tensor
    positions: Tensor
    key: dict


def _sha256(tensors) -> str:
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def table_key(clt: CrossLayerTranscoder, tokens: Tensor, examples: int, special: tuple) -> dict:
    return {"latents_per_layer": clt.latents_per_layer, "clt_sha256": _sha256([p for _, p in sorted(clt.state_dict().items())]),
            "tokens_sha256": _sha256([tokens.long()]), "tokens_shape": list(tokens.shape), "examples": examples,
            "special_ids": list(special)}


def top_contexts(model, clt: CrossLayerTranscoder, tokens: Tensor, examples: int = 5, batch_contexts: int = 8,
                 special_ids="tokenizer", progress: bool = False) -> ContextTable:
    """Every feature's ``examples`` best contexts in tokens [N, T] (module docstring)."""
    check_model_and_clt(model, clt)
    tokens = check_contexts(tokens)
    examples = positive_int("examples", examples)
    batch_contexts = positive_int("batch_contexts", batch_contexts)
    special = resolve_special_ids(model, special_ids)
    n, L = clt.latents_per_layer, clt.n_layers
    top = TopContexts(n * L, examples)
    keep = kept_positions(tokens, special)
    stop = clt.layers()[-1] + 1
    with clt_pass(clt, progress, tokens.numel(), "tok", "top contexts", unit_scale=True) as advance, torch.no_grad():
        for first in range(0, tokens.shape[0], batch_contexts):
            batch = tokens[first:first + batch_contexts]
            _, cache = model.run_with_cache(batch.to(model.cfg.device), stop_at_layer=stop,
                                            names_filter=[mlp_hooks(m)[0] for m in clt.layers()])
            rows = keep[first:first + batch.shape[0]].nonzero()                     # [R, 2]: context, position
            for layer, m in enumerate(clt.layers()):
                x = cache[mlp_hooks(m)[0]][rows[:, 0].to(model.cfg.device), rows[:, 1].to(model.cfg.device)]
                codes = encode_layer(clt, x, layer)
                row, slot = (codes.values > 0).nonzero(as_tuple=True)
                row = row.cpu()
                top.add(codes.values[row, slot].float().cpu(), codes.indices[row, slot].cpu() + layer * n,
                        first + rows[row, 0], rows[row, 1])
            advance(batch.numel())
    return ContextTable(tokens.cpu(), top.values, top.contexts, top.positions,
                        table_key(clt, tokens, examples, special))


def write_table(table: ContextTable, path) -> Path:
    """The table as JSON, atomically."""
    path = Path(path)
    data = {"key": table.key, "tokens": table.tokens.tolist(), "values": table.values.tolist(),
            "contexts": table.contexts.tolist(), "positions": table.positions.tolist()}
    atomic_write_bytes(path, (json.dumps(data) + "\n").encode())
    return path


def read_table(path) -> ContextTable:
    data = load_json(Path(path), max_bytes=256 << 20, what="top-contexts cache")
    return ContextTable(torch.tensor(data["tokens"], dtype=torch.int64), torch.tensor(data["values"], dtype=torch.float32),
                        torch.tensor(data["contexts"], dtype=torch.int64),
                        torch.tensor(data["positions"], dtype=torch.int64), data["key"])


def cached_top_contexts(model, clt: CrossLayerTranscoder, tokens: Tensor, path, examples: int = 5,
                        special_ids="tokenizer", progress: bool = False) -> tuple[ContextTable, bool]:
    """The table at path when its key matches (clt, tokens, examples, special ids), else ``top_contexts``
    written there -> (table, whether it came from the cache)."""
    path = Path(path)
    tokens = check_contexts(tokens)
    key = table_key(clt, tokens, examples, resolve_special_ids(model, special_ids))
    if path.is_file():
        try:
            table = read_table(path)
        except (ValueError, KeyError, TypeError, OSError):  # RefusedFile is a ValueError
            table = None  # unreadable or another layout: computed again below
        if table is not None and table.key == key:
            return table, True
    table = top_contexts(model, clt, tokens, examples, special_ids=special_ids, progress=progress)
    write_table(table, path)
    return table, False


def context_windows(table: ContextTable, model, layer: int, latent: int, before: int = 12, after: int = 4) -> list[dict]:
    """Feature (CLT layer, latent)'s top contexts as windows of up to ``before`` tokens before and
    ``after`` after the active one -> [{"tokens": [str], "active": the active token's index in tokens,
    "value": its activation}], best first (empty: it never fired in the pass)."""
    row = layer * int(table.key["latents_per_layer"]) + latent
    windows = []
    for value, context, position in zip(table.values[row].tolist(), table.contexts[row].tolist(),
                                        table.positions[row].tolist()):
        if context < 0:
            break
        lo, hi = max(1, position - before), min(table.tokens.shape[1], position + after + 1)
        windows.append({"tokens": token_strings(model, table.tokens[context, lo:hi].tolist()), "active": position - lo,
                        "value": value})
    return windows
