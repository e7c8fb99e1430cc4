"""The ecosystem's metric names beside sparsekit's, and the warning lines for results worse than trivial."""
import math

import pytest
import torch

import sparsekit
from sparsekit.training.metrics import evaluate, worse_than_trivial


def test_held_out_metrics_carry_explained_variance_as_one_minus_fvu():
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))
    sae = sparsekit.TopKSAE(8, 32, 3, seed=None)
    x = torch.randn(200, 8, generator=gen)
    metrics = evaluate(sae, x)
    assert metrics["explained_variance"] == pytest.approx(1 - metrics["fvu"], abs=1e-12)


def test_training_metric_lines_carry_explained_variance():
    sae = sparsekit.TopKSAE(8, 32, 3)
    result = sparsekit.train(sae, torch.randn(2048, 8), sparsekit.TrainConfig(batch_size=256, total_tokens=1024,
                                                                           eval_tokens=256, log_every=2, progress=False))
    assert result.history and all(line["explained_variance"] == pytest.approx(1 - line["fvu"]) for line in result.history)


@pytest.mark.parametrize("metrics, flagged", [
    ({"fvu": 0.3, "ce_recovered": 0.8}, []),
    ({"fvu": 1.94}, ["FVU 1.940 >= 1"]),
    ({"fvu": 1.0}, ["FVU 1.000 >= 1"]),
    ({"fvu": math.nan}, ["FVU nan >= 1"]),
    ({"fvu": 0.2, "ce_recovered": -0.25}, ["CE loss recovered -0.250 < 0"]),
    ({"fvu": 2.0, "ce_recovered": -1.0}, ["FVU 2.000 >= 1", "CE loss recovered -1.000 < 0"]),
    ({"l0": 3.0}, []),
])
def test_worse_than_trivial_flags_fvu_of_one_and_negative_ce_recovered(metrics, flagged):
    lines = worse_than_trivial(metrics)
    assert [line.split(":")[0] for line in lines] == flagged


def test_final_metrics_count_never_fired_on_held_out_apart_from_dead_by_the_window(tmp_path):
    sae = sparsekit.TopKSAE(8, 64, 2)
    with torch.no_grad():
        sae.b_enc[32:] = -1e4  # half the latents can never fire
    x = torch.randn(4096, 8)
    cfg = sparsekit.TrainConfig(batch_size=256, total_tokens=512, eval_tokens=1024, lr=1e-9, progress=False,
                                dead_window_tokens=10**9, output_dir=str(tmp_path))
    result = sparsekit.train(sae, x, cfg)
    held_out = x[:1024] * result.sae.input_scale
    fires = result.sae.fire_counts(result.sae.encode(held_out))
    assert result.metrics["never_fired_frac"] == pytest.approx(float((fires == 0).float().mean()))
    assert result.metrics["never_fired_frac"] >= 0.5
    assert result.metrics["dead_frac"] == 0.0  # the window (10**9 tokens) has not elapsed: nothing counts as dead
