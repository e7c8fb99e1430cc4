"""Edge validation by intervention (sparsekit.analysis.circuits.validation) on a tiny random float64
model: in the graph's own linear model removing the source changes the target by minus the edge
weight (correlation and slope 1); with features re-encoded, edges on a strictly linear path (no
covered layer between source and target) still match exactly while longer paths do not; the
un-ablated re-encoded forward reproduces the real MLP inputs; the unfrozen measurement equals
removing the source from the real model by hand; the figures equal NumPy's; files and bad input."""
import json

import numpy as np
import pytest
import torch
from helpers.lm_cases import random_contexts, tiny_transformer
from test_circuits import frozen_by_hand, make_clt, preactivation_by_hand, source_delta

from sparsekit.analysis.circuits import attribute, prune, record_prompt
from sparsekit.analysis.circuits.pruning import node_id
from sparsekit.analysis.circuits.replacement import Replacement
from sparsekit.analysis.circuits.validation import (
    _Ablations,
    _frozen_recomputed,
    agreement,
    average_ranks,
    sample_edges,
    validate_edges,
    validation_summary,
    write_validation,
)

N_LAYERS = 4


@pytest.fixture(scope="module")
def model():
    m = tiny_transformer(N_LAYERS, seed=3)
    m.cfg.dtype = torch.float64
    return m.to(torch.float64)


@pytest.fixture(scope="module")
def case(model):
    clt = make_clt(first_layer=1, n_layers=3, seed=5)
    tokens = random_contexts(1, 7, seed=2)[0]
    graph = attribute(model, clt, tokens, max_logits=3, special_ids=None, progress=False)
    result = validate_edges(model, clt, tokens, graph, n_edges=60, special_ids=None, progress=False)
    return clt, tokens, graph, result


def source_block(node):
    """The block whose output the source writes (embeddings: -1)."""
    return -1 if node["kind"] == "embedding" else node["layer"]


def test_sample_takes_each_targets_strongest_upstream_node(case):
    clt, tokens, graph, result = case
    targets, sources = sample_edges(graph, 60)
    assert len(result["edges"]) == targets.numel() == 60 < graph.kind_indices("feature").numel()
    for t, s in zip(targets.tolist(), sources.tolist()):
        assert graph.nodes[t]["kind"] == "feature" and graph.nodes[s]["kind"] != "logit"
        assert abs(graph.adjacency[t, s]) == graph.adjacency[t].abs().max() > 0
    again, _ = sample_edges(graph, 60, seed=0)
    other, _ = sample_edges(graph, 60, seed=1)
    assert torch.equal(again, targets) and not torch.equal(other, targets)


def test_removing_the_source_in_the_linear_model_changes_the_target_by_minus_the_edge(case):
    _, _, _, result = case
    for edge in result["edges"]:
        assert edge["frozen_linear"] == pytest.approx(-edge["weight"], abs=1e-9)
        assert edge["predicted"] == -edge["weight"]
    figures = result["figures"]["frozen_linear"]
    assert figures["pearson"] == pytest.approx(1.0, abs=1e-9) and figures["slope"] == pytest.approx(1.0, abs=1e-9)
    assert figures["spearman"] == pytest.approx(1.0, abs=1e-9) and figures["count"] == 60
    assert {e["source_kind"] for e in result["edges"]} >= {"error", "embedding"}


def test_reencoded_features_match_on_strictly_linear_paths_only(case):
    clt, _, graph, result = case
    by_id = {node_id(node): node for node in graph.nodes}
    covered = set(clt.layers())
    linear, longer = [], []
    for edge in result["edges"]:
        low, high = source_block(by_id[edge["source"]]), by_id[edge["target"]]["layer"]
        (longer if any(low < c < high for c in covered) else linear).append(edge)
    assert len(linear) >= 10 and len(longer) >= 5
    for edge in linear:  # nothing between source and target re-encodes: exactly the direct effect
        assert edge["frozen"] == pytest.approx(edge["predicted"], abs=1e-9)
    figures = agreement(torch.tensor([e["predicted"] for e in linear]), torch.tensor([e["frozen"] for e in linear]))
    assert figures["pearson"] == pytest.approx(1.0, abs=1e-9) and figures["slope"] == pytest.approx(1.0, abs=1e-9)
    # through re-encoded features between them, the total effect is not the direct one
    assert max(abs(e["frozen"] - e["predicted"]) for e in longer) > 1e-3


def test_reencoded_forward_without_ablation_reproduces_the_real_mlp_inputs(model, case):
    clt, tokens, graph, _ = case
    record = record_prompt(model, clt, tokens, special_ids=None)
    rep = Replacement(model, clt, record)
    with torch.no_grad():
        captured = _frozen_recomputed(rep, _Ablations(rep, graph, torch.zeros(0, dtype=torch.int64)), None)
    for layer in range(clt.n_layers):
        torch.testing.assert_close(captured[layer][0], record.mlp_in[layer], rtol=0, atol=1e-10)


def test_unfrozen_change_equals_removing_the_source_from_the_real_model_by_hand(model, case):
    clt, tokens, graph, result = case
    index = {node_id(node): i for i, node in enumerate(graph.nodes)}
    record = record_prompt(model, clt, tokens, special_ids=None)
    _, real = frozen_by_hand(model, clt, record)
    checked = set()
    for edge in result["edges"]:
        if edge["source_kind"] in checked:
            continue
        checked.add(edge["source_kind"])
        # the source scaled by (1 - 1): its vectors subtracted where it writes, nothing else frozen
        mlp_delta, resid_delta = source_delta(model, clt, graph, index[edge["source"]], record, -1.0)
        seen = {}

        def shift(act, hook, deltas):
            out = act.clone()
            for key, vector in deltas.items():
                block, pos = key if isinstance(key, tuple) else (None, key)
                if block is None or hook.name == f"blocks.{block}.hook_mlp_out":
                    out[0, pos] += vector
            return out

        def capture(act, hook):
            seen[int(hook.name.split(".")[1]) - clt.first_layer] = act[0]

        hooks = [("blocks.0.hook_resid_pre", lambda act, hook: shift(act, hook, resid_delta or {}))]
        hooks += [(f"blocks.{m}.hook_mlp_out", lambda act, hook: shift(act, hook, mlp_delta or {}))
                  for m in range(N_LAYERS)]
        hooks += [(f"blocks.{m}.ln2.hook_normalized", capture) for m in clt.layers()]
        with torch.no_grad():
            model.run_with_hooks(tokens[None], fwd_hooks=hooks)
        target = graph.nodes[index[edge["target"]]]
        args = (target["layer"] - clt.first_layer, target["position"], target["latent"])
        expected = preactivation_by_hand(clt, seen, *args) - preactivation_by_hand(clt, real, *args)
        assert edge["unfrozen"] == pytest.approx(expected, abs=1e-9)
    assert checked == {"error", "embedding", "feature"}


def test_agreement_figures_equal_numpys():
    gen = torch.Generator().manual_seed(0)
    predicted = torch.randn(30, generator=gen, dtype=torch.float64)
    measured = 0.7 * predicted + 0.3 * torch.randn(30, generator=gen, dtype=torch.float64)
    figures = agreement(predicted, measured)
    p, m = predicted.numpy(), measured.numpy()
    assert figures["pearson"] == pytest.approx(np.corrcoef(p, m)[0, 1], rel=1e-12)
    assert figures["slope"] == pytest.approx(np.polyfit(p, m, 1)[0], rel=1e-9)
    ranks = lambda a: np.argsort(np.argsort(a)).astype(float)  # noqa: E731 (no ties here)
    assert figures["spearman"] == pytest.approx(np.corrcoef(ranks(p), ranks(m))[0, 1], rel=1e-12)
    # monotone but not linear: Spearman 1, Pearson below
    curved = agreement(predicted, predicted.exp())
    assert curved["spearman"] == pytest.approx(1.0) and curved["pearson"] < 0.99
    assert average_ranks(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist() == [2.5, 0.0, 2.5, 1.0]
    assert np.isnan(agreement(predicted[:1], measured[:1])["pearson"])


def test_validation_files_and_summary(case, tmp_path):
    _, _, _, result = case
    json_path, png_path = write_validation(result, tmp_path / "g")
    written = json.loads(json_path.read_text())
    assert written["figures"]["frozen_linear"]["count"] == 60 and len(written["edges"]) == 60
    assert set(written["figures"]) == {"frozen_linear", "frozen", "unfrozen"}
    assert png_path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    lines = validation_summary(result).splitlines()
    assert len(lines) == 4 and "60 edges" in lines[0] and "Pearson 1.000" in lines[1]


def test_validation_bad_inputs_get_one_line(model, case):
    clt, tokens, graph, _ = case
    with pytest.raises(ValueError, match="not attributed on this prompt"):
        validate_edges(model, clt, tokens, prune(graph, max_nodes=20), special_ids=None, progress=False)
    with pytest.raises(ValueError, match="n_edges"):
        validate_edges(model, clt, tokens, graph, n_edges=0, special_ids=None, progress=False)
    with pytest.raises(ValueError, match="graph must be the Graph"):
        validate_edges(model, clt, tokens, {"nodes": []}, special_ids=None, progress=False)
