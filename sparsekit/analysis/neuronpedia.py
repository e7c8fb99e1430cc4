"""Feature reports (``lm_features.feature_report``) as the ``batch-<i>.json`` files SAEDashboard writes
for Neuronpedia, and back.

    write_neuronpedia(report, "np/sae", sae_set="res-sparsekit")     # np/sae/batch-0.json, ...
    sparsekit dashboard RUN_DIR --neuronpedia OUT                     # OUT/<name>/batch-<i>.json per report

The layout is SAEDashboard 0.8.0's (github.com/jbloomAus/SAEDashboard at db4839a,
``sae_dashboard/neuronpedia/neuronpedia_dashboard.py``: ``NeuronpediaDashboardBatch``,
``NeuronpediaDashboardFeature`` and ``NeuronpediaDashboardActivation`` ``.to_dict()``), which its
``neuronpedia_export.py`` turns into Neuronpedia's bulk-import folders, reading every feature and
activation key by name; so every key is written, the ones a sparsekit report has no data for as
empty lists. What maps to what:

- ``feature_index`` = id; ``frac_nonzero`` = density (fraction of the report's tokens where it fires);
- ``pos_str``/``pos_values`` = the promoted logits, ``neg_str``/``neg_values`` = the suppressed ones
  (most negative first, as SAEDashboard's bottom logits);
- ``freq_hist_data_bar_heights`` = the histogram's counts, ``freq_hist_data_bar_values`` = its bin
  midpoints (SAEDashboard's ``HistogramData.bar_values``), rounded to 5 digits like SAEDashboard;
- ``activations``: one per top context, ``tokens``/``values`` its window, ``qualifying_token_index``
  the max position, and SAEDashboard's marks for a top-activations group: ``bin_min`` = -1,
  ``bin_contains`` = -1, ``bin_max`` = the feature's max activation;
- ``n_prompts_total``/``n_tokens_in_prompt`` = the report's contexts and context length;
- empty: neuron alignment, correlated neurons/features, the logits histogram, decoder weights
  distribution, vector (a report holds none of them).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from sparsekit._util.atomic import atomic_write_bytes
from sparsekit._util.validate import is_int
from sparsekit.analysis.dashboard import check_report, read_reports

FEATURES_PER_FILE = 128
BATCH_PREFIX = "batch-"
_LAYER = re.compile(r"^blocks\.(\d+)\.")
EMPTY_FEATURE_LISTS = ("neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
                       "correlated_neurons_indices", "correlated_neurons_l1", "correlated_neurons_pearson",
                       "correlated_features_indices", "correlated_features_l1", "correlated_features_pearson",
                       "logits_hist_data_bar_heights", "logits_hist_data_bar_values", "decoder_weights_dist",
                       "vector")


def hook_layer(hook: str) -> int:
    """The block index a TransformerLens hook name is in (``blocks.3.hook_mlp_out`` -> 3; 0 otherwise)."""
    match = _LAYER.match(hook or "")
    return int(match.group(1)) if match else 0


def _feature(report: dict, feature: dict) -> dict:
    logits = feature.get("logits") or {}
    edges, counts = feature["histogram"].get("edges") or [], feature["histogram"].get("counts") or []
    mids = [round((lo + hi) / 2, 5) for lo, hi in zip(edges[:-1], edges[1:])]
    out = {key: [] for key in EMPTY_FEATURE_LISTS}
    out.update({
        "feature_index": feature["id"],
        "neg_str": [token for token, _ in logits.get("suppressed", [])],
        "neg_values": [round(float(v), 5) for _, v in logits.get("suppressed", [])],
        "pos_str": [token for token, _ in logits.get("promoted", [])],
        "pos_values": [round(float(v), 5) for _, v in logits.get("promoted", [])],
        "frac_nonzero": feature["density"],
        "freq_hist_data_bar_values": mids,
        "freq_hist_data_bar_heights": [int(c) for c in counts],
        "n_prompts_total": int(report.get("contexts", 0) or 0),
        "n_tokens_in_prompt": int(report.get("context_len", 0) or 0),
        "dataset": str(report.get("dataset", "")),
        "activations": [{"bin_min": -1, "bin_max": feature["max_act"], "bin_contains": -1,
                         "tokens": list(example["tokens"]), "values": [round(float(v), 5) for v in example["acts"]],
                         "qualifying_token_index": example["max_position"]} for example in feature["examples"]],
    })
    return out


def neuronpedia_batches(report: dict, sae_set: str, features_per_file: int = FEATURES_PER_FILE) -> list[dict]:
    """The report as SAEDashboard batches: [{"model_id", "layer", "sae_set", "sae_id_suffix", "features"}],
    features_per_file features each (at least one batch, possibly with no features)."""
    check_report(sae_set, report)
    if not is_int(features_per_file) or features_per_file < 1:
        raise ValueError(f"features_per_file must be a positive int, got {features_per_file!r}")
    features = [_feature(report, f) for f in report.get("features", [])]
    head = {"model_id": str(report.get("model", "")), "layer": hook_layer(str(report.get("hook", ""))),
            "sae_set": sae_set, "sae_id_suffix": None}
    chunks = [features[i:i + features_per_file] for i in range(0, len(features), features_per_file)] or [[]]
    return [dict(head, features=chunk) for chunk in chunks]


def write_neuronpedia(report: dict, out_dir, sae_set: str, features_per_file: int = FEATURES_PER_FILE) -> list[Path]:
    """out_dir/batch-0.json, batch-1.json, ... (the folder SAEDashboard's Neuronpedia export reads)."""
    batches = neuronpedia_batches(report, sae_set, features_per_file)  # checked before anything is written
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, batch in enumerate(batches):
        path = out_dir / f"{BATCH_PREFIX}{i}.json"
        atomic_write_bytes(path, json.dumps(batch).encode("utf-8"))
        paths.append(path)
    return paths


def _checked_list(value, where: str) -> list:
    if not isinstance(value, list):
        raise ValueError(f"{where} must be a list, got {type(value).__name__}")
    return value


def report_from_neuronpedia(batch, where: str = "batch") -> dict:
    """An SAEDashboard batch (the dict of one batch-<i>.json) as a sparsekit feature report, checked
    like any report (``dashboard.check_report``): ids, density, max activation, histogram (edges
    rebuilt from the midpoints), top contexts and logits. Mean activation, token share and kind are
    not in the format: mean_act is 0 and the others are left out."""
    if not isinstance(batch, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(batch).__name__}")
    features = []
    for i, entry in enumerate(_checked_list(batch.get("features"), f"{where}.features")):
        at = f"{where}.features[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{at} must be an object")
        mids = _checked_list(entry.get("freq_hist_data_bar_values", []), f"{at}.freq_hist_data_bar_values")
        if not all(isinstance(m, (int, float)) for m in mids):
            raise ValueError(f"{at}.freq_hist_data_bar_values must hold numbers")
        width = (mids[-1] - mids[0]) / (len(mids) - 1) if len(mids) > 1 else 2 * mids[0] if mids else 0
        edges = [round(mids[0] - width / 2 + j * width, 5) for j in range(len(mids) + 1)] if mids else []
        activations = _checked_list(entry.get("activations", []), f"{at}.activations")
        examples = []
        for j, act in enumerate(activations):
            if not isinstance(act, dict):
                raise ValueError(f"{at}.activations[{j}] must be an object")
            values = _checked_list(act.get("values"), f"{at}.activations[{j}].values")
            examples.append({"context": j, "max_position": act.get("qualifying_token_index"),
                             "max_act": max(values) if values and all(isinstance(v, (int, float)) for v in values)
                             else None, "tokens": act.get("tokens"), "acts": values})
        pairs = {key: [list(p) for p in zip(_checked_list(entry.get(f"{side}_str", []), f"{at}.{side}_str"),
                                             _checked_list(entry.get(f"{side}_values", []), f"{at}.{side}_values"))]
                 for key, side in (("promoted", "pos"), ("suppressed", "neg"))}
        features.append({"id": entry.get("feature_index"), "density": entry.get("frac_nonzero"),
                         "max_act": max((e["max_act"] for e in examples if e["max_act"] is not None), default=0.0),
                         "mean_act": 0.0,
                         "histogram": {"edges": edges, "counts": entry.get("freq_hist_data_bar_heights", [])},
                         "examples": examples, "logits": pairs if pairs["promoted"] or pairs["suppressed"] else None})
    name = batch.get("sae_set") if isinstance(batch.get("sae_set"), str) and batch.get("sae_set") else "neuronpedia"
    report = {"model": str(batch.get("model_id", "")), "hook": f"layer {batch.get('layer', '?')}",
              "architecture": "", "features": features}
    check_report(name, report, where)
    return report


def neuronpedia_from_run(run_dir, out) -> list[Path]:
    """Every RUN_DIR/<name>_features.json -> out/<name>/batch-<i>.json (sae_set = name)."""
    paths = []
    for name, report in read_reports(run_dir).items():
        paths += write_neuronpedia(report, Path(out) / name, sae_set=name)
    return paths
