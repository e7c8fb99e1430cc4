"""Issue 21, class 7: bombs and giants, at every reader. YAML aliases (billion laughs) and deep
nesting in a `sparsekit train --config` file; deep, huge or malformed JSON in a dictionary's cfg.json,
a feature report or a metrics.jsonl (read by the dashboard, and on resume); files that are pipes or
devices; absurd path lengths (`sparsekit.load`'s directory too). Every reader goes
through ``sparsekit._util.bounded`` and each case must end in one clear line naming the file or flag:
no traceback, no memory blow-up, no stall.

Each case runs in a forked child under a memory cap (the parent's address space + 512 MiB) and a
timeout (tests/helpers/forked.py): an unrefused bomb dies there, failing the case, instead of taking
the machine. Depths, sizes and contents are drawn from a fresh seed, named when a case fails."""
import ast
import functools
import json
import os
import random

import pytest
from helpers import forked, hostile

import sparsekit
from sparsekit._util import bounded
from sparsekit.analysis.dashboard import REPORT_MAX_BYTES, save_report, training_dead
from sparsekit.cli.train import CONFIG_MAX_BYTES
from sparsekit.sae.files import CONFIG_MAX_BYTES as CFG_JSON_MAX_BYTES
from sparsekit.training.metrics import METRICS_FILE, restore_history

SEED = hostile.fresh_seed()
RNG = random.Random(SEED)


one_line = functools.partial(forked.one_line, seed=SEED)  # the stderr line of a CLI run that exited


def refused(outcome, *words) -> str:
    """The message of a call that raised a ValueError (RefusedFile or its wording) holding `words`."""
    assert outcome.status == "raised" and outcome.kind in ("RefusedFile", "ValueError"), f"seed {SEED}: {outcome}"
    for word in words:
        assert word in outcome.value, f"seed {SEED}: {word!r} not in {outcome.value!r}"
    assert len(outcome.value) < 600, outcome.value
    return outcome.value


def nested_json(depth: int, rng: random.Random) -> str:
    opens = [rng.choice(("[", '{"a":')) for _ in range(depth)]
    return "".join(opens) + "1" + "".join("]" if o == "[" else "}" for o in reversed(opens))


def nested_yaml_flow(depth: int) -> str:
    return "n_latents: " + "[" * depth + "8" + "]" * depth + "\n"


def nested_yaml_block(depth: int) -> str:
    return "".join("  " * i + f"k{i}:\n" for i in range(depth)) + "  " * depth + "leaf: 1\n"


def laughs(levels: int) -> str:
    """The billion-laughs document: 9**levels "lol"s built from `levels` lines of aliases."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    lines.append(f"n_latents: *a{levels - 1}")
    return "\n".join(lines) + "\n"


def sparse_file(path, size: int):
    """A file of `size` bytes that takes no disk (a hole): reading it whole would need `size` bytes of memory."""
    with open(path, "wb") as handle:
        handle.truncate(size)
    return path


def train_with_config(data, tmp_path, text: str | bytes):
    config = tmp_path / "cfg.yaml"
    (config.write_bytes if isinstance(text, bytes) else config.write_text)(text)
    return forked.cli("train", "--config", config, "--data", data, "--out", tmp_path / "out", "--n-latents", "16",
                      "--k", "2", "--total-tokens", "256", "--batch-size", "64", "--eval-tokens", "0", "--no-progress")


# --- sparsekit train --config: aliases, nesting, size, kind ------------------------------------------

YAML_BOMBS = {
    "billion laughs": (laughs(9), "line 1: YAML anchors (&a0) are not accepted here"),
    "an alias of nothing": ("k: 2\nn_latents: *b\n", "line 2: YAML aliases (*name) are not accepted here"),
    "a merge key": ("base: &b {n_latents: 8}\n<<: *b\n", "line 1: YAML anchors (&b) are not accepted here"),
    "flow nesting 10,000 deep": (nested_yaml_flow(10_000), "YAML nested more than 16 levels deep"),
    "flow nesting a random depth": (nested_yaml_flow(RNG.randrange(17, 3000)), "YAML nested more than 16 levels deep"),
    "block nesting 300 deep": (nested_yaml_block(300), "YAML nested more than 16 levels deep"),
    "an int of 5,000 digits": ("n_latents: " + "9" * 5000 + "\n", "not valid YAML: Exceeds the limit"),
    "not UTF-8": (b"n_latents: 8\nk: \xff\xfe\n", "YAML file is not UTF-8 text (invalid start byte at byte 16)"),
    "a 100,000-character key": ("? " + "x" * 100_000 + "\n: 1\n", "unknown key 'xxxxxxxx"),
    "a 100,000-character value": ("architecture: " + "y" * 100_000 + "\n",
                                  "'architecture': a string of 100,000 characters is longer than"),
    "one anchor on a real setting": ("n_latents: 8\ndata: &d /tmp/x.npy\n",
                                     "line 2: YAML anchors (&d) are not accepted here"),
    "3 MiB written out": ("# " + "x" * (3 << 20) + "\nn_latents: 8\n", "larger than the 1,048,576 allowed"),
}


@pytest.mark.parametrize("case", list(YAML_BOMBS))
def test_a_hostile_config_is_refused_in_one_line_naming_the_file(data, tmp_path, case):
    text, expected = YAML_BOMBS[case]
    err = one_line(train_with_config(data, tmp_path, text))
    assert expected in err, f"seed {SEED}: {err!r}"
    assert not (tmp_path / "out").exists()


def test_a_config_over_the_size_limit_is_refused_before_it_is_read(data, tmp_path):
    size = RNG.randrange(CONFIG_MAX_BYTES + 1, 1 << 40)
    config = sparse_file(tmp_path / "cfg.yaml", size)
    err = one_line(forked.cli("train", "--config", config, "--data", data, "--n-latents", "8", "--out", tmp_path / "o"))
    assert f"{config}: YAML file of {size:,} bytes is larger than the {CONFIG_MAX_BYTES:,} allowed" in err, err


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero", "/dev/urandom"])
def test_a_config_that_is_a_pipe_or_device_is_refused_without_waiting(data, tmp_path, kind):
    if kind == "fifo":
        config = tmp_path / "cfg.yaml"
        os.mkfifo(config)  # no writer ever comes: a blocking open would wait forever
    else:
        config = kind
    err = one_line(forked.cli("train", "--config", config, "--data", data, "--n-latents", "8", "--out", tmp_path / "o"))
    assert f"--config {config}: YAML file is not a regular file" in err


def test_a_config_at_the_nesting_limit_still_reads(tmp_path):
    # 16 nodes deep: the root mapping, 14 nested mappings, the leaf's value
    (tmp_path / "ok.yaml").write_text(nested_yaml_block(14))
    (tmp_path / "deep.yaml").write_text(nested_yaml_block(15))
    loaded = forked.run(bounded.load_yaml, tmp_path / "ok.yaml")
    assert loaded.status == "returned" and "leaf" in loaded.value, loaded
    refused(forked.run(bounded.load_yaml, tmp_path / "deep.yaml"), "YAML nested more than 16 levels deep")


def test_a_real_config_with_lists_still_trains(data, tmp_path):
    # A fresh interpreter, not a fork: a child forked from a parent whose OpenMP pool has run can
    # deadlock as soon as it trains (seen in a full-suite run: killed at the 60 s timeout).
    config = tmp_path / "cfg.yaml"
    config.write_text("architecture: matryoshka_batchtopk\nmatryoshka_widths: [4, 16]\n"
                      "adam_betas: [0.9, 0.99]\nseed: 9223372036854775807\n")
    done = hostile.run_capped(["-m", "sparsekit", "train", "--config", str(config), "--data", str(data), "--out",
                               str(tmp_path / "out"), "--n-latents", "16", "--k", "2", "--total-tokens", "256",
                               "--batch-size", "64", "--eval-tokens", "0", "--no-progress"], timeout=180)
    assert done.returncode == 0, f"seed {SEED}: {done.stderr[-2000:]}"
    assert (tmp_path / "out" / "cfg.json").is_file()


# --- a dictionary's cfg.json -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def dictionary(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dictionary") / "sae"
    sparsekit.TopKSAE(8, 32, k=3, seed=SEED % 1000).save(folder)
    return folder


@pytest.fixture
def saved(dictionary, tmp_path):
    import shutil
    folder = tmp_path / "sae"
    shutil.copytree(dictionary, folder)
    return folder


CFG_BOMBS = {
    "nested 100,000 deep": (lambda r: nested_json(100_000, r), "JSON nested 100000 levels deep"),
    "nested a random depth past the limit": (lambda r: nested_json(r.randrange(65, 900), r),
                                             "levels deep, more than the 64 allowed"),
    "an int of 100,000 digits": (lambda r: '{"n_latents": ' + "7" * 100_000 + "}", "is not usable JSON: Exceeds"),
    "a field deep inside the object": (lambda r: '{"architecture": "topk", "metadata": ' + nested_json(70, r) + "}",
                                       "JSON nested 71 levels deep, more than the 64 allowed"),
    "cut short": (lambda r: '{"architecture": "topk", "d_in": 8, "n_lat', "is not valid JSON: Unterminated string"),
    "nested one past the limit": (lambda r: nested_json(65, r), "JSON nested 65 levels deep, more than the 64 allowed"),
}


@pytest.mark.parametrize("case", list(CFG_BOMBS))
def test_a_hostile_cfg_json_is_refused_naming_it(saved, case):
    make, expected = CFG_BOMBS[case]
    (saved / "cfg.json").write_text(make(random.Random(SEED)))
    refused(forked.run(sparsekit.load, saved), str(saved / "cfg.json"), expected)


def test_a_cfg_json_over_the_size_limit_is_refused_before_it_is_read(saved):
    size = RNG.randrange(CFG_JSON_MAX_BYTES + 1, 1 << 42)
    sparse_file(saved / "cfg.json", size)
    refused(forked.run(sparsekit.load, saved), str(saved / "cfg.json"), f"config of {size:,} bytes is larger than")


def test_a_sparse_17_mib_cfg_json_is_refused_without_reading_a_byte(saved, monkeypatch):
    sparse_file(saved / "cfg.json", 17 << 20)  # a hole: nothing is written, reading it would allocate 17 MiB
    reads = []
    real_read = bounded.os.read
    monkeypatch.setattr(bounded.os, "read", lambda fd, n: reads.append(n) or real_read(fd, n))
    with pytest.raises(bounded.RefusedFile, match="config of 17,825,792 bytes is larger than the 16,777,216 allowed"):
        sparsekit.load(saved)
    assert reads == [], "the size is refused from fstat, before any read"


@pytest.mark.parametrize("name", ["cfg.json", "sae.safetensors"])
def test_a_dictionary_file_that_is_a_pipe_is_refused_by_name_without_waiting(saved, name):
    (saved / name).unlink()
    os.mkfifo(saved / name)  # no writer ever comes: a blocking open would wait forever
    # before: "cfg.json does not exist: is ... a directory written by sae.save()?" for a file that exists
    refused(forked.run(sparsekit.load, saved), f"{saved / name} is a pipe, socket or device, not a regular file")
    if name == "cfg.json":
        refused(forked.run(bounded.load_json, saved / name, 1024), "cfg.json: JSON file is not a regular file")


@pytest.mark.parametrize("where", ["the whole path", "one name", "the subfolder"])
def test_an_absurd_path_to_load_is_one_line_naming_the_argument(saved, where):
    # before: OSError [Errno 36] File name too long, from the first stat
    if where == "the whole path":
        outcome = forked.run(sparsekit.load, str(saved) + "/x" * RNG.randrange(2100, 10_000))
        words = ("directory: the path is", "bytes long; a path must be under 4,096 bytes")
    elif where == "one name":
        outcome = forked.run(sparsekit.load, saved / ("n" * RNG.randrange(256, 2000)))
        words = ("directory: a folder or file name in the path is", "names are at most 255 bytes")
    else:
        outcome = forked.run(functools.partial(sparsekit.load, saved, subfolder="s" * RNG.randrange(256, 2000)))
        words = ("a folder or file name in the path is", "names are at most 255 bytes")
    refused(outcome, *words)


# --- sparsekit dashboard: *_features.json and metrics.jsonl ----------------------------------------

def a_report() -> dict:
    return {"model": "tiny", "hook": "blocks.0.hook_resid_post", "output_hook": "blocks.0.hook_resid_post",
            "architecture": "topk", "n_latents": 8, "tokens": 100,
            "census": {"features": 8, "dead": 2, "reported": 1, "single_token": 0, "context": 1},
            "features": [{"id": 3, "density": 0.1, "max_act": 2.0, "mean_act": 1.0,
                          "histogram": {"edges": [0, 1, 2], "counts": [3, 1]},
                          "examples": [{"context": 0, "max_position": 1, "max_act": 2.0, "tokens": [" a", " b"],
                                        "acts": [0.5, 2.0]}],
                          "logits": {"promoted": [[" x", 1.0]], "suppressed": [[" y", -1.0]]},
                          "single_token_ratio": 0.1, "kind": "context"}]}


REPORT_BOMBS = {
    "nested 200,000 deep": (lambda r: nested_json(200_000, r).encode(), "JSON nested 200000 levels deep"),
    "a feature nested past the limit": (
        lambda r: json.dumps(dict(a_report(), extra=json.loads(nested_json(r.randrange(65, 500), r)))).encode(),
        "levels deep, more than the 64 allowed"),
    "an int of 50,000 digits": (lambda r: b'{"n_latents": ' + b"9" * 50_000 + b"}", "not usable JSON: Exceeds"),
    "not UTF-8": (lambda r: b'{"model": "\xc3\x28"}', "feature report is not UTF-8 text (invalid continuation byte "
                                                         "at byte 11)"),
    "random bytes": (lambda r: bytes([0xFF]) + os.urandom(r.randrange(10, 5000)), "feature report is not UTF-8 text"),
    "garbage text": (lambda r: "".join(r.choice("{[:,]}x1\"") for _ in range(r.randrange(1, 3000))).encode(),
                     "not"),
}


@pytest.mark.parametrize("case", list(REPORT_BOMBS))
def test_a_hostile_feature_report_stops_the_dashboard_in_one_line(tmp_path, case):
    make, expected = REPORT_BOMBS[case]
    (tmp_path / "sae_features.json").write_bytes(make(random.Random(SEED)))
    err = one_line(forked.cli("dashboard", tmp_path), code="1")
    assert f"{tmp_path / 'sae_features.json'} is not a JSON feature report" in err and expected in err, err
    assert not (tmp_path / "dashboard.html").exists()


def test_a_feature_report_over_the_size_limit_is_refused_before_it_is_read(tmp_path):
    size = RNG.randrange(REPORT_MAX_BYTES + 1, 1 << 42)
    sparse_file(tmp_path / "sae_features.json", size)
    err = one_line(forked.cli("dashboard", tmp_path), code="1")
    assert "is not a JSON feature report" in err and f"feature report of {size:,} bytes is larger than" in err, err


def test_a_feature_report_under_the_cap_but_over_memory_is_one_line(tmp_path):
    # a sparse file under the 1 GiB cap and over the child's 512 MiB headroom: MemoryError becomes the line
    sparse_file(tmp_path / "sae_features.json", RNG.randrange(700 << 20, REPORT_MAX_BYTES))
    err = one_line(forked.cli("dashboard", tmp_path), code="1")
    assert "is not a JSON feature report" in err and "does not fit in this process's memory" in err, err


def test_a_feature_report_that_is_no_object_stops_the_dashboard_in_one_line(tmp_path):
    (tmp_path / "sae_features.json").write_text(json.dumps([RNG.random() for _ in range(RNG.randrange(1, 50))]))
    err = one_line(forked.cli("dashboard", tmp_path), code="1")
    assert f"{tmp_path / 'sae_features.json'} must be a JSON object, got list" in err, err


def test_a_feature_report_that_is_a_pipe_is_refused_without_waiting(tmp_path):
    os.mkfifo(tmp_path / "sae_features.json")
    err = one_line(forked.cli("dashboard", tmp_path), code="1")
    assert "not a regular file" in err, err


@pytest.mark.parametrize("flag", ["RUN_DIR", "--out", "--neuronpedia", "--screenshot"])
def test_the_dashboard_refuses_an_absurd_path_by_its_argument(tmp_path, flag):
    save_report(a_report(), tmp_path, "sae")
    long = str(tmp_path / ("n" * RNG.randrange(256, 2000)))
    argv = [long] if flag == "RUN_DIR" else [tmp_path, flag, long]
    err = one_line(forked.cli("dashboard", *argv))
    assert f"argument {'run_dir' if flag == 'RUN_DIR' else flag}:" in err and "bytes long" in err, err


GOOD = {"step": 290, "tokens": 296960, "dead_frac": 0.0625}
TAIL_BOMBS = {
    "a line nested 8,000 deep": lambda r: nested_json(8_000, r),
    "a line nested just past the limit": lambda r: json.dumps({"dead_frac": 0.5, "x": json.loads(nested_json(64, r))}),
    "a 10 MB line": lambda r: '{"dead_frac": 0.5, "pad": "' + "p" * 10_000_000 + '"}',
    "random bytes": lambda r: os.urandom(r.randrange(1, 4000)).decode("latin-1").replace("\n", " "),
    "a list": lambda r: json.dumps([GOOD]),
    "an int of 20,000 digits": lambda r: '{"dead_frac": ' + "1" * 20_000 + "}",
    "dead_frac a string": lambda r: '{"dead_frac": "0.5", "step": 1}',
}


@pytest.mark.parametrize("case", list(TAIL_BOMBS))
def test_a_hostile_last_metrics_line_is_passed_over_for_the_last_good_one(tmp_path, case):
    log = tmp_path / "metrics.jsonl"
    log.write_text(json.dumps({"step": 10, "tokens": 10240, "dead_frac": 0.9}) + "\n" + json.dumps(GOOD) + "\n" +
                   TAIL_BOMBS[case](random.Random(SEED)) + "\n")
    outcome = forked.run(training_dead, log)
    big = case == "a 10 MB line"  # the last 64 KiB are all padding: no record there at all
    assert outcome.status == "returned", f"seed {SEED}: {outcome}"
    assert ast.literal_eval(outcome.value) == (None if big else GOOD), f"seed {SEED}: {outcome}"


def test_a_metrics_log_of_a_terabyte_is_read_only_at_its_tail(tmp_path):
    log = sparse_file(tmp_path / "metrics.jsonl", 1 << 40)
    with open(log, "r+b") as handle:
        handle.seek((1 << 40) - 200)
        handle.write(b"\n" + json.dumps(GOOD).encode() + b"\n")
    outcome = forked.run(training_dead, log)
    assert outcome.status == "returned" and ast.literal_eval(outcome.value) == GOOD, outcome


def test_the_dashboard_passes_over_a_hostile_training_log(tmp_path):
    save_report(a_report(), tmp_path, "sae")
    (tmp_path / "sae").mkdir()
    (tmp_path / "sae" / "metrics.jsonl").write_text(nested_json(50_000, RNG) + "\n")
    outcome = forked.cli("dashboard", tmp_path)
    assert outcome.status == "returned" and (tmp_path / "dashboard.html").is_file(), f"seed {SEED}: {outcome}"


HOSTILE_METRIC_LINES = ["[" * 100_000, '{"step": "ten"}', "[1, 2]", '"a string"', "null", '{"step": true}',
                        '{"step": 1e999}', "\udcff garbage", '{"step": ' + "9" * 5000 + "}"]


def test_resume_skips_every_hostile_metrics_line_and_keeps_the_good_ones(tmp_path):
    good = [{"step": s, "fvu": 0.5} for s in (2, 4, 6, 8)]
    lines = [json.dumps(r) for r in good]
    for bad in HOSTILE_METRIC_LINES:  # at fresh random places among the good lines
        lines.insert(RNG.randrange(len(lines) + 1), bad)
    (tmp_path / METRICS_FILE).write_text("\n".join(lines) + "\n", errors="surrogateescape")
    outcome = forked.run(restore_history, tmp_path, 6)
    assert outcome.status == "returned" and ast.literal_eval(outcome.value) == good[:3], f"seed {SEED}: {outcome}"
    assert (tmp_path / METRICS_FILE).read_text().splitlines() == [json.dumps(r) for r in good[:3]]


# --- the loader itself ----------------------------------------------------------------------------

def test_the_nesting_depth_ignores_brackets_inside_strings():
    for _ in range(20):
        depth = RNG.randrange(1, 30)
        value = {"s": "".join(RNG.choice('[]{}"\\x') for _ in range(50))}  # brackets, quotes, escapes
        for _ in range(depth - 1):
            value = [value]
        text = json.dumps(value)
        assert bounded.nesting_depth(text) == depth, f"seed {SEED}: {text}"
        assert bounded.parse_json(text, "x", max_depth=depth) == value
        with pytest.raises(bounded.RefusedFile, match=f"JSON nested {depth} levels deep"):
            bounded.parse_json(text, "x", max_depth=depth - 1)


def test_fresh_random_json_nesting_is_refused_exactly_past_the_limit():
    rng = random.Random(SEED)
    for _ in range(40):
        depth = rng.randrange(1, 3 * bounded.DEFAULT_DEPTH)
        text = nested_json(depth, rng)
        if depth <= bounded.DEFAULT_DEPTH:
            assert bounded.parse_json(text, "t.json") is not None, f"seed {SEED}: depth {depth}"
        else:
            with pytest.raises(bounded.RefusedFile, match=f"JSON nested {depth} levels deep, more than the 64"):
                bounded.parse_json(text, "t.json")


def test_a_path_with_a_nul_byte_or_too_long_is_refused_before_the_file_system_sees_it():
    for path, expected in (("a\0b", "NUL byte"), ("/x" * 2100, "4,200 bytes long"), ("/" + "n" * 256, "256 bytes")):
        with pytest.raises(bounded.RefusedFile, match=expected):
            bounded.read_bytes(path, 10, "--flag")
