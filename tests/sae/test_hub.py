"""sparsekit.load("user/repo") through the Hugging Face cache, offline (no network ever: every test
here runs with HF_HUB_OFFLINE and a socket that refuses to connect), and push_to_hub with the
upload replaced by a recorder: what would be uploaded, and that it loads back."""
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers.dictionary_cases import D_IN, make_dictionary

import sparsekit

huggingface_hub = pytest.importorskip("huggingface_hub")
hub_constants = pytest.importorskip("huggingface_hub.constants")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to reach the network")
    monkeypatch.setattr(socket.socket, "connect", refuse)


def cached_snapshot(cache: Path, repo_id: str, ref: str | None = "main", commit: str | None = None) -> Path:
    """The folder snapshot_download reads for repo_id at ref: models--owner--name/snapshots/<commit>,
    with refs/<ref> naming the commit (as a download leaves them)."""
    commit = commit or secrets.token_hex(20)
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = storage / "snapshots" / commit
    snapshot.mkdir(parents=True)
    if ref is not None:
        (storage / "refs").mkdir(exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    return snapshot


def same_dictionary(a, b) -> bool:
    x = torch.randn(7, D_IN)
    return (type(a) is type(b) and a.config() == b.config() and a.metadata == b.metadata
            and all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
            and torch.equal(a.reconstruct(x), b.reconstruct(x)))


def test_a_repo_id_loads_from_the_cache(tmp_path):
    sae = make_dictionary("jumprelu", seed=secrets.randbelow(1000))
    sae.metadata = {"hook": "blocks.2.hook_resid_post", "model": "gpt2"}
    sae.save(cached_snapshot(tmp_path, "someone/my-saes"))
    assert same_dictionary(sparsekit.load("someone/my-saes", cache_dir=tmp_path), sae)


def test_revision_picks_a_tag_or_a_commit(tmp_path):
    first, second = make_dictionary("topk", seed=1), make_dictionary("topk", seed=2)
    first.save(cached_snapshot(tmp_path, "someone/saes", ref="main"))
    commit = secrets.token_hex(20)
    second.save(cached_snapshot(tmp_path, "someone/saes", ref="v2", commit=commit))
    assert same_dictionary(sparsekit.load("someone/saes", cache_dir=tmp_path), first)
    assert same_dictionary(sparsekit.load("someone/saes", revision="v2", cache_dir=tmp_path), second)
    assert same_dictionary(sparsekit.load("someone/saes", revision=commit, cache_dir=tmp_path), second)


def test_subfolder_picks_one_of_several_dictionaries(tmp_path):
    snapshot = cached_snapshot(tmp_path, "someone/per-layer")
    saes = {f"layers.{i}": make_dictionary("relu", seed=i) for i in range(3)}
    for name, sae in saes.items():
        sae.save(snapshot / name)
    loaded = sparsekit.load("someone/per-layer", subfolder="layers.1", cache_dir=tmp_path)
    assert same_dictionary(loaded, saes["layers.1"])
    with pytest.raises(FileNotFoundError, match=r"holds dictionaries in folders \(layers.0, layers.1, layers.2\), "
                                                r"none of its own: pass subfolder="):
        sparsekit.load("someone/per-layer", cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="has no folder 'layers.7'"):
        sparsekit.load("someone/per-layer", subfolder="layers.7", cache_dir=tmp_path)


def test_a_repo_that_is_not_cached_is_one_line_saying_so(tmp_path):
    with pytest.raises(FileNotFoundError) as raised:
        sparsekit.load("someone/never-downloaded", cache_dir=tmp_path)
    message = str(raised.value)
    assert "\n" not in message and "not in the Hugging Face cache" in message and "HF_HUB_OFFLINE=1" in message
    cached_snapshot(tmp_path, "someone/tagged").joinpath("cfg.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="someone/tagged at revision 'v9' is not in the Hugging Face cache"):
        sparsekit.load("someone/tagged", revision="v9", cache_dir=tmp_path)


def test_a_local_folder_wins_over_a_repo_of_the_same_name(tmp_path, monkeypatch):
    sae = make_dictionary("gated")
    monkeypatch.chdir(tmp_path)
    sae.save(Path("someone/saes"))
    assert same_dictionary(sparsekit.load("someone/saes"), sae)  # no cache_dir: never looked up


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(subfolder="../elsewhere"), "subfolder must be a relative folder path"),
    (dict(subfolder="/etc"), "subfolder must be a relative folder path"),
    (dict(subfolder=3), "subfolder must be a relative folder path"),
    (dict(revision=""), "revision must be a branch, tag or commit hash"),
])
def test_bad_hub_arguments_are_one_error_naming_them(tmp_path, kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        sparsekit.load("someone/saes", cache_dir=tmp_path, **kwargs)


def test_the_env_variable_alone_keeps_it_offline(tmp_path):
    """A fresh process with only HF_HUB_OFFLINE=1 and HF_HUB_CACHE set, as a user would run it."""
    sae = make_dictionary("batchtopk", transcoder=True)
    sae.save(cached_snapshot(tmp_path, "someone/tc"))
    sae.save(tmp_path / "expected")
    code = textwrap.dedent("""
        import socket, torch, sparsekit
        def refuse(*a, **k): raise AssertionError("network")
        socket.socket.connect = refuse
        got, want = sparsekit.load("someone/tc"), sparsekit.load(__import__("sys").argv[1])
        assert all(torch.equal(got.state_dict()[k], want.state_dict()[k]) for k in want.state_dict())
        try:
            sparsekit.load("someone/other")
        except FileNotFoundError as e:
            print(e)
        """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path), PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "expected")], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "someone/other is not a local folder, and someone/other is not in the Hugging Face cache" in result.stdout


# --- push_to_hub ---------------------------------------------------------------------------------

class RecordingApi:
    """HfApi with create_repo and upload_folder recorded instead of sent; the uploaded folder is copied."""
    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **kwargs):
        RecordingApi.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, *, repo_id, folder_path, path_in_repo=None, **kwargs):
        files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
        RecordingApi.calls.append(("upload_folder", repo_id, dict(kwargs, path_in_repo=path_in_repo, files=files)))
        RecordingApi.uploaded = Path(folder_path)
        RecordingApi.copy_to.mkdir(parents=True, exist_ok=True)
        shutil.copytree(folder_path, RecordingApi.copy_to / (path_in_repo or ""), dirs_exist_ok=True)
        return "commit-info"


@pytest.fixture
def recorder(monkeypatch, tmp_path):
    RecordingApi.calls = []
    RecordingApi.copy_to = cached_snapshot(tmp_path / "cache", "me/pushed")
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    return RecordingApi


@pytest.mark.parametrize("subfolder", [None, "layers.3"])
def test_push_uploads_what_save_writes_and_it_loads_back(tmp_path, recorder, subfolder):
    sae = make_dictionary("topk", seed=secrets.randbelow(1000))
    sae.metadata = {"hook": "blocks.3.hook_resid_post", "tokens_trained": 123}
    assert sae.push_to_hub("me/pushed", subfolder=subfolder, private=True, token="t0k") == "commit-info"
    (create, repo, create_kwargs), (upload, repo2, upload_kwargs) = recorder.calls
    assert (create, repo, repo2, upload) == ("create_repo", "me/pushed", "me/pushed", "upload_folder")
    assert create_kwargs == {"private": True, "exist_ok": True}
    assert upload_kwargs["files"] == ["cfg.json", "sae.safetensors"] and upload_kwargs["path_in_repo"] == subfolder
    assert "topk" in upload_kwargs["commit_message"]
    assert not recorder.uploaded.exists()  # the temporary folder is gone
    loaded = sparsekit.load("me/pushed", subfolder=subfolder, cache_dir=tmp_path / "cache")
    assert same_dictionary(loaded, sae)


def test_push_refuses_bad_arguments_before_any_call(recorder):
    sae = make_dictionary("relu")
    with pytest.raises(ValueError, match="repo_id must be a Hub repo id"):
        sparsekit.push_to_hub(sae, "no-owner")
    with pytest.raises(ValueError, match="private must be True, False or None"):
        sae.push_to_hub("me/pushed", private="yes")
    sae.metadata = {"weights": torch.ones(1)}
    with pytest.raises(ValueError, match=r"sae.metadata\['weights'\]"):
        sae.push_to_hub("me/pushed")
    assert recorder.calls == []


def test_pushed_cfg_is_the_saved_cfg(recorder, tmp_path):
    sae = make_dictionary("jumprelu", transcoder=True)
    sae.push_to_hub("me/pushed")
    sae.save(tmp_path / "local")
    assert json.loads((recorder.copy_to / "cfg.json").read_text()) == json.loads((tmp_path / "local/cfg.json").read_text())


def test_without_huggingface_hub_a_missing_path_says_both(tmp_path, monkeypatch):
    """A mistyped relative path has a repo id's form: without huggingface_hub the error names the path first."""
    monkeypatch.chdir(tmp_path)
    result = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import sys
        sys.modules["huggingface_hub"] = None
        import sparsekit
        try:
            sparsekit.load("runs/finall")
        except FileNotFoundError as e:
            print(e)
        """)], env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ("runs/finall is not a directory, nor a Hugging Face Hub repo this installation can "
                                     "read (sparsekit.load from the Hugging Face Hub needs huggingface_hub: "
                                     "pip install 'sparsekit[hub]')")
