"""evaluate_splices reports SAELens's eval names for the same quantities."""
import pytest
import torch
from helpers.lm_cases import random_contexts, tiny_transformer

import sparsekit
from sparsekit.analysis.lm_metrics import SAELENS_NAMES, lm_splice_metrics, with_saelens_names


def test_saelens_names_equal_their_sparsekit_twins():
    model = tiny_transformer(2, seed=int(torch.randint(0, 1000, ())))
    sae = sparsekit.TopKSAE(16, 32, 4, seed=None)
    m = lm_splice_metrics(model, random_contexts(4, 8, seed=1), "blocks.0.hook_resid_post", sae, batch_contexts=2)
    for alias, ours in SAELENS_NAMES.items():
        assert m[alias] == m[ours]
    assert m["explained_variance"] == pytest.approx(1 - m["fvu"])
    assert m["kl_div_score"] == pytest.approx((m["kl_zero"] - m["kl"]) / m["kl_zero"])


def test_kl_div_score_without_a_zero_ablation_effect_is_nan_not_an_error():
    named = with_saelens_names({"kl": 0.0, "kl_zero": 0.0})
    assert named["kl_div_score"] != named["kl_div_score"]
