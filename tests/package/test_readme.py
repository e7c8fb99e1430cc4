"""The README's training example runs as printed (with a shorter run and a temporary folder)."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_training_example_runs(tmp_path, monkeypatch, capsys):
    section = README.read_text().split("## Train a dictionary", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "sparsekit.train(" in code and len(code.strip().splitlines()) <= 12
    code = code.replace("total_tokens=5_000_000", "total_tokens=200_000").replace("200_000)", "50_000)")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "fvu" in printed
    assert (tmp_path / "runs/topk/metrics.jsonl").stat().st_size > 0
    assert (tmp_path / "runs/topk/final/cfg.json").is_file()
