"""`sparsekit train --model/--dataset`: from a model folder and a text dataset to a trained, evaluated
dictionary, end to end on a tiny random Llama written here (with its own word-level tokenizer, no
network), over .txt, .jsonl, .parquet and datasets folders; the splice metrics with forward hooks;
the summary's warnings. Bad input: tests/cli/test_cli_train.py's table (BAD_INPUTS)."""
import json
import random

import pytest
import torch
from helpers.lm_cases import axis_dictionary
from tiny_lm import make_tiny_lm

import sparsekit
from sparsekit.cli import train_lm
from sparsekit.cli.train import run

transformers = pytest.importorskip("transformers")

WORDS = ("the cat sat on a mat while dog ran to big small red blue park fast slow and then it was "
         "very happy sad old new").split()
QUICK = ["--n-latents", "32", "--k", "4", "--context-len", "16", "--eval-contexts", "4", "--batch-size", "64",
         "--total-tokens", "640", "--eval-tokens", "64", "--lr", "3e-3", "--device", "cpu", "--no-progress"]


def documents(n, seed):
    gen = random.Random(seed)
    return [" ".join(gen.choice(WORDS) for _ in range(gen.randint(10, 40))) for _ in range(n)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model folder and the same 60 documents in every dataset format."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("lm")
    docs = documents(60, seed=int(torch.randint(0, 10 ** 6, ())))
    make_tiny_lm(root / "model", " ".join(WORDS), random_norms=True)
    (root / "txt").mkdir()
    for i, doc in enumerate(docs):
        (root / "txt" / f"{i:03d}.txt").write_text(doc)
    (root / "lines.txt").write_text("\n".join(docs))
    (root / "d.jsonl").write_text("".join(json.dumps({"body": doc}) + "\n" for doc in docs))
    pq.write_table(pa.table({"body": docs}), root / "d.parquet")
    datasets.Dataset.from_dict({"body": docs}).save_to_disk(str(root / "saved"))
    return root


@pytest.mark.parametrize("dataset, extra", [
    ("txt", []), ("lines.txt", ["--document-per-line"]), ("d.jsonl", ["--text-field", "body"]),
    ("d.parquet", ["--text-field", "body"]), ("saved", ["--text-field", "body"]),
])
def test_one_command_trains_evaluates_and_writes_the_run_folder(world, tmp_path, capsys, dataset, extra):
    out = tmp_path / "run"
    result, folder = run(["--model", str(world / "model"), "--dataset", str(world / dataset), "--hook",
                          "model.layers.1", "--out", str(out), *QUICK, *extra])
    assert folder == out
    assert {"cfg.json", "sae.safetensors", "metrics.json", "metrics.jsonl"} <= {p.name for p in out.iterdir()}
    loaded = sparsekit.load(out)
    assert (loaded.d_in, loaded.n_latents) == (32, 32)
    assert loaded.metadata["hook"] == "model.layers.1" and loaded.metadata["dataset"]["paths"] == [str(world / dataset)]
    record = json.loads((out / "metrics.json").read_text())
    evaluation = record["evaluation"]
    assert record["dataset"]["paths"] == [str(world / dataset)] and record["special_ids"]
    assert 0 <= evaluation["fvu"] < 1 and evaluation["explained_variance"] == pytest.approx(1 - evaluation["fvu"])
    assert evaluation["l0"] == pytest.approx(4) and evaluation["contexts"] == 4
    assert evaluation["ce_recovered"] == pytest.approx(sparsekit.loss_recovered(
        evaluation["ce_clean"], evaluation["ce_splice"], evaluation["ce_zero"]))
    assert evaluation["kl"] > 0 and evaluation["kl_zero"] > 0  # a random model: zero-ablating may even help
    assert evaluation["tokens"] <= 4 * 15  # EOS between documents is dropped
    meta = result.sae.metadata
    assert meta["model"] == str(world / "model") and meta["hook"] == "model.layers.1" and meta["input_hook"] is None
    assert meta["context_len"] == 16 and meta["exclude_special_tokens"] is True
    assert meta["dataset"]["text_field"] == ("body" if "--text-field" in extra else "text")
    printed = capsys.readouterr().out
    assert "trained a topk SAE on" in printed and f"FVU {evaluation['fvu']:.4f}" in printed
    assert "CE loss recovered" in printed


def test_transcoder_from_a_module_input_cached_as_bfloat16_shards(world, tmp_path):
    result, out = run(["--model", str(world / "model"), "--dataset", str(world / "txt"), "--input-hook",
                       "model.layers.0.mlp:input", "--hook", "model.layers.0.mlp", "--cache", str(tmp_path / "cache"),
                       "--cache-dtype", "bfloat16", "--out", str(tmp_path / "run"), *QUICK])
    assert result.sae.transcoder and (result.sae.d_in, result.sae.d_out) == (32, 32)
    assert {p.suffix for p in (tmp_path / "cache").iterdir()} == {".json", ".safetensors"}
    assert result.sae.metadata["input_hook"] == "model.layers.0.mlp:input"
    # the held-out FVU, recomputed here from the first 4 contexts of the same text
    from sparsekit.activations import HFModuleSource
    from sparsekit.activations.datasets import TextDataset, iter_contexts, take_contexts
    from sparsekit.activations.text import special_token_ids

    model = transformers.AutoModelForCausalLM.from_pretrained(world / "model", local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(world / "model", local_files_only=True)
    held_out = take_contexts(iter_contexts(TextDataset(world / "txt"), tokenizer, 16), count=4)
    x, y = next(iter(HFModuleSource(model, held_out, "model.layers.0.mlp:input", target="model.layers.0.mlp",
                                    batch_contexts=4, special_ids=special_token_ids(tokenizer))))
    with torch.no_grad():
        error = (sparsekit.load(out).reconstruct(x).double() - y.double()).pow(2).sum()
    fvu = float(error / (y.double() - y.double().mean(0)).pow(2).sum())
    evaluation = json.loads((out / "metrics.json").read_text())["evaluation"]
    assert evaluation["tokens"] == x.shape[0] and evaluation["fvu"] == pytest.approx(fvu, rel=1e-4)
    assert "ce_recovered" in evaluation


def test_no_exclude_special_tokens_keeps_the_document_separators(world, tmp_path):
    base = ["--model", str(world / "model"), "--dataset", str(world / "txt"), "--hook", "model.layers.0", *QUICK]
    _, kept = run(base + ["--out", str(tmp_path / "a"), "--no-exclude-special-tokens"])
    _, dropped = run(base + ["--out", str(tmp_path / "b")])
    with_specials = json.loads((kept / "metrics.json").read_text())
    without = json.loads((dropped / "metrics.json").read_text())
    assert with_specials["evaluation"]["tokens"] == 4 * 15 > without["evaluation"]["tokens"]
    assert with_specials["exclude_special_tokens"] is False and with_specials["special_ids"] == []


def identity_sae(d):
    """relu(x) - relu(-x) = x exactly: splicing it in changes nothing."""
    return axis_dictionary(d)


@pytest.mark.parametrize("hook", ["model.layers.0.mlp", "model.layers.1:input"])
def test_hf_splice_of_an_exact_dictionary_recovers_all_the_loss(world, hook):
    model = transformers.AutoModelForCausalLM.from_pretrained(world / "model", local_files_only=True).eval()
    tokens = torch.randint(4, model.config.vocab_size, (6, 12))
    tokens[:, 0] = 2
    metrics = train_lm.hf_splice_metrics(model, tokens, identity_sae(32), hook, special_ids=(0, 1, 2, 3))
    assert metrics["ce_splice"] == pytest.approx(metrics["ce_clean"], abs=1e-6)
    assert metrics["kl"] == pytest.approx(0, abs=1e-8) and metrics["kl_zero"] > 1e-4
    assert metrics["ce_recovered"] == pytest.approx(1, abs=1e-4)
    noisy = identity_sae(32)
    with torch.no_grad():
        noisy.W_dec.add_(0.5 * torch.randn_like(noisy.W_dec))
    worse = train_lm.hf_splice_metrics(model, tokens, noisy, hook, special_ids=(0, 1, 2, 3))
    assert worse["kl"] > 1e-5 and worse["ce_clean"] == pytest.approx(metrics["ce_clean"])


def test_hf_splice_leaves_special_positions_clean(world):
    model = transformers.AutoModelForCausalLM.from_pretrained(world / "model", local_files_only=True).eval()
    tokens = torch.full((2, 8), 3)  # every position a special token (EOS): nothing is replaced
    tokens[:, 0] = 2
    metrics = train_lm.hf_splice_metrics(model, tokens, sparsekit.TopKSAE(32, 8, k=1), "model.layers.0",
                                         special_ids=(2, 3))
    assert metrics["kl"] == 0 and metrics["kl_zero"] == 0 and metrics["ce_splice"] == metrics["ce_clean"]


def test_summary_warns_when_fvu_is_at_least_1_or_ce_recovered_negative(tmp_path, capsys):
    settings = {"architecture": "topk", "model": "m", "hook": "h", "dataset": ["d"]}
    metrics = {"contexts": 4, "tokens": 60, "fvu": 1.25, "explained_variance": -0.25, "l0": 4.0, "dead_latents": 3,
               "n_latents": 32, "ce_recovered": -0.5, "ce_clean": 3.0, "ce_splice": 5.0, "ce_zero": 4.0, "kl": 1.0,
               "kl_zero": 0.5}
    train_lm._summary(settings, "SAE", tmp_path, metrics, None, {"tokens": 640})
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 2 and "FVU 1.250 >= 1" in warnings[0] and "CE loss recovered -0.500 < 0" in warnings[1]
    train_lm._summary(settings, "SAE", tmp_path, {**metrics, "fvu": 0.2, "ce_recovered": 0.9}, None, {"tokens": 640})
    assert "WARNING" not in capsys.readouterr().out


def test_an_interrupted_run_resumes_to_the_same_dictionary(world, tmp_path):
    import shutil

    base = ["--model", str(world / "model"), "--dataset", str(world / "txt"), "--hook", "model.layers.0", *QUICK,
            "--checkpoint-every-tokens", "320"]
    _, whole = run(base + ["--checkpoint-dir", str(tmp_path / "a"), "--out", str(tmp_path / "whole")])
    first = sorted(p for p in (tmp_path / "a").iterdir() if p.name.startswith("step_"))[0]
    shutil.copytree(first, tmp_path / "b" / first.name)  # as if killed after the first checkpoint
    _, resumed = run(base + ["--checkpoint-dir", str(tmp_path / "b"), "--out", str(tmp_path / "resumed"),
                             "--resume"])
    for name, value in sparsekit.load(whole).state_dict().items():
        assert torch.equal(value, sparsekit.load(resumed).state_dict()[name]), name


def test_a_checkpoint_whose_source_recorded_no_special_ids_resumes_with_position_0_only(tmp_path):
    class Tokenizer:
        all_special_ids, bos_token_id, eos_token_id, pad_token_id = [0, 5], 1, 2, None

    settings = {"exclude_special_tokens": True}
    (tmp_path / "state.json").write_text(json.dumps({"source_state": {"kind": "LMActivationSource"}}))
    assert train_lm.special_ids_for(settings, Tokenizer(), tmp_path) == ()
    (tmp_path / "state.json").write_text(json.dumps({"source_state": {"kind": "LMActivationSource",
                                                                      "special_ids": [0, 1, 2, 5]}}))
    assert train_lm.special_ids_for(settings, Tokenizer(), tmp_path) == (0, 1, 2, 5)
    assert train_lm.special_ids_for(settings, Tokenizer(), None) == (0, 1, 2, 5)
    assert train_lm.special_ids_for({"exclude_special_tokens": False}, Tokenizer(), None) == ()


def test_a_hugging_face_model_gets_the_dashboard_with_contexts_and_logits_from_the_model(world, tmp_path, capsys):
    """The run folder of `--model <HF folder>` holds the feature report and dashboard.html; every number in
    the report is recomputed here from the model itself: codes from layer 0's hidden states at the kept
    positions of the held-out contexts, logit effects as (W_dec * final norm weight) @ lm_head^T."""
    import html

    from sparsekit.activations.datasets import TextDataset, iter_contexts, take_contexts
    from sparsekit.activations.text import kept_positions, special_token_ids

    out = tmp_path / "run"
    run(["--model", str(world / "model"), "--dataset", str(world / "txt"), "--hook", "model.layers.0", "--out",
         str(out), *QUICK])
    assert {"sae_features.json", "dashboard.html"} <= {p.name for p in out.iterdir()}
    printed = capsys.readouterr().out
    report = json.loads((out / "sae_features.json").read_text())
    census = report["census"]
    assert (f"dashboard: {out / 'dashboard.html'} ({census['reported']} features shown: {census['single_token']} "
            f"single-token, {census['context']} context-dependent; {census['dead']} of 32 never fired") in printed
    evaluation = json.loads((out / "metrics.json").read_text())["evaluation"]

    model = transformers.AutoModelForCausalLM.from_pretrained(world / "model", local_files_only=True).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(world / "model", local_files_only=True)
    sae = sparsekit.load(out)
    held_out = take_contexts(iter_contexts(TextDataset(world / "txt"), tokenizer, 16), count=4)
    keep = kept_positions(held_out, special_token_ids(tokenizer))
    with torch.no_grad():
        hidden = model(held_out, output_hidden_states=True).hidden_states[1]          # layer 0's output
        codes = sae.dense_codes(sae.encode(hidden[keep] * sae.input_scale)).float()   # [kept, n_latents]
        effects = (sae.W_dec * model.model.norm.weight) @ model.lm_head.weight.T       # [n_latents, vocab]
    assert report["model"] == str(world / "model") and report["hook"] == "model.layers.0"
    assert report["tokens"] == codes.shape[0] == evaluation["tokens"]
    assert report["metrics"]["fvu"] == pytest.approx(evaluation["fvu"])
    assert report["features"] and report["census"]["dead"] == int((codes.max(0).values == 0).sum())
    for feature in report["features"]:
        column = codes[:, feature["id"]]
        assert feature["density"] == pytest.approx(float((column > 0).double().mean()))
        assert feature["max_act"] == pytest.approx(float(column.max()), rel=1e-5)
        assert feature["examples"][0]["max_act"] == pytest.approx(float(column.max()), rel=1e-5)
        values, ids = effects[feature["id"]].topk(len(feature["logits"]["promoted"]))
        assert [token for token, _ in feature["logits"]["promoted"]] == [tokenizer.decode([int(i)]) for i in ids]
        assert [v for _, v in feature["logits"]["promoted"]] == pytest.approx(values.tolist(), rel=1e-5)

    page = (out / "dashboard.html").read_text()
    sections = page.split('<section class="feature" ')[1:]
    assert len(sections) == len(report["features"])
    first = report["features"][0]
    assert sections[0].startswith(f'id="f-sae-{first["id"]}">')                       # the landing page shows it
    assert all(' hidden>' in s.split("<h2>")[0] for s in sections[1:])
    for feature, section in zip(report["features"], sections):
        for example in feature["examples"]:
            assert all(html.escape(token) in section for token in example["tokens"])    # the contexts
        for token, _ in feature["logits"]["promoted"] + feature["logits"]["suppressed"]:
            assert html.escape(repr(token)) in section                                    # the logit tokens
    assert "<eos>" not in page and "<bos>" not in page                                  # token text is escaped
    assert f"{evaluation['fvu']:.3f}" in page[:page.index('<section class="feature"')]  # the summary row
