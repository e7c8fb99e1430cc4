"""MatryoshkaBatchTopKSAE (Bussmann et al. 2025): every prefix's loss and every gradient equal a plain
PyTorch reference that selects the batch's top B*k itself and decodes each prefix separately, on
every CPU backend, ties included; the prefixes cost one sparse decode; inference is BatchTopK's;
widths are checked; SAELens's training save imports with the same losses and its inference layout
is JumpReLU; trained on planted features, each prefix reconstructs, better the wider it is."""
import json
import os

import numpy as np
import pytest
import torch
from helpers.seeds import fresh_seed
from safetensors.torch import load_file

import sparsekit
from sparsekit import ops
from sparsekit.sae import BatchTopKSAE, MatryoshkaBatchTopKSAE, Transcoder, registry
from sparsekit.toys.superposition import SuperpositionData
from sparsekit.training.memory import estimate_training_memory

D_IN, N, D_OUT, K, WIDTHS = 10, 40, 6, 3, (4, 13, 40)


def random_matryoshka(seed, form="sae", dtype=torch.float64, widths=WIDTHS):
    """A training-mode dictionary with every parameter moved off its initial value."""
    kwargs = {"sae": {}, "transcoder": dict(d_out=D_OUT, transcoder=True),
              "skip": dict(d_out=D_OUT, transcoder=True, skip=True)}[form]
    sae = MatryoshkaBatchTopKSAE(D_IN, N, k=K, matryoshka_widths=widths, dtype=dtype, seed=seed, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in sae.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=gen, dtype=param.dtype))
    return sae


def tied_inputs(sae, gen, rows):
    """Small-integer x, W_enc, b_enc and pre-encoder bias, drawn until the batch's B*k-th largest
    pre-activation ties with the next: the selection must then keep the lower flat index."""
    for _ in range(200):
        with torch.no_grad():
            sae.W_enc.copy_(torch.randint(-1, 2, sae.W_enc.shape, generator=gen).to(sae.W_enc))
            sae.b_enc.copy_(torch.randint(-1, 2, sae.b_enc.shape, generator=gen).to(sae.b_enc))
            center = sae.b_in if sae.transcoder else sae.b_dec
            center.copy_(torch.randint(-1, 2, center.shape, generator=gen).to(center))
            x = torch.randint(-2, 3, (rows, sae.d_in), generator=gen).to(sae.W_enc)
            ranked = torch.relu((x - center) @ sae.W_enc + sae.b_enc).flatten().sort(descending=True).values
        if ranked[rows * K - 1] == ranked[rows * K] > 0:
            return x
    raise AssertionError("no draw tied at the B*k-th value")


def reference(params: dict, x, y, k, widths, transcoder, skip):
    """Plain PyTorch from the parameters: BatchTopK by a stable descending sort (ties: lower flat
    index first), then each prefix decoded on its own from the dense codes."""
    center = params["b_in"] if transcoder else params["b_dec"]
    pre = torch.relu((x - center) @ params["W_enc"] + params["b_enc"])
    flat = pre.flatten()
    kept = torch.sort(flat.detach(), descending=True, stable=True).indices[:k * x.shape[0]]
    mask = torch.zeros_like(flat).index_fill(0, kept, 1.0).view_as(pre)
    codes = pre * mask
    target = y if transcoder else x
    outputs, losses = [], {}
    for m in widths:
        out = codes[:, :m] @ params["W_dec"][:m] + params["b_dec"]
        if skip:
            out = out + x @ params["W_skip"]
        outputs.append(out)
        losses["mse" if m == widths[-1] else f"mse_prefix_{m}"] = (out - target).pow(2).sum(-1).mean()
    return codes, torch.stack(outputs), losses


def cpu_backends():
    names = ["torch", "cpp"]
    if os.environ.get("TRITON_INTERPRET") == "1" and sparsekit.ops.backend.triton_installed():
        names.append("triton")
    return names


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("form", ["sae", "transcoder", "skip"])
@pytest.mark.parametrize("ties", [False, True], ids=["continuous", "ties"])
def test_prefix_losses_and_gradients_match_decoding_each_prefix_separately(monkeypatch, backend, form, ties):
    monkeypatch.setenv("SPARSEKIT_BACKEND", backend)
    seed = fresh_seed()
    dtype = torch.float32 if backend == "triton" else torch.float64  # Triton takes 32- and 16-bit floats
    sae = random_matryoshka(seed, form, dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    rows = 23
    x = tied_inputs(sae, gen, rows) if ties else torch.randn(rows, D_IN, generator=gen, dtype=dtype)
    y = torch.randn(rows, D_OUT, generator=gen, dtype=dtype) if sae.transcoder else None
    params = {name: p.detach().clone().requires_grad_() for name, p in sae.named_parameters()}
    codes, prefixes, losses = reference(params, x, y, K, WIDTHS, sae.transcoder, sae.skip)

    out = sae(x, y)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}
    torch.testing.assert_close(sae.dense_codes(out.codes), codes.detach(), msg=f"seed {seed}", **tol)
    torch.testing.assert_close(out.x_hat, prefixes[-1].detach(), msg=f"seed {seed}", **tol)
    torch.testing.assert_close(sae.prefix_outputs(out.codes, x), prefixes.detach(), msg=f"seed {seed}", **tol)
    assert set(out.losses) == set(losses) == {"mse", "mse_prefix_4", "mse_prefix_13"}
    for name in losses:
        torch.testing.assert_close(out.losses[name], losses[name], msg=f"{name}, seed {seed}", **tol)
    assert len({round(float(v.detach()), 6) for v in losses.values()}) == len(losses), f"seed {seed}: prefixes coincide"
    sum(out.losses.values()).backward()
    sum(losses.values()).backward()
    for name, param in sae.named_parameters():
        assert param.grad is not None and torch.count_nonzero(param.grad) > 0, f"{name} got no gradient, seed {seed}"
        torch.testing.assert_close(param.grad, params[name].grad, msg=f"grad of {name}, seed {seed}", **tol)


def test_the_prefixes_cost_one_sparse_decode_of_the_batch_codes(monkeypatch):
    calls = []
    real = ops.sparse_decode_coo

    def counting(values, rows, cols, W_dec, b_dec, batch_size):
        calls.append((values.numel(), batch_size))
        return real(values, rows, cols, W_dec, b_dec, batch_size)

    monkeypatch.setattr(ops, "sparse_decode_coo", counting)
    sae = random_matryoshka(fresh_seed())
    out = sae(torch.randn(17, D_IN, dtype=torch.float64))
    assert isinstance(out.codes, ops.BatchTopKCodes) and len(out.losses) == len(WIDTHS)
    assert calls == [(17 * K, len(WIDTHS) * 17)]  # B*k entries, once, into G stacked batches


def test_a_single_width_is_batchtopk_with_the_same_parameters():
    seed = fresh_seed()
    sae = random_matryoshka(seed, widths=(N,))
    plain = BatchTopKSAE(D_IN, N, k=K, dtype=torch.float64, seed=None)
    plain.load_state_dict(sae.state_dict())
    x = torch.randn(19, D_IN, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ours, theirs = sae(x), plain(x)
    assert set(ours.losses) == {"mse"}
    torch.testing.assert_close(ours.losses["mse"], theirs.losses["mse"])
    torch.testing.assert_close(sae.threshold, plain.threshold)


def test_evaluation_uses_the_batchtopk_threshold_and_prefixes_truncate_its_codes():
    seed = fresh_seed()
    sae = random_matryoshka(seed)
    sae.input_scale, sae.output_scale = 1.6, 0.7
    x = torch.randn(31, D_IN, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    sae(x * 1.6)  # a training step sets the threshold
    assert float(sae.threshold) > 0
    plain = BatchTopKSAE(D_IN, N, k=K, dtype=torch.float64, seed=None).eval()
    plain.load_state_dict(sae.state_dict())
    plain.input_scale, plain.output_scale = 1.6, 0.7
    prefixes = sae.prefix_reconstructions(x)
    assert sae.training  # restored
    torch.testing.assert_close(prefixes[-1], plain.reconstruct(x))
    torch.testing.assert_close(sae.reconstruct(x), plain.reconstruct(x))
    codes = plain.encode(x * 1.6)
    assert 0 < (codes > 0).double().mean() < 1
    for g, m in enumerate(WIDTHS):
        torch.testing.assert_close(prefixes[g], (codes[:, :m] @ sae.W_dec[:m] + sae.b_dec).detach() / 0.7)


@pytest.mark.parametrize("widths, message", [
    ((), "matryoshka_widths must be a non-empty list of ints, got ()"),
    ((0, 40), "matryoshka_widths must be positive, got [0, 40]"),
    ((8, 8, 40), "matryoshka_widths must be strictly increasing, got [8, 8, 40]"),
    ((20, 10, 40), "matryoshka_widths must be strictly increasing, got [20, 10, 40]"),
    ((8, 16), "matryoshka_widths must end at n_latents=40, got [8, 16]"),
    ((8, 48), "matryoshka_widths must end at n_latents=40, got [8, 48]"),
    ((8.5, 40), "matryoshka_widths must be a non-empty list of ints, got (8.5, 40)"),
    ((True, 40), "matryoshka_widths must be a non-empty list of ints, got (True, 40)"),
    ("8,40", "matryoshka_widths must be a list of ints ending at n_latents=40, got '8,40'"),
    (40, "matryoshka_widths must be a list of ints ending at n_latents=40, got 40"),
])
def test_bad_widths_are_refused_in_one_line_naming_the_argument(widths, message):
    with pytest.raises(ValueError) as raised:
        MatryoshkaBatchTopKSAE(D_IN, N, k=K, matryoshka_widths=widths)
    assert str(raised.value) == message


def test_registry_facts_memory_estimate_and_transcoder_factory():
    assert registry.get("matryoshka_batchtopk") is MatryoshkaBatchTopKSAE
    spec = registry.hyperparameters()["matryoshka_widths"]
    assert (spec.kind, spec.element, spec.required, spec.flag) == (tuple, int, True, True)
    assert registry.architectures_taking("matryoshka_widths") == (("matryoshka_batchtopk",),) * 2
    assert "matryoshka_batchtopk" in registry.architectures_taking("k")[1]
    batch = 128
    estimate = estimate_training_memory(D_IN, N, batch, k=K, architecture="matryoshka_batchtopk")
    assert estimate.parts["batch_by_latent_buffers"] == 2 * batch * N * 4
    assert estimate.parts["sparse_codes"] == 2 * batch * K * (4 + 8)
    tc = Transcoder(D_IN, N, D_OUT, k=K, architecture="matryoshka_batchtopk", matryoshka_widths=[8, N])
    assert type(tc) is MatryoshkaBatchTopKSAE and tc.transcoder and tc.matryoshka_widths == (8, N)


def test_save_and_load_keep_widths_threshold_and_prefixes(tmp_path):
    sae = random_matryoshka(fresh_seed())
    x = torch.randn(29, D_IN, dtype=torch.float64)
    sae(x)
    sae.save(tmp_path)
    assert json.loads((tmp_path / "cfg.json").read_text())["matryoshka_widths"] == list(WIDTHS)
    assert "group_starts" not in load_file(str(tmp_path / "sae.safetensors"))
    loaded = sparsekit.load(tmp_path)
    assert type(loaded) is MatryoshkaBatchTopKSAE and loaded.matryoshka_widths == WIDTHS
    torch.testing.assert_close(loaded.threshold, sae.threshold)
    torch.testing.assert_close(loaded.prefix_reconstructions(x), sae.prefix_reconstructions(x))
    config = json.loads((tmp_path / "cfg.json").read_text())
    config["matryoshka_widths"] = [4, 13]
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="matryoshka_widths must end at n_latents=40, got \\[4, 13\\]"):
        sparsekit.load(tmp_path)


@pytest.mark.parametrize("transcoder", [False, True])
def test_saelens_export_is_jumprelu_with_the_global_threshold(tmp_path, transcoder):
    sae = random_matryoshka(fresh_seed(), "transcoder" if transcoder else "sae")
    x = torch.randn(29, D_IN, dtype=torch.float64)
    sae(x, torch.randn(29, D_OUT, dtype=torch.float64) if transcoder else None)
    sae.eval().export_saelens(tmp_path, hook_name="blocks.2.hook_resid_post")
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == ("jumprelu_transcoder" if transcoder else "jumprelu")
    weights = load_file(str(tmp_path / "sae_weights.safetensors"))
    assert torch.equal(weights["threshold"], torch.full((N,), float(sae.threshold), dtype=torch.float64))
    back = sparsekit.load_saelens(tmp_path)
    torch.testing.assert_close(back.reconstruct(x), sae.reconstruct(x), rtol=1e-10, atol=1e-10)


def test_saelens_training_save_imports_with_its_widths_and_the_same_prefix_losses(tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    from sae_lens.saes.sae import TrainStepInput
    seed = fresh_seed()
    cfg = sae_lens.MatryoshkaBatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=N, k=K, matryoshka_widths=list(WIDTHS),
                                                       dtype="float64")
    lens = sae_lens.MatryoshkaBatchTopKTrainingSAE(cfg)  # rescale_acts_by_decoder_norm=True by default
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in lens.parameters():
            param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float64))
        lens.topk_threshold.fill_(0.6)
    lens.save_model(tmp_path / "training")
    lens.save_inference_model(tmp_path / "inference")
    sae = sparsekit.load_saelens(tmp_path / "training")
    assert type(sae) is MatryoshkaBatchTopKSAE and (sae.k, sae.matryoshka_widths) == (K, WIDTHS)
    assert float(sae.threshold) == 0.6
    x = 2.0 * torch.randn(37, D_IN, generator=gen, dtype=torch.float64) + 0.5
    inference = sae_lens.SAE.load_from_disk(str(tmp_path / "inference")).eval()
    with torch.no_grad():
        torch.testing.assert_close(sae.reconstruct(x), inference(x), rtol=1e-10, atol=1e-10)
        theirs = lens.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=None,
                                                           n_training_steps=0, is_logging_step=False))
        ours = sae.train()(x)
    torch.testing.assert_close(ours.losses["mse"], theirs.losses["mse_loss"], rtol=1e-10, atol=1e-10)
    for m in WIDTHS[:-1]:
        torch.testing.assert_close(ours.losses[f"mse_prefix_{m}"], theirs.losses[f"inner_mse_loss_{m}"],
                                   rtol=1e-10, atol=1e-10)


def prefix_fvus(sae, x) -> list[float]:
    """Each prefix's fraction of variance unexplained on x [B, d], through the inference path."""
    variance = (x - x.mean(0)).pow(2).sum()
    return [float((prefix - x).pow(2).sum() / variance) for prefix in sae.prefix_reconstructions(x)]


def test_trained_on_planted_features_every_prefix_reconstructs_better_the_wider_it_is():
    data = SuperpositionData(n_true=64, d=24, p_active=0.04, seed=0)
    x, _ = data.sample(30_000, torch.Generator().manual_seed(1))
    held_out, _ = data.sample(4096, torch.Generator().manual_seed(2))
    cfg = sparsekit.TrainConfig(batch_size=256, lr=3e-3, total_tokens=256 * 300, eval_tokens=2048, log_every=50,
                                progress=False, seed=0, dead_strategy="auxk", dead_window_tokens=256 * 50)
    widths = (8, 32, 96)
    sae = MatryoshkaBatchTopKSAE(24, 96, k=4, matryoshka_widths=widths)
    result = sparsekit.train(sae, x, cfg)
    assert {"mse_prefix_8", "mse_prefix_32"} <= set(result.history[-1])
    fvus = prefix_fvus(sae, held_out)
    assert fvus[0] > fvus[1] > fvus[2], fvus
    assert fvus[0] < 1, fvus  # the first 8 latents alone already explain part of the variance
    # Plain BatchTopK, trained alike, gives its first latents no reason to work alone.
    plain = BatchTopKSAE(24, 96, k=4)
    sparsekit.train(plain, x, cfg)
    as_matryoshka = MatryoshkaBatchTopKSAE(24, 96, k=4, matryoshka_widths=widths, seed=None).eval()
    as_matryoshka.load_state_dict(plain.state_dict())
    as_matryoshka.input_scale, as_matryoshka.output_scale = plain.input_scale, plain.output_scale
    plain_fvus = prefix_fvus(as_matryoshka, held_out)
    assert fvus[0] < plain_fvus[0], (fvus, plain_fvus)


def test_the_cli_trains_it_from_comma_separated_widths(tmp_path, capsys):
    from sparsekit.cli.train import main
    x = torch.randn(1024, 8, generator=torch.Generator().manual_seed(fresh_seed())).numpy()
    np.save(tmp_path / "x.npy", x)
    args = ["--data", tmp_path / "x.npy", "--architecture", "matryoshka_batchtopk", "--n-latents", 32, "--k", 4,
            "--matryoshka-widths", "8,16,32", "--batch-size", 128, "--total-tokens", 1024, "--eval-tokens", 128,
            "--no-progress", "--device", "cpu", "--out", tmp_path / "out"]
    try:
        main([str(a) for a in args])
    except SystemExit as stop:
        assert stop.code == 0, capsys.readouterr().err
    loaded = sparsekit.load(tmp_path / "out")
    assert type(loaded) is MatryoshkaBatchTopKSAE and loaded.matryoshka_widths == (8, 16, 32)
