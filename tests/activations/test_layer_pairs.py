"""cache_layer_pairs / LayerPairSource: every layer's (MLP input, MLP output) from one forward per batch
of contexts, read back in step (shuffled rows stay aligned across the 2L folders, and equal the model's
activations at those hooks); folders laid out differently and bad layer lists are refused."""
import numpy as np
import pytest
import torch
from helpers.lm_cases import random_contexts, tiny_transformer
from helpers.seeds import fresh_seed

from sparsekit.activations.layers import LayerPairSource, cache_layer_pairs, check_layers, mlp_hooks
from sparsekit.activations.shards import write_shards


def test_shuffled_pairs_stay_aligned_and_equal_the_models_activations(tmp_path):
    seed = fresh_seed()
    model = tiny_transformer(4, seed % 1000)
    tokens = random_contexts(12, 9, seed)
    pairs = cache_layer_pairs(model, tokens, [1, 2], tmp_path, batch_size=16, progress=False, seed=seed, epochs=1)
    assert (pairs.layers, pairs.d_in, pairs.d_out, pairs.tokens) == (2, 16, 16, 12 * 8)
    _, cache = model.run_with_cache(tokens)
    hooks = [hook for layer in (1, 2) for hook in mlp_hooks(layer)]
    # every row of the model's activations, keyed by its (layer 1 input) bytes
    expected = {}
    flat = {h: cache[h][:, 1:].reshape(-1, 16) for h in hooks}
    for row in range(flat[hooks[0]].shape[0]):
        expected[flat[hooks[0]][row].numpy().tobytes()] = torch.stack([flat[h][row] for h in hooks])
    seen = 0
    for x, y in pairs:
        assert x.shape[1:] == (2, 16) and y.shape == x.shape and x.dtype == torch.float32
        for row in range(x.shape[0]):
            want = expected[x[row, 0].numpy().tobytes()]
            got = torch.stack([x[row, 0], y[row, 0], x[row, 1], y[row, 1]])
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=f"seed {seed}")
        seen += x.shape[0]
    assert seen == 96


def test_a_second_call_reuses_the_cache(tmp_path):
    model = tiny_transformer(3, 1)
    tokens = random_contexts(4, 6, 1)
    cache_layer_pairs(model, tokens, range(0, 2), tmp_path, progress=False)
    stamp = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.npy")}
    cache_layer_pairs(model, tokens, range(0, 2), tmp_path, progress=False)
    assert stamp and stamp == {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.npy")}


def test_folders_laid_out_differently_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    write_shards(tmp_path / "a", [torch.from_numpy(rng.standard_normal((10, 4), dtype=np.float32))], shard_rows=5)
    write_shards(tmp_path / "b", [torch.from_numpy(rng.standard_normal((10, 4), dtype=np.float32))], shard_rows=10)
    with pytest.raises(ValueError, match="does not hold single-hook shards laid out like"):
        LayerPairSource([tmp_path / "a"], [tmp_path / "b"])


@pytest.mark.parametrize("layers, message", [
    ([3, 5], "consecutive and increasing"),
    ([], "non-empty list"),
    ("3-8", "consecutive layer numbers"),
    (range(2, 7), "the model has layers 0..3"),
])
def test_bad_layer_lists_name_the_problem(layers, message):
    with pytest.raises(ValueError, match=message):
        check_layers(layers, 4)
