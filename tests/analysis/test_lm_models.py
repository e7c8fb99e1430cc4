"""The model seam (sparsekit.analysis.lm_models) on tiny random Hugging Face models built here: a
2-layer Llama (RMSNorm, nn.Linear) and a 2-layer GPT-2 (LayerNorm, Conv1D). Activations at a module
path are the model's own hidden states; directions reach the logits through the layer whose input the
path names, the final norm's weight and lm_head; feature_report reads an HF model as it reads a
TransformerLens one."""
import pytest
import torch
from helpers.lm_cases import axis_dictionary

from sparsekit.analysis.lm_features import feature_activations, feature_report, find_features, logit_effects
from sparsekit.analysis.lm_models import HFModel, LensModel, as_lm

transformers = pytest.importorskip("transformers")
VOCAB, HIDDEN = 48, 16


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=40, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      initializer_range=0.3)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # a final norm weight far from ones, so folding it shows
        model.model.norm.weight.copy_(torch.rand(HIDDEN) * 2 + 0.1)
    return model


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(1)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=2, n_positions=64)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        model.transformer.ln_f.weight.copy_(torch.rand(HIDDEN) * 2 + 0.1)
    return model


def contexts(n, t, seed):
    tokens = torch.randint(1, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))
    tokens[:, 0] = 0
    return tokens


def test_activations_at_a_module_path_are_the_models_hidden_states_after_position_0(llama):
    tokens = contexts(3, 7, seed=int(torch.randint(0, 1000, ())))
    got = HFModel(llama).activations(tokens, "model.layers.0")
    with torch.no_grad():
        hidden = llama(tokens, output_hidden_states=True).hidden_states[1]       # layer 0's output
    assert got.shape == (3 * 6, HIDDEN) and got.dtype == torch.float32
    torch.testing.assert_close(got, hidden[:, 1:].reshape(-1, HIDDEN))


def test_logit_effects_fold_the_final_norm_weight_into_lm_head(llama):
    import sparsekit

    sae = sparsekit.TopKSAE(HIDDEN, 8, k=2)                                   # random decoder rows
    effects = logit_effects(HFModel(llama), sae, "model.layers.1", range(8), top=4)
    gamma, head = llama.model.norm.weight.detach(), llama.lm_head.weight.detach()
    expected = (sae.W_dec.detach() * gamma) @ head.T                            # [8, vocab], computed here
    for feature in range(8):
        values, ids = expected[feature].topk(4)
        assert [t for t, _ in effects[feature]["promoted"]] == [f"<{int(i)}>" for i in ids]
        torch.testing.assert_close(torch.tensor([v for _, v in effects[feature]["promoted"]]), values)
        low, low_ids = (-expected[feature]).topk(4)
        assert [t for t, _ in effects[feature]["suppressed"]] == [f"<{int(i)}>" for i in low_ids]
        torch.testing.assert_close(torch.tensor([v for _, v in effects[feature]["suppressed"]]), -low)
    unfolded = (sae.W_dec.detach() @ head.T).topk(4).indices                   # without the norm: other tokens
    assert any([t for t, _ in effects[f]["promoted"]] != [f"<{int(i)}>" for i in unfolded[f]] for f in range(8))


@pytest.mark.parametrize("fixture, path, layer", [
    ("llama", "model.layers.0.mlp.down_proj:input", "model.layers.0.mlp.down_proj"),   # nn.Linear, like W_out
    ("llama", "model.layers.1.self_attn.o_proj:input", "model.layers.1.self_attn.o_proj"),  # like W_O
    ("gpt2", "transformer.h.0.mlp.c_proj:input", "transformer.h.0.mlp.c_proj"),      # Conv1D
])
def test_a_direction_at_a_layers_input_enters_the_residual_as_that_layer_moves_it(request, fixture, path, layer):
    model = request.getfixturevalue(fixture)
    module = model.get_submodule(layer)
    width = module.weight.shape[1] if isinstance(module, torch.nn.Linear) else module.weight.shape[0]
    directions = torch.randn(3, width)
    got = HFModel(model).residual_directions(path, directions)
    x = torch.randn(1, width)
    with torch.no_grad():  # the layer is affine: what a direction adds to its input, it adds W @ direction to its output
        moved = module(x + directions) - module(x)
    torch.testing.assert_close(got, moved, atol=1e-5, rtol=1e-4)


def test_a_path_not_written_by_a_known_matrix_has_no_logit_effects(llama, gpt2):
    lm = HFModel(llama)
    assert lm.residual_directions("model.layers.0.mlp.act_fn", torch.randn(2, 40)) is None   # an output, not linear
    assert lm.residual_directions("model.layers.*", torch.randn(2, 2 * HIDDEN)) is None        # two modules
    assert logit_effects(lm, axis_dictionary(20), "model.layers.0.mlp.act_fn", [0]) is None
    assert HFModel(gpt2).logit_path == "transformer.ln_f weight, then lm_head"
    assert lm.logit_path == "model.norm weight, then lm_head"


def test_feature_report_on_a_transformers_model_matches_the_dense_activations(llama):
    tokens = contexts(6, 9, seed=int(torch.randint(0, 1000, ())))
    sae = axis_dictionary(HIDDEN)
    report = feature_report(llama, sae, tokens, "model.layers.0", max_features=None, examples=3, window=2,
                            special_ids=None)
    with torch.no_grad():
        hidden = llama(tokens, output_hidden_states=True).hidden_states[1][:, 1:]   # [N, T-1, d]
    acts = torch.cat([hidden.clamp_min(0), (-hidden).clamp_min(0)], -1)              # the axis dictionary's codes
    torch.testing.assert_close(feature_activations(llama, sae, tokens, "model.layers.0")[:, 1:], acts)
    assert report["model"] == "LlamaForCausalLM" and report["tokens"] == 6 * 8
    for feature in report["features"]:
        column = acts[..., feature["id"]]
        assert feature["density"] == pytest.approx(float((column > 0).double().mean()))
        assert feature["max_act"] == pytest.approx(float(column.max()))
        top = feature["examples"][0]
        assert top["max_act"] == pytest.approx(float(column.max()))
        assert top["tokens"][top["max_position"]] == f"<{int(tokens[top['context'], 1 + int(column[top['context']].argmax())])}>"
        assert feature["logits"] is not None


def test_find_features_and_the_seam_take_hf_models_with_a_tokenizer_for_text(llama):
    with pytest.raises(ValueError, match="need a tokenizer with a BOS token"):
        find_features(llama, axis_dictionary(HIDDEN), "model.layers.0", ["some text"])
    hits = find_features(llama, axis_dictionary(HIDDEN), "model.layers.0", [contexts(1, 6, 1)[0], contexts(1, 6, 2)[0]])
    assert hits and all(min(h["acts"]) == pytest.approx(h["min_act"]) for h in hits)
    assert isinstance(as_lm(llama), HFModel) and as_lm(as_lm(llama)) is not None
    with pytest.raises(ValueError, match="HookedTransformer"):
        LensModel(llama)
    with pytest.raises(ValueError, match="causal LM"):
        HFModel(torch.nn.Linear(2, 2))
