"""steer / promoted_tokens / mean_log_prob / steering_effect on a tiny random-weight HookedTransformer:
steering adds strength x the decoder row at every position and nothing else, promoted tokens are
logit_effects' with their ids, and the measured effect follows the strength's sign."""
import pytest
import torch
from helpers.lm_cases import D_VOCAB, axis_dictionary, random_contexts, tiny_transformer

import sparsekit
from sparsekit.analysis.lm_features import logit_effects
from sparsekit.analysis.splice import splice
from sparsekit.analysis.steering import mean_log_prob, promoted_tokens, steer, steering_effect

pytest.importorskip("transformer_lens")
HOOK = "blocks.1.hook_resid_post"


def fresh_seed():
    return int(torch.randint(0, 2**31 - 1, ()))


@pytest.fixture(scope="module")
def tiny():
    return tiny_transformer(n_layers=2, seed=fresh_seed() % 1000)


def random_topk(seed, d=16, n=48):
    """A TopK SAE with random decoder rows and non-unit scales (the shift is output_scale-dependent)."""
    sae = sparsekit.TopKSAE(d, n, k=4, seed=seed % 1000)
    sae.input_scale, sae.output_scale = 1.5, 0.5
    return sae.eval()


def test_steer_adds_strength_times_the_decoder_row_at_every_position(tiny):
    seed = fresh_seed()
    sae, tokens = random_topk(seed), random_contexts(4, 9, seed=seed)
    latent, strength = seed % 48, float(torch.empty(()).uniform_(-6, 6))
    with torch.no_grad():
        _, cache = tiny.run_with_cache(tokens)
        shift = strength * sae.W_dec[latent] / sae.output_scale
        expected = tiny.run_with_hooks(tokens, fwd_hooks=[(HOOK, lambda act, hook: act + shift)])
        seen = []
        with steer(tiny, HOOK, sae, latent, strength):
            handle = tiny.get_submodule(HOOK).register_forward_hook(lambda m, a, out: seen.append(out))
            steered = tiny(tokens)
            handle.remove()
    torch.testing.assert_close(seen[0], cache[HOOK] + shift, msg=f"seed {seed}")
    torch.testing.assert_close(steered, expected, msg=f"seed {seed}")
    assert sum(len(m._forward_hooks) for m in tiny.modules()) == 0


def test_steer_is_splice_with_an_add_intervention_and_the_error_term(tiny):
    seed = fresh_seed()
    tc = sparsekit.Transcoder(16, 40, 16, k=3, seed=seed % 1000).eval()
    tokens = random_contexts(2, 7, seed=seed)
    hooks = dict(hook_name="blocks.0.hook_mlp_out", input_hook="blocks.0.ln2.hook_normalized")
    with torch.no_grad():
        with steer(tiny, hooks["hook_name"], tc, 7, 2.5, input_hook=hooks["input_hook"]):
            steered = tiny(tokens)
        with splice(tiny, hooks["hook_name"], tc, hooks["input_hook"], error_term=True, interventions={7: ("add", 2.5)}):
            spliced = tiny(tokens)
    torch.testing.assert_close(steered, spliced, rtol=0, atol=0)
    assert not torch.allclose(steered, tiny(tokens))


def test_promoted_tokens_are_logit_effects_with_their_ids(tiny):
    sae, latent = axis_dictionary(16), fresh_seed() % 32
    got = promoted_tokens(tiny, sae, HOOK, latent, top=6)
    sign = 1.0 if latent < 16 else -1.0  # latent i writes +e_i, latent 16 + i writes -e_i
    values, ids = (sign * tiny.W_U[latent % 16]).detach().topk(6)
    assert [token for token, _, _ in got] == ids.tolist()
    torch.testing.assert_close(torch.tensor([v for _, _, v in got]), values)
    effects = logit_effects(tiny, sae, HOOK, [latent], top=6)[latent]["promoted"]
    assert [(text, value) for _, text, value in got] == effects


def test_promoted_tokens_go_through_w_out_for_an_mlp_post_dictionary(tiny):
    sae = sparsekit.TopKSAE(32, 20, k=2, seed=fresh_seed() % 1000)  # blocks.0.mlp.hook_post is d_mlp = 32 wide
    got = promoted_tokens(tiny, sae, "blocks.0.mlp.hook_post", 3, top=4)
    direct = (sae.W_dec[3] @ tiny.blocks[0].mlp.W_out @ tiny.W_U).detach()
    assert [token for token, _, _ in got] == direct.topk(4).indices.tolist()


def test_mean_log_prob_is_the_mean_of_the_tokens_log_softmax_after_bos(tiny):
    seed = fresh_seed()
    tokens, ids = random_contexts(5, 6, seed=seed), torch.randperm(D_VOCAB)[:3]
    with torch.no_grad():
        expected = tiny(tokens)[:, 1:].log_softmax(-1)[..., ids].mean()
    assert mean_log_prob(tiny, tokens, ids, batch_contexts=2) == pytest.approx(float(expected), rel=1e-6)


def test_steering_effect_follows_the_sign_of_the_strength(tiny):
    seed = fresh_seed()
    sae, tokens = axis_dictionary(16), random_contexts(6, 8, seed=seed)
    latent = seed % 32
    effect = steering_effect(tiny, tokens, HOOK, sae, latent, strengths=(-20.0, 0.0, 20.0), top=5)
    ids = [token for token, _, _ in promoted_tokens(tiny, sae, HOOK, latent, top=5)]
    assert effect[0.0] == mean_log_prob(tiny, tokens, ids)  # the error term: strength 0 is the clean model
    assert effect[20.0] > effect[0.0] > effect[-20.0], f"seed {seed}: {effect}"


@pytest.mark.parametrize("call, message", [
    (lambda m, s: steer(m, HOOK, s, 48, 1.0), r"latent=48 is out of range: the dictionary has n_latents=48"),
    (lambda m, s: steer(m, HOOK, s, 2.0, 1.0), r"latent must be an int latent index, got 2.0"),
    (lambda m, s: steer(m, HOOK, s, 3, float("nan")), r"strength must be a finite number, got nan"),
    (lambda m, s: steer(m, HOOK, s, 3, "up"), r"strength must be a finite number, got 'up'"),
    (lambda m, s: promoted_tokens(m, s, HOOK, 3, top=0), r"top must be an int in \[1, d_vocab=40\], got 0"),
    (lambda m, s: promoted_tokens(m, s, HOOK, -1), r"latent=-1 is out of range"),
    (lambda m, s: promoted_tokens(m, sparsekit.TopKSAE(32, 8, k=2), "blocks.0.mlp.hook_pre", 3),
     r"hook='blocks.0.mlp.hook_pre'.*no direct logit effect"),
    (lambda m, s: mean_log_prob(m, random_contexts(2, 4), [1, 40]), r"token_ids must be non-empty ids in \[0, 40\)"),
    (lambda m, s: mean_log_prob(m, random_contexts(2, 4), []), r"token_ids must be non-empty"),
    (lambda m, s: mean_log_prob(m, torch.zeros(3), [1]), r"tokens must be an integer tensor"),
])
def test_bad_arguments_are_refused_naming_them(tiny, call, message):
    with pytest.raises(ValueError, match=message):
        call(tiny, random_topk(0))
