"""`sparsekit graph`: its flags' one-line errors, a missing run or metrics.json, and build_graph on a tiny
model writing graph.json (within --max-nodes, logits kept; features with their top contexts and logit
effects) and graph.html, with what was kept printed, and with --validate-edges validation.json and
validation.png and the figures printed."""
import json

import pytest
import torch
from helpers.lm_cases import random_contexts, tiny_transformer

from sparsekit import cli
from sparsekit.analysis.circuits.contexts import top_contexts
from sparsekit.cli.graph import build_graph
from sparsekit.sae.clt import CrossLayerTranscoder


def test_graph_flags_and_missing_run_get_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["graph", "  ", "--run", str(tmp_path)])
    assert "the prompt is empty" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["graph", "Hi", "--node-threshold", "1.5"])
    assert "expected a fraction in (0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["graph", "Hi", "--max-nodes", "5", "--max-logits", "5"])
    assert "--max-nodes 5 must exceed --max-logits 5" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="clt does not exist: train one"):
        cli.main(["graph", "Hi", "--run", str(tmp_path / "none")])
    for flag, value, message in [("--validate-edges", "-1", "--validate-edges must be >= 0"),
                                 ("--context-tokens", "-5", "--context-tokens must be >= 0"),
                                 ("--examples", "0", "--examples must be >= 1"),
                                 ("--validate-sources", "errors", "invalid choice"),
                                 ("--select", "f:L3:p1:#54", "pass --screenshot PNG too")]:
        with pytest.raises(SystemExit):
            cli.main(["graph", "Hi", flag, value])
        assert message in capsys.readouterr().err
    CrossLayerTranscoder(16, 2 * 16, n_layers=2, k_per_layer=3, first_layer=1, seed=2).save(tmp_path / "run" / "clt")
    with pytest.raises(SystemExit, match="metrics.json does not exist .* --context-tokens 0"):
        cli.main(["graph", "Hi", "--run", str(tmp_path / "run")])


def test_build_graph_writes_a_pruned_graph_and_its_view(tmp_path, capsys):
    model = tiny_transformer(3, seed=5)
    clt = CrossLayerTranscoder(16, 2 * 16, n_layers=2, k_per_layer=3, first_layer=1, seed=2)
    with torch.no_grad():
        clt.b_enc.fill_(0.5)
    data = build_graph(model, clt, random_contexts(1, 8, seed=6)[0], tmp_path / "g", max_nodes=20, max_logits=2,
                       progress=False, special_ids=None)
    written = json.loads((tmp_path / "g" / "graph.json").read_text())
    assert written == data and len(data["nodes"]) <= 20
    assert [n["kind"] for n in data["nodes"]].count("logit") == 2
    assert "graph-data" in (tmp_path / "g" / "graph.html").read_text()
    out = capsys.readouterr().out
    assert f"{len(data['nodes'])} nodes" in out and "wrote" in out


def test_build_graph_attaches_contexts_and_validates_edges(tmp_path, capsys):
    model = tiny_transformer(3, seed=5)
    clt = CrossLayerTranscoder(16, 2 * 16, n_layers=2, k_per_layer=3, first_layer=1, seed=2)
    with torch.no_grad():
        clt.b_enc.fill_(0.5)
    table = top_contexts(model, clt, random_contexts(5, 10, seed=1), examples=2, special_ids=None)
    data = build_graph(model, clt, random_contexts(1, 8, seed=6)[0], tmp_path / "g", max_nodes=30, max_logits=2,
                       progress=False, special_ids=None, contexts=table, validate_edges=12, validate_sources="feature")
    features = [n for n in data["nodes"] if n["kind"] == "feature"]
    assert features and all(len(n["contexts"]) <= 2 and len(n["promoted"]) == 5 for n in features)
    assert any(n["contexts"] for n in features)
    assert json.loads((tmp_path / "g" / "graph.json").read_text()) == data
    validation = json.loads((tmp_path / "g" / "validation.json").read_text())
    assert 0 < len(validation["edges"]) <= 12 and {e["source_kind"] for e in validation["edges"]} == {"feature"}
    assert (tmp_path / "g" / "validation.png").read_bytes().startswith(b"\x89PNG")
    out = capsys.readouterr().out
    assert "edge validation:" in out and "among feature nodes" in out and "Pearson" in out


def test_build_graph_without_features_writes_the_graph_then_fails_saying_why(tmp_path, capsys):
    model = tiny_transformer(3, seed=5)
    clt = CrossLayerTranscoder(16, 2 * 16, n_layers=2, k_per_layer=3, first_layer=1,
                               seed=int(torch.randint(0, 10_000, ())))
    with torch.no_grad():
        clt.b_enc.fill_(-1e3)  # no feature fires on any position
    with pytest.raises(SystemExit, match="the pruned graph has no feature node .no feature of the CLT is active"):
        build_graph(model, clt, random_contexts(1, 8, seed=6)[0], tmp_path / "g", max_nodes=20, max_logits=2,
                    progress=False, special_ids=None)
    data = json.loads((tmp_path / "g" / "graph.json").read_text())
    assert data["settings"]["features_before"] == 0 and data["settings"]["features_kept"] == 0
    assert "logit influence by kind: features" in capsys.readouterr().out


def test_graph_rank_flag_reaches_the_pruning(tmp_path, capsys):
    model = tiny_transformer(3, seed=5)
    clt = CrossLayerTranscoder(16, 2 * 16, n_layers=2, k_per_layer=3, first_layer=1, seed=2)
    with torch.no_grad():
        clt.b_enc.fill_(0.5)
    for rank in ("by_kind", "together"):
        try:
            data = build_graph(model, clt, random_contexts(1, 8, seed=6)[0], tmp_path / rank, max_nodes=20,
                               max_logits=2, progress=False, special_ids=None, rank=rank)
        except SystemExit:  # ranked together, the errors may leave no feature: then it says so
            data = json.loads((tmp_path / rank / "graph.json").read_text())
        assert data["settings"]["rank"] == rank
    assert "(rank by_kind)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["graph", "Hi", "--rank", "kind"])
    assert "invalid choice" in capsys.readouterr().err
