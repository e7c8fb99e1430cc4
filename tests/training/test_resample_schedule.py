"""Resampling's points: by default one to four dead windows into the run, up to half of it (no latent can
count as dead before one whole window, so an earlier point resamples nothing), and a WARNING at the start
when the points asked for cannot resample (before the first window, or none inside the run)."""
import pytest
import torch

import sparsekit
from sparsekit import TrainConfig, train


def config(**overrides):
    base = dict(batch_size=256, total_tokens=256 * 400, dead_window_tokens=256 * 20, dead_strategy="resample",
                eval_tokens=0, progress=False)
    base.update(overrides)
    return TrainConfig(**base)


def test_the_default_schedule_starts_after_one_dead_window_and_stops_at_half_the_run():
    assert config().resample_schedule() == [256 * 20, 256 * 40, 256 * 60, 256 * 80]
    assert config(total_tokens=256 * 100).resample_schedule() == [256 * 20, 256 * 40]
    assert config(total_tokens=256 * 30).resample_schedule() == []
    assert all(t >= 256 * 20 for t in config().resample_schedule())


def test_resampling_points_asked_for_are_kept_as_given():
    assert config(resample_at_tokens=(256 * 90, 256 * 30)).resample_schedule() == [256 * 30, 256 * 90]


@pytest.mark.parametrize("overrides, words", [
    (dict(resample_at_tokens=(256 * 5, 256 * 40)), "come before one dead window"),
    (dict(total_tokens=256 * 30), "no resampling point falls inside the run"),
    (dict(resample_at_tokens=(256 * 500,)), "no resampling point falls inside the run")])
def test_a_schedule_that_cannot_resample_is_named_in_a_warning(overrides, words):
    assert words in config(**overrides).resample_warning()


def test_no_warning_when_resampling_can_happen_or_is_not_asked_for():
    assert config().resample_warning() is None
    assert config(dead_strategy="auxk", total_tokens=256 * 30).resample_warning() is None


def test_the_trainer_prints_the_warning_at_the_start(capsys):
    x = torch.randn(4096, 8, generator=torch.Generator().manual_seed(0))
    train(sparsekit.TopKSAE(8, 16, k=2), x, config(total_tokens=256 * 4, dead_window_tokens=256 * 4))
    lines = [line for line in capsys.readouterr().err.splitlines() if "WARNING" in line]
    assert len(lines) == 1 and "no resampling point falls inside the run" in lines[0], lines


def test_with_the_default_schedule_planted_dead_latents_are_resampled():
    # 16 latents that cannot fire (tiny encoder columns, negative bias): the old default (2.5-10% of the
    # run, all before the 20-step window) resampled none of them; the new one does after one window.
    x = torch.randn(20_000, 8, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    sae = sparsekit.ReLUSAE(8, 32, l1_coeff=0.1, seed=1)
    with torch.no_grad():
        sae.W_enc[:, :16] *= 0.01
        sae.b_enc[:16] = -5.0
    result = train(sae, x, config(total_tokens=256 * 100, log_every=10))
    assert sum(r.get("resampled", 0) for r in result.history) >= 16, result.history
