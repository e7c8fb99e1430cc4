"""The CPU crossovers' lookups, cache file and crossover rule (sparsekit.ops.cpu.tuning)."""
import json
import random

import pytest

from sparsekit.ops.cpu import gemm, tuner, tuning

OTHER = {"parallel_min_flop": 0, "pooled_mm_min_flop": 5, "screen_min_flop": 3, "screen_min_n_over_k": 7, "screen_rows": 64,
         "select_threshold_min_share": 0}
DEFAULTS = lambda: {name: tuning.default(name) for name in tuning.KNOBS}  # noqa: E731


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty tuning cache of this test's own; nothing pinned before or after."""
    monkeypatch.setenv(tuning.CACHE_ENV, str(tmp_path / "cache"))
    tuning.unpin()
    tuning.reload()
    yield tmp_path / "cache"
    tuning.unpin()
    tuning.reload()


def save(values: dict, **changes) -> None:
    tuning.save({"format": tuning.FORMAT, "key": tuning.cache_key(), "values": values, **changes})


def test_without_a_cache_the_measured_defaults_apply(cache):
    assert tuning.in_effect() == DEFAULTS() and tuning.source().startswith("defaults")
    assert tuning.default("parallel_min_flop") == gemm.PARALLEL_MIN_FLOP


def test_the_cache_file_is_keyed_by_machine_and_software_under_the_overriding_folder(cache):
    path = tuning.cache_path()
    assert path.parent == cache and path.suffix == ".json"
    key = tuning.cache_key()
    assert {"cpu", "isa", "extension_sha256", "sparsekit", "torch", "numpy", "threads"} <= set(key)
    assert tuning.cache_path({**key, "torch": key["torch"] + "-other"}) != path


def test_saved_values_drive_the_lookups_and_the_gemm_choice(cache):
    save(OTHER)
    assert tuning.in_effect() == OTHER and tuning.source() == f"tuned ({tuning.cache_path()})"
    if gemm.openblas_available():
        assert gemm.gemm_library(1.0) == "numpy"  # a 1-FLOP GEMM: the tuned crossover is 0
    assert tuning.reset() is not None and tuning.in_effect() == DEFAULTS()


@pytest.mark.parametrize("case", ["random bytes", "not json", "a list", "nested", "foreign key", "unknown knob",
                                  "out of range", "a bool", "other format", "a folder"])
def test_a_corrupt_or_foreign_cache_is_ignored_with_one_warning(cache, case, capsys):
    path = tuning.cache_path()
    path.parent.mkdir(parents=True)
    good = {"format": tuning.FORMAT, "key": tuning.cache_key(), "values": OTHER}
    text = {"random bytes": bytes(random.randrange(128, 256) for _ in range(random.randrange(1, 200))),
            "not json": b'{"format": 1, "key":',
            "a list": b"[1, 2]",
            "nested": b"[" * 1000 + b"]" * 1000,
            "foreign key": json.dumps({**good, "key": {**good["key"], "cpu": "another CPU"}}).encode(),
            "unknown knob": json.dumps({**good, "values": {**OTHER, "warp_speed": 9}}).encode(),
            "out of range": json.dumps({**good, "values": {**OTHER, "screen_rows": 0}}).encode(),
            "a bool": json.dumps({**good, "values": {**OTHER, "screen_rows": True}}).encode(),
            "other format": json.dumps({**good, "format": 99}).encode(),
            "a folder": None}[case]
    if text is None:
        path.mkdir()
    else:
        path.write_bytes(text)
    capsys.readouterr()
    assert tuning.in_effect() == DEFAULTS()
    assert tuning.in_effect() == DEFAULTS()  # read once: still one warning
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 1 and "ignoring the CPU tuning cache" in warnings[0] and str(path) in warnings[0]


def test_a_pin_overrides_the_cache_until_unpinned(cache):
    save(OTHER)
    assert tuning.pin(DEFAULTS(), "checkpoint step_000000004") == DEFAULTS()
    assert tuning.source() == "recorded in checkpoint step_000000004"
    tuning.unpin()
    assert tuning.in_effect() == OTHER


def test_a_pin_of_the_defaults_leaves_the_module_constants_in_charge(cache, monkeypatch):
    tuning.pin(DEFAULTS(), "a checkpoint")
    monkeypatch.setattr(gemm, "PARALLEL_MIN_FLOP", 12345)
    assert tuning.chosen("parallel_min_flop") == 12345


def test_a_pinned_value_out_of_range_is_refused_by_name(cache):
    with pytest.raises(ValueError, match=r"a checkpoint: screen_rows must be an int in \[1, "):
        tuning.pin({"screen_rows": -1}, "a checkpoint")


@pytest.mark.parametrize("times, expected", [
    ([(1, 9, 10), (4, 5, 10), (16, 5, 10)], 1),           # wins from the smallest rung: at most it
    ([(1, 11, 10), (4, 5, 10), (16, 5, 10)], 2),          # wins from 4: between 1 and 4
    ([(1, 5, 10), (4, 11, 10), (16, 5, 10)], 8),          # a loss at 4: only from 16 on
    ([(1, 11, 10), (4, 11, 10), (16, 10, 10)], 1000),     # no win (a tie is none): the larger of default and 2 x 16
])
def test_the_crossover_is_where_the_new_path_wins_at_every_larger_size(times, expected):
    assert tuner.crossover(times, default=1000 if expected == 1000 else 500) == expected


def test_the_crossover_keeps_the_default_where_it_lies_outside_what_was_measured():
    assert tuner.crossover([(8, 5, 10), (16, 5, 10)], default=2) == 2       # won everywhere, default lower
    assert tuner.crossover([(8, 11, 10), (16, 11, 10)], default=10) == 32   # lost everywhere, default inside


def test_the_fastest_choice_keeps_the_default_unless_another_beats_it_by_the_margin():
    assert tuner.fastest({256: 0.99, 1024: 1.0}, keep=1024) == 1024
    assert tuner.fastest({256: 0.9, 1024: 1.0}, keep=1024) == 256


def test_the_selection_share_is_the_k_crossover_as_a_share_of_the_width():
    heap, fast, slow = 1.0, 0.5, 2.0
    # threshold wins from k = 64 on (crossing between 32 and 64: k ~ 45): share ceil(2048 / 45) = 46
    rungs = [(8, slow, heap), (16, slow, heap), (32, slow, heap), (64, fast, heap), (128, fast, heap)]
    assert tuner.select_share_from(rungs, 2048, 64) == 46
    assert tuner.select_share_from([(8, fast, heap), (32, fast, heap)], 2048, 64) == 256  # wins everywhere: from k = 8
    # never wins up to k = 32: the default's k (2048 / 64 = 32) or twice the largest rung, whichever is larger
    assert tuner.select_share_from([(8, slow, heap), (32, slow, heap)], 2048, 64) == 32
