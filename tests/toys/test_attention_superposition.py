"""Attention-head superposition toy: data, target, mixing model, column geometry, training, CLI."""
import json
import math
import subprocess
import sys

import pytest
import torch
from helpers.seeds import fresh_seed

from sparsekit.cli.toys import main as toys_main
from sparsekit.toys.attention_superposition import (
    Adam,
    AttentionToyConfig,
    column_geometry,
    dense_patterns,
    distinct_keys,
    draw_batch,
    head_reads,
    learning_rate,
    mixed_output,
    mixing_loss,
    sample_batch,
    sparse_ov,
    train_mixing,
    true_output,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_batch_and_ov_shapes_density_and_row_sums():
    cfg = AttentionToyConfig(n_true=4, n_tokens=6, d_model=32, batch=64, pattern_keys=2, p_active=0.5,
                             ov_density=0.2, seed=fresh_seed())
    patterns, resid = sample_batch(cfg, torch.Generator().manual_seed(fresh_seed()))
    ov = sparse_ov(cfg)
    assert patterns.shape == (64, 4, 6, 6) and resid.shape == (64, 6, 32) and ov.shape == (4, 32, 32)
    rows = patterns.sum(-1)
    assert torch.all(((rows - 1).abs() < 1e-6) | (rows == 0))  # each row: attends (sums to 1) or is off
    assert torch.all(((patterns > 0).sum(-1) == 2) | (rows == 0))
    assert 0.4 < (rows > 0).float().mean() < 0.6
    assert 0.15 < (ov != 0).float().mean() < 0.25


def test_no_true_head_has_an_empty_ov():
    ov = sparse_ov(AttentionToyConfig(n_true=50, d_model=2, ov_density=0.01, seed=fresh_seed()))
    assert (ov != 0).flatten(1).any(1).all()


def test_target_matches_a_direct_loop():
    cfg = AttentionToyConfig(n_true=3, n_tokens=5, d_model=4, batch=3, pattern_keys=2, ov_density=0.5,
                             seed=fresh_seed())
    patterns, resid = sample_batch(cfg, torch.Generator().manual_seed(fresh_seed()))
    ov = sparse_ov(cfg)
    M = torch.randn(2, 3)
    expected, mixed = torch.zeros(3, 5, 4), torch.zeros(3, 5, 4)
    for b in range(3):
        for q in range(5):
            for e in range(4):
                total = mixed_total = 0.0
                for h in range(3):
                    for k in range(5):
                        for d in range(4):
                            total += patterns[b, h, q, k] * resid[b, k, d] * ov[h, d, e]
                for j in range(2):
                    head = sum(M[j, i] * patterns[b, i] for i in range(3))
                    ov_j = sum(M[j, i] * ov[i] for i in range(3))
                    mixed_total += sum(head[q, k] * resid[b, k, d] * ov_j[d, e] for k in range(5) for d in range(4))
                expected[b, q, e], mixed[b, q, e] = max(total, 0.0), max(mixed_total, 0.0)
    torch.testing.assert_close(true_output(patterns, resid, ov), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed_output(M, patterns, resid, ov), mixed, atol=1e-4, rtol=1e-4)


def test_identity_mixing_reproduces_the_target_when_heads_equal_features():
    cfg = AttentionToyConfig(n_true=3, n_heads=3, seed=fresh_seed())
    patterns, resid = sample_batch(cfg, torch.Generator().manual_seed(fresh_seed()))
    ov = sparse_ov(cfg)
    torch.testing.assert_close(mixed_output(torch.eye(3), patterns, resid, ov), true_output(patterns, resid, ov))


def test_column_geometry_counts_and_angles_on_a_planted_m():
    rotation = torch.rand(()).item() * 2 * math.pi
    angles = [rotation + math.radians(a) for a in (0, 72, 144, 216, 300)]
    norms = [1.0, 0.9, 0.2, 0.7, 0.05]  # threshold 0.5 keeps features 0, 1, 3
    M = torch.tensor([[n * math.cos(a) for n, a in zip(norms, angles)],
                      [n * math.sin(a) for n, a in zip(norms, angles)]])
    geometry = column_geometry(M, threshold=0.5)
    assert geometry["n_represented"] == 3 and geometry["represented"] == [0, 1, 3]
    assert geometry["norms"] == pytest.approx(norms, abs=1e-6)
    assert geometry["angles_deg"] == pytest.approx({"0-1": 72.0, "0-3": 144.0, "1-3": 144.0}, abs=1e-3)


def test_training_lowers_the_loss():
    result = train_mixing(AttentionToyConfig(steps=300, seed=3), progress=False)
    assert result["loss"] < 0.8 * result["loss_first"]
    assert result["loss"] < result["loss_M_zero"]
    assert len(result["M"]) == 2 and len(result["M"][0]) == 5


def test_config_rejects_bad_values_by_name():
    with pytest.raises(ValueError, match="ov_density"):
        AttentionToyConfig(ov_density=0.0)
    with pytest.raises(ValueError, match="pattern_keys=9 exceeds n_tokens=8"):
        AttentionToyConfig(pattern_keys=9)


def test_cli_writes_run_and_sweep_files(tmp_path, capsys):
    toys_main(["attention", "--steps", "5", "--out", str(tmp_path), "--sweep", "--seeds", "2", "--densities", "0.1,1"])
    for name in ("m_columns.png", "summary.json", "sweep.csv", "sweep.png"):
        assert (tmp_path / name).stat().st_size > 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["run"]["config"]["steps"] == 5 and [s["ov_density"] for s in summary["sweep"]] == [0.1, 1.0]
    assert len((tmp_path / "sweep.csv").read_text().strip().splitlines()) == 1 + 2 * 2
    assert "features represented" in capsys.readouterr().out


def test_cli_rejects_a_bad_flag_with_one_line_and_exit_2():
    for bad in (["--ov-density", "1.5"], ["--stepz", "3"]):
        done = subprocess.run([sys.executable, "-m", "sparsekit", "toys", "attention", *bad],
                              capture_output=True, text=True)
        assert done.returncode == 2
        assert len(done.stderr.strip().splitlines()) == 1 and "error" in done.stderr


def test_distinct_keys_are_distinct_and_every_subset_equally_likely():
    keys = distinct_keys((60000,), 5, 2, torch.Generator().manual_seed(fresh_seed()))
    assert keys.shape == (60000, 2) and torch.all(keys[:, 0] != keys[:, 1]) and keys.min() >= 0 and keys.max() < 5
    subsets = torch.bincount(keys.min(1).values * 5 + keys.max(1).values, minlength=25)
    counts = subsets[subsets > 0]
    assert len(counts) == 10  # C(5, 2)
    assert counts.min() > 0.9 * 6000 and counts.max() < 1.1 * 6000  # expected 6000 each, sd ~73
    assert torch.equal(distinct_keys((7,), 4, 4, torch.Generator()).sort(-1).values, torch.arange(4).repeat(7, 1))


def test_head_reads_equal_the_dense_patterns_times_resid():
    for keys, resid in ((1, "gaussian"), (3, "onehot")):
        cfg = AttentionToyConfig(n_true=3, n_tokens=6, d_model=5, batch=16, pattern_keys=keys, p_active=0.6,
                                 p_head=0.5, resid=resid, seed=fresh_seed())
        draw = draw_batch(cfg, torch.Generator().manual_seed(fresh_seed()))
        patterns = dense_patterns(draw, cfg.n_tokens)
        expected = (patterns @ draw.resid.unsqueeze(1)).transpose(1, 2)  # [B, T, H, d]
        torch.testing.assert_close(head_reads(draw), expected)


def test_mixing_loss_and_its_gradient_match_the_reference_model():
    cfg = AttentionToyConfig(n_true=4, n_heads=3, n_tokens=7, d_model=6, batch=9, pattern_keys=2, p_active=0.7,
                             ov_density=0.4, seed=fresh_seed())
    draw = draw_batch(cfg, torch.Generator().manual_seed(fresh_seed()))
    patterns, resid, ov = dense_patterns(draw, 7).double(), draw.resid.double(), sparse_ov(cfg).double()
    M = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    target = true_output(patterns, resid, ov)
    expected = (mixed_output(M, patterns, resid, ov) - target).pow(2).mean()
    loss, zero = mixing_loss(M, head_reads(draw._replace(resid=draw.resid.double())), ov)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(zero, target.pow(2).mean())
    torch.testing.assert_close(torch.autograd.grad(loss, M)[0], torch.autograd.grad(expected, M)[0])


def test_p_head_switches_whole_patterns_off_at_its_rate():
    cfg = AttentionToyConfig(n_true=5, batch=2000, p_head=0.3, p_active=1.0, seed=fresh_seed())
    patterns, _ = sample_batch(cfg, torch.Generator().manual_seed(fresh_seed()))
    on_rows = (patterns.sum(-1) > 0)  # [B, H, T]
    assert torch.all(on_rows.all(-1) | ~on_rows.any(-1))  # a head is on at every query or at none
    assert 0.26 < on_rows.all(-1).float().mean() < 0.34


def test_onehot_resid_has_one_token_per_position_with_unit_second_moment():
    cfg = AttentionToyConfig(d_model=16, batch=64, resid="onehot", seed=fresh_seed())
    _, resid = sample_batch(cfg, torch.Generator().manual_seed(fresh_seed()))
    assert torch.all((resid != 0).sum(-1) == 1) and torch.all(resid.sum(-1) == 4.0)
    assert resid.pow(2).mean().item() == pytest.approx(1.0)


def test_importance_decay_scales_head_h_by_decay_to_the_h():
    seed = fresh_seed()
    plain = sparse_ov(AttentionToyConfig(seed=seed))
    decayed = sparse_ov(AttentionToyConfig(seed=seed, importance_decay=0.7))
    torch.testing.assert_close(decayed, plain * (0.7 ** torch.arange(5.0))[:, None, None])


def test_cosine_schedule_trains_and_bad_knobs_are_refused_by_name():
    result = train_mixing(AttentionToyConfig(steps=200, schedule="cosine", seed=fresh_seed()), progress=False)
    assert result["loss"] < result["loss_M_zero"]
    for field, bad in (("resid", "uniform"), ("schedule", "step"), ("ov_norm", "unit"), ("p_head", 0.0),
                       ("importance_decay", 1.5)):
        with pytest.raises(ValueError, match=field):
            AttentionToyConfig(**{field: bad})


def test_equal_ov_norm_gives_every_head_the_expected_norm_on_the_same_support():
    seed = fresh_seed()
    drawn = sparse_ov(AttentionToyConfig(seed=seed, ov_density=0.05, d_model=8))
    equal = sparse_ov(AttentionToyConfig(seed=seed, ov_density=0.05, d_model=8, ov_norm="equal"))
    torch.testing.assert_close(equal.flatten(1).norm(dim=1), torch.full((5,), math.sqrt(8)))
    assert torch.equal(equal != 0, drawn != 0)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_the_toys_adam_and_schedule_follow_torch_optim(schedule):
    cfg = AttentionToyConfig(steps=40, lr=0.05, schedule=schedule)
    ours = torch.randn(2, 5)
    theirs = ours.clone().requires_grad_()
    reference = torch.optim.Adam([theirs], lr=cfg.lr)
    scheduler = None
    if schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(reference, T_max=cfg.steps, eta_min=cfg.lr / 100)
    optimizer = Adam(ours)
    grads = torch.Generator().manual_seed(fresh_seed())
    for step in range(cfg.steps):
        assert learning_rate(cfg, step) == pytest.approx(reference.param_groups[0]["lr"], rel=1e-9)
        grad = torch.randn(2, 5, generator=grads) * (1 + step % 3)
        optimizer.step(grad, learning_rate(cfg, step))
        theirs.grad = grad.clone()
        reference.step()
        if scheduler is not None:
            scheduler.step()
    torch.testing.assert_close(ours, theirs.detach(), rtol=1e-5, atol=1e-6)
