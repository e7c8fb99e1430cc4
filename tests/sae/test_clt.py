"""CrossLayerTranscoder: the stacked decode equals a loop over target layers; values and every gradient
equal the plain-torch reference in float64 on every CPU backend; a layer's codes cost one sparse decode;
a one-layer CLT is a TopK transcoder; save/load round-trips through sparsekit.load; bad arguments get
one line naming them; on planted cross-layer data the CLT explains what per-layer transcoders cannot."""
import os
import re

import pytest
import torch
from helpers.seeds import fresh_seed

import sparsekit
from sparsekit import ops
from sparsekit.sae import CrossLayerTranscoder, Transcoder, registry
from sparsekit.sae.clt import SEND_TO_TRAIN_CLT, reference_forward
from sparsekit.training.clt import evaluate_clt, train_clt

D_IN, D_OUT, L, N, K = 7, 5, 3, 12, 3


def random_clt(seed, reach=None, dtype=torch.float64, n_layers=L):
    """A training-mode CLT with every parameter moved off its initial value."""
    clt = CrossLayerTranscoder(D_IN, n_layers * N, D_OUT, n_layers=n_layers, k_per_layer=K, reach=reach, dtype=dtype,
                               seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in clt.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=gen, dtype=param.dtype))
    return clt


def batch(seed, rows=9, n_layers=L, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed + 1)
    return (torch.randn(rows, n_layers, D_IN, generator=gen, dtype=dtype),
            torch.randn(rows, n_layers, D_OUT, generator=gen, dtype=dtype))


def cpu_backends():
    names = ["torch", "cpp"]
    if os.environ.get("TRITON_INTERPRET") == "1" and sparsekit.ops.backend.triton_installed():
        names.append("triton")
    return names


@pytest.mark.parametrize("reach", [None, 1, 2])
def test_stacked_decode_equals_a_loop_over_target_layers(reach):
    seed = fresh_seed()
    clt = random_clt(seed, reach)
    x, _ = batch(seed)
    codes = clt.encode(x)
    dense = [torch.zeros(x.shape[0], N, dtype=x.dtype).scatter(1, c.indices, c.values) for c in codes]
    expected = torch.stack([clt.b_dec[t] + sum(dense[s] @ clt.decoder_to(s, t) for s in range(t + 1)
                                               if t - s < clt.spans[s]) for t in range(L)], 1)
    torch.testing.assert_close(clt.decode(codes), expected, rtol=1e-12, atol=1e-12, msg=f"seed {seed}")


def test_each_layer_decodes_once_into_all_its_targets(monkeypatch):
    clt = random_clt(fresh_seed())
    x, _ = batch(3)
    widths = []
    real = ops.sparse_decode

    def counting(values, indices, W_dec, b_dec):
        widths.append(W_dec.shape)
        return real(values, indices, W_dec, b_dec)

    monkeypatch.setattr(ops, "sparse_decode", counting)
    clt.decode(clt.encode(x))
    assert widths == [(N, (L - layer) * D_OUT) for layer in range(L)]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("reach", [None, 1])
def test_forward_and_backward_match_the_reference_in_float64(backend, reach, monkeypatch):
    seed = fresh_seed()
    monkeypatch.setenv("SPARSEKIT_BACKEND", backend)
    dtype = torch.float32 if backend == "triton" else torch.float64
    clt = random_clt(seed, reach, dtype=dtype)
    x, y = batch(seed, dtype=dtype)
    out = clt(x, y)
    (out.losses["mse"] + (out.y_hat * torch.linspace(-1, 1, D_OUT, dtype=dtype)).sum()).backward()
    got = {name: p.grad.clone() for name, p in clt.named_parameters()}
    clt.zero_grad()
    monkeypatch.setenv("SPARSEKIT_BACKEND", "torch")
    y_ref, mse_ref = reference_forward(clt, x, y)
    (mse_ref.sum() + (y_ref * torch.linspace(-1, 1, D_OUT, dtype=dtype)).sum()).backward()
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.y_hat, y_ref, **tol, msg=f"seed {seed}")
    torch.testing.assert_close(out.layer_mse, mse_ref, **tol, msg=f"seed {seed}")
    for name, p in clt.named_parameters():
        torch.testing.assert_close(got[name], p.grad, **tol, msg=f"{name}, seed {seed}")
        assert got[name].abs().sum() > 0, name


def test_a_one_layer_clt_is_a_topk_transcoder():
    seed = fresh_seed()
    clt = random_clt(seed, n_layers=1)
    tc = Transcoder(D_IN, N, D_OUT, k=K, dtype=torch.float64)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec"):
            getattr(tc, name).copy_(getattr(clt, name))
        tc.b_in.copy_(clt.b_in[0])
        tc.b_dec.copy_(clt.b_dec[0])
    x, y = batch(seed, n_layers=1)
    torch.testing.assert_close(clt(x, y).y_hat[:, 0], tc(x[:, 0], y[:, 0]).x_hat, rtol=1e-12, atol=1e-12)


def test_unit_norm_constraint_covers_the_whole_stacked_row():
    clt = random_clt(fresh_seed())
    x, y = batch(5)
    clt(x, y).losses["mse"].backward()
    clt.remove_parallel_decoder_grad()
    for layer in range(L):
        rows, grads = clt.decoder(layer).detach(), clt.W_dec.grad[clt.row_starts[layer]:clt.row_starts[layer + 1]]
        assert (rows * grads.reshape(rows.shape)).sum(-1).abs().max() < 1e-10
    clt.normalize_decoder()
    for layer in range(L):
        torch.testing.assert_close(clt.decoder(layer).norm(dim=-1), torch.ones(N, dtype=torch.float64))


@pytest.mark.parametrize("reach", [None, 2])
def test_save_and_load_round_trip(tmp_path, reach):
    seed = fresh_seed()
    clt = random_clt(seed, reach, dtype=torch.float32)
    with torch.no_grad():
        clt.layer_input_scale.copy_(torch.rand(L) + 0.5)
        clt.layer_output_scale.copy_(torch.rand(L) + 0.5)
    clt.metadata = {"model": "tiny", "layers": [2, 3, 4]}
    clt.save(tmp_path / "clt")
    back = sparsekit.load(tmp_path / "clt")
    assert type(back) is CrossLayerTranscoder and registry.get("clt") is CrossLayerTranscoder
    assert back.config() == clt.config() and back.metadata == clt.metadata
    for name, tensor in clt.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    x, _ = batch(seed, dtype=torch.float32)
    assert torch.equal(back.reconstruct(x), clt.reconstruct(x))


def test_load_refuses_a_config_that_disagrees_with_the_weights(tmp_path):
    import json
    random_clt(1, dtype=torch.float32).save(tmp_path)
    config = json.loads((tmp_path / "cfg.json").read_text())
    config["n_latents"] = 4 * N
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="n_latents=48 does not match"):
        sparsekit.load(tmp_path)


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_layers=None), SEND_TO_TRAIN_CLT),
    (dict(n_layers=3, k_per_layer=13), "k_per_layer=13 exceeds the 12 latents per layer"),
    (dict(n_layers=5, k_per_layer=2), "n_latents=36 must be a multiple of n_layers=5"),
    (dict(n_layers=3, k_per_layer=2, reach=0), "reach must be a positive int, got 0"),
    (dict(n_layers=3), "k_per_layer is required"),
    (dict(n_layers=3, k_per_layer=2, first_layer=-1), "first_layer must be a non-negative int"),
])
def test_bad_arguments_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        CrossLayerTranscoder(D_IN, 3 * N, D_OUT, **kwargs)


def test_bad_shapes_name_the_tensor():
    clt = random_clt(1)
    x, y = batch(1)
    with pytest.raises(ValueError, match=r"x must be \[B, n_layers=3, 7\], got \(9, 7\)"):
        clt(x[:, 0], y)
    with pytest.raises(ValueError, match="needs its targets y"):
        clt(x)
    with pytest.raises(ValueError, match=re.escape(SEND_TO_TRAIN_CLT)):
        Transcoder(D_IN, N, D_OUT, architecture="clt")


def planted_cross_layer_data(seed, rows, d=16, features=24, n_layers=3):
    """Per layer l, sparse features s_l [rows, m] (3 of m active) write x_l = s_l @ A_l; the target of
    layer t is y_t = sum_{l <= t} s_l @ D_{l,t}: layer t's target depends on earlier layers' features,
    which x_t does not carry."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.zeros(rows, n_layers, features)
    active = torch.rand(rows, n_layers, features, generator=gen).argsort(-1)[..., :3]
    s.scatter_(2, active, torch.rand(rows, n_layers, 3, generator=gen) + 0.5)
    A = torch.nn.functional.normalize(torch.randn(n_layers, features, d, generator=gen), dim=-1)
    D = torch.nn.functional.normalize(torch.randn(n_layers, n_layers, features, d, generator=gen), dim=-1)
    x = torch.einsum("blm,lmd->bld", s, A)
    y = torch.stack([sum(s[:, src] @ D[src, t] for src in range(t + 1)) for t in range(n_layers)], 1)
    return x, y


def test_clt_explains_cross_layer_targets_that_per_layer_transcoders_cannot():
    seed = fresh_seed()
    x, y = planted_cross_layer_data(seed, 12_288)
    train, held_out = (x[:10_240], y[:10_240]), (x[10_240:], y[10_240:])
    fvu = {}
    for reach in (None, 1):
        clt = CrossLayerTranscoder(16, 3 * 32, 16, n_layers=3, k_per_layer=3, reach=reach, seed=seed)
        batches = [(train[0][i:i + 256], train[1][i:i + 256]) for i in range(0, 10_240, 256)]
        result = train_clt(clt, batches, total_tokens=4 * 10_240, lr=3e-3, eval_pairs=held_out, progress=False)
        fvu[reach] = result["eval"]["fvu"]
        assert result["tokens"] == 4 * 10_240 and result["history"][-1]["tokens"] == 4 * 10_240
    # layer 0's target depends on x_0 alone: both fit it; later layers need the earlier layers' features
    assert fvu[None][0] < 0.75 and fvu[1][0] < 0.75, (fvu, seed)
    assert fvu[None][1] < fvu[1][1] and fvu[None][2] < fvu[1][2], (fvu, seed)
    assert evaluate_clt(clt, *held_out)["l0"] == pytest.approx([3, 3, 3], abs=0.01)


def test_auxk_of_a_one_layer_clt_is_the_transcoders_and_reaches_only_dead_latents():
    from sparsekit.training.clt import clt_auxk_loss
    from sparsekit.training.dead_latents import auxk_loss
    seed = fresh_seed()
    clt = random_clt(seed, n_layers=1)
    tc = Transcoder(D_IN, N, D_OUT, k=K, dtype=torch.float64)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec"):
            getattr(tc, name).copy_(getattr(clt, name))
        tc.b_in.copy_(clt.b_in[0])
    x, residual = batch(seed, n_layers=1)
    dead = torch.zeros(N, dtype=torch.bool)
    dead[torch.randperm(N, generator=torch.Generator().manual_seed(seed))[:5]] = True
    got = clt_auxk_loss(clt, x, residual, dead, k_aux=2)
    torch.testing.assert_close(got, auxk_loss(tc, x[:, 0], residual[:, 0], dead.nonzero().flatten(), 2))
    got.backward()
    assert clt.W_enc.grad[:, ~dead].abs().sum() == 0 and clt.W_enc.grad[:, dead].abs().sum() > 0
    assert clt_auxk_loss(clt, x, residual, torch.zeros(N, dtype=torch.bool), 2) == 0


def test_auxk_reaches_every_target_of_a_layers_dead_latents():
    from sparsekit.training.clt import clt_auxk_loss
    clt = random_clt(fresh_seed())
    x, residual = batch(2)
    dead = torch.zeros(L * N, dtype=torch.bool)
    dead[3] = dead[N + 4] = True  # one dead latent in layers 0 and 1
    with torch.no_grad():  # positive pre-activations: each is its layer's AuxK pick with a nonzero gradient
        clt.b_enc[dead] = 100.0
    clt_auxk_loss(clt, x, residual, dead, k_aux=1).backward()
    rows = clt.W_dec.grad.abs().sum(-1)
    touched = {int(r) for r in rows.nonzero().flatten()}
    # latent 3 of layer 0 owns rows 3 * 3 .. 3 * 3 + 2 (three targets); latent 4 of layer 1 two rows after layer 0's block
    assert touched == {9, 10, 11, clt.row_starts[1] + 8, clt.row_starts[1] + 9}
