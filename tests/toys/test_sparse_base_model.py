"""Sparse-regularised base models: the model and its cut residual, the L1 penalty, training, caching,
the facet / disambiguation / magnitude-code analyses on planted data, the report and the CLI."""
import json
import math

import pytest
import torch
from helpers.seeds import fresh_seed

from sparsekit.cli.toys import main as toys_main
from sparsekit.toys.sparse_base_analysis import (
    adjusted_rand_index,
    facet_predictability,
    facets,
    jensen_shannon,
    kmeans,
    magnitude_bands,
    magnitude_code_score,
    silhouette,
)
from sparsekit.toys.sparse_base_model import (
    HOOK_POST,
    SparseBaseConfig,
    SparseBaseModel,
    build_model,
    build_vocabulary,
    decode,
    encode,
    evaluate,
    loss_terms,
    train_model,
    train_sparse_base,
)
from sparsekit.toys.sparse_base_neurons import analyse_model, collect, logits_from_mlp
from sparsekit.toys.sparse_base_report import shown, write_report

TINY = dict(d_model=16, n_heads=2, d_mlp=32, n_ctx=16, batch_size=8, warmup_steps=5)
VOCAB = 12



pytestmark = pytest.mark.usefixtures("one_thread")


def counting_contexts(n: int, n_ctx: int, seed: int) -> torch.Tensor:
    """BOS then t, t+1, t+2, ... (mod VOCAB - 2, shifted past BOS/UNK) from random starts: learnable."""
    starts = torch.randint(VOCAB - 2, (n, 1), generator=torch.Generator().manual_seed(seed))
    body = (starts + torch.arange(n_ctx - 1)) % (VOCAB - 2) + 2
    return torch.cat([torch.zeros(n, 1, dtype=torch.int64), body], 1)


def test_vocabulary_encode_decode_and_model_shapes():
    vocabulary = build_vocabulary("abracadabra!~", min_count=2)
    assert vocabulary == ["<bos>", "<unk>", "a", "b", "r"]
    ids = encode("abc", vocabulary)
    assert ids.tolist() == [2, 3, 1] and decode(torch.tensor([0, 2, 4, 1]), vocabulary) == "⟨ar�"
    for variant in ("standard", "cut"):
        cfg = SparseBaseConfig(variant=variant, tokens=1024, seed=fresh_seed(), **TINY)
        model = build_model(cfg, VOCAB)
        tokens = counting_contexts(3, 16, fresh_seed())
        logits, cache = model.run_with_cache(tokens)
        assert logits.shape == (3, 16, VOCAB) and cache[HOOK_POST].shape == (3, 16, 32)
        ce, l1 = loss_terms(model, tokens)
        assert ce.dim() == 0 and l1.dim() == 0 and l1.item() == pytest.approx(cache[HOOK_POST].sum(-1).mean().item(), rel=1e-5)


def test_cut_residual_replaces_the_residual_stream():
    seed = fresh_seed()
    cut = build_model(SparseBaseConfig(variant="cut", tokens=1024, seed=seed, **TINY), VOCAB)
    standard = build_model(SparseBaseConfig(variant="standard", tokens=1024, seed=seed, **TINY), VOCAB)
    assert all(torch.equal(a, b) for a, b in zip(cut.state_dict().values(), standard.state_dict().values()))
    tokens = counting_contexts(4, 16, fresh_seed())
    with torch.no_grad():
        logits, cache = cut.run_with_cache(tokens)
        mlp = cut.blocks[0].mlp
        direct_mlp_out = cache[HOOK_POST] @ mlp.W_out + mlp.b_out
        direct = cut.unembed(cut.ln_final(direct_mlp_out))
        torch.testing.assert_close(logits, direct, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache["blocks.0.hook_resid_post"], direct_mlp_out)
        torch.testing.assert_close(cut(tokens), logits)  # a plain forward is cut too
        standard_logits, standard_cache = standard.run_with_cache(tokens)
        with_residual = standard.unembed(standard.ln_final(standard_cache["blocks.0.hook_resid_mid"] + direct_mlp_out))
        torch.testing.assert_close(standard_logits, with_residual, rtol=1e-5, atol=1e-5)
        assert (standard_logits - logits).abs().max() > 1e-2
        for model, model_cache, model_logits, variant in ((cut, cache, logits, "cut"),
                                                          (standard, standard_cache, standard_logits, "standard")):
            trained = SparseBaseModel(model, [str(i) for i in range(VOCAB)], SparseBaseConfig(variant=variant, **TINY),
                                      {}, tokens)
            positionwise = logits_from_mlp(trained, model_cache["blocks.0.hook_resid_mid"].reshape(-1, 16),
                                           model_cache[HOOK_POST].reshape(-1, 32))
            torch.testing.assert_close(positionwise, model_logits.reshape(-1, VOCAB), rtol=1e-5, atol=1e-5)


def test_training_lowers_the_loss_and_the_l1_penalty_lowers_activations():
    contexts = counting_contexts(512, 16, seed=7)
    held = counting_contexts(64, 16, seed=8)
    metrics = {}
    for l1 in (0.0, 0.05):
        cfg = SparseBaseConfig(l1=l1, tokens=8 * 16 * 120, lr=1e-2, seed=3, **TINY)
        model, history = train_model(cfg, contexts, VOCAB, progress=False)
        metrics[l1] = evaluate(model, held)
        assert history["ce"][-1] < 0.6 * history["ce"][0]
        assert metrics[l1]["ce"] < 0.6 * math.log(VOCAB)
    assert metrics[0.05]["l1"] < 0.5 * metrics[0.0]["l1"]
    assert metrics[0.05]["l0"] < metrics[0.0]["l0"]


def test_training_is_cached_deterministic_and_round_trips(tmp_path):
    cfg = SparseBaseConfig(tokens=8 * 16 * 6, seed=fresh_seed() % 1000, **TINY)
    first = train_sparse_base(cfg, progress=False, cache_dir=tmp_path / "a")
    files = sorted(p.name for p in (tmp_path / "a" / "sparse_base").iterdir())
    assert files == [f"{cfg.key()}.json", f"{cfg.key()}.safetensors"]
    loaded = train_sparse_base(cfg, progress=False, cache_dir=tmp_path / "a")
    again = train_sparse_base(cfg, progress=False, cache_dir=tmp_path / "b")
    for other in (loaded, again):
        for (name, a), b in zip(first.model.state_dict().items(), other.model.state_dict().values()):
            assert torch.equal(a, b), name
    assert loaded.record["history"] == first.record["history"] and loaded.vocabulary == first.vocabulary
    tokens = first.held_out[:2]
    torch.testing.assert_close(loaded.model(tokens), first.model(tokens), rtol=0, atol=0)
    sidecar = tmp_path / "a" / "sparse_base" / f"{cfg.key()}.json"
    record = json.loads(sidecar.read_text())
    record["config"]["l1"] = 123.0
    sidecar.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="does not match"):
        train_sparse_base(cfg, progress=False, cache_dir=tmp_path / "a")


def test_config_rejects_bad_values_by_name():
    for bad, match in ((dict(variant="half"), "variant"), (dict(l1=-1.0), "l1"), (dict(d_model=30, n_heads=4), "d_model=30"),
                       (dict(tokens=10), "tokens=10"), (dict(seed=-1), "seed")):
        with pytest.raises(ValueError, match=match):
            SparseBaseConfig(**bad)


def planted_directions(k: int, per: int, d: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.linalg.qr(torch.randn(d, k, generator=gen))[0].T  # k orthonormal directions
    labels = torch.arange(k).repeat_interleave(per)
    x = centres[labels] + noise * torch.randn(k * per, d, generator=gen) / math.sqrt(d)
    return x / x.norm(dim=1, keepdim=True), labels


def test_facets_recover_planted_facets_and_find_one_in_a_single_blob():
    # A rate over fixed draws, not one fresh draw: the selection of k is statistical, and a fresh
    # seed failed one run in ~60 (seed 12 here picks k=4: 59 of seeds 0-59 recover all three).
    recovered = 0
    for seed in range(40):
        x, truth = planted_directions(3, 120, 32, noise=0.5, seed=seed)
        found = facets(x, k_max=5, seed=seed)
        recovered += found["k"] == 3 and adjusted_rand_index(found["labels"], truth) > 0.95
    assert recovered >= 37, f"{recovered} of 40 planted 3-facet draws recovered"
    for seed in range(10):
        blob = torch.randn(300, 64, generator=torch.Generator().manual_seed(seed))
        assert facets(blob)["k"] == 1, seed


def test_silhouette_and_ari_match_direct_computations():
    gen = torch.Generator().manual_seed(fresh_seed())
    x, labels = torch.randn(30, 3, generator=gen), torch.randint(3, (30,), generator=gen)
    labels[:3] = torch.arange(3)
    direct = []
    for i in range(30):
        d = (x - x[i]).norm(dim=1)
        own = labels == labels[i]
        a = d[own].sum() / (own.sum() - 1) if own.sum() > 1 else None
        b = min(d[labels == c].mean() for c in labels.unique() if c != labels[i])
        direct.append(0.0 if a is None else float((b - a) / max(a, b)))
    assert silhouette(x, labels) == pytest.approx(sum(direct) / 30, abs=1e-6)
    permuted = (labels + 1) % 3
    assert adjusted_rand_index(labels, permuted) == pytest.approx(1.0)
    big = torch.randint(4, (4000,), generator=gen)
    assert abs(adjusted_rand_index(big, torch.randint(4, (4000,), generator=gen))) < 0.02
    lab, cent = kmeans(torch.tensor([[0.0], [0.1], [10.0], [10.2]]), 2)
    assert lab[0] == lab[1] != lab[2] == lab[3]


def test_other_neurons_predict_facets_only_when_they_carry_them():
    gen = torch.Generator().manual_seed(fresh_seed())
    labels = torch.randint(3, (600,), generator=gen)
    # Noise 0.2 on a one-hot code: the best classifier errs on ~0.04% of rows; over 300 seeds the ridge
    # scored >= 0.99 (at 0.3 it fell to 0.9496 once in 300: this test failed on a fresh seed).
    informative = torch.nn.functional.one_hot(labels, 3).float() + 0.2 * torch.randn(600, 3, generator=gen)
    noise = torch.randn(600, 20, generator=gen)
    assert facet_predictability(torch.cat([informative, noise], 1), labels) > 0.95
    assert facet_predictability(noise, labels) < 0.5


def test_magnitude_code_is_high_for_a_planted_magnitude_code_and_near_zero_without_one():
    gen = torch.Generator().manual_seed(fresh_seed())
    a = torch.rand(900, generator=gen)
    bands = magnitude_bands(a, 3)
    assert torch.bincount(bands).tolist() == [300, 300, 300] and a[bands == 0].max() < a[bands == 1].min()
    coded = 0.9 * torch.nn.functional.one_hot(bands * 2, 8).float() + 0.1 / 8  # weak -> token 0, mid -> 2, strong -> 4
    result = magnitude_code_score(a, coded, 3, seed=fresh_seed() % 1000)
    assert result["score"] > 0.7 and result["top_token_disagreement"] == 1.0
    same = torch.distributions.Dirichlet(torch.ones(8)).sample((900,)) * 0.4
    same[:, 5] += 0.6  # every band predicts token 5 first, whatever the magnitude
    flat = magnitude_code_score(a, same, 3, seed=fresh_seed() % 1000)
    assert abs(flat["score"]) < 0.02 and flat["top_token_disagreement"] == 0.0
    assert jensen_shannon(torch.eye(4)) == pytest.approx(2.0) and jensen_shannon(same[[0, 0]]) == pytest.approx(0.0, abs=1e-12)


def test_report_escapes_text_from_the_data():
    assert shown("<b>|`x&\n") == "&lt;b&gt;&#124;&#96;x&amp;⏎" and shown("\n") == "⏎" and shown(" ") == "␣"


def test_analysis_and_report_on_a_tiny_trained_model(tmp_path):
    cfg = SparseBaseConfig(tokens=8 * 16 * 40, l1=1e-3, seed=1, **TINY)
    trained = train_sparse_base(cfg, progress=False, cache_dir=tmp_path / "cache")
    data = collect(trained, max_contexts=40)
    assert data["post"].shape == (40 * 15, 32) and data["probs"].shape[1] == len(trained.vocabulary)
    neurons = analyse_model(trained, data, min_fires=20, progress=False)
    assert neurons and all(0 < n["density"] <= 1 and n["residual_facets"] >= 1 for n in neurons)
    summary = write_report(trained, neurons, tmp_path / "out", positions=600, min_fires=20, max_density=1.0, top=3)
    assert summary["aggregates"]["analysed"] == len(neurons)
    assert "## Most polysemantic sparse neurons" in (tmp_path / "out" / "report.md").read_text()


def test_cli_writes_its_files_and_rejects_bad_flags(tmp_path, capsys):
    toys_main(["sparse-base", "--variant", "cut", "--tokens", "4096", "--d-model", "16", "--d-mlp", "32",
               "--contexts", "20", "--min-fires", "5", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out")])
    for name in ("overview.png", "facets.png", "magnitude.png", "report.md", "summary.json"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["config"]["variant"] == "cut" and summary["config"]["tokens"] == 4096
    assert "wrote overview.png" in capsys.readouterr().out
    for bad in (["--variant", "half"], ["--l1", "-1"], ["--tokens", "0"], ["--d-model", "30"], ["--tokenz", "3"]):
        with pytest.raises(SystemExit) as exit_info:
            toys_main(["sparse-base", *bad, "--out", str(tmp_path / "bad")])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "error" in err
    assert not (tmp_path / "bad").exists()
