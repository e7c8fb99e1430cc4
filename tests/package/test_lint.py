"""The code passes ruff with the settings in pyproject.toml ([tool.ruff]): pycodestyle, pyflakes,
import order, and no relative import that climbs out of its package (`from ..x import y`)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def ruff(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", *args],
                          cwd=cwd, capture_output=True, text=True)


def test_ruff_finds_nothing_in_the_repository():
    result = ruff(str(ROOT))
    assert result.returncode == 0, f"`ruff check .` found:\n{result.stdout}{result.stderr}"


def test_ruff_with_our_settings_refuses_a_relative_import_out_of_a_package(tmp_path):
    package = tmp_path / "pkg" / "sub"
    package.mkdir(parents=True)
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "escape.py").write_text("from ..other import thing\n\nprint(thing)\n")
    result = ruff("--config", str(ROOT / "pyproject.toml"), str(package / "escape.py"), cwd=tmp_path)
    assert result.returncode == 1 and "TID252" in result.stdout, result.stdout + result.stderr


def test_no_two_test_files_share_a_basename():
    # The test folders have no __init__.py, so pytest imports each test file by its basename: a second
    # tests/<dir>/test_x.py stops the whole collection ("import file mismatch").
    seen: dict[str, Path] = {}
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        assert path.name not in seen, f"{path.relative_to(ROOT)} and {seen[path.name].relative_to(ROOT)} share a name"
        seen[path.name] = path
    assert len(seen) > 100
