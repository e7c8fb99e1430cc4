"""Data under your feet (issue 21, class 8), the parts fixed so far: a source that stalls on empty
batches stops with one line instead of hanging; non-finite rows are named (batch and row); shards are
never written with values float16 turns into inf, nor with NaN or Inf. Sources run in a child process
under the memory cap and a timeout where a regression would hang."""
import random
import re

import numpy as np
import pytest
import torch
from helpers import hostile

import sparsekit
from sparsekit.activations.shards import write_shards
from sparsekit.training.batches import EMPTY_BATCHES_IN_A_ROW

STALLING_SOURCE = """
import itertools, torch, sparsekit
def source():
    yield torch.randn({first}, 8)
    for _ in itertools.count():
        yield torch.empty(0, 8)
sae = sparsekit.TopKSAE(8, 16, k=2)
sparsekit.train(sae, source, sparsekit.TrainConfig(batch_size=32, total_tokens=256, eval_tokens=0, progress=False))
"""


@pytest.mark.parametrize("first", [0, 40])
def test_a_source_of_endless_empty_batches_stops_with_one_line_not_a_hang(first):
    done = hostile.run_capped(["-c", STALLING_SOURCE.format(first=first)], timeout=120)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    empty_from = 2 if first else 1
    assert last == (f"sparsekit.errors.SourceStalled: the source yielded {EMPTY_BATCHES_IN_A_ROW} empty batches in a "
                    f"row (batches {empty_from} to {empty_from + EMPTY_BATCHES_IN_A_ROW - 1}): it stalled; a source "
                    f"must yield rows")


def test_empty_batches_between_real_ones_are_skipped_and_train_as_without_them():
    seed = hostile.fresh_seed()
    batches = [torch.randn(32, 8, generator=torch.Generator().manual_seed(seed + i)) for i in range(10)]
    rng = random.Random(seed)
    with_gaps = []
    for batch in batches:
        with_gaps += [torch.empty(0, 8)] * rng.randrange(0, 5) + [batch]
    results = []
    for source in (batches, with_gaps):
        sae = sparsekit.TopKSAE(8, 16, k=2, seed=1)
        sparsekit.train(sae, source, sparsekit.TrainConfig(batch_size=32, total_tokens=256, eval_tokens=32,
                                                           progress=False, seed=2))
        results.append(sae.state_dict())
    for name in results[0]:
        assert torch.equal(results[0][name], results[1][name]), (name, seed)


@pytest.mark.parametrize("which", ["x", "y"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_row_is_named_by_batch_and_row(which, bad):
    rng = random.Random(hostile.fresh_seed())
    at, row, extra = rng.randrange(1, 6), rng.randrange(0, 32), rng.randrange(0, 3)
    batches = [(torch.randn(32, 8), torch.randn(32, 4)) for _ in range(6)]
    target = batches[at][0 if which == "x" else 1]
    rows = sorted({row, *rng.sample(range(32), extra)})
    for r in rows:
        target[r, rng.randrange(target.shape[1])] = bad
    more = f" (and {len(rows) - 1} more rows)" if len(rows) > 1 else ""
    expected = f"source batch {at + 1}: {which} row {rows[0]}{more} contains NaN or Inf"
    transcoder = sparsekit.Transcoder(8, 16, 4, k=2)
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        sparsekit.train(transcoder, batches, sparsekit.TrainConfig(batch_size=32, total_tokens=6 * 32, eval_tokens=0,
                                                                    progress=False))


@pytest.mark.parametrize("largest", [65520.0, 1e5, 3.0e38])
def test_float16_shards_refuse_values_float16_would_store_as_inf(tmp_path, largest):
    x = torch.randn(64, 8)
    x[17, 3] = largest * random.choice([1, -1])
    with pytest.raises(ValueError, match=r"^batch 0: x holds .* \(row 17\), beyond float16's largest finite value 65504: "
                                         r"it would be stored as inf \(shard .*x-00000.npy, row 17\)\. Write "
                                         r"dtype='bfloat16'"):
        write_shards(tmp_path / "shards", [x], dtype="float16")
    assert not list((tmp_path / "shards").glob("x-*"))


def test_float16_shards_keep_the_largest_finite_value(tmp_path):
    x = torch.randn(64, 8)
    x[5, 5] = 65504.0
    write_shards(tmp_path / "shards", [x], dtype="float16")
    stored = np.load(tmp_path / "shards" / "x-00000.npy")
    assert np.isfinite(stored).all() and stored[5, 5] == np.float16(65504.0)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_shards_are_never_written_with_nan_or_inf(tmp_path, dtype, bad):
    row = random.randrange(64)
    batches = [torch.randn(64, 8), torch.randn(64, 8)]
    batches[1][row, 2] = bad
    with pytest.raises(ValueError, match=f"batch 1: x row {row} holds NaN or Inf; activations must be finite"):
        write_shards(tmp_path / "shards", batches, dtype=dtype)
