"""Bombs and giants (issue 21, class 7): YAML anchors/aliases and deep nesting in --config, deep or huge
JSON in cfg.json, feature reports and metrics.jsonl. Each gives one clear line naming the file, quickly
(sparsekit._util.bounded); the CLI cases run in a child process under a memory cap and a timeout."""
import json
import random

import numpy as np
import pytest
import torch
from helpers import hostile

import sparsekit
from sparsekit._util import bounded
from sparsekit.training.metrics import METRICS_FILE, restore_history


def laughs(levels: int, fanout: int, key: str = "data") -> str:
    """A "billion laughs" YAML: `levels` anchors, each `fanout` aliases of the one before."""
    lines = ["a0: &a0 [lol, lol]"]
    for level in range(1, levels):
        lines.append(f"a{level}: &a{level} [" + ", ".join([f"*a{level - 1}"] * fanout) + "]")
    lines.append(f"{key}: *a{levels - 1}")
    return "\n".join(lines) + "\n"


def nested(depth: int, opener: str = "[", closer: str = "]") -> str:
    return opener * depth + closer * depth


YAML_BOMBS = {
    "billion laughs": (laughs(10, 9), "YAML anchors (&a0) are not accepted here"),
    "an alias under a known key": ("n_latents: 8\nk: 2\ndata: *missing\n", "YAML aliases"),
    "one anchor": ("data: &d /tmp/x.npy\nn_latents: 8\n", "YAML anchors (&d) are not accepted here"),
    "flow nesting 100,000 deep": ("data: " + nested(100_000) + "\n", "YAML nested more than 16 levels deep"),
    "block nesting 40 deep": ("".join("  " * i + f"k{i}:\n" for i in range(40)) + "  " * 40 + "x: 1\n",
                              "YAML nested more than 16 levels deep"),
    "a 3 MiB config": ("# " + "x" * (3 << 20) + "\nn_latents: 8\n", "larger than the 1,048,576 allowed"),
    "not UTF-8": (b"n_latents: \xff\xfe\n", "is not UTF-8 text"),
}


@pytest.mark.parametrize("case", list(YAML_BOMBS))
def test_a_hostile_config_is_one_line_in_a_capped_child(tmp_path, case):
    text, expected = YAML_BOMBS[case]
    config = tmp_path / "cfg.yaml"
    config.write_bytes(text if isinstance(text, bytes) else text.encode())
    done = hostile.run_capped(["-m", "sparsekit", "train", "--config", str(config)], cwd=tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.startswith("sparsekit train: ") and done.stderr.count("\n") == 1, done.stderr[-2000:]
    assert expected in done.stderr and str(config) in done.stderr


@pytest.mark.parametrize("depth", [65, 1000, 100_000])
@pytest.mark.parametrize("bracket", ["[]", "{}"])
def test_a_dictionary_whose_cfg_json_nests_too_deep_is_refused_naming_it(tmp_path, depth, bracket):
    sae = sparsekit.TopKSAE(4, 8, k=2)
    sae.save(tmp_path / "sae")
    cfg = tmp_path / "sae" / "cfg.json"
    inner = '{"a": ' * depth + "1" + "}" * depth if bracket == "{}" else nested(depth)
    cfg.write_text(inner)
    with pytest.raises(ValueError, match=f"cfg.json: JSON nested {depth} levels deep, more than the 64 allowed"):
        sparsekit.load(tmp_path / "sae")


def test_a_giant_cfg_json_is_refused_before_it_is_read(tmp_path, monkeypatch):
    sae = sparsekit.TopKSAE(4, 8, k=2)
    sae.save(tmp_path / "sae")
    cfg = tmp_path / "sae" / "cfg.json"
    with open(cfg, "r+b") as handle:  # a sparse 17 MiB file: nothing is really written
        handle.truncate(17 << 20)
    read = []
    monkeypatch.setattr(type(cfg), "read_bytes", lambda self: read.append(self) or b"")
    with pytest.raises(ValueError, match="config of 17,825,792 bytes is larger than the 16,777,216 allowed"):
        sparsekit.load(tmp_path / "sae")
    assert read == []


def test_a_cfg_json_with_a_huge_integer_is_one_clear_error(tmp_path):
    sae = sparsekit.TopKSAE(4, 8, k=2)
    sae.save(tmp_path / "sae")
    cfg = tmp_path / "sae" / "cfg.json"
    cfg.write_text('{"d_in": ' + "9" * 10_000 + "}")
    with pytest.raises(ValueError, match="cfg.json is not usable JSON"):
        sparsekit.load(tmp_path / "sae")


@pytest.mark.parametrize("seed", range(4))
def test_nesting_depth_ignores_brackets_inside_strings(seed):
    rng = random.Random(seed)
    depth = rng.randrange(1, 30)
    noise = "".join(rng.choice('[]{}"\\x') for _ in range(50))
    value = {"s": noise}
    for _ in range(depth - 1):
        value = [value]
    text = json.dumps(value)
    assert bounded.nesting_depth(text) == depth
    assert bounded.parse_json(text, "x", max_depth=depth) == value
    with pytest.raises(ValueError, match=f"JSON nested {depth} levels deep"):
        bounded.parse_json(text, "x", max_depth=depth - 1)


HOSTILE_METRIC_LINES = ["[" * 100_000, '{"step": "ten"}', "[1, 2]", '"a string"', "null", '{"step": true}',
                        '{"step": 1e999}', "\udcff garbage", '{"step": ' + "9" * 5000 + "}"]


def test_resume_skips_every_hostile_metrics_line_and_keeps_the_good_ones(tmp_path):
    good = [{"step": s, "fvu": 0.5} for s in (2, 4, 6, 8)]
    lines = [json.dumps(r) for r in good]
    rng = random.Random(hostile.fresh_seed())
    for bad in HOSTILE_METRIC_LINES:
        lines.insert(rng.randrange(len(lines) + 1), bad)
    (tmp_path / METRICS_FILE).write_text("\n".join(lines) + "\n", errors="surrogateescape")
    kept = restore_history(tmp_path, step=6)
    assert kept == good[:3]
    assert (tmp_path / METRICS_FILE).read_text().splitlines() == [json.dumps(r) for r in good[:3]]


@pytest.mark.parametrize("content", ["deep", "huge-int", "not-utf8", "list"])
def test_a_hostile_feature_report_is_one_line_from_the_dashboard_command(tmp_path, content):
    run = tmp_path / "run"
    run.mkdir()
    report = run / "sae_features.json"
    if content == "deep":
        report.write_text(nested(200_000))
    elif content == "huge-int":
        report.write_text('{"features": ' + "7" * 20_000 + "}")
    elif content == "not-utf8":
        report.write_bytes(b'{"x": "\xff"}')
    else:
        report.write_text("[1, 2, 3]")
    np.save(tmp_path / "unused.npy", torch.zeros(1).numpy())
    done = hostile.run_capped(["-m", "sparsekit", "dashboard", str(run)], cwd=tmp_path, timeout=120)
    assert done.returncode == 1, (done.stdout[-1000:], done.stderr[-2000:])  # SystemExit with the line
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert str(report) in done.stderr
