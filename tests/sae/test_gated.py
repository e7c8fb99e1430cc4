"""GatedSAE (Rajamanoharan et al. 2024): the forward and every gradient equal the paper's formulas
written in plain PyTorch; the gate learns only from the L1 and the frozen-decoder reconstruction;
it trains on planted features; SAELens's training coefficient comes back on import."""
import pytest
import torch
from helpers.seeds import fresh_seed

import sparsekit
from sparsekit.sae import GatedSAE
from sparsekit.toys.superposition import SuperpositionData


def random_gated(seed, transcoder=False, d_in=12, n=40, d_out=7):
    gen = torch.Generator().manual_seed(seed)
    kwargs = dict(d_out=d_out, transcoder=True) if transcoder else {}
    sae = GatedSAE(d_in, n, l1_coeff=3e-3, dtype=torch.float64, seed=seed, **kwargs)
    with torch.no_grad():
        for param in sae.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=gen, dtype=param.dtype))
    return sae


def reference_losses(params: dict, x, y, l1_coeff, transcoder):
    """The paper's forward and loss, term by term, from the parameters alone."""
    center = params["b_in"] if transcoder else params["b_dec"]
    centered = x - center
    gate = centered @ params["W_enc"] + params["b_enc"]
    mag = centered @ (params["W_enc"] * params["r_mag"].exp()) + params["b_mag"]
    codes = (gate > 0).double() * torch.relu(mag)
    target = y if transcoder else x
    x_hat = codes @ params["W_dec"] + params["b_dec"]
    via_gate = torch.relu(gate) @ params["W_dec"].detach() + params["b_dec"].detach()
    return codes, {"mse": (x_hat - target).pow(2).sum(-1).mean(),
                   "l1": l1_coeff * torch.relu(gate).sum(-1).mean(),
                   "gate_reconstruction": (via_gate - target).pow(2).sum(-1).mean()}


@pytest.mark.parametrize("transcoder", [False, True])
def test_forward_losses_and_gradients_match_the_formulas(transcoder):
    seed = fresh_seed()
    sae = random_gated(seed, transcoder)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(33, 12, generator=gen, dtype=torch.float64)
    y = torch.randn(33, 7, generator=gen, dtype=torch.float64) if transcoder else None
    out = sae(x, y)
    params = {name: p.detach().clone().requires_grad_() for name, p in sae.named_parameters()}
    codes, losses = reference_losses(params, x, y, sae.l1_coeff, transcoder)
    torch.testing.assert_close(out.codes, codes, msg=f"seed {seed}")
    assert 0 < (codes > 0).double().mean() < 1, f"seed {seed}: every latent on or off"
    for name in losses:
        torch.testing.assert_close(out.losses[name], losses[name], msg=f"{name}, seed {seed}")
    sum(out.losses.values()).backward()
    sum(losses.values()).backward()
    for name, param in sae.named_parameters():
        torch.testing.assert_close(param.grad, params[name].grad, msg=f"grad of {name}, seed {seed}")


def test_the_gate_learns_only_from_the_l1_and_the_frozen_decoder_reconstruction():
    sae = random_gated(fresh_seed())
    x = torch.randn(50, 12, dtype=torch.float64)
    sae(x).losses["mse"].backward()
    assert sae.b_enc.grad is None or torch.count_nonzero(sae.b_enc.grad) == 0  # 1[gate > 0] passes none
    assert torch.count_nonzero(sae.b_mag.grad) > 0
    sae.zero_grad(set_to_none=True)
    sae(x).losses["gate_reconstruction"].backward()
    assert torch.count_nonzero(sae.b_enc.grad) > 0
    assert sae.W_dec.grad is None and sae.b_dec.grad is not None  # b_dec still centres the input
    assert sae.r_mag.grad is None or torch.count_nonzero(sae.r_mag.grad) == 0


def test_encode_is_the_training_codes_and_reconstruct_undoes_the_scales():
    sae = random_gated(fresh_seed())
    sae.input_scale, sae.output_scale = 1.7, 1.7
    x = torch.randn(20, 12, dtype=torch.float64)
    torch.testing.assert_close(sae.encode(x * 1.7), sae(x * 1.7).codes)
    torch.testing.assert_close(sae.reconstruct(x), sae.decode(sae.encode(x * 1.7)) / 1.7)


def test_gated_trains_on_planted_features_to_a_sparse_faithful_code():
    data = SuperpositionData(n_true=64, d=24, p_active=0.03, seed=0)
    x, _ = data.sample(40_000)
    sae = GatedSAE(24, 96, l1_coeff=0.1)
    cfg = sparsekit.TrainConfig(batch_size=512, lr=3e-3, total_tokens=512 * 300, eval_tokens=2048, log_every=100,
                                progress=False, seed=0)
    result = sparsekit.train(sae, x, cfg)
    first = result.history[0]
    assert result.metrics["fvu"] < 0.5 * first["fvu"], (first, result.metrics)
    assert result.metrics["l0"] < 0.5 * 96


def test_saelens_training_coefficient_comes_back_on_import(tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    cfg = sae_lens.GatedTrainingSAEConfig(d_in=6, d_sae=16, l1_coefficient=0.7, dtype="float64")
    sae_lens.GatedTrainingSAE(cfg).save_model(tmp_path)
    loaded = sparsekit.load_saelens(tmp_path)
    assert isinstance(loaded, GatedSAE) and loaded.l1_coeff == 0.7
    assert sparsekit.load_saelens(tmp_path, l1_coeff=1e-3).l1_coeff == 1e-3
