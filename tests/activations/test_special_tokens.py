"""Special tokens (BOS, EOS, pad, ...) are dropped wherever they sit in a context, not only at position 0:
LMActivationSource (TransformerLens and transformers models), cache_activations and HFModuleSource,
on tiny random models without a tokenizer (the special ids are passed explicitly). States and caches
made before (position 0 only) still resume."""
import json

import pytest
import torch
from helpers.lm_cases import tiny_transformer

from sparsekit.activations import HFModuleSource
from sparsekit.activations.store import STORE_RECORD, LMActivationSource, cache_activations
from sparsekit.activations.text import kept_positions, special_token_ids

BOS, EOS, PAD = 0, 38, 39
SPECIAL = (BOS, EOS, PAD)
HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def tiny():
    return tiny_transformer(n_layers=2, seed=3)


def contexts_with_specials(n=10, t=12, seed=None):
    """[n, t] BOS-first contexts of ids 1..37, with EOS and pad written at random positions >= 1."""
    g = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2 ** 31, ())))
    tokens = torch.randint(1, 38, (n, t), generator=g)
    tokens[:, 0] = BOS
    where = torch.rand(n, t, generator=g) < 0.2
    where[:, 0] = False
    tokens[where] = torch.where(torch.rand(n, t, generator=g) < 0.5, EOS, PAD)[where]
    tokens[0, 3], tokens[0, 4] = EOS, BOS  # a document boundary in the middle: EOS, then the next BOS
    return tokens


def every_position(model, tokens):
    _, cache = model.run_with_cache(tokens)
    return cache[HOOK]  # [n, t, d]


def test_kept_positions_drop_position_0_and_every_special_token():
    tokens = torch.tensor([[BOS, 5, EOS, 7, PAD, BOS, 9]])
    assert kept_positions(tokens, SPECIAL).tolist() == [[False, True, False, True, False, False, True]]
    assert kept_positions(tokens, ()).tolist() == [[False] + [True] * 6]


def test_a_context_with_eos_and_pad_inside_loses_exactly_those_rows(tiny):
    tokens = contexts_with_specials()
    source = LMActivationSource(tiny, tokens, HOOK, batch_size=10 ** 6, shuffle=False, special_ids=SPECIAL)
    rows = next(iter(source))
    specials_inside = int(torch.isin(tokens[:, 1:], torch.tensor(SPECIAL)).sum())
    assert specials_inside >= 2
    assert rows.shape[0] == source.rows == tokens.shape[0] * (tokens.shape[1] - 1) - specials_inside
    keep = ~torch.isin(tokens, torch.tensor(SPECIAL))
    torch.testing.assert_close(rows, every_position(tiny, tokens)[keep])
    old = next(iter(LMActivationSource(tiny, tokens, HOOK, batch_size=10 ** 6, shuffle=False, special_ids=None)))
    assert old.shape[0] == tokens.shape[0] * (tokens.shape[1] - 1)  # position 0 only: the behaviour before


def test_shuffled_rows_with_specials_are_a_permutation_and_resume_exactly(tiny):
    tokens = contexts_with_specials(n=14)
    kwargs = dict(batch_size=7, buffer_contexts=4, batch_contexts=3, seed=5, special_ids=SPECIAL)
    whole = torch.cat(list(LMActivationSource(tiny, tokens, HOOK, **kwargs)))
    reference = every_position(tiny, tokens)[~torch.isin(tokens, torch.tensor(SPECIAL))]
    assert whole.shape == reference.shape
    assert sorted(whole.sum(1).tolist()) == pytest.approx(sorted(reference.sum(1).tolist()), abs=1e-4)
    first = LMActivationSource(tiny, tokens, HOOK, **kwargs)
    stream = iter(first)
    taken = [next(stream) for _ in range(6)]  # crosses window boundaries of uneven sizes
    resumed = LMActivationSource(tiny, tokens, HOOK, **kwargs)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    torch.testing.assert_close(torch.cat(taken + list(resumed)), whole)


def test_a_state_from_before_special_ids_resumes_only_with_position_0_excluded(tiny):
    tokens = contexts_with_specials()
    old = LMActivationSource(tiny, tokens, HOOK, batch_size=16, special_ids=None)
    stream = iter(old)
    next(stream)
    state = old.state_dict()
    assert "special_ids" not in state
    with pytest.raises(ValueError, match="state field 'special_ids' is None"):
        LMActivationSource(tiny, tokens, HOOK, batch_size=16, special_ids=SPECIAL).load_state_dict(state)
    LMActivationSource(tiny, tokens, HOOK, batch_size=16, special_ids=None).load_state_dict(state)


def test_special_ids_absent_from_the_text_change_no_state(tiny):
    tokens = torch.randint(1, 38, (6, 10))
    tokens[:, 0] = BOS
    with_ids = LMActivationSource(tiny, tokens, HOOK, batch_size=16, special_ids=SPECIAL)
    without = LMActivationSource(tiny, tokens, HOOK, batch_size=16, special_ids=None)
    assert with_ids.state_dict() == without.state_dict()


def test_cache_drops_the_special_rows_and_records_the_ids(tiny, tmp_path):
    tokens = contexts_with_specials()
    shards = cache_activations(tiny, tokens, HOOK, tmp_path / "c", progress=False, special_ids=SPECIAL,
                               shuffle=False, epochs=1, batch_size=10 ** 6)
    keep = ~torch.isin(tokens, torch.tensor(SPECIAL))
    torch.testing.assert_close(next(iter(shards)), every_position(tiny, tokens)[keep])
    assert json.loads((tmp_path / "c" / STORE_RECORD).read_text())["special_ids"] == list(SPECIAL)
    with pytest.raises(ValueError, match="differs in special_ids"):
        cache_activations(tiny, tokens, HOOK, tmp_path / "c", progress=False, special_ids=None)


transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_hf_module_source_drops_special_positions_anywhere(llama):
    tokens = contexts_with_specials()
    source = HFModuleSource(llama, tokens, "model.layers.0", batch_contexts=100, special_ids=SPECIAL, epochs=1)
    rows = next(iter(source))
    with torch.no_grad():
        hidden = llama(tokens, output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(rows, hidden[~torch.isin(tokens, torch.tensor(SPECIAL))])
    assert source.state_dict()["special_ids"] == list(SPECIAL)
    assert "special_ids" not in HFModuleSource(llama, tokens, "model.layers.0").state_dict()


def test_lm_activation_source_streams_a_transformers_model_through_its_buffer(llama):
    tokens = contexts_with_specials(n=9)
    pairs = LMActivationSource(llama, tokens, ("model.layers.1.mlp:input", "model.layers.1.mlp"), batch_size=10 ** 6,
                               shuffle=False, special_ids=SPECIAL)
    x, y = next(iter(pairs))
    direct = HFModuleSource(llama, tokens, "model.layers.1.mlp:input", target="model.layers.1.mlp",
                            batch_contexts=100, special_ids=SPECIAL)
    want_x, want_y = next(iter(direct))
    torch.testing.assert_close(x, want_x)
    torch.testing.assert_close(y, want_y)
    assert (pairs.d, pairs.d_out) == (32, 32) and x.shape[0] == pairs.rows


def test_special_token_ids_collects_bos_eos_and_pad():
    class Tokenizer:
        all_special_ids = [7, 3]
        bos_token_id, eos_token_id, pad_token_id = 1, 2, None

    assert special_token_ids(Tokenizer()) == (1, 2, 3, 7)
