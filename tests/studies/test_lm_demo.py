"""`sparsekit lm-demo` end to end on a tiny random-weight HookedTransformer and random contexts: each
transcoder kind (mlp, resid, attn), per-layer SAEs from one collection pass, metrics.json, the
dashboard's per-layer summary, and a second run that reuses every cache."""
import json

import pytest
from helpers.lm_cases import random_contexts, tiny_transformer

import sparsekit
from sparsekit.cli import lm as lm_cli
from sparsekit.studies import lm_demo


@pytest.fixture(scope="module")
def tiny():
    return tiny_transformer(n_layers=3, seed=4)


def demo_args(out, *extra):
    return lm_cli.parse(["--out", str(out), "--layer", "1", "--context-len", "16", "--train-tokens", "1500",
                          "--eval-tokens", "240", "--n-latents", "48", "--k", "4", "--batch-size", "128",
                          "--epochs", "2", "--features", "6", *extra])


@pytest.mark.parametrize("kind, hooks", [
    ("mlp", ["blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"]),
    ("resid", ["blocks.0.hook_resid_pre", "blocks.2.hook_resid_pre"]),
    ("attn", ["blocks.1.attn.hook_z", "blocks.1.hook_attn_out"])])
def test_demo_trains_and_evaluates_each_transcoder_kind(tiny, tmp_path, kind, hooks):
    extra = ["--transcoder", kind] + (["--layer", "0", "--resid-offset", "2"] if kind == "resid" else [])
    metrics = lm_demo.run(demo_args(tmp_path, *extra), tiny, random_contexts(150, 16, seed=1))
    assert metrics["hooks"] == hooks
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for name in ("sae", "transcoder"):
        m = saved["dictionaries"][name]
        assert m["tokens"] == 240 and m["l0"] <= 4.0 + 1e-9 and m["ce_zero"] != m["ce_clean"]
        assert m["kl"] < m["kl_zero"]  # trained dictionaries keep more of the clean prediction than zeros
    transcoder = sparsekit.load(tmp_path / "transcoder")
    assert transcoder.transcoder and transcoder.W_enc.shape == (16, 48)
    report = json.loads((tmp_path / "transcoder_features.json").read_text())
    assert (report["hook"], report["output_hook"]) == tuple(hooks)


def test_per_layer_saes_share_one_pass_and_the_dashboard_summarises_them(tiny, tmp_path, monkeypatch):
    contexts = random_contexts(150, 16, seed=2)
    metrics = lm_demo.run(demo_args(tmp_path, "--layers", "2,0", "--layer-site", "hook_mlp_out"), tiny, contexts)
    assert metrics["per_layer_hooks"] == {"layer0": "blocks.0.hook_mlp_out", "layer2": "blocks.2.hook_mlp_out"}
    for name in ("layer0", "layer2"):
        m = metrics["dictionaries"][name]
        assert m["fvu"] < 1.0 and m["kl"] < m["kl_zero"] and 0 <= m["census"]["single_token"] <= m["census"]["reported"]
        assert sparsekit.load(tmp_path / name).W_enc.shape == (16, 48)
    page = (tmp_path / "dashboard.html").read_text()
    summary = page[page.index('<table class="summary">'):]
    summary = summary[:summary.index("</table>")]
    assert summary.count("<tr>") == 5  # header + sae, transcoder, layer0, layer2
    assert "blocks.2.hook_mlp_out" in summary

    # a second run reads every cache: no activations are collected and written again
    import sparsekit.activations.store as store
    monkeypatch.setattr(store, "write_shards", lambda *a, **k: pytest.fail("activations recomputed"))
    again = lm_demo.run(demo_args(tmp_path, "--layers", "0,2", "--layer-site", "hook_mlp_out"), tiny, contexts)
    assert again["dictionaries"]["layer0"]["fvu"] == pytest.approx(metrics["dictionaries"]["layer0"]["fvu"])


def test_bad_demo_arguments_are_refused():
    with pytest.raises(SystemExit):
        lm_cli.parse(["--layers", "a,b"])
    with pytest.raises(SystemExit):
        lm_cli.parse(["--transcoder", "mlp2"])
    with pytest.raises(ValueError, match="resid_offset must be >= 1"):
        lm_demo.transcoder_hooks("resid", 3, 0)


def test_lm_demo_help_names_every_default_and_lists_the_transcoder_hooks():
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-m", "sparsekit", "lm-demo", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0
    assert "see above" not in result.stdout and "(default: 300000)" in result.stdout
    assert "blocks.L.ln2.hook_normalized -> blocks.L.hook_mlp_out" in result.stdout
