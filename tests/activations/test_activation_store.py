"""LM activation store on a tiny random-weight HookedTransformer: rows, BOS exclusion, stop_at_layer,
shuffle buffer, exact resume, transcoder pairs, hook_z flattening, the shard cache."""
import json

import pytest
import torch
from helpers.lm_cases import tiny_transformer

from sparsekit.activations import ShardSource
from sparsekit.activations.store import (
    LMActivationSource,
    cache_activations,
    cache_layer_activations,
    check_hooks,
    stop_layer,
    tokens_digest,
)


@pytest.fixture(scope="module")
def tiny():
    return tiny_transformer(n_layers=3, seed=1)


def contexts(n=12, t=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 40, (n, t), generator=g)
    tokens[:, 0] = 0  # BOS
    tokens[:, 1] = torch.arange(1, n + 1)  # distinct prefixes: every row of activations differs
    return tokens


def reference(model, tokens, hook):
    _, cache = model.run_with_cache(tokens)
    act = cache[hook]
    return act.reshape(act.shape[0], act.shape[1], -1)[:, 1:].reshape(-1, act[0, 0].numel())


def test_unshuffled_rows_are_every_non_bos_position_in_context_order(tiny):
    tokens = contexts()
    source = LMActivationSource(tiny, tokens, "blocks.1.hook_resid_post", batch_size=10, shuffle=False,
                                buffer_contexts=5, batch_contexts=3)
    got = torch.cat(list(source))
    assert got.shape == (12 * 8, 16)
    torch.testing.assert_close(got, reference(tiny, tokens, "blocks.1.hook_resid_post"), atol=1e-5, rtol=1e-5)
    assert source.stop_at_layer == 2


def test_stop_at_layer_runs_only_the_blocks_the_hooks_need(tiny):
    assert stop_layer(tiny, ["blocks.0.hook_mlp_out"]) == 1
    assert stop_layer(tiny, ["blocks.0.ln2.hook_normalized", "blocks.1.hook_resid_post"]) == 2
    assert stop_layer(tiny, ["blocks.2.hook_mlp_out"]) is None
    assert stop_layer(tiny, ["ln_final.hook_normalized"]) is None
    ran = []
    handle = tiny.blocks[2].register_forward_hook(lambda *a: ran.append(1))
    try:
        next(iter(LMActivationSource(tiny, contexts(), "blocks.0.hook_mlp_out")))
    finally:
        handle.remove()
    assert not ran


def test_shuffled_epoch_is_a_permutation_and_epochs_differ(tiny):
    tokens = contexts()
    plain = torch.cat(list(LMActivationSource(tiny, tokens, "blocks.0.hook_mlp_out", shuffle=False)))
    source = LMActivationSource(tiny, tokens, "blocks.0.hook_mlp_out", batch_size=7, buffer_contexts=4, epochs=2, seed=3)
    rows = torch.cat(list(source))
    first, second = rows[:plain.shape[0]], rows[plain.shape[0]:]
    for epoch_rows in (first, second):  # each row matches one distinct row of the plain order
        distance, match = torch.cdist(epoch_rows, plain, compute_mode="donot_use_mm_for_euclid_dist").min(1)
        assert distance.max() < 1e-4 and match.unique().numel() == plain.shape[0]
    assert not torch.equal(first, plain) and not torch.equal(first, second)


def test_state_dict_resumes_exactly_mid_window(tiny):
    tokens = contexts(n=10)
    make = lambda: LMActivationSource(tiny, tokens, ("blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"),
                                      batch_size=11, buffer_contexts=3, batch_contexts=2, epochs=2, seed=5)
    whole = list(make())
    source = make()
    it = iter(source)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(source.state_dict()))
    resumed = make()
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(whole) - 5
    for (x, y), (x2, y2) in zip(rest, whole[5:]):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    other = LMActivationSource(tiny, contexts(n=10, seed=1), ("blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"),
                               batch_size=11, buffer_contexts=3, batch_contexts=2, epochs=2, seed=5)
    with pytest.raises(ValueError, match="tokens_sha256"):
        other.load_state_dict(state)


def test_transcoder_pairs_and_flattened_attention_heads(tiny):
    tokens = contexts(n=4)
    source = LMActivationSource(tiny, tokens, ("blocks.2.attn.hook_z", "blocks.2.hook_attn_out"), shuffle=False)
    x, y = next(iter(source))
    assert x.shape == (4 * 8, 2 * 8) and y.shape == (4 * 8, 16)
    assert (source.d, source.d_out) == (16, 16)
    _, cache = tiny.run_with_cache(tokens)
    z = cache["blocks.2.attn.hook_z"][:, 1:]                 # [b, pos, heads, d_head]
    torch.testing.assert_close(x, z.reshape(-1, 16), atol=1e-6, rtol=1e-6)
    # attn_out = sum over heads of z_h @ W_O[h] + b_O: the flattened row order is (head, d_head)
    W_O = tiny.blocks[2].attn.W_O.reshape(16, 16)
    torch.testing.assert_close(x @ W_O + tiny.blocks[2].attn.b_O, y, atol=1e-5, rtol=1e-5)


def test_cache_is_written_once_and_reused(tiny, tmp_path, monkeypatch):
    tokens = contexts()
    hooks = ("blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out")
    shards = cache_activations(tiny, tokens, hooks, tmp_path / "acts", shard_rows=40, progress=False, shuffle=False,
                              epochs=1)
    assert isinstance(shards, ShardSource) and shards.tokens == 96 and (shards.d, shards.d_out) == (16, 16)
    x, y = map(torch.cat, zip(*list(shards)))
    torch.testing.assert_close(x, reference(tiny, tokens, hooks[0]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, reference(tiny, tokens, hooks[1]), atol=1e-5, rtol=1e-5)
    record = json.loads((tmp_path / "acts" / "lm_store.json").read_text())
    assert record["tokens_sha256"] == tokens_digest(tokens) and record["hooks"] == list(hooks)

    def no_forward(*args, **kwargs):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(tiny, "run_with_cache", no_forward)
    again = cache_activations(tiny, tokens, hooks, tmp_path / "acts", progress=False)
    assert again.tokens == 96
    with pytest.raises(ValueError, match="differs in contexts, tokens_sha256"):
        cache_activations(tiny, contexts(n=5), hooks, tmp_path / "acts", progress=False)


def test_per_layer_cache_is_one_pass_and_reuses_single_hook_folders(tiny, tmp_path, monkeypatch):
    tokens = contexts()
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out", "blocks.1.attn.hook_z"]
    # one hook cached beforehand the single-hook way: the per-layer cache must reuse its folder
    cache_activations(tiny, tokens, hooks[0], tmp_path / "layers" / hooks[0], progress=False)
    passes = []
    real = tiny.run_with_cache
    monkeypatch.setattr(tiny, "run_with_cache", lambda *a, **k: passes.append(k) or real(*a, **k))
    sources = cache_layer_activations(tiny, tokens, hooks, tmp_path / "layers", batch_contexts=5, shard_rows=30,
                                      progress=False, shuffle=False, epochs=1)
    assert len(passes) == 3  # 12 contexts in batches of 5, each ONE pass for both missing hooks
    assert all(sorted(k["names_filter"]) == sorted(hooks[1:]) and k["stop_at_layer"] == 2 for k in passes)
    for hook in hooks:
        got = torch.cat(list(sources[hook]))
        assert sources[hook].tokens == 96
        torch.testing.assert_close(got, reference(tiny, tokens, hook), atol=1e-5, rtol=1e-5)
    assert sources[hooks[2]].d == 16  # 2 heads x 8 flattened
    monkeypatch.setattr(tiny, "run_with_cache", lambda *a, **k: pytest.fail("the cache should have been reused"))
    again = cache_layer_activations(tiny, tokens, hooks, tmp_path / "layers", progress=False)
    assert sorted(again) == sorted(hooks)
    with pytest.raises(ValueError, match="distinct hook names"):
        cache_layer_activations(tiny, tokens, [hooks[0], hooks[0]], tmp_path / "layers")
    with pytest.raises(ValueError, match="hooks: 'blocks.7.hook_mlp_out' is not a hook point"):
        cache_layer_activations(tiny, tokens, ["blocks.7.hook_mlp_out"], tmp_path / "other")


def test_per_layer_cache_surfaces_a_writer_error(tiny, tmp_path, monkeypatch):
    import sparsekit.activations.store as store

    def failing_writer(directory, batches, **kwargs):
        next(iter(batches))
        raise OSError("disk full")

    monkeypatch.setattr(store, "write_shards", failing_writer)
    with pytest.raises(OSError, match="disk full"):
        cache_layer_activations(tiny, contexts(), ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"],
                                tmp_path / "layers", batch_contexts=2, progress=False)
    assert not (tmp_path / "layers" / "blocks.0.hook_resid_post" / "lm_store.json").exists()


def test_bad_hooks_and_tokens_name_the_argument(tiny):
    with pytest.raises(ValueError, match="hooks: 'blocks.9.hook_mlp_out' is not a hook point"):
        check_hooks(tiny, "blocks.9.hook_mlp_out")
    with pytest.raises(ValueError, match="hooks must be"):
        check_hooks(tiny, ("a", "b", "c"))
    with pytest.raises(ValueError, match="tokens must be an integer tensor"):
        LMActivationSource(tiny, torch.zeros(3, 4), "blocks.0.hook_mlp_out")
    with pytest.raises(ValueError, match="at least one context of >= 2 positions"):
        LMActivationSource(tiny, torch.zeros(3, 1, dtype=torch.long), "blocks.0.hook_mlp_out")
