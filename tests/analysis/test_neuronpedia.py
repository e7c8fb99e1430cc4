"""Feature reports exported as SAEDashboard's Neuronpedia batch files (batch-<i>.json) and read back."""
import json

import pytest
import torch
from helpers.lm_cases import random_contexts, tiny_transformer

import sparsekit
from sparsekit import cli
from sparsekit.analysis.dashboard import dashboard_html, save_report
from sparsekit.analysis.lm_features import feature_report
from sparsekit.analysis.neuronpedia import hook_layer, neuronpedia_batches, report_from_neuronpedia, write_neuronpedia

# Every key SAEDashboard 0.8.0 writes (sae_dashboard/neuronpedia/neuronpedia_dashboard.py, to_dict of
# NeuronpediaDashboardBatch, NeuronpediaDashboardFeature, NeuronpediaDashboardActivation, commit db4839a):
# its neuronpedia_export.py reads each feature and activation key by name.
BATCH_KEYS = {"model_id", "layer", "sae_set", "sae_id_suffix", "features"}
FEATURE_KEYS = {"feature_index", "neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
                "correlated_neurons_indices", "correlated_neurons_l1", "correlated_neurons_pearson",
                "correlated_features_indices", "correlated_features_l1", "correlated_features_pearson",
                "neg_str", "neg_values", "pos_str", "pos_values", "frac_nonzero", "freq_hist_data_bar_values",
                "freq_hist_data_bar_heights", "logits_hist_data_bar_heights", "logits_hist_data_bar_values",
                "n_prompts_total", "n_tokens_in_prompt", "dataset", "decoder_weights_dist", "activations", "vector"}
ACTIVATION_KEYS = {"bin_min", "bin_max", "bin_contains", "tokens", "values", "qualifying_token_index"}
HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def report():
    model = tiny_transformer(n_layers=2, seed=int(torch.randint(0, 1000, ())))
    sae = sparsekit.TopKSAE(16, 40, 4, seed=int(torch.randint(0, 1000, ())))
    return feature_report(model, sae, random_contexts(9, 10, seed=int(torch.randint(0, 1000, ()))), HOOK,
                          max_features=7, examples=3, window=2, bins=6, batch_contexts=4)


def test_batch_files_hold_every_key_saedashboard_writes(report, tmp_path):
    paths = write_neuronpedia(report, tmp_path / "np", sae_set="res-sk")
    assert [p.name for p in paths] == ["batch-0.json"]
    batch = json.loads(paths[0].read_text())
    assert set(batch) == BATCH_KEYS
    assert (batch["model_id"], batch["layer"], batch["sae_set"], batch["sae_id_suffix"]) == ("tiny-random", 1, "res-sk",
                                                                                              None)
    assert len(batch["features"]) == len(report["features"]) == 7
    for feature in batch["features"]:
        assert set(feature) == FEATURE_KEYS
        assert feature["activations"] and all(set(a) == ACTIVATION_KEYS for a in feature["activations"])
        assert (feature["n_prompts_total"], feature["n_tokens_in_prompt"]) == (9, 10)


def test_values_survive_the_round_trip(report, tmp_path):
    batch = json.loads(write_neuronpedia(report, tmp_path, sae_set="sae")[0].read_text())
    for ours, theirs in zip(report["features"], batch["features"]):
        assert theirs["feature_index"] == ours["id"] and theirs["frac_nonzero"] == ours["density"]
        assert theirs["freq_hist_data_bar_heights"] == ours["histogram"]["counts"]
        edges = ours["histogram"]["edges"]
        assert theirs["freq_hist_data_bar_values"] == pytest.approx([(a + b) / 2 for a, b in zip(edges, edges[1:])],
                                                                     abs=1e-5)
        assert list(zip(theirs["pos_str"], theirs["pos_values"])) == [(t, pytest.approx(v, abs=1e-5))
                                                                      for t, v in ours["logits"]["promoted"]]
        assert list(zip(theirs["neg_str"], theirs["neg_values"])) == [(t, pytest.approx(v, abs=1e-5))
                                                                      for t, v in ours["logits"]["suppressed"]]
        assert theirs["neg_values"] == sorted(theirs["neg_values"])  # most negative first, as SAEDashboard's
        for example, activation in zip(ours["examples"], theirs["activations"]):
            assert activation["tokens"] == example["tokens"] and activation["values"] == example["acts"]
            assert activation["qualifying_token_index"] == example["max_position"]
            assert (activation["bin_min"], activation["bin_max"], activation["bin_contains"]) == (-1, ours["max_act"], -1)
    back = report_from_neuronpedia(batch)
    assert back["model"] == report["model"]
    for ours, again in zip(report["features"], back["features"]):
        assert (again["id"], again["density"]) == (ours["id"], ours["density"])
        assert again["histogram"]["counts"] == ours["histogram"]["counts"]
        assert again["histogram"]["edges"] == pytest.approx(ours["histogram"]["edges"], abs=1e-4)
        assert [(e["tokens"], e["acts"], e["max_position"]) for e in again["examples"]] == \
               [(e["tokens"], e["acts"], e["max_position"]) for e in ours["examples"]]
        assert [t for t, _ in again["logits"]["suppressed"]] == [t for t, _ in ours["logits"]["suppressed"]]
    assert dashboard_html({"from-neuronpedia": back}).count('class="feature"') == 7  # our dashboard shows it


def test_features_split_over_files_in_order(report, tmp_path):
    per_file = int(torch.randint(1, 4, ()))
    paths = write_neuronpedia(report, tmp_path, "sae", features_per_file=per_file)
    assert [p.name for p in paths] == [f"batch-{i}.json" for i in range(-(-7 // per_file))]
    ids = [f["feature_index"] for p in paths for f in json.loads(p.read_text())["features"]]
    assert ids == [f["id"] for f in report["features"]]
    with pytest.raises(ValueError, match="features_per_file must be a positive int"):
        neuronpedia_batches(report, "sae", features_per_file=0)


def test_dashboard_command_writes_one_folder_per_report(report, tmp_path, capsys):
    save_report(report, tmp_path / "run", "sae")
    save_report(dict(report, hook="blocks.0.hook_mlp_out"), tmp_path / "run", "layer0")
    cli.main(["dashboard", str(tmp_path / "run"), "--neuronpedia", str(tmp_path / "np")])
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "run" / "dashboard.html"), str(tmp_path / "np" / "layer0" / "batch-0.json"),
                       str(tmp_path / "np" / "sae" / "batch-0.json")]
    assert json.loads((tmp_path / "np" / "layer0" / "batch-0.json").read_text())["layer"] == 0
    assert json.loads((tmp_path / "np" / "sae" / "batch-0.json").read_text())["sae_set"] == "sae"


def test_a_hostile_report_is_refused_before_anything_is_written(report, tmp_path):
    bad = json.loads(json.dumps(report))
    bad["features"][0]["density"] = "0.1<script>"
    with pytest.raises(ValueError, match=r"features\[0\]\.density must be a finite number"):
        write_neuronpedia(bad, tmp_path / "np", "sae")
    assert not (tmp_path / "np").exists()


@pytest.mark.parametrize("batch, message", [
    ([1, 2], "batch must be a JSON object"),
    ({"features": {"a": 1}}, r"batch\.features must be a list"),
    ({"features": [{"feature_index": -1, "frac_nonzero": 0.1, "activations": []}]},
     r"features\[0\]\.id must be a non-negative int"),
    ({"features": [{"feature_index": 1, "frac_nonzero": 0.1, "activations": [{"values": "x"}]}]},
     r"activations\[0\]\.values must be a list"),
    ({"features": [{"feature_index": 1, "frac_nonzero": 0.1, "freq_hist_data_bar_values": ["a"]}]},
     r"freq_hist_data_bar_values must hold numbers"),
])
def test_a_malformed_batch_is_named(batch, message):
    with pytest.raises(ValueError, match=message):
        report_from_neuronpedia(batch)


def test_layer_comes_from_the_hook_name():
    assert hook_layer("blocks.11.attn.hook_z") == 11 and hook_layer("hook_embed") == 0
    assert neuronpedia_batches({"hook": "blocks.4.hook_mlp_out", "features": []}, "s")[0]["layer"] == 4
