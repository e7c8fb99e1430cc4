"""docs/interop.md's sharing example runs as printed: in a temporary folder, the Hub offline (no
socket may connect), push_to_hub's upload recorded into the Hub cache the load then reads."""
import re
import shutil
import socket
from pathlib import Path

import pytest
import torch

import sparsekit

DOC = Path(__file__).resolve().parents[2] / "docs" / "interop.md"
TITLE = "Sharing dictionaries: the Hub, sparsify, dictionary_learning"
huggingface_hub = pytest.importorskip("huggingface_hub")
hub_constants = pytest.importorskip("huggingface_hub.constants")


def example() -> str:
    section = DOC.read_text().split(f"\n## {TITLE}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_sharing_example_runs_as_printed(tmp_path, monkeypatch):
    cache = tmp_path / "hub-cache"
    commit = "0" * 40

    class RecordingApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kwargs):
            pass

        def upload_folder(self, *, repo_id, folder_path, path_in_repo=None, **kwargs):
            storage = cache / f"models--{repo_id.replace('/', '--')}"
            shutil.copytree(folder_path, storage / "snapshots" / commit / (path_in_repo or ""), dirs_exist_ok=True)
            (storage / "refs").mkdir(exist_ok=True)
            (storage / "refs" / "main").write_text(commit)

    def refuse(*args, **kwargs):
        raise AssertionError("the example tried to reach the network")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    monkeypatch.chdir(tmp_path)
    code = example()
    assert len(code.strip().splitlines()) <= 12, "the example should stay short"
    namespace = {}
    exec(compile(code, f"docs/interop.md ({TITLE})", "exec"), namespace)
    sae, copies, again = namespace["sae"], namespace["copies"], namespace["again"]
    x = torch.randn(16, 64)
    for copy in [*copies, again]:
        assert isinstance(copy, sparsekit.TopKSAE) and copy.metadata == sae.metadata
        torch.testing.assert_close(copy.reconstruct(x), sae.reconstruct(x), rtol=0, atol=0)
    assert sorted(p.name for p in (tmp_path / "runs/for_dl").iterdir()) == ["ae.pt", "config.json"]
