"""The Hugging Face Hub: ``sparsekit.load("user/repo")`` reads a repo through the Hub's cache
(``huggingface_hub.snapshot_download``: downloaded once, then read offline, ``HF_HUB_OFFLINE=1``
included), and ``push_to_hub`` uploads what ``sae.save`` writes.

A name is taken for a repo id only when no local path of that name exists and it has the Hub's
form, "owner/name" (letters, digits, ``-``, ``_``, ``.``). huggingface_hub comes with the ``hub``
extra (``pip install 'sparsekit[hub]'``).
"""
from __future__ import annotations

import re
import tempfile
from pathlib import Path, PurePosixPath

from sparsekit._util.extras import require

REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
HUB_EXTRA = "hub"


def looks_like_repo_id(name) -> bool:
    """Whether ``name`` has the form of a Hub repo id ("owner/name"; a Path never does)."""
    return isinstance(name, str) and REPO_ID.fullmatch(name) is not None and ".." not in name


def checked_subfolder(subfolder) -> str:
    """A relative folder path inside a repo or folder ("layers.5", "a/b"); ValueError otherwise."""
    parts = PurePosixPath(subfolder).parts if isinstance(subfolder, str) else ()
    if not parts or PurePosixPath(subfolder).is_absolute() or any(p in ("..", ".") for p in parts) or "\\" in subfolder:
        raise ValueError(f"subfolder must be a relative folder path such as 'layers.5', got {subfolder!r}")
    return str(PurePosixPath(*parts))


def _hub(what: str, module: str = "huggingface_hub"):
    return require(module, HUB_EXTRA, what=what, package="huggingface_hub")


def snapshot(repo_id: str, revision: str | None = None, subfolder: str | None = None, cache_dir=None) -> Path:
    """The local folder of ``repo_id`` at ``revision`` (its ``subfolder`` only), from the Hub's cache,
    downloading what is missing unless the Hub is offline. One-line errors: not cached while offline,
    no such repo, no such revision."""
    if revision is not None and (not isinstance(revision, str) or not revision):
        raise ValueError(f"revision must be a branch, tag or commit hash (a non-empty str), got {revision!r}")
    sub = checked_subfolder(subfolder) if subfolder is not None else None
    what = "sparsekit.load from the Hugging Face Hub"
    hf, errors, constants = (_hub(what, module) for module in ("huggingface_hub", "huggingface_hub.errors",
                                                               "huggingface_hub.constants"))
    where = f"{repo_id}" + (f" at revision {revision!r}" if revision else "")
    try:
        folder = hf.snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                      allow_patterns=[f"{sub}/*"] if sub else None)
    except errors.RevisionNotFoundError:
        raise FileNotFoundError(f"{repo_id} has no revision {revision!r} on the Hugging Face Hub") from None
    except (errors.RepositoryNotFoundError, errors.GatedRepoError):
        raise FileNotFoundError(f"{repo_id} is not a local folder, and the Hugging Face Hub has no repo {repo_id} "
                                f"that this account can read (private or gated repos need `hf auth login`)") from None
    except errors.IncompleteSnapshotError:
        raise FileNotFoundError(f"{where} is only partly in the Hugging Face cache ({cache_dir or constants.HF_HUB_CACHE}) "
                                f"and the Hub cannot be reached: download it again with network access") from None
    except errors.LocalEntryNotFoundError:
        raise FileNotFoundError(f"{repo_id} is not a local folder, and {where} is not in the Hugging Face cache "
                                f"({cache_dir or constants.HF_HUB_CACHE}) while the Hub cannot be reached "
                                f"(HF_HUB_OFFLINE={int(bool(constants.HF_HUB_OFFLINE))}): download it once with "
                                f"network access") from None
    path = Path(folder)
    if sub is not None:
        path = path / sub
        if not path.is_dir():
            raise FileNotFoundError(f"{where} has no folder {sub!r}")
    return path


def push_to_hub(sae, repo_id: str, *, subfolder: str | None = None, revision: str | None = None,
                private: bool | None = None, token: str | None = None, commit_message: str | None = None):
    """Upload ``sae`` to the Hub repo ``repo_id`` (created if missing) as ``sae.save`` writes it
    (cfg.json + sae.safetensors, into ``subfolder`` when given), so ``sparsekit.load(repo_id,
    subfolder=...)`` reads it back. Returns huggingface_hub's CommitInfo."""
    if not looks_like_repo_id(repo_id):
        raise ValueError(f"repo_id must be a Hub repo id 'owner/name', got {repo_id!r}")
    sub = checked_subfolder(subfolder) if subfolder is not None else None
    if private is not None and not isinstance(private, bool):
        raise ValueError(f"private must be True, False or None, got {private!r}")
    hf = _hub("push_to_hub")
    api = hf.HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="sparsekit-push-") as tmp:
        sae.save(tmp)  # before any network call: bad metadata stops here
        api.create_repo(repo_id, private=private, exist_ok=True)
        message = commit_message or f"sparsekit: {sae.architecture} dictionary, {sae.d_in} -> {sae.n_latents} latents"
        return api.upload_folder(repo_id=repo_id, folder_path=tmp, path_in_repo=sub, revision=revision,
                                 commit_message=message)
