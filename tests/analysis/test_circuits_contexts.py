"""Top activating contexts of a CLT's features (sparsekit.analysis.circuits.contexts) on a tiny random
model: each feature's contexts and positions equal a brute-force search over the CLT's codes on the
real MLP inputs, batching does not change them, skipped positions never appear, the cache is read
back when its key matches and recomputed when the CLT changes, and windows hold the active token."""
import json

import pytest
import torch
from helpers.lm_cases import random_contexts, tiny_transformer
from test_circuits import make_clt

from sparsekit.analysis.circuits.contexts import cached_top_contexts, context_windows, top_contexts


@pytest.fixture(scope="module")
def model():
    m = tiny_transformer(4, seed=3)
    m.cfg.dtype = torch.float64
    return m.to(torch.float64)


def brute_force(model, clt, tokens, skip_id):
    """[n_layers * latents, N, T] codes of every feature at every position (0 where skipped)."""
    _, cache = model.run_with_cache(tokens)
    n = clt.latents_per_layer
    out = torch.zeros(clt.n_layers * n, *tokens.shape, dtype=torch.float64)
    for layer, m in enumerate(clt.layers()):
        x = cache[f"blocks.{m}.ln2.hook_normalized"].reshape(-1, clt.d_in) * clt.layer_input_scale[layer]
        columns = slice(layer * n, (layer + 1) * n)
        pre = (x * clt.input_scale - clt.b_in[layer]) @ clt.W_enc[:, columns] + clt.b_enc[columns]
        top = pre.topk(clt.k_per_layer, dim=1)
        dense = torch.zeros_like(pre).scatter(1, top.indices, top.values.clamp_min(0))
        out[columns] = dense.T.reshape(n, *tokens.shape).detach()
    out[:, :, 0] = 0
    out[:, tokens == skip_id] = 0
    return out


def test_top_contexts_equal_a_brute_force_search_and_skip_special_positions(model):
    clt = make_clt(first_layer=1, n_layers=3, seed=5)
    tokens = random_contexts(9, 8, seed=4)
    skip = int(tokens[0, 3])
    table = top_contexts(model, clt, tokens, examples=3, batch_contexts=4, special_ids=[skip])
    codes = brute_force(model, clt, tokens, skip)
    fired = 0
    for row in range(codes.shape[0]):
        best, where = codes[row].max(1)                        # per context: its best value, first position
        order = sorted(range(tokens.shape[0]), key=lambda c: (-float(best[c]), c))
        expected = [c for c in order if best[c] > 0][:3]
        got = [c for c in table.contexts[row].tolist() if c >= 0]
        assert got == expected, row
        for slot, context in enumerate(got):
            assert table.values[row, slot].item() == pytest.approx(float(best[context]), rel=1e-6)
            assert table.positions[row, slot].item() == int(where[context])
            assert tokens[context, table.positions[row, slot]] != skip
        fired += bool(got)
    assert fired > 20
    again = top_contexts(model, clt, tokens, examples=3, batch_contexts=9, special_ids=[skip])
    assert torch.equal(again.contexts, table.contexts) and torch.equal(again.positions, table.positions)


def test_cache_is_read_back_and_recomputed_when_the_clt_changes(model, tmp_path):
    clt = make_clt(first_layer=1, n_layers=2, seed=7)
    tokens = random_contexts(4, 8, seed=1)
    path = tmp_path / "top_contexts.json"
    first, cached = cached_top_contexts(model, clt, tokens, path, examples=2, special_ids=None)
    assert not cached and path.is_file()
    second, cached = cached_top_contexts(model, clt, tokens, path, examples=2, special_ids=None)
    assert cached and torch.equal(second.contexts, first.contexts) and torch.equal(second.values, first.values)
    with torch.no_grad():
        clt.W_enc.mul_(-1)
    third, cached = cached_top_contexts(model, clt, tokens, path, examples=2, special_ids=None)
    assert not cached and not torch.equal(third.contexts, first.contexts)
    assert json.loads(path.read_text())["key"] == third.key
    path.write_text("{not json")
    _, cached = cached_top_contexts(model, clt, tokens, path, examples=2, special_ids=None)
    assert not cached


def test_context_windows_hold_the_active_token(model):
    clt = make_clt(first_layer=1, n_layers=2, seed=2)
    tokens = random_contexts(5, 12, seed=3)
    table = top_contexts(model, clt, tokens, examples=2, special_ids=None)
    row = int((table.contexts[:, 0] >= 0).nonzero()[0])
    layer, latent = divmod(row, clt.latents_per_layer)
    windows = context_windows(table, model, layer, latent, before=3, after=2)
    assert 1 <= len(windows) <= 2
    for window, context, position, value in zip(windows, table.contexts[row], table.positions[row], table.values[row]):
        assert window["tokens"][window["active"]] == f"#{int(tokens[context, position])}"
        assert window["value"] == pytest.approx(float(value))
        assert len(window["tokens"]) <= 6 and window["active"] <= 3
    with pytest.raises(ValueError, match="examples"):
        top_contexts(model, clt, tokens, examples=0)
