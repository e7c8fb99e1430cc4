"""HFModuleSource: activations of transformers modules by dotted path (globs), on small random-weight
Llama and GPT-2 models built here (no download)."""
import pytest
import torch

import sparsekit
from sparsekit.activations import HFModuleSource, find_modules

transformers = pytest.importorskip("transformers")

D_MODEL, VOCAB, T = 32, 96, 9


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=D_MODEL, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(1)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=D_MODEL, n_layer=2, n_head=4, n_positions=64)
    return transformers.GPT2LMHeadModel(cfg).eval()


def tokens(n=6, seed=0):
    return torch.randint(1, VOCAB, (n, T), generator=torch.Generator().manual_seed(seed))


def hidden_states(model, ids):
    with torch.no_grad():
        return model(ids, output_hidden_states=True).hidden_states


@pytest.mark.parametrize("model_name,layer", [("llama", "model.layers.1"), ("gpt2", "transformer.h.0")])
def test_block_outputs_equal_the_models_hidden_states(request, model_name, layer):
    model = request.getfixturevalue(model_name)
    ids = tokens()
    source = HFModuleSource(model, ids, layer, batch_contexts=4, epochs=1)
    batches = list(source)
    assert [b.shape for b in batches] == [(4 * (T - 1), D_MODEL), (2 * (T - 1), D_MODEL)]
    index = int(layer.rsplit(".", 1)[1]) + 1  # hidden_states[0] is the embedding
    expected = hidden_states(model, ids)[index][:, 1:].reshape(-1, D_MODEL)
    torch.testing.assert_close(torch.cat(batches), expected)


def test_glob_paths_concatenate_layers_in_model_order(llama):
    ids = tokens(n=3)
    source = HFModuleSource(llama, ids, "model.layers.*.mlp", batch_contexts=3, exclude_bos=False)
    assert source.module_names == [["model.layers.0.mlp", "model.layers.1.mlp", "model.layers.2.mlp"]]
    x = next(iter(source))
    assert x.shape == (3 * T, 3 * D_MODEL)
    single = HFModuleSource(llama, ids, "model.layers.2.mlp", batch_contexts=3, exclude_bos=False)
    torch.testing.assert_close(x[:, 2 * D_MODEL:], next(iter(single)))
    assert find_modules(llama, "model.layers.?.self_attn.[qk]_proj") == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.k_proj", "model.layers.2.self_attn.q_proj", "model.layers.2.self_attn.k_proj"]


@pytest.mark.parametrize("model_name,mlp", [("llama", "model.layers.1.mlp"), ("gpt2", "transformer.h.1.mlp")])
def test_transcoder_pairs_are_an_mlps_input_and_output(request, model_name, mlp):
    model = request.getfixturevalue(model_name)
    source = HFModuleSource(model, tokens(n=2), f"{mlp}:input", target=mlp, batch_contexts=2)
    x, y = next(iter(source))
    assert x.shape == y.shape == (2 * (T - 1), D_MODEL)
    module = dict(model.named_modules())[mlp]
    with torch.no_grad():
        torch.testing.assert_close(y, module(x))


def test_the_forward_pass_stops_after_the_last_hooked_module(llama):
    def hook_counts():
        return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in llama.modules()]

    before = hook_counts()
    ran = []
    handle = llama.model.layers[2].register_forward_hook(lambda *args: ran.append(2))
    try:
        next(iter(HFModuleSource(llama, tokens(n=2), "model.layers.1.mlp")))
        assert ran == []
        llama(tokens(n=1))
        assert ran == [2]
    finally:
        handle.remove()
    assert hook_counts() == before  # the source's hooks are gone


def test_resume_reads_exactly_the_contexts_that_come_next(gpt2):
    ids = tokens(n=10, seed=3)
    source = HFModuleSource(gpt2, ids, "transformer.h.1", batch_contexts=3, shuffle=True, seed=7)
    stream = iter(source)
    next(stream), next(stream)
    state = source.state_dict()
    expected = [next(stream) for _ in range(3)]  # crosses into the second epoch
    resumed = HFModuleSource(gpt2, ids, "transformer.h.1", batch_contexts=3, shuffle=True, seed=7)
    resumed.load_state_dict(state)
    got = [batch for batch, _ in zip(resumed, range(3))]
    assert state["position"] == 6 and source.epoch == 1
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    other = HFModuleSource(gpt2, ids, "transformer.h.0", batch_contexts=3, shuffle=True, seed=7)
    with pytest.raises(ValueError, match="state field 'paths'"):
        other.load_state_dict(state)


def test_bad_paths_list_close_module_names(llama):
    with pytest.raises(ValueError, match=r"'model.layer.\*.mlp' matches no module of LlamaForCausalLM; "
                                         r"close module names: model.layers.0.mlp"):
        HFModuleSource(llama, tokens(), "model.layer.*.mlp")
    with pytest.raises(ValueError, match="after ':' must be 'input' or 'output'"):
        HFModuleSource(llama, tokens(), "model.layers.0.mlp:inputs")
    with pytest.raises(ValueError, match="tokens must be a non-empty int64 tensor"):
        HFModuleSource(llama, tokens().float(), "model.layers.0.mlp")


def test_trains_a_dictionary(llama):
    source = HFModuleSource(llama, tokens(n=40, seed=4), "model.layers.0.mlp", batch_contexts=8)
    sae = sparsekit.TopKSAE(D_MODEL, 64, k=4)
    cfg = sparsekit.TrainConfig(batch_size=64, lr=1e-3, total_tokens=640, eval_tokens=64, progress=False, log_every=5)
    result = sparsekit.train(sae, source, cfg)
    assert result.history[-1]["step"] == 10 and result.metrics["fvu"] < 1.0
