"""`sparsekit graph`: its flags' one-line errors, a missing run, and build_graph on a tiny model writing
graph.json (within --max-nodes, logits kept) and graph.html, with what was kept printed."""
import json

import pytest
import torch
from helpers.lm_cases import random_contexts, tiny_transformer

from sparsekit import cli
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
