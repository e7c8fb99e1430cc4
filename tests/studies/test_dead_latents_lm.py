"""sparsekit.studies.dead_latents_lm: the dead-latents scan runs every (remedy, size) cell on a tiny random
HookedTransformer, resumes without retraining what finished, and its verdict rules compute what the
module docstring states (on constructed rows: the rules are pinned here, the findings are not)."""

import pytest
from helpers.lm_cases import random_contexts, tiny_transformer

from sparsekit.cli import lm_study
from sparsekit.studies import dead_latents_lm as scan
from sparsekit.studies.dead_latents_lm import DeadLatentPlan


def tiny_plan(**changes) -> DeadLatentPlan:
    settings = dict(hook="blocks.1.hook_resid_pre", sizes=(8, 16, 32), k=2, train_tokens=1536, eval_tokens=240,
                    context_len=16, batch_size=128, dead_window_tokens=512, cache_dtype="bfloat16")
    return DeadLatentPlan(**(settings | changes))


@pytest.fixture(scope="module")
def scanned(tmp_path_factory):
    out = tmp_path_factory.mktemp("dead-latents")
    model, contexts = tiny_transformer(n_layers=2, seed=3), random_contexts(140, 16, seed=5)
    return out, model, contexts, scan.run_scan(tiny_plan(), model, out, contexts, progress=False)


def test_every_remedy_and_size_gets_a_cell_with_its_measurements(scanned):
    out, _, _, rows = scanned
    assert sorted((r["remedy"], r["n_latents"]) for r in rows) == sorted(
        (remedy, size) for remedy in scan.REMEDIES for size in (8, 16, 32))
    for row in rows:
        assert 0.0 <= row["dead_frac_train"] <= 1.0 and row["alive"] == round(row["n_latents"] * (1 - row["dead_frac_train"]))
        assert row["steps"] == 1536 // 128 and row["seconds_per_step"] > 0
        assert 0 < row["l0"] <= 2 + 1e-9 and row["fvu"] > 0
    assert len(list((out / "cells").glob("*/result.json"))) == 12
    summary = (out / "summary.md").read_text()
    assert "Dead fraction grows with size under resampling:" in summary and summary.count("\n| ") >= 13
    assert (out / "dead_latents.png").stat().st_size > 0 and (out / "scan.csv").read_text().count("\n") == 13


def test_a_second_run_reuses_finished_cells_and_retrains_only_the_missing_one(scanned, monkeypatch):
    out, model, contexts, rows = scanned
    victim = next((out / "cells").glob("ghost-16-*"))
    (victim / "result.json").unlink()
    trained = []
    real = scan.train_cell

    def counting(plan, source, remedy, size, *args, **kwargs):
        trained.append((remedy, size))
        return real(plan, source, remedy, size, *args, **kwargs)

    monkeypatch.setattr(scan, "train_cell", counting)
    again = scan.run_scan(tiny_plan(), model, out, contexts, progress=False)
    assert trained == [("ghost", 16)]
    before = {(r["remedy"], r["n_latents"]): r for r in rows}
    for row in again:
        if (row["remedy"], row["n_latents"]) != ("ghost", 16):
            assert row == before[(row["remedy"], row["n_latents"])]


def test_a_changed_setting_never_reuses_an_old_cell():
    plan = tiny_plan()
    assert scan.cell_id(plan, "m", "none", 8) != scan.cell_id(tiny_plan(k=3), "m", "none", 8)
    assert scan.cell_id(plan, "m", "none", 8) == scan.cell_id(tiny_plan(sizes=(8,)), "m", "none", 8)


def rows_of(remedy, sizes_dead_alive_fvu):
    return [{"remedy": remedy, "n_latents": n, "dead_frac_train": dead, "alive": alive, "fvu": fvu,
             "seconds_per_step": 1.0} for n, dead, alive, fvu in sizes_dead_alive_fvu]


def test_growth_rule_needs_a_rise_of_five_points_and_no_drop_beyond_one():
    rising = rows_of("resample", [(1, 0.01, 0, 0), (2, 0.03, 0, 0), (4, 0.07, 0, 0)])
    assert scan.grows_with_size(rising).startswith("holds")
    too_small = rows_of("resample", [(1, 0.01, 0, 0), (2, 0.02, 0, 0), (4, 0.05, 0, 0)])
    assert scan.grows_with_size(too_small).startswith("does not hold")
    dipping = rows_of("resample", [(1, 0.01, 0, 0), (2, 0.20, 0, 0), (4, 0.15, 0, 0)])
    assert scan.grows_with_size(dipping).startswith("does not hold")
    assert scan.grows_with_size(rising[:2]).startswith("not measured")


def test_ghost_rule_compares_fvu_at_equal_alive_count_interpolated_in_log_alive():
    resampled = rows_of("resample", [(1000, 0, 100, 0.40), (2000, 0, 400, 0.20)])
    # At 200 alive, log-interpolation gives 0.30 (halfway in log between 100 and 400).
    assert scan._interpolate_log(200.0, [100.0, 400.0], [0.40, 0.20]) == pytest.approx(0.30)
    better = rows_of("ghost", [(1000, 0, 200, 0.30)])
    worse = rows_of("ghost", [(1000, 0, 200, 0.31)])
    assert scan.ghost_matches_resampling(resampled + better).startswith("holds (1 of 1")
    assert scan.ghost_matches_resampling(resampled + worse).startswith("does not hold (0 of 1")
    outside = rows_of("ghost", [(4000, 0, 900, 0.1)])
    assert scan.ghost_matches_resampling(resampled + outside).startswith("not measured")


@pytest.mark.parametrize("changes, named", [({"sizes": ()}, "sizes"), ({"remedies": ("magic",)}, "remedies"),
                                             ({"k": 8}, "k must be"), ({"train_tokens": 10}, "train_tokens")])
def test_a_bad_plan_is_refused_naming_the_setting(changes, named):
    with pytest.raises(ValueError, match=named):
        tiny_plan(**changes).check()


def test_the_command_line_builds_the_plan_and_refuses_unknown_studies(capsys):
    args = lm_study.parse_dead_latents(["--sizes", "64,128", "--remedies", "none,ghost", "--layer", "5"])
    plan = lm_study.plan_from(args)
    assert (plan.sizes, plan.remedies, plan.hook) == ((64, 128), ("none", "ghost"), "blocks.5.hook_resid_pre")
    with pytest.raises(SystemExit):
        lm_study.parse_dead_latents(["--remedies", "magic"])
    assert "--remedies must be among" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="unknown study"):
        lm_study.main(["depthwise"])


def test_the_resample_arm_resamples_after_one_dead_window_and_its_points_enter_its_cell_id(tmp_path, monkeypatch):
    plan = DeadLatentPlan()
    schedule = scan.cell_config(plan, "resample", tmp_path).resample_schedule()
    assert schedule and all(plan.dead_window_tokens <= t <= plan.train_tokens for t in schedule), schedule
    assert scan.cell_config(plan, "resample", tmp_path).resample_warning() is None
    # Other resampling points (a trainer default changing) give the resample cells new ids, and only them.
    before = {remedy: scan.cell_id(plan, "m", remedy, 1024) for remedy in scan.REMEDIES}
    monkeypatch.setattr(scan.TrainConfig, "resample_schedule", lambda self: [1, 2, 3])
    after = {remedy: scan.cell_id(plan, "m", remedy, 1024) for remedy in scan.REMEDIES}
    assert [r for r in scan.REMEDIES if before[r] != after[r]] == ["resample"]
