"""`sparsekit tune`: --quick measures and caches, --show says what is in effect, --reset goes back."""
import json

import pytest

from sparsekit.cli import main
from sparsekit.ops.cpu import tuning


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(tuning.CACHE_ENV, str(tmp_path / "cache"))
    tuning.unpin()
    tuning.reload()
    yield tmp_path / "cache"
    tuning.unpin()
    tuning.reload()


def test_tune_quick_caches_what_it_measured_then_show_and_reset(cache, capsys):
    main(["tune", "--quick", "--no-progress"])
    out = capsys.readouterr().out
    path = tuning.cache_path()
    assert f"wrote {path}" in out
    record = json.loads(path.read_text())
    assert record["quick"] is True and record["key"] == tuning.cache_key()
    for name in tuning.KNOBS:  # each knob measured, or said why not
        assert name in record["values"] or name in record["notes"]
        assert f"{name} = " in out or f"{name}: skipped" in out
    assert tuning.in_effect() == {**{n: tuning.default(n) for n in tuning.KNOBS}, **record["values"]}
    main(["tune", "--show"])
    shown = capsys.readouterr().out
    assert f"CPU paths: tuned ({path})" in shown and "written " in shown
    main(["tune", "--reset"])
    assert f"deleted {path}" in capsys.readouterr().out and not path.exists()
    assert tuning.source().startswith("defaults")


def test_show_without_a_cache_says_the_defaults_apply(cache, capsys):
    main(["tune", "--show"])
    out = capsys.readouterr().out
    assert "CPU paths: defaults" in out and "none (`sparsekit tune` writes it)" in out


def test_tune_refuses_show_with_reset_in_one_line(cache, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["tune", "--show", "--reset"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip() == "sparsekit tune: error: argument --reset: not allowed with argument --show"
