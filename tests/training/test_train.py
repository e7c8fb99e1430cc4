"""The trainer: dictionaries learn planted features, dead-latent remedies work, bad configs are
refused clearly, batching does not depend on the source's chunking."""
import json

import pytest
import torch

import sparsekit
from sparsekit import TrainConfig, train
from sparsekit.toys.superposition import SuperpositionData, feature_recovery


def planted(n_true=48, d=24, p_active=0.04, seed=0, rows=40_000):
    data = SuperpositionData(n_true, d, p_active=p_active, seed=seed)
    x, _ = data.sample(rows, torch.Generator().manual_seed(seed + 1))
    return data, x


def quick_config(**overrides):
    base = dict(batch_size=256, lr=3e-3, total_tokens=256 * 400, eval_tokens=2048, dead_window_tokens=256 * 50,
                log_every=50, progress=False, lr_decay_fraction=0.2)
    base.update(overrides)
    return TrainConfig(**base)


def test_topk_training_recovers_planted_features():
    data, x = planted()
    sae = sparsekit.TopKSAE(24, 96, k=4)
    result = train(sae, x, quick_config(dead_strategy="auxk"))
    recovery = feature_recovery(sae, data.features)
    assert recovery >= 0.95, (recovery, result.metrics)
    assert result.metrics["fvu"] < 0.2 and result.metrics["l0"] <= 4


def test_relu_l1_training_recovers_planted_features():
    data, x = planted(seed=3)
    sae = sparsekit.ReLUSAE(24, 96, l1_coeff=1.0)
    result = train(sae, x, quick_config(total_tokens=256 * 600, l1_warmup_tokens=256 * 50))
    recovery = feature_recovery(sae, data.features)
    assert recovery >= 0.95, (recovery, result.metrics)
    assert (sae.W_dec.norm(dim=-1) - 1).abs().max() < 1e-5, "decoder rows must stay unit norm"


@pytest.mark.parametrize("architecture, strategy", [
    ("topk", "none"), ("topk", "auxk"), ("topk", "ghost"), ("topk", "resample"), ("batchtopk", "auxk"),
    ("relu", "resample"), ("relu", "ghost"), ("relu", "resample+ghost"), ("jumprelu", "none")])
def test_every_architecture_and_strategy_reduces_the_loss(architecture, strategy):
    _, x = planted(seed=5, rows=20_000)
    make = {"topk": lambda: sparsekit.TopKSAE(24, 96, k=4), "batchtopk": lambda: sparsekit.BatchTopKSAE(24, 96, k=4),
            "relu": lambda: sparsekit.ReLUSAE(24, 96, l1_coeff=1e-2),
            "jumprelu": lambda: sparsekit.JumpReLUSAE(24, 96, l0_coeff=1e-3, bandwidth=0.05, init_threshold=0.05)}
    sae = make[architecture]()
    result = train(sae, x, quick_config(total_tokens=256 * 150, dead_strategy=strategy, dead_window_tokens=256 * 10,
                                        log_every=25, resample_at_tokens=(256 * 30, 256 * 60)))
    fvus = [r["fvu"] for r in result.history]
    assert fvus[-1] < 0.6 * fvus[0], fvus
    assert all(k in result.history[-1] for k in ("mse", "fvu", "l0", "dead_frac", "dense_frac", "aux_loss",
                                                  "tokens", "step"))


def _plant_dead_latents(sae, n_dead):
    # Latents that cannot fire: tiny encoder columns and a negative bias (pre-activations near -3,
    # so exp(pre) still carries a ghost gradient).
    with torch.no_grad():
        sae.W_enc[:, :n_dead] *= 0.05
        sae.b_enc[:n_dead] = -3.0
    return sae


@pytest.mark.parametrize("strategy", ["ghost", "resample"])
def test_dead_latent_remedy_revives_planted_dead_latents(strategy):
    _, x = planted(seed=7, rows=20_000)
    cfg = dict(total_tokens=256 * 600, dead_window_tokens=256 * 20, b_dec_init="mean",
               resample_at_tokens=(256 * 40, 256 * 80, 256 * 120))
    results = {}
    for name in ("none", strategy):
        torch.manual_seed(0)
        sae = _plant_dead_latents(sparsekit.ReLUSAE(24, 96, l1_coeff=0.3, seed=1), 32)
        results[name] = train(sae, x, quick_config(dead_strategy=name, **cfg)).metrics["dead_frac"]
    assert results["none"] >= 32 / 96 - 1e-9, results
    assert results[strategy] < results["none"], results


def test_auxk_revives_planted_dead_latents():
    _, x = planted(seed=9, rows=20_000)
    results = {}
    for name in ("none", "auxk"):
        sae = sparsekit.TopKSAE(24, 96, k=4, seed=1)
        with torch.no_grad():  # positive pre-activations that never win the top k: only AuxK trains them
            sae.W_enc[:, :32] *= 0.01
            sae.b_enc[:32] = 0.05
        results[name] = train(sae, x, quick_config(dead_strategy=name, total_tokens=256 * 200,
                                                   dead_window_tokens=256 * 10)).metrics["dead_frac"]
    assert results["auxk"] < results["none"], results


def test_batch_size_is_independent_of_the_source_chunking():
    _, x = planted(seed=11, rows=6000)
    finals = []
    for chunk in (7, 256, 1000):
        sae = sparsekit.TopKSAE(24, 64, k=4)
        chunks = [x[i:i + chunk] for i in range(0, x.shape[0], chunk)]
        train(sae, chunks, quick_config(total_tokens=256 * 15, eval_tokens=512, log_every=5))
        finals.append(torch.cat([p.detach().flatten() for p in sae.parameters()]))
    assert torch.equal(finals[0], finals[1]) and torch.equal(finals[1], finals[2])


def test_transcoder_learns_a_sparse_map_between_two_activations():
    gen = torch.Generator().manual_seed(0)
    data, x = planted(seed=13, rows=20_000)
    _, coefficients = data.sample(20_000, gen)
    x = coefficients @ data.features
    readout = torch.nn.functional.normalize(torch.randn(48, 12, generator=gen), dim=-1)
    y = coefficients @ readout  # the target: the same sparse causes, read out differently
    tc = sparsekit.Transcoder(24, 96, 12, k=4)
    result = train(tc, (x, y), quick_config(total_tokens=256 * 300))
    assert result.metrics["fvu"] < 0.25, result.metrics


def test_metrics_log_and_density_plot_are_written(tmp_path):
    _, x = planted(seed=15, rows=8000)
    sae = sparsekit.TopKSAE(24, 64, k=4)
    result = train(sae, x, quick_config(total_tokens=256 * 20, log_every=5, output_dir=str(tmp_path)))
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [5, 10, 15, 20] and lines == result.history
    assert (tmp_path / "feature_density.png").stat().st_size > 1000


@pytest.mark.parametrize("overrides, message", [
    (dict(batch_size=0), "batch_size must be a positive int"),
    (dict(lr=-1.0), "lr must be a positive finite number"),
    (dict(total_tokens=10, batch_size=64), "less than one batch"),
    (dict(dead_strategy="ghosts"), "'ghosts' is not one of"),
    (dict(dead_strategy="none+auxk"), "'none' cannot be combined"),
    (dict(lr_decay_fraction=1.5), "lr_decay_fraction must be in"),
    (dict(checkpoint_every_tokens=100), "needs a checkpoint_dir"),
    (dict(b_dec_init="median"), "b_dec_init must be"),
])
def test_bad_train_config_is_refused_naming_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        train(sparsekit.TopKSAE(8, 16, k=2), torch.randn(512, 8), TrainConfig(progress=False, **overrides))


def test_bad_sources_are_refused_clearly():
    sae = sparsekit.TopKSAE(8, 16, k=2)
    cfg = TrainConfig(batch_size=32, total_tokens=32 * 5, eval_tokens=0, progress=False)
    with pytest.raises(ValueError, match=r"x must be a float tensor \[rows, d_in=8\]"):
        train(sae, [torch.randn(32, 9)] * 10, cfg)
    poisoned = [torch.randn(32, 8) for _ in range(10)]
    poisoned[3][5, 2] = float("nan")
    with pytest.raises(ValueError, match="source batch 4: x row 5 contains NaN"):
        train(sae, poisoned, cfg)
    with pytest.raises(ValueError, match="ran out after"):
        train(sae, [torch.randn(32, 8)] * 2, cfg)
    with pytest.raises(ValueError, match="auxk' needs a topk, batchtopk or matryoshka_batchtopk"):
        train(sparsekit.ReLUSAE(8, 16, 1e-3), torch.randn(256, 8), TrainConfig(dead_strategy="auxk", progress=False))


def test_training_steps_match_a_plain_foreach_adam_reference():
    # Guards against torch's fused CPU Adam mis-reading non-contiguous gradients (torch 2.13):
    # the trainer's update must equal a hand-written loop with the for-each Adam.
    _, x = planted(seed=17, rows=4096)
    cfg = quick_config(total_tokens=256 * 3, eval_tokens=0, lr_decay_fraction=0.0, grad_clip_norm=None,
                       normalize_inputs=False, b_dec_init="zeros")
    trained = sparsekit.ReLUSAE(24, 64, l1_coeff=0.1)
    manual = sparsekit.ReLUSAE(24, 64, l1_coeff=0.1)
    train(trained, [x[i * 256:(i + 1) * 256] for i in range(3)], cfg)  # a list: no shuffling
    optimizer = torch.optim.Adam(manual.parameters(), lr=cfg.lr, foreach=True)
    for step in range(3):
        out = manual(x[step * 256:(step + 1) * 256])
        optimizer.zero_grad()
        sum(out.losses.values()).backward()
        manual.remove_parallel_decoder_grad()
        optimizer.step()
        manual.normalize_decoder()
    for a, b in zip(trained.parameters(), manual.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_trainer_takes_fused_adam_only_when_every_parameter_is_contiguous():
    from sparsekit.training.optimizer import adam as _adam
    sae = sparsekit.TopKSAE(8, 32, 4)
    assert all(p.is_contiguous() for p in sae.parameters())  # the constructor's layout
    assert _adam(sae, TrainConfig()).defaults["fused"] is True
    sae.W_enc = torch.nn.Parameter(sae.W_enc.detach().t().contiguous().t())  # same values, column-major
    optimizer = _adam(sae, TrainConfig())
    assert not optimizer.defaults["fused"] and optimizer.defaults["foreach"] is True
