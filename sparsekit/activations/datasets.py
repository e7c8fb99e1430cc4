"""Text datasets on disk, read lazily, and their tokenisation into fixed-length contexts.

    dataset = TextDataset(["corpus/"], text_field="text")          # .txt / .jsonl / .parquet files, or
    dataset = TextDataset(["saved/"])                               # a folder from datasets' save_to_disk
    for context in iter_contexts(dataset, tokenizer, context_len=128):   # [128] int64, BOS first
        ...

Formats (a path is a file or a folder; a folder is searched recursively, in sorted order):

- ``.txt``: one document per file, or one per non-empty line (``document_per_line=True``);
- ``.jsonl``: one JSON object per line, the document in its ``text_field`` (default ``"text"``);
- ``.parquet``: the ``text_field`` column, read in record batches with pyarrow;
- a folder written by ``datasets.Dataset.save_to_disk`` (it holds ``dataset_info.json`` and
  ``state.json``; a ``DatasetDict`` folder, holding ``dataset_dict.json``, is read from its
  ``train`` split), memory-mapped by ``datasets.load_from_disk`` and read in batches.

Opening a dataset checks what it can without reading the text: every path exists, every file has a
known type, the text field is a column (parquet, datasets) or a key of the first record (jsonl).
Iterating yields documents one at a time, so the corpus is never in memory at once; tokenising
stops as soon as enough contexts were made.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import Tensor

from sparsekit._util.validate import is_int

SUFFIXES = (".txt", ".jsonl", ".parquet")
_BATCH = 256  # rows per read from parquet and datasets folders


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (
        (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file())


class TextDataset:
    """Documents from text files and saved datasets, in a fixed order (see the module docstring).

    paths: a path or a list of them. text_field: the JSON key / column holding the text.
    document_per_line: each non-empty line of a .txt file is a document. Iterating yields str.
    Attributes: sources (the files and dataset folders, in reading order), text_field.
    """

    def __init__(self, paths, text_field: str = "text", document_per_line: bool = False):
        if isinstance(paths, (str, Path)):
            paths = [paths]
        if not isinstance(paths, (list, tuple)) or not paths or not all(isinstance(p, (str, Path)) for p in paths):
            raise ValueError(f"paths must be a path or a non-empty list of paths, got {paths!r:.120}")
        if not isinstance(text_field, str) or not text_field:
            raise ValueError(f"text_field must be a non-empty string, got {text_field!r}")
        self.text_field = text_field
        self.document_per_line = bool(document_per_line)
        self.paths = [Path(p) for p in paths]
        self.sources: list[Path] = []
        for path in self.paths:
            self.sources += self._expand(path)
        for source in self.sources:
            self._check_field(source)

    def _expand(self, path: Path) -> list[Path]:
        if not path.exists():
            raise FileNotFoundError(f"dataset {path}: no such file or directory")
        if path.is_dir():
            if _is_saved_dataset(path):
                return [path]
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
            saved = sorted(p.parent for p in path.rglob("state.json") if _is_saved_dataset(p.parent))
            if not found and not saved:
                raise ValueError(f"dataset {path}: the folder holds no {', '.join(SUFFIXES)} files and no "
                                 f"datasets.save_to_disk folder")
            return sorted(found + saved)
        if path.suffix not in SUFFIXES:
            raise ValueError(f"dataset {path}: unknown file type {path.suffix or '(none)'!r}; expected "
                             f"{', '.join(SUFFIXES)} or a folder saved by datasets.save_to_disk")
        return [path]

    def _missing_field(self, source: Path, found) -> ValueError:
        return ValueError(f"dataset {source} has no text field {self.text_field!r} (found: "
                          f"{', '.join(map(str, found)) or 'none'}); pass the right one as text_field (--text-field)")

    def _check_field(self, source: Path) -> None:
        if source.is_dir():
            columns = _load_saved(source).column_names
            if self.text_field not in columns:
                raise self._missing_field(source, columns)
        elif source.suffix == ".parquet":
            import pyarrow.parquet as pq
            try:
                names = pq.ParquetFile(source).schema_arrow.names
            except Exception as error:  # pyarrow raises ArrowInvalid, OSError, ...: all mean unreadable
                raise ValueError(f"dataset {source} is not a readable parquet file ({error})") from None
            if self.text_field not in names:
                raise self._missing_field(source, names)
        elif source.suffix == ".jsonl":
            for number, record in _jsonl_records(source):
                if self.text_field not in record:
                    raise self._missing_field(source, list(record))
                break

    def __iter__(self) -> Iterator[str]:
        for source in self.sources:
            if source.is_dir():
                yield from _saved_texts(source, self.text_field)
            elif source.suffix == ".txt":
                text = source.read_text(encoding="utf-8", errors="replace")
                if self.document_per_line:
                    yield from (line for line in text.splitlines() if line.strip())
                elif text.strip():
                    yield text
            elif source.suffix == ".jsonl":
                for number, record in _jsonl_records(source):
                    yield _text(record.get(self.text_field), f"{source}: line {number}", self)
            else:
                yield from _parquet_texts(source, self)

    def describe(self) -> dict:
        """What the dataset is, for provenance: {"paths", "text_field", "document_per_line"}."""
        return {"paths": [str(p) for p in self.paths], "text_field": self.text_field,
                "document_per_line": self.document_per_line}


def _text(value, where: str, dataset: TextDataset) -> str:
    if value is None:
        raise ValueError(f"{where} has no text field {dataset.text_field!r}")
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {dataset.text_field!r} holds a {type(value).__name__}, not text")
    return value


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict]]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as error:
                raise ValueError(f"dataset {path}: line {number} is not JSON ({error})") from None
            if not isinstance(record, dict):
                raise ValueError(f"dataset {path}: line {number} is a JSON {type(record).__name__}, not an object")
            yield number, record


def _parquet_texts(path: Path, dataset: TextDataset) -> Iterator[str]:
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=_BATCH, columns=[dataset.text_field]):
        for value in batch.column(0).to_pylist():
            if value is not None:
                yield _text(value, f"dataset {path}", dataset)


def _load_saved(folder: Path):
    import datasets

    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as error:  # datasets raises FileNotFoundError, ValueError, ... for a damaged folder
        raise ValueError(f"dataset {folder} is not a readable datasets.save_to_disk folder ({error})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise ValueError(f"dataset {folder} is a DatasetDict without a 'train' split (splits: "
                             f"{', '.join(loaded)}); pass the split's own folder")
        loaded = loaded["train"]
    return loaded


def _saved_texts(folder: Path, field: str) -> Iterator[str]:
    table = _load_saved(folder).select_columns([field])
    for batch in table.iter(batch_size=_BATCH):
        for value in batch[field]:
            if isinstance(value, str):
                yield value


# --- tokenising ------------------------------------------------------------------------------------

def iter_contexts(documents: Iterable[str], tokenizer, context_len: int, bos_id: int | None = None,
                  separator_id: int | None = -1) -> Iterator[Tensor]:
    """Documents -> contexts [context_len] int64, each BOS followed by the next context_len - 1 tokens
    of the documents' token stream; lazily, one document tokenised at a time.

    Each document is encoded without special tokens and followed by ``separator_id`` (default -1:
    the tokenizer's EOS, if it has one; None: nothing), so a context can hold a document boundary.
    bos_id: default the tokenizer's BOS (else its EOS). The ragged tail is dropped.
    """
    if not is_int(context_len) or context_len < 2:
        raise ValueError(f"context_len must be an int >= 2 (BOS and one token), got {context_len!r}")
    if bos_id is None:
        bos_id = getattr(tokenizer, "bos_token_id", None)
        bos_id = getattr(tokenizer, "eos_token_id", None) if bos_id is None else bos_id
    if not is_int(bos_id):
        raise ValueError("the tokenizer has no BOS or EOS token: pass bos_id")
    if separator_id == -1:
        separator_id = getattr(tokenizer, "eos_token_id", None)
    body = context_len - 1
    buffer: list[int] = []
    for document in documents:
        buffer.extend(tokenizer.encode(document, add_special_tokens=False))
        if separator_id is not None:
            buffer.append(int(separator_id))
        while len(buffer) >= body:
            yield torch.tensor([bos_id] + buffer[:body], dtype=torch.int64)
            del buffer[:body]


def take_contexts(contexts: Iterator[Tensor], count: int | None = None, rows: int | None = None,
                  special_ids=(), progress=None) -> Tensor:
    """The next contexts of an ``iter_contexts`` stream as [n, T]: ``count`` of them, or as many as give
    at least ``rows`` activation rows (``text.kept_positions`` with special_ids), or fewer when the
    stream ends first (n may be 0: then [0, 0]). progress: a tqdm bar updated with tokens read."""
    from .text import kept_positions

    taken: list[Tensor] = []
    have = 0
    while (count is None or len(taken) < count) and (rows is None or have < rows):
        context = next(contexts, None)
        if context is None:
            break
        taken.append(context)
        if rows is not None:
            have += int(kept_positions(context[None], special_ids).sum())
        if progress is not None:
            progress.update(context.numel())
    return torch.stack(taken) if taken else torch.zeros(0, 0, dtype=torch.int64)
