"""The attention-superposition phase scan: the quick design runs end to end and writes its files, a
killed scan resumes without redoing finished runs, the design is what it says, and the verdict rule
computes what its docstring states on constructed inputs."""
import csv
import json
import subprocess
import sys

import pytest

from sparsekit.cli.toys import main as toys_main
from sparsekit.studies import attention_phase
from sparsekit.studies.attention_phase import (
    CLASSES,
    KNOBS,
    QUICK,
    PhaseDesign,
    classify,
    coarse_cells,
    judge,
    run_config,
    run_key,
    run_phase,
    verdict,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def quick_scan(tmp_path_factory):
    out = tmp_path_factory.mktemp("phase")
    return out, run_phase(out, QUICK, workers=1, progress=False)


def expected_runs(design: PhaseDesign, refined: int, equal: int) -> int:
    """Coarse: 2 ends x seeds per cell; refinement: every density x seeds x 2 schedules per refined
    cell, less its constant-schedule ends already run; equal OV norms: every density x seeds."""
    cells = len(coarse_cells(design))
    fine = refined * design.seeds * (2 * len(design.densities) - 2)
    return cells * 2 * design.seeds + fine + equal * design.seeds * len(design.densities)


def test_quick_scan_writes_every_run_the_table_the_figure_and_a_verdict(quick_scan):
    out, summary = quick_scan
    lines = (out / "phase.jsonl").read_text().splitlines()
    keys = [json.loads(line)["key"] for line in lines]
    assert len(keys) == len(set(keys)) == summary["runs"] == expected_runs(QUICK, len(summary["refined"]),
                                                                           len(summary["equal_norm"]))
    assert summary["equal_norm"][0] == "base"
    assert (out / "phase.png").stat().st_size > 0
    rows = list(csv.DictReader((out / "phase.csv").open()))
    assert {r["variant"] for r in rows} == {"constant", "cosine", "equal_norm"}
    refined = set(summary["refined"])
    assert {r["cell"] for r in rows if r["variant"] == "cosine"} == refined
    assert {r["cell"] for r in rows if r["variant"] == "equal_norm"} == refined | {"base"}
    assert {float(r["ov_density"]) for r in rows if r["cell"] in refined} == set(QUICK.densities)
    saved = json.loads((out / "phase_summary.json").read_text())
    assert saved["verdict"]["shown"] in (True, False)
    assert sum(saved["verdict"]["classes"].values()) == saved["verdict"]["judged"] == len(saved["judged"])
    assert saved["verdict"]["closest"]["score"] == max(j["score"] for j in saved["judged"])


def test_a_killed_scan_resumes_and_runs_only_what_is_missing(quick_scan, tmp_path, monkeypatch):
    out, summary = quick_scan
    lines = (out / "phase.jsonl").read_text().splitlines()
    kept = 5
    # a scan killed after 5 runs, in the middle of writing the 6th line
    (tmp_path / "phase.jsonl").write_text("\n".join(lines[:kept]) + "\n" + lines[kept][:40])
    calls = []
    real = attention_phase.run_one
    monkeypatch.setattr(attention_phase, "run_one", lambda cfg: calls.append(cfg) or real(cfg))
    resumed = run_phase(tmp_path, QUICK, workers=1, progress=False)
    assert len(calls) == summary["runs"] - kept
    assert {run_key(cfg) for cfg in calls}.isdisjoint(json.loads(line)["key"] for line in lines[:kept])
    assert resumed["verdict"] == summary["verdict"]  # the runs are seeded: resuming changes nothing
    calls.clear()
    run_phase(tmp_path, QUICK, workers=1, progress=False)
    assert calls == []  # a finished scan reruns nothing


def test_records_of_another_toy_version_are_not_reused(quick_scan, monkeypatch):
    out, _ = quick_scan
    done = {json.loads(line)["key"] for line in (out / "phase.jsonl").read_text().splitlines()}
    configs = [run_config(QUICK, cell, d, 0, "constant") for cell in coarse_cells(QUICK) for d in QUICK.densities]
    assert any(run_key(cfg) in done for cfg in configs)
    monkeypatch.setattr(attention_phase, "TOY_VERSION", attention_phase.TOY_VERSION + 1)
    assert not any(run_key(cfg) in done for cfg in configs)  # a rerun into the folder would run them again


def test_coarse_cells_are_base_then_one_factor_at_a_time_then_distinct_seeded_draws():
    design = PhaseDesign()
    cells = coarse_cells(design)
    base = {k: levels[0] for k, levels in KNOBS.items()}
    one_factor = sum(len(levels) - 1 for levels in KNOBS.values())
    assert cells[0] == base and len(cells) == design.coarse_cells
    assert all(sum(c[k] != base[k] for k in KNOBS) == 1 for c in cells[1:1 + one_factor])
    assert all(sum(c[k] != base[k] for k in KNOBS) >= 2 for c in cells[1 + one_factor:])
    assert len({json.dumps(c, sort_keys=True) for c in cells}) == len(cells)
    assert coarse_cells(design) == cells
    assert coarse_cells(PhaseDesign(coarse_cells=12)) == cells[:12]  # a smaller scan reuses the same runs
    assert coarse_cells(PhaseDesign(design_seed=1)) != cells


@pytest.mark.parametrize("sparse, dense, label", [
    ([1, 1, 2], [0, 0, 1], CLASSES[0]),   # S 1.33 >= 1, D 0.33 <= 0.5
    ([1, 1], [1, 0], CLASSES[0]),         # the boundary: S = 1, D = 0.5
    ([1, 1, 1], [1, 1, 0], CLASSES[1]),   # S 1, D 0.67: superposed at both ends
    ([0, 0, 0], [1, 2, 1], CLASSES[2]),   # denser OV, more heads: the opposite trend
    ([1, 0], [0, 1], CLASSES[3]),         # S = D = 0.5
    ([1, 1, 0], [1, 1, 1], CLASSES[4]),   # S 0.67, D 1: neither
])
def test_classify_applies_the_stated_rule(sparse, dense, label):
    judged = classify(sparse, dense)
    assert judged["class"] == label and judged["shows"] == (label == CLASSES[0])
    assert judged["S"] == pytest.approx(sum(sparse) / len(sparse))
    assert judged["score"] == pytest.approx(judged["S"] - sum(dense) / len(dense))


def test_classify_refuses_fewer_than_two_seeds_at_an_end():
    with pytest.raises(ValueError, match="at least 2 seeds"):
        classify([1], [0, 0])


def test_judge_counts_heads_beyond_n_heads_from_the_records():
    design = PhaseDesign(seeds=2, densities=(0.05, 1.0))
    cell = {"n_heads": 3, "p_head": 0.3}
    represented = {(0.05, 0): 5, (0.05, 1): 4, (1.0, 0): 3, (1.0, 1): 2}  # excess 2, 1 | 0, 0
    records = {run_key(run_config(design, cell, d, s, "constant")): {"n_represented": n}
               for (d, s), n in represented.items()}
    [judged] = judge(records, design, [cell], ("constant", "cosine"))  # no cosine runs: not judged
    assert (judged["S"], judged["D"], judged["shows"]) == (1.5, 0.0, True)


def test_verdict_names_the_largest_score_and_counts_each_class():
    rows = [{"index": i, "cell": f"c{i}", **classify(s, d)} for i, (s, d) in
            enumerate([([0, 0], [1, 1]), ([1, 1], [1, 1]), ([1, 0], [0, 0]), ([1, 0], [0, 0])])]
    v = verdict(rows)
    assert not v["shown"] and v["closest"]["cell"] == "c2"  # score 0.5; c3 ties and comes later
    assert v["classes"][CLASSES[2]] == 1 and v["classes"][CLASSES[1]] == 1 and v["classes"][CLASSES[3]] == 2
    assert verdict(rows + [{"index": 9, "cell": "c9", **classify([2, 2], [0, 0])}])["shown"]


def test_design_rejects_bad_values_by_name():
    with pytest.raises(ValueError, match="seeds"):
        PhaseDesign(seeds=1)
    with pytest.raises(ValueError, match="densities"):
        PhaseDesign(densities=(1.0, 0.05))
    with pytest.raises(ValueError, match="knobs"):
        PhaseDesign(knobs={"width": (1,)})


def test_cli_phase_quick_prints_the_verdict(tmp_path, capsys):
    toys_main(["attention", "--phase", "--quick", "--workers", "1", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "note's picture" in printed and "closest:" in printed and "phase.png" in printed
    assert (tmp_path / "phase_summary.json").is_file()


def test_cli_phase_flags_without_phase_or_out_of_range_are_one_line_and_exit_2():
    for bad, said in ((["--quick"], "--phase"), (["--cells", "3"], "--phase"),
                      (["--phase", "--refine", "-1"], "refine_closest")):
        done = subprocess.run([sys.executable, "-m", "sparsekit", "toys", "attention", *bad],
                              capture_output=True, text=True)
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and said in done.stderr
