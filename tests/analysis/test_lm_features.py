"""Feature analysis on a tiny random-weight HookedTransformer with a hand-made dictionary whose
features are known: feature i fires on residual direction i."""
import pytest
import torch
from helpers.lm_cases import axis_dictionary, random_contexts, tiny_transformer

from sparsekit.analysis.lm_features import feature_activations, feature_report, find_features, logit_effects, residual_directions


@pytest.fixture(scope="module")
def tiny():
    return tiny_transformer(n_layers=1, seed=3)


def axis_sae(d=16):
    return axis_dictionary(d)


def contexts(n=10, t=10):
    return random_contexts(n, t)


HOOK = "blocks.0.hook_resid_post"


def test_feature_activations_are_codes_of_each_token_with_bos_zeroed(tiny):
    tokens = contexts()
    acts = feature_activations(tiny, axis_sae(), tokens, HOOK, batch_contexts=3)
    _, cache = tiny.run_with_cache(tokens)
    x = cache[HOOK]
    assert acts.shape == (10, 10, 32) and (acts[:, 0] == 0).all()
    torch.testing.assert_close(acts[:, 1:, :16], x[:, 1:].clamp_min(0))
    torch.testing.assert_close(acts[:, 1:, 16:], (-x[:, 1:]).clamp_min(0))


def test_report_top_examples_histogram_density_and_logits(tiny):
    tokens = contexts()
    sae = axis_sae()
    report = feature_report(tiny, sae, tokens, HOOK, max_features=5, examples=3, window=2)
    acts = feature_activations(tiny, sae, tokens, HOOK)
    assert report["tokens"] == 90 and len(report["features"]) == 5
    density = (acts[:, 1:] > 0).float().mean((0, 1))
    densities = [f["density"] for f in report["features"]]
    assert densities == sorted(densities, reverse=True)
    assert densities[0] == pytest.approx(float(density.max()))
    for feature in report["features"]:
        f = feature["id"]
        best = feature["examples"][0]
        assert best["max_act"] == pytest.approx(float(acts[..., f].max()))
        assert best["acts"][best["max_position"]] == pytest.approx(best["max_act"], abs=1e-3)
        assert len(best["tokens"]) == len(best["acts"]) <= 5
        assert sum(feature["histogram"]["counts"]) == int((acts[..., f] > 0).sum())
        assert feature["kind"] == ("single-token" if feature["token_share"] >= 0.5 else "context")
        # latent f writes direction ±e_f: its logit effect is ±W_U[f]
        sign = 1.0 if f < 16 else -1.0
        expected = torch.topk(sign * tiny.W_U[f % 16], 8).values
        got = torch.tensor([v for _, v in feature["logits"]["promoted"]])
        torch.testing.assert_close(got, expected)
    census = report["census"]
    assert census["single_token"] + census["context"] == 5 and census["features"] == 32


def test_residual_directions_through_w_out_and_w_o(tiny):
    d = torch.randn(3, 32)
    torch.testing.assert_close(residual_directions(tiny, "blocks.0.mlp.hook_post", d), d @ tiny.blocks[0].mlp.W_out)
    z = torch.randn(2, 16)
    torch.testing.assert_close(residual_directions(tiny, "blocks.0.attn.hook_z", z),
                               torch.einsum("mhd,hdk->mk", z.reshape(2, 2, 8), tiny.blocks[0].attn.W_O))
    assert residual_directions(tiny, "blocks.0.attn.hook_pattern", torch.randn(1, 7)) is None
    assert logit_effects(tiny, axis_sae(), HOOK, [0, 17], top=3)[17]["promoted"][0][0] == "<%d>" % int(
        torch.argmax(-tiny.W_U[1]))


def test_find_features_needs_every_prompt(tiny):
    sae = axis_sae()
    prompts = [contexts(3)[i] for i in range(3)]
    hits = find_features(tiny, sae, HOOK, prompts, top=32)
    maxima = torch.stack([feature_activations(tiny, sae, p[None], HOOK)[0].max(0).values for p in prompts])
    expected = {int(f) for f in torch.nonzero(maxima.min(0).values > 0)[:, 0]}
    assert {h["id"] for h in hits} == expected and 0 < len(expected) < 32
    assert all(h["min_act"] == pytest.approx(float(maxima[:, h["id"]].min())) for h in hits)
    assert [h["min_act"] for h in hits] == sorted((h["min_act"] for h in hits), reverse=True)
    with pytest.raises(ValueError, match="texts must be a non-empty list"):
        find_features(tiny, sae, HOOK, "just one string")


def test_token_share_is_the_activation_mass_on_the_top_token():
    from sparsekit.analysis.lm_features import token_shares
    tokens = torch.tensor([[5, 6, 7, 5], [6, 5, 9, 9]])
    acts = torch.zeros(2, 4, 4)
    acts[0, 0, 0] = acts[1, 1, 0] = 2.0         # feature 0: only ever on token 5
    acts[0, 1, 1] = acts[0, 3, 1] = 1.0         # feature 1: tokens 6 and 5, equally
    acts[:, :, 2] = torch.tensor([[1.0, 0.0, 3.0, 0.0], [0.0, 0.0, 1.0, 1.0]])  # 7: 3, 9: 2, 5: 1 of 6
    shares = token_shares(acts, tokens)
    torch.testing.assert_close(shares, torch.tensor([1.0, 0.5, 0.5, 0.0], dtype=torch.float64))
