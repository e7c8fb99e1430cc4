"""Toy superposition data (ground truth for tests) and the feature-recovery score."""
import itertools
import json
import math
from types import SimpleNamespace

import pytest
import torch
from helpers.seeds import fresh_seed

from sparsekit import ops
from sparsekit.activations import ActivationSource
from sparsekit.toys import SuperpositionData, feature_recovery, recovery_per_feature


def test_superposition_firing_rate_matches_p_active():
    data = SuperpositionData(n_true=200, d=40, p_active=0.03, seed=fresh_seed())
    _, coefficients = data.sample(20_000, torch.Generator().manual_seed(fresh_seed()))
    rate = (coefficients > 0).double().mean(0)  # [n_true]
    per_feature_sd = math.sqrt(0.03 * 0.97 / 20_000)
    assert abs(rate.mean().item() - 0.03) < 5 * per_feature_sd / math.sqrt(200)
    assert (rate - 0.03).abs().max().item() < 5 * per_feature_sd


def test_superposition_features_are_unit_norm_and_orthonormal_when_d_allows():
    few = SuperpositionData(n_true=24, d=32, seed=fresh_seed()).features
    assert few.shape == (24, 32)
    torch.testing.assert_close(few @ few.t(), torch.eye(24), atol=1e-5, rtol=0)
    many = SuperpositionData(n_true=512, d=128, seed=fresh_seed()).features
    torch.testing.assert_close(many.norm(dim=1), torch.ones(512))
    off_diagonal = (many @ many.t() - torch.eye(512)).abs()
    assert off_diagonal.max() < 0.5  # random directions in 128-D: nearly orthogonal (typical |cos| ~ 0.09)


def test_superposition_x_is_coefficients_times_features_plus_noise():
    data = SuperpositionData(n_true=30, d=10, p_active=0.2, seed=fresh_seed())
    x, coefficients = data.sample(500, torch.Generator().manual_seed(fresh_seed()))
    torch.testing.assert_close(x, coefficients @ data.features)
    assert coefficients.shape == (500, 30)
    on = coefficients[coefficients > 0]
    assert on.max() <= 1.0 and on.min() > 0.0 and 0.4 < on.mean() < 0.6  # U(0, 1]
    noisy = SuperpositionData(n_true=30, d=10, p_active=0.2, noise=0.5, seed=data.seed)
    x_noisy, c_noisy = noisy.sample(4000, torch.Generator().manual_seed(1))
    residual = x_noisy - c_noisy @ noisy.features
    assert abs(residual.std().item() - 0.5) < 0.02


def test_superposition_constant_magnitude_gives_unit_coefficients():
    data = SuperpositionData(n_true=20, d=8, p_active=0.5, magnitude="constant", seed=fresh_seed())
    _, coefficients = data.sample(100, torch.Generator().manual_seed(0))
    assert set(coefficients.unique().tolist()) == {0.0, 1.0}


def test_correlated_groups_fire_together_and_others_independently():
    data = SuperpositionData(n_true=20, d=16, p_active=0.2, correlated_groups=2, group_size=3, seed=fresh_seed())
    assert data.groups.tolist() == [0, 0, 0, 1, 1, 1] + [-1] * 14
    _, coefficients = data.sample(5000, torch.Generator().manual_seed(fresh_seed()))
    on = coefficients > 0
    for group in (slice(0, 3), slice(3, 6)):
        assert (on[:, group].all(1) == on[:, group].any(1)).all()  # all members or none
    both = (on[:, 0] & on[:, 3]).double().mean().item()
    assert abs(both - 0.04) < 0.015  # the two groups are independent: 0.2 * 0.2
    independent = (on[:, 6] & on[:, 7]).double().mean().item()
    assert abs(independent - 0.04) < 0.015
    rates = on.double().mean(0)
    assert ((rates - 0.2).abs() < 0.03).all()  # grouping keeps every feature's rate at p_active


def test_superposition_source_resumes_exactly_and_is_reproducible():
    data = SuperpositionData(n_true=40, d=12, p_active=0.1, seed=fresh_seed())
    seed = fresh_seed()
    source = data.source(batch_size=16, seed=seed)
    assert isinstance(source, ActivationSource)
    uninterrupted = list(itertools.islice(iter(source), 8))
    first = data.source(batch_size=16, seed=seed)
    list(itertools.islice(iter(first), 3))
    resumed = data.source(batch_size=16, seed=seed)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for got, expected in zip(itertools.islice(iter(resumed), 5), uninterrupted[3:]):
        assert torch.equal(got, expected)
    assert not torch.equal(uninterrupted[0], uninterrupted[1])
    other = next(iter(data.source(batch_size=16, seed=seed + 1)))
    assert not torch.equal(other, uninterrupted[0])
    with pytest.raises(ValueError, match="'batch_size' is 16 but this SuperpositionSource has 8"):
        data.source(batch_size=8, seed=seed).load_state_dict(first.state_dict())


def test_feature_recovery_is_one_for_the_true_features_and_low_for_random():
    data = SuperpositionData(n_true=32, d=64, seed=fresh_seed())
    gen = torch.Generator().manual_seed(fresh_seed())
    # a wider dictionary holding the true features, scaled and shuffled, among random rows
    decoder = torch.cat([data.features * 3.0, torch.randn(40, 64, generator=gen)])[torch.randperm(72, generator=gen)]
    assert feature_recovery(decoder, data.features) == pytest.approx(1.0, abs=1e-6)
    assert feature_recovery(SimpleNamespace(W_dec=decoder), data) == pytest.approx(1.0, abs=1e-6)
    random = torch.randn(64, 64, generator=gen)
    assert feature_recovery(random, data.features) < 0.6
    assert feature_recovery(-data.features, data.features) < 0.5  # sign matters: latents are non-negative


def test_recovery_per_feature_scores_each_true_feature():
    data = SuperpositionData(n_true=10, d=16, seed=fresh_seed())
    half = data.features[:5]
    scores = recovery_per_feature(half, data)
    assert scores.shape == (10,)
    torch.testing.assert_close(scores[:5], torch.ones(5))
    assert (scores[5:] < 1e-5).all()  # orthonormal features: the missing ones have cosine 0


def test_feature_recovery_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="rows of width 8 but true_features has width 16"):
        feature_recovery(torch.randn(4, 8), torch.randn(3, 16))
    with pytest.raises(ValueError, match="sae_or_decoder must be a \\[n, d\\] tensor or have .W_dec"):
        feature_recovery(torch.randn(8), torch.randn(3, 8))


@pytest.mark.parametrize("kwargs, message", [
    (dict(p_active=0.0), "p_active must be a probability in \\(0, 1\\], got 0.0"),
    (dict(magnitude="gaussian"), "magnitude must be one of uniform, constant, got 'gaussian'"),
    (dict(correlated_groups=5), "correlated_groups=5 of group_size=2 need 10 features but n_true=8"),
    (dict(noise=-0.1), "noise must be a non-negative finite number, got -0.1"),
    (dict(n_true=0), "n_true must be a positive int, got 0"),
])
def test_superposition_rejects_bad_arguments_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SuperpositionData(**{"n_true": 8, "d": 4, **kwargs})


def test_topk_dictionary_trained_on_the_toy_recovers_its_features(backend):
    """End to end: the toy is learnable and the score sees it (a TopK SAE through sparsekit.ops).

    Any backend learns it; the torch reference is the fastest at these tiny shapes.
    """
    backend("torch")
    seed = fresh_seed()
    data = SuperpositionData(n_true=48, d=24, p_active=0.04, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    W_dec = torch.nn.functional.normalize(torch.randn(96, 24, generator=gen), dim=-1)
    W_enc = W_dec.t().clone().requires_grad_()
    W_dec.requires_grad_()
    b_enc, b_dec = torch.zeros(96, requires_grad=True), torch.zeros(24, requires_grad=True)
    optimizer = torch.optim.Adam([W_enc, b_enc, W_dec, b_dec], lr=3e-3)
    before = feature_recovery(W_dec, data)
    for x in itertools.islice(iter(data.source(batch_size=256, seed=seed)), 600):
        codes = ops.topk_encode(x - b_dec, W_enc, b_enc, 4)
        loss = (ops.sparse_decode(codes.values, codes.indices, W_dec, b_dec) - x).pow(2).sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            W_dec /= W_dec.norm(dim=-1, keepdim=True)
    after = feature_recovery(W_dec, data)
    assert before < 0.6 and after > 0.9, (seed, before, after)
