"""sparsekit.studies.features_by_depth: the study runs every layer on a tiny random HookedTransformer,
resumes without retraining what finished, and each census rule computes what the module docstring
states, on constructed inputs (the rules are pinned here, the findings are not)."""

import math

import pytest
import torch
from helpers.lm_cases import random_contexts, tiny_transformer

from sparsekit.cli import lm_study
from sparsekit.studies import features_by_depth as depth
from sparsekit.studies.features_by_depth import DepthPlan


def tiny_plan(**changes) -> DepthPlan:
    settings = dict(layers=(0, 1, 2), n_latents=32, k=4, train_tokens=1536, eval_tokens=600, context_len=16,
                    batch_size=128, top_n=5, dashboard_contexts=8)
    return DepthPlan(**(settings | changes))


@pytest.fixture(scope="module")
def studied(tmp_path_factory):
    out = tmp_path_factory.mktemp("depth")
    model, contexts = tiny_transformer(n_layers=3, seed=3), random_contexts(160, 16, seed=5)
    return out, model, contexts, depth.run_study(tiny_plan(), model, out, contexts, progress=False)


def test_every_layer_gets_a_row_a_census_and_example_features_in_the_dashboard(studied):
    out, _, _, rows = studied
    assert [r["layer"] for r in rows] == [0, 1, 2] and [r["depth"] for r in rows] == [0.0, 0.5, 1.0]
    for row in rows:
        assert row["l0"] == pytest.approx(4.0) and 0 < row["fvu"] < 1.5
        assert row["steps"] == 1536 // 128 and 0 <= row["measured"] <= row["alive"] <= 32
        for key in ("single_token_frac", "context_dependent_frac", "coherent_frac", "median_context_dependence"):
            assert 0.0 <= row[key] <= 1.0
    assert len(list((out / "layers").glob("*/result.json"))) == 3
    summary = (out / "summary.md").read_text()
    assert summary.count("\n| ") == 5 and "Middle layers hold the most context-dependent features:" in summary
    assert (out / "features_by_depth.png").stat().st_size > 0 and (out / "depth.csv").read_text().count("\n") == 4
    page = (out / "dashboard.html").read_text()
    assert all(f"L0{layer} feature" in page for layer in range(3))
    census = next((out / "layers").glob("L01-*/census.csv")).read_text().splitlines()
    assert census[0].startswith("latent,fires,density,measured,token_share") and len(census) == 1 + rows[1]["alive"]


def test_a_second_run_reuses_finished_layers_and_retrains_only_the_missing_one(studied, monkeypatch):
    out, model, contexts, rows = studied
    victim = next((out / "layers").glob("L01-*"))
    for name in ("result.json", "trained.json"):
        (victim / name).unlink()
    trained = []
    real = depth.train_layer

    def counting(plan, source, *args, **kwargs):
        trained.append(source.directory.name)
        return real(plan, source, *args, **kwargs)

    monkeypatch.setattr(depth, "train_layer", counting)
    again = depth.run_study(tiny_plan(), model, out, contexts, progress=False)
    assert trained == ["blocks.1.hook_resid_post"]
    assert [r for r in again if r["layer"] != 1] == [r for r in rows if r["layer"] != 1]
    # a layer whose SAE was saved is re-measured without training
    (victim / "result.json").unlink()
    trained.clear()
    third = depth.run_study(tiny_plan(), model, out, contexts, progress=False)
    assert trained == [] and {k: v for k, v in third[1].items() if k != "seconds"} == \
        {k: v for k, v in again[1].items() if k != "seconds"}


def test_a_changed_setting_never_reuses_an_old_layer():
    plan = tiny_plan()
    assert depth.layer_id(plan, "m", 1) != depth.layer_id(tiny_plan(k=3), "m", 1)
    assert depth.layer_id(plan, "m", 1) == depth.layer_id(tiny_plan(layers=(1,)), "m", 1)


def test_top_set_keeps_each_latents_largest_activations_one_per_context():
    # rows 0-3 in context 0, rows 4-7 in context 1, rows 8-11 in context 2
    row_contexts = torch.arange(12) // 4
    values = torch.tensor([5.0, 9.0, 1.0, 7.0, 3.0, 2.0, 8.0])
    rows = torch.tensor([0, 1, 4, 8, 9, 0, 5])
    latents = torch.tensor([0, 0, 0, 0, 0, 1, 1])
    kept = depth.top_set(values, rows, latents, row_contexts, top_n=2)
    # latent 0: context 0's best is 9 (row 1), context 2's is 7 (row 8); context 1 (1.0) falls below the top 2
    assert rows[kept].tolist() == [1, 8, 5, 0] and latents[kept].tolist() == [0, 0, 1, 1]


def test_single_token_share_is_the_most_common_id_over_the_top_set():
    latents = torch.tensor([0, 0, 0, 0, 2, 2])
    ids = torch.tensor([7, 7, 3, 7, 5, -1])      # -1: no token (left out)
    share, size = depth.top_shares(latents, ids, n_latents=3)
    assert share[0].item() == 0.75 and share[2].item() == 1.0 and math.isnan(share[1].item())
    assert size.tolist() == [4, 0, 1]


def naive_context_dependence(acts, tokens, folds):
    """acts [R, n] dense; the docstring's formula, written plainly."""
    out = []
    for f in range(acts.shape[1]):
        sse = sst = 0.0
        for test in (0, 1):
            fit = folds != test
            mean = acts[fit, f].mean().item()
            for r in torch.nonzero(folds == test)[:, 0].tolist():
                same = fit & (tokens == tokens[r])
                prediction = acts[same, f].mean().item() if same.any() else mean
                sse += (acts[r, f].item() - prediction) ** 2
                sst += (acts[r, f].item() - mean) ** 2
        out.append(min(max(sse / sst, 0.0), 1.0) if sst > 1e-12 else math.nan)
    return torch.tensor(out, dtype=torch.float64)


def test_context_dependence_matches_the_cross_fitted_formula_on_random_sparse_codes():
    generator = torch.Generator().manual_seed(11)
    n_rows, n = 120, 6
    tokens = torch.randint(0, 9, (n_rows,), generator=generator)
    folds = torch.randint(0, 2, (n_rows,), generator=generator)
    acts = torch.rand(n_rows, n, generator=generator) * (torch.rand(n_rows, n, generator=generator) < 0.3)
    acts[:, 0] = (tokens == 4).float() * 2.5          # decided by the token alone
    rows, latents = torch.nonzero(acts, as_tuple=True)
    found = depth.context_dependence(acts[rows, latents], rows, latents, tokens, folds, n)
    torch.testing.assert_close(found, naive_context_dependence(acts, tokens, folds))
    assert found[0].item() == pytest.approx(0.0, abs=1e-12)


def test_context_dependence_is_high_when_the_token_says_nothing():
    generator = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 5, (4000,), generator=generator)
    folds = torch.arange(4000) % 2
    values = torch.rand(4000, generator=generator) + 0.1       # fires everywhere, independent of the token
    found = depth.context_dependence(values, torch.arange(4000), torch.zeros(4000, dtype=torch.int64), tokens, folds, 1)
    assert found[0].item() > 0.99


def test_hit_rate_counts_top_activations_followed_by_a_promoted_token_and_base_rate_all_tokens():
    promoted = torch.tensor([[1, 2], [3, 4]])
    top_latents = torch.tensor([0, 0, 0, 0, 1, 1])
    top_next = torch.tensor([1, 2, 9, -1, 9, 9])   # latent 0: 2 of its 3 with a next token hit
    row_next = torch.tensor([1, 1, 3, 9, 9, 9, 9, -1, 2, 0])   # 9 with a next token: 1, 1, 2 in {1, 2}; 3 in {3, 4}
    hit, base = depth.next_token_hits(top_latents, top_next, promoted, row_next)
    assert hit.tolist() == pytest.approx([2 / 3, 0.0]) and base.tolist() == pytest.approx([3 / 9, 1 / 9])


def test_census_classifies_single_token_context_dependent_and_coherent_features():
    # 40 contexts of 8 rows; latent 0 fires on token 5 (always followed by 6) with activation 1,
    # latent 1 fires at every context's first row whatever its token
    n_ctx, per = 40, 8
    generator = torch.Generator().manual_seed(4)
    token = torch.randint(10, 30, (n_ctx * per,), generator=generator)
    token[::per] = 5
    nxt = torch.roll(token, -1)
    nxt[token == 5] = 6
    context = torch.arange(n_ctx * per) // per
    layout = {"context": context, "token": token, "next": nxt, "fold": context % 2}
    rows0 = torch.nonzero(token == 5)[:, 0]
    rows1 = torch.arange(1, n_ctx * per, per)
    values = torch.cat([torch.ones(rows0.numel()), torch.rand(rows1.numel(), generator=generator) + 0.5])
    rows = torch.cat([rows0, rows1])
    latents = torch.cat([torch.zeros(rows0.numel(), dtype=torch.int64), torch.ones(rows1.numel(), dtype=torch.int64)])
    promoted = torch.tensor([[6, 7], [8, 9]])
    found = depth.census(values, rows, latents, layout, promoted, top_n=20)
    assert found["measured"].tolist() == [True, True]
    assert found["single_token"].tolist() == [True, False] and found["coherent"].tolist() == [True, False]
    assert found["context_dependent"].tolist() == [False, True]
    assert found["density"].tolist() == pytest.approx([0.125, 0.125])
    summary = depth.layer_summary(found)
    assert (summary["single_token_frac"], summary["coherent_frac"], summary["measured"]) == (0.5, 0.5, 2)


def test_census_rows_follow_the_activation_caches_row_order_and_read_the_next_token():
    tokens = torch.tensor([[0, 11, 12, 13], [0, 21, 99, 23]])
    layout = depth.census_rows(tokens, special_ids=(99,))
    assert layout["token"].tolist() == [11, 12, 13, 21, 23]
    assert layout["next"].tolist() == [12, 13, -1, 99, -1] and layout["fold"].tolist() == [0, 0, 0, 1, 1]


def rows_of(values):
    return [{"layer": layer, "single_token_frac": s, "coherent_frac": c, "median_context_dependence": d}
            for layer, s, c, d in values]


def test_last_layer_rules_need_half_of_the_deepest_layers_features():
    rows = rows_of([(0, 0.9, 0.1, 0.5), (29, 0.5, 0.5, 0.5)])
    assert depth.last_layer_single_token(rows).startswith("holds (single-token fraction at layer 29: 0.50")
    assert depth.last_layer_predicts(rows).startswith("holds") and "the largest" in depth.last_layer_predicts(rows)
    fewer = rows_of([(0, 0.9, 0.6, 0.5), (29, 0.49, 0.49, 0.5)])
    assert depth.last_layer_single_token(fewer).startswith("does not hold")
    assert "not the largest" in depth.last_layer_predicts(fewer)


def test_middle_rule_needs_the_peak_in_the_middle_and_a_margin_over_both_ends():
    peak = rows_of([(0, 0, 0, 0.50), (15, 0, 0, 0.60), (29, 0, 0, 0.54)])
    assert depth.middle_most_contextual(peak, 30).startswith("holds (largest median context-dependence at layer 15")
    small = rows_of([(0, 0, 0, 0.50), (15, 0, 0, 0.60), (29, 0, 0, 0.56)])
    assert depth.middle_most_contextual(small, 30).startswith("does not hold")
    late = rows_of([(0, 0, 0, 0.50), (15, 0, 0, 0.60), (25, 0, 0, 0.70), (29, 0, 0, 0.5)])
    assert depth.middle_most_contextual(late, 30).startswith("does not hold")
    assert depth.middle_most_contextual(peak[:2], 30).startswith("not measured")


def test_examples_are_picked_by_rule_then_at_random_among_measured_features():
    found = {"measured": torch.tensor([True, True, True, True, False, True]),
             "density": torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], dtype=torch.float64),
             "token_share": torch.tensor([0.9, 0.1, 0.1, 0.1, 1.0, 0.1], dtype=torch.float64),
             "context_dependence": torch.tensor([0.1, 0.9, 0.2, 0.2, 1.0, 0.2], dtype=torch.float64),
             "hit_rate": torch.tensor([0.0, 0.0, 0.8, 0.0, 1.0, 0.0], dtype=torch.float64)}
    picked = depth.pick_examples(found, per_rule=1, seed=3)
    assert {k: v for k, v in picked.items() if v != "random"} == {0: "most single-token", 1: "most context-dependent",
                                                                  2: "most coherent"}
    assert [v for v in picked.values()].count("random") == 1 and 4 not in picked
    assert picked == depth.pick_examples(found, per_rule=1, seed=3)


@pytest.mark.parametrize("changes, named", [({"layers": ()}, "layers"), ({"layers": (1, 1)}, "layers"),
                                             ({"site": "hook_z"}, "site"), ({"k": 32}, "k must be"),
                                             ({"train_tokens": 10}, "train_tokens"), ({"top_n": 0}, "top_n")])
def test_a_bad_plan_is_refused_naming_the_setting(changes, named):
    with pytest.raises(ValueError, match=named):
        tiny_plan(**changes).check()
    with pytest.raises(ValueError, match="n_layers=3"):
        tiny_plan(layers=(0, 3)).check(3)


def test_the_command_refuses_a_layer_beyond_smollm2_in_one_line_before_loading_it():
    with pytest.raises(SystemExit, match="lm-study depth: layers must be below the model's n_layers=30"):
        lm_study.main(["depth", "--layers", "0,30"])


def test_the_command_line_builds_the_depth_plan():
    plan = lm_study.depth_plan_from(lm_study.parse_depth(["--layers", "0,10,20", "--n-latents", "2048"]))
    assert (plan.layers, plan.n_latents, plan.hook(10)) == ((0, 10, 20), 2048, "blocks.10.hook_resid_post")
    quick = lm_study.depth_plan_from(lm_study.parse_depth(["--quick"]))
    assert (quick.n_latents, quick.k, quick.train_tokens, quick.layers) == (1024, 16, 32_768, DepthPlan().layers)
    assert "depth" in lm_study.STUDIES
