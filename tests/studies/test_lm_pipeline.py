"""The LM pipeline on a tiny random-weight HookedTransformer: CE loss recovered / KL / FVU with
dictionaries whose answer is known (exact identity, all-zero), and a dictionary trained end to end
from the activation store."""
import pytest
import torch
from helpers.lm_cases import axis_dictionary, random_contexts, tiny_transformer

import sparsekit
from sparsekit.activations.store import cache_activations
from sparsekit.analysis.lm_metrics import lm_splice_metrics


@pytest.fixture(scope="module")
def tiny():
    return tiny_transformer(n_layers=2, seed=2)


def contexts(n, t=12, seed=0):
    return random_contexts(n, t, seed)


def identity_dictionary(d, transcoder=False):
    """The axis dictionary (an exact identity), with scales that must cancel out."""
    sae = axis_dictionary(d, transcoder)
    sae.input_scale = sae.output_scale = 0.37
    return sae


def test_identity_dictionary_recovers_all_of_the_loss(tiny):
    m = lm_splice_metrics(tiny, contexts(6), "blocks.0.hook_resid_post", identity_dictionary(16), batch_contexts=4)
    assert m["ce_zero"] != pytest.approx(m["ce_clean"], abs=1e-3)
    assert m["ce_splice"] == pytest.approx(m["ce_clean"], abs=1e-5)
    assert m["ce_recovered"] == pytest.approx(1.0, abs=1e-3)
    assert m["kl"] == pytest.approx(0.0, abs=1e-6) and m["fvu"] < 1e-10
    assert m["l0"] == pytest.approx(16.0, abs=0.5) and m["tokens"] == 6 * 11


def test_zero_dictionary_is_as_bad_as_zero_ablation(tiny):
    sae = identity_dictionary(16)
    with torch.no_grad():
        sae.W_dec.zero_()
    m = lm_splice_metrics(tiny, contexts(6), "blocks.0.hook_resid_post", sae)
    assert m["ce_splice"] == pytest.approx(m["ce_zero"], abs=1e-5)
    assert m["ce_recovered"] == pytest.approx(0.0, abs=1e-3) and m["kl"] > 0
    assert m["fvu"] > 0.9 and m["l0"] > 0


def test_transcoder_splices_its_prediction_from_the_input_hook(tiny):
    # resid_post of block 0 is resid_pre of block 1: an identity transcoder between them is exact,
    # and its prediction must come from the input hook (the target is zeroed by nothing else)
    m = lm_splice_metrics(tiny, contexts(4), "blocks.1.hook_resid_pre", identity_dictionary(16, transcoder=True),
                          input_hook="blocks.0.hook_resid_post")
    assert m["ce_recovered"] == pytest.approx(1.0, abs=1e-3) and m["kl"] < 1e-6
    with pytest.raises(ValueError, match="a transcoder needs input_hook"):
        lm_splice_metrics(tiny, contexts(2), "blocks.1.hook_resid_pre", identity_dictionary(16, transcoder=True))


def test_dictionary_trained_from_the_store_keeps_most_of_the_loss(tiny, tmp_path):
    hook = "blocks.1.hook_resid_pre"
    source = cache_activations(tiny, contexts(64, seed=1), hook, tmp_path / "resid", batch_size=256, progress=False)
    sae = sparsekit.TopKSAE(16, 64, k=6)
    cfg = sparsekit.TrainConfig(batch_size=128, lr=1e-2, total_tokens=20_000, eval_tokens=512, progress=False,
                                log_every=20, dead_window_tokens=5_000, dead_strategy="auxk")
    result = sparsekit.train(sae, source, cfg)
    assert result.metrics["fvu"] < 0.2
    held_out = contexts(8, seed=99)
    m = lm_splice_metrics(tiny, held_out, hook, sae)
    assert m["fvu"] < 0.25 and m["l0"] <= 6.0
    # a random model's zero-ablated loss can even beat the clean one (its predictions are noise),
    # so the distribution distance carries the test: the splice keeps most of the clean prediction
    assert m["kl"] < 0.2 * m["kl_zero"]
    assert 0.0 <= m["dead_frac"] <= 1.0 and 0.0 <= m["dense_frac"] <= 1.0
    transcoder = sparsekit.Transcoder(16, 64, 16, k=6)
    pairs = cache_activations(tiny, contexts(64, seed=1), ("blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"),
                              tmp_path / "mlp", batch_size=256, progress=False)
    sparsekit.train(transcoder, pairs, cfg)
    t = lm_splice_metrics(tiny, held_out, "blocks.0.hook_mlp_out", transcoder, input_hook="blocks.0.ln2.hook_normalized")
    assert t["fvu"] < 0.3 and t["kl"] < 0.2 * t["kl_zero"]


def naive_spliced_ce(model, tokens, hook, replace):
    """Reference: a full forward from the tokens with the activation at hook replaced (BOS kept)."""
    def swap(act, hook):
        new = replace(act).reshape(act.shape)
        new[:, 0] = act[:, 0]
        return new
    with torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=[(hook, swap)])
    log_probs = logits[:, 1:-1].log_softmax(-1)
    return float(-log_probs.gather(-1, tokens[:, 2:, None]).mean())


def test_shared_evaluation_matches_one_full_forward_per_dictionary(tiny):
    from sparsekit.analysis.lm_metrics import Splice, _reconstruct, evaluate_splices
    torch.manual_seed(3)
    tokens = contexts(7, seed=5)
    mlp_in, mlp_out, z, attn_out = ("blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out", "blocks.1.attn.hook_z",
                                    "blocks.1.hook_attn_out")
    splices = {"sae": Splice(sparsekit.TopKSAE(16, 48, k=4), mlp_out),
               "mlp_tc": Splice(sparsekit.Transcoder(16, 48, 16, k=4), mlp_out, mlp_in),
               "attn_tc": Splice(sparsekit.Transcoder(16, 48, 16, k=4), attn_out, z),
               "embed": Splice(sparsekit.TopKSAE(16, 48, k=4), "hook_embed")}  # no block: runs from the tokens
    shared = evaluate_splices(tiny, tokens, splices, batch_contexts=3)
    with torch.no_grad():
        clean = float(-tiny(tokens)[:, 1:-1].log_softmax(-1).gather(-1, tokens[:, 2:, None]).mean())
        seen = {}
        tiny.run_with_hooks(tokens, fwd_hooks=[(n, lambda a, hook: seen.__setitem__(hook.name, a)) for n in (mlp_in, z)])
    for name, s in splices.items():
        m = shared[name]
        source = None if s.input_hook is None else seen[s.input_hook]
        expected = naive_spliced_ce(tiny, tokens, s.hook,
                                    lambda act: _reconstruct(s.sae, act if source is None else source))
        assert m["ce_splice"] == pytest.approx(expected, abs=1e-5)
        assert m["ce_zero"] == pytest.approx(naive_spliced_ce(tiny, tokens, s.hook, torch.zeros_like), abs=1e-5)
        assert m["ce_clean"] == pytest.approx(clean, abs=1e-5)
        assert m["ce_splice"] != pytest.approx(clean, abs=1e-4)  # the splice changed something
        alone = lm_splice_metrics(tiny, tokens, s.hook, s.sae, input_hook=s.input_hook, batch_contexts=2)
        assert alone == pytest.approx(m, rel=1e-4, abs=1e-6)  # other batches: float32 sums in another order
    assert shared["sae"]["ce_zero"] == shared["mlp_tc"]["ce_zero"] != shared["attn_tc"]["ce_zero"]


def test_bad_splices_name_the_argument(tiny):
    from sparsekit.analysis.lm_metrics import Splice, evaluate_splices
    tokens = contexts(2)
    with pytest.raises(ValueError, match="splices must be a non-empty dict"):
        evaluate_splices(tiny, tokens, {})
    with pytest.raises(ValueError, match=r"splices\['a'\] must be Splice\(sae, hook, input_hook=None\)"):
        evaluate_splices(tiny, tokens, {"a": identity_dictionary(16)})
    with pytest.raises(ValueError, match="sae must be a sparsekit dictionary"):
        evaluate_splices(tiny, tokens, {"a": Splice(torch.nn.Linear(2, 2), "blocks.0.hook_resid_post")})
    with pytest.raises(ValueError, match="hooks: 'blocks.5.hook_resid_post' is not a hook point"):
        evaluate_splices(tiny, tokens, {"a": Splice(identity_dictionary(16), "blocks.5.hook_resid_post")})
    with pytest.raises(ValueError, match="input_hook blocks.1.hook_resid_pre must run before hook blocks.0.hook_mlp_out"):
        evaluate_splices(tiny, tokens, {"a": Splice(identity_dictionary(16, transcoder=True), "blocks.0.hook_mlp_out",
                                                    "blocks.1.hook_resid_pre")})
    with pytest.raises(ValueError, match="batch_contexts must be a positive int, got 0"):
        evaluate_splices(tiny, tokens, {"a": Splice(identity_dictionary(16), "blocks.0.hook_resid_post")},
                         batch_contexts=0)
