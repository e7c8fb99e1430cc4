"""The MNIST study end to end at a tiny size (report, summary, CSV, resumable cells), its pieces
(grid, error curves, dead-latent study, claims), and the `sparsekit mnist` command's bad flags."""
import csv
import json
from pathlib import Path

import pytest

from sparsekit import cli
from sparsekit.activations.mnist import default_cache_dir, load_mnist
from sparsekit.analysis.mnist_report import write_report
from sparsekit.studies import mnist_scan, mnist_study
from sparsekit.studies.mnist_scan import CSV_COLUMNS, METHODS, ScanGrid
from sparsekit.toys.mnist_mlp import MLPConfig, train_mlp

TINY = ScanGrid(sizes=(16, 32, 64), ks=(2, 4, 8), l1_coeffs=(1.0, 3.0, 10.0), steps=40, batch_size=256,
                dead_window_tokens=2560)


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    """One tiny study (16-unit MLP, 1 epoch; 20 dictionaries of 40 steps) in a fresh cache."""
    load_mnist("train"), load_mnist("test")
    cache = tmp_path_factory.mktemp("cache")
    (cache / "mnist").symlink_to(default_cache_dir() / "mnist", target_is_directory=True)
    out = tmp_path_factory.mktemp("study")
    config = mnist_study.StudyConfig(mlp=MLPConfig(hidden=16, epochs=1), grid=TINY, out=str(out), progress=False,
                                     cache_dir=str(cache), top_images=4)
    return config, mnist_study.run_study(config)


def test_grid_has_a_size_sweep_and_a_sparsity_sweep_per_method():
    cells = TINY.cells()
    for method in METHODS:
        mine = [(n, s) for m, n, s in cells if m == method]
        headline = TINY.headline(method)
        assert [n for n, s in mine if s == headline] == [16, 32, 64]
        assert sorted(s for n, s in mine if n == 64) == sorted(TINY.settings(method))
    assert len(cells) == 4 * 5
    assert all(s <= n for m, n, s in ScanGrid(sizes=(4, 64), ks=(2, 8)).cells() if METHODS[m][2] == "k")
    with pytest.raises(ValueError, match="methods"):
        ScanGrid(methods=("relu", "topk_auxk"))


def test_tiny_study_writes_report_summary_and_csv(tiny_study):
    config, summary = tiny_study
    out = config.out
    assert 0.85 < summary["mlp"]["accuracy"] < 1 and summary["mlp"]["acc_zero_ablated"] < 0.3
    assert set(summary["methods"]) == set(METHODS)
    for method, m in summary["methods"].items():
        assert {"fvu", "l0", "dead_frac", "acc_recovered", "template_score"} <= set(m)
        assert 0 < m["fvu"] < 1.5 and m["l0"] > 0 and 0 <= m["dead_frac"] <= 1
        assert m["acc_recovered"] <= 1.0 + 1e-9 and sum(m["features_per_digit"]) <= m["n_latents"]
    assert summary["methods"]["topk_auxk"]["l0"] <= 4 + 1e-9  # k = 4, the headline
    assert summary["template_score"] == summary["methods"][summary["template_score_method"]]["template_score"]
    assert isinstance(summary["elbow"]["found"], bool) and summary["elbow"]["verdict"]
    assert {c["verdict"] for c in summary["claims"]} <= {"held", "did not hold", "partly", "not testable"}
    assert len(summary["claims"]) == 5
    out_path = Path(out)
    assert json.loads((out_path / "summary.json").read_text()) == summary
    with open(out_path / "scan.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(TINY.cells()) and tuple(rows[0]) == CSV_COLUMNS
    report = (out_path / "report.html").read_text()
    assert report.count('src="data:image/png;base64,') >= 6 and "http://" not in report and "<script" not in report
    for claim in summary["claims"]:
        assert claim["verdict"] in report


def test_scan_resumes_without_retraining_and_report_escapes_data(tiny_study, tmp_path, monkeypatch):
    config, summary = tiny_study
    out = Path(config.out)
    model, accuracy = train_mlp(config.mlp, progress=False, cache_dir=config.cache_dir)  # cached: no training
    data = mnist_study.layer_data(model, accuracy, 0, config.mlp.key(), config.cache_dir)

    def must_not_train(*args, **kwargs):
        raise AssertionError("a finished cell was trained again")

    run_cell = mnist_scan.run_cell
    monkeypatch.setattr(mnist_scan, "run_cell", must_not_train)
    again = mnist_scan.run_scan(TINY, data, out, progress=False)
    assert len(again) == len(TINY.cells())
    headline = [r for r in again if r["method"] == "topk_auxk" and r["n_latents"] == 64 and r["sparsity"] == 4][0]
    assert headline["fvu"] == summary["methods"]["topk_auxk"]["fvu"]
    # An interrupted scan (one result missing) trains exactly that cell.
    (out / "cells" / headline["cell"] / "result.json").unlink()
    trained = []
    monkeypatch.setattr(mnist_scan, "run_cell", lambda *args, **kw: trained.append(args[2:5]) or run_cell(*args, **kw))
    mnist_scan.run_scan(TINY, data, out, progress=False)
    assert trained == [("topk_auxk", 64, 4)]
    rows = list(csv.DictReader(open(out / "scan.csv")))
    rows = [{**r, "fvu": float(r["fvu"]), "l0": float(r["l0"])} for r in rows]
    evil = dict(summary, claims=[{"claim": "<script>alert(1)</script>", "verdict": "held", "evidence": "a & b"}])
    curves = mnist_study.error_curves(rows, TINY)
    # an empty gallery: the feature analysis (None here) is never read
    rows[0]["fvu"] = 1.5  # a cell worse than trivial is flagged, the rest are not
    write_report(tmp_path / "r.html", evil, rows, curves, {"topk_auxk": [1] * 10}, None, [])
    text = (tmp_path / "r.html").read_text()
    assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text and "a &amp; b" in text
    assert text.count("FVU 1.500 &gt;= 1") == 1 and '<td class="not-held text">FVU 1.500 &gt;= 1</td>' in text
    assert f"1 of {len(rows)} cells are worse than trivial" in text


def test_dead_latent_study_and_claims_follow_their_rules():
    rows = [{"method": "relu_resample", "sparsity": 3.0, "n_latents": n, "dead_frac": d, "alive": round(n * (1 - d)),
             "fvu": f, "l0": 5.0} for n, d, f in ((32, 0.0, 0.4), (128, 0.1, 0.2), (512, 0.3, 0.1))]
    rows += [{"method": "relu_ghost", "sparsity": 3.0, "n_latents": n, "dead_frac": d, "alive": round(n * (1 - d)),
              "fvu": f, "l0": 5.0} for n, d, f in ((32, 0.5, 0.5), (128, 0.0, 0.3), (512, 0.5, 0.05))]
    grid = ScanGrid(sizes=(32, 128, 512), methods=("relu_resample", "relu_ghost"), l1_coeffs=(1.0, 3.0, 10.0))
    dead = mnist_study.dead_latent_study(rows, grid)
    assert dead["resample_dead_grows"] is True and dead["resample_dead_vs_size_spearman"] == pytest.approx(1.0)
    ghost_256 = [r for r in dead["equal_alive"] if r["alive"] == 256][0]  # resample's FVU between alive 115 and 358
    assert 0.1 < ghost_256["fvu_resample"] < 0.2
    assert [r["alive"] for r in dead["equal_alive"]] == [128, 256]  # ghost's 16 is below resample's range
    features = {"relu_resample": {"median_purity": 0.9, "per_digit": [2] * 10, "template_score": 0.8},
                "relu_ghost": {"median_purity": 0.5, "per_digit": [2] * 10, "template_score": 0.05}}
    elbows = mnist_study.elbow_analysis(mnist_study.error_curves(rows, grid))
    claims = {c["claim"].split()[0] + c["claim"].split()[1]: c["verdict"]
              for c in mnist_study.evaluate_claims(64, rows, elbows, dead, features)}
    assert claims["Featureslook"] == "partly" and claims["Logitweights"] == "partly"
    assert claims["Lowerror"] == "held"  # the FVU <= 0.1 cells have n = 512 = 8 x 64
    assert claims["Underresampling"] == "held"
    flat = [dict(r, dead_frac=0.2) for r in rows]
    assert mnist_study.dead_latent_study(flat, grid)["resample_dead_grows"] is None  # constant: no rank correlation


@pytest.mark.parametrize("args, message", [
    (("mnist", "--scan", "huge"), "argument --scan: invalid choice"),
    (("mnist", "--hidden", "0"), "argument --hidden: expected a positive int, got 0"),
    (("mnist", "--depth", "2", "--layer", "2"), "--layer: 2 is not a hidden layer of a depth-2 MLP"),
    (("mnist", "--seed", "-1"), "--seed: expected a non-negative int"),
    (("demo", "--steps", "x"), "argument --steps: invalid positive value: 'x'"),
])
def test_mnist_cli_bad_flags_give_one_line_and_exit_2(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(list(args))
    captured = capsys.readouterr()
    assert exit_info.value.code == 2 and message in captured.err, captured.err
    assert len(captured.err.strip().splitlines()) == 1 and captured.out == ""
