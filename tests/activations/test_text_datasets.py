"""TextDataset reads .txt (per file or per line), .jsonl, .parquet and datasets.save_to_disk folders in a
fixed order, lazily; iter_contexts/take_contexts cut the token stream into BOS-first contexts and stop
reading once they have enough; bad paths and wrong text fields are one clear error."""
import json
import random

import pytest
import torch

from sparsekit.activations.datasets import TextDataset, iter_contexts, take_contexts

BOS, EOS = 1, 2


class WordTokenizer:
    """Word ids from 3 up, assigned in order of first sight; BOS 1, EOS 2."""
    bos_token_id, eos_token_id = BOS, EOS

    def __init__(self):
        self.ids = {}

    def encode(self, text, add_special_tokens=True):
        assert not add_special_tokens
        return [self.ids.setdefault(word, len(self.ids) + 3) for word in text.split()]


def documents(n=12):
    words = "alpha beta gamma delta eps zeta eta theta iota kappa".split()
    return [" ".join(random.choice(words) for _ in range(random.randint(3, 30))) for _ in range(n)]


def write_jsonl(path, docs, field="text"):
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))


def test_every_format_yields_its_documents_in_order(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    datasets = pytest.importorskip("datasets")
    docs = documents(20)
    (tmp_path / "txt").mkdir()
    for i, d in enumerate(docs[:5]):
        (tmp_path / "txt" / f"{i:02d}.txt").write_text(d)
    (tmp_path / "lines.txt").write_text("\n".join(docs[5:9]) + "\n\n")
    write_jsonl(tmp_path / "d.jsonl", docs[9:13], field="body")
    pq.write_table(pa.table({"body": docs[13:17]}), tmp_path / "d.parquet")
    datasets.Dataset.from_dict({"body": docs[17:]}).save_to_disk(str(tmp_path / "saved"))

    assert list(TextDataset(tmp_path / "txt")) == docs[:5]
    assert list(TextDataset(tmp_path / "lines.txt", document_per_line=True)) == docs[5:9]
    assert list(TextDataset(tmp_path / "lines.txt")) == ["\n".join(docs[5:9]) + "\n\n"]
    assert list(TextDataset(tmp_path / "d.jsonl", text_field="body")) == docs[9:13]
    assert list(TextDataset(tmp_path / "d.parquet", text_field="body")) == docs[13:17]
    assert list(TextDataset(tmp_path / "saved", text_field="body")) == docs[17:]
    both = TextDataset([tmp_path / "d.parquet", tmp_path / "saved"], text_field="body")
    assert list(both) == docs[13:] and both.describe()["text_field"] == "body"


def test_contexts_are_bos_then_the_documents_tokens_separated_by_eos():
    docs = documents()
    tokenizer = WordTokenizer()
    got = take_contexts(iter_contexts(docs, tokenizer, context_len=7))
    again = WordTokenizer()
    stream = [t for d in docs for t in again.encode(d, add_special_tokens=False) + [EOS]]
    assert got.dtype == torch.int64 and got.shape == (len(stream) // 6, 7)
    assert (got[:, 0] == BOS).all()
    assert got[:, 1:].reshape(-1).tolist() == stream[:got.shape[0] * 6]


def test_reading_stops_once_enough_contexts_or_rows_are_made():
    read = []

    def lazily():
        for d in documents(1000):
            read.append(d)
            yield d

    stream = iter_contexts(lazily(), WordTokenizer(), context_len=9)
    first = take_contexts(stream, count=3)
    assert first.shape == (3, 9) and len(read) < 10
    more = take_contexts(stream, rows=40, special_ids=(BOS, EOS))
    kept = int((~torch.isin(more[:, 1:], torch.tensor([BOS, EOS]))).sum())
    assert kept >= 40 and kept - int((~torch.isin(more[-1, 1:], torch.tensor([BOS, EOS]))).sum()) < 40
    assert len(read) < 30


def test_a_jsonl_file_is_read_only_as_far_as_needed(tmp_path):
    path = tmp_path / "d.jsonl"
    write_jsonl(path, documents(50))
    with open(path, "a") as f:
        f.write("this line is not JSON\n")
    contexts = take_contexts(iter_contexts(TextDataset(path), WordTokenizer(), context_len=5), count=4)
    assert contexts.shape == (4, 5)
    with pytest.raises(ValueError, match="line 51 is not JSON"):
        list(TextDataset(path))


def test_wrong_text_field_names_the_field_and_the_ones_found(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    datasets = pytest.importorskip("datasets")
    write_jsonl(tmp_path / "d.jsonl", documents(3), field="body")
    pq.write_table(pa.table({"body": ["x"], "n": [1]}), tmp_path / "d.parquet")
    datasets.Dataset.from_dict({"content": ["x"]}).save_to_disk(str(tmp_path / "saved"))
    for path, found in (("d.jsonl", "body, id"), ("d.parquet", "body, n"), ("saved", "content")):
        with pytest.raises(ValueError, match=f"has no text field 'text' \\(found: {found}\\); pass the right one"):
            TextDataset(tmp_path / path)


@pytest.mark.parametrize("make, message", [
    (lambda root: root / "nope.jsonl", "nope.jsonl: no such file or directory"),
    (lambda root: (root / "a.csv").write_text("x") and root / "a.csv", "unknown file type '.csv'"),
    (lambda root: (root / "empty").mkdir() or root / "empty", "holds no .txt, .jsonl, .parquet files"),
    (lambda root: (root / "p.parquet").write_text("no") and root / "p.parquet", "is not a readable parquet file"),
])
def test_bad_dataset_paths_are_one_clear_error(tmp_path, make, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        TextDataset(make(tmp_path))


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="paths must be a path or a non-empty list of paths"):
        TextDataset([])
    with pytest.raises(ValueError, match="text_field must be a non-empty string"):
        TextDataset(".", text_field="")
    with pytest.raises(ValueError, match="context_len must be an int >= 2"):
        next(iter_contexts(["a b"], WordTokenizer(), context_len=1))
