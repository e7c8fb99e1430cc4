"""Feature reports and CE/KL evaluation leave special tokens (BOS, EOS, pad anywhere in a context) out,
as training does: a special position never appears in a report and is never spliced."""
import torch
from helpers.lm_cases import random_contexts, tiny_transformer

import sparsekit
from sparsekit.analysis.lm_features import feature_report
from sparsekit.analysis.lm_metrics import lm_splice_metrics

SPECIAL = (0, 7)  # BOS is 0 in the helpers' contexts; 7 plays EOS/pad in the middle


def contexts_with_specials(seed: int):
    tokens = random_contexts(6, 12, seed=seed)
    tokens[tokens == 7] = 8
    tokens[:, 5] = 7  # one special token mid-context in every context
    tokens[2, 9] = 0  # and a BOS in the middle of one
    return tokens


def test_feature_report_never_shows_a_special_position_and_counts_only_kept_tokens():
    seed = int(torch.randint(0, 10_000, ()))
    model = tiny_transformer(1, seed=seed)
    tokens = contexts_with_specials(seed)
    sae = sparsekit.ReLUSAE(16, 48, l1_coeff=1.0, seed=seed)
    with torch.no_grad():
        sae.b_enc.fill_(0.5)  # every latent fires almost everywhere: any special position would show up
    report = feature_report(model, sae, tokens, "blocks.0.hook_resid_post", max_features=None, examples=4, window=0,
                            special_ids=SPECIAL)
    assert report["tokens"] == 6 * 11 - 6 - 1
    shown = [e["tokens"] for f in report["features"] for e in f["examples"]]
    assert shown and all(len(t) == 1 and t[0] not in ("<0>", "<7>") for t in shown)  # window=0: the max's token only
    full = feature_report(model, sae, tokens, "blocks.0.hook_resid_post", max_features=None, examples=4, window=0,
                          special_ids=None)
    assert full["tokens"] == 6 * 11
    dense = {f["id"]: f["density"] * report["tokens"] for f in report["features"]}
    dense_all = {f["id"]: f["density"] * full["tokens"] for f in full["features"]}
    assert all(round(dense[i]) <= round(dense_all[i]) for i in dense)
    assert any(round(dense[i]) < round(dense_all[i]) for i in dense)  # the special positions' fires are gone


def test_evaluation_leaves_special_positions_clean_and_out_of_fvu():
    seed = int(torch.randint(0, 10_000, ()))
    model = tiny_transformer(2, seed=seed)
    tokens = contexts_with_specials(seed)
    hook = "blocks.0.hook_resid_post"
    sae = sparsekit.TopKSAE(16, 32, 2, seed=seed)
    seen = []
    original = sae.reconstruct

    def spy(x):
        seen.append(x.shape[0])
        return original(x)

    sae.reconstruct = spy
    kept = lm_splice_metrics(model, tokens, hook, sae, special_ids=SPECIAL)
    everything = lm_splice_metrics(model, tokens, hook, sae, special_ids=None)
    assert (kept["tokens"], everything["tokens"]) == (6 * 11 - 7, 6 * 11)  # FVU/L0 rows
    assert kept["ce_clean"] == everything["ce_clean"]  # CE/KL: over the same predictions
    assert kept["fvu"] != everything["fvu"]  # FVU over kept rows only
    # The spliced output at a special position is the clean activation: splicing a dictionary that
    # returns garbage only at kept positions gives the same CE as one that returns garbage everywhere.
    sae.reconstruct = lambda x: torch.full_like(x, 1e3)
    garbage_kept = lm_splice_metrics(model, tokens, hook, sae, special_ids=SPECIAL)
    garbage_all = lm_splice_metrics(model, tokens, hook, sae, special_ids=None)
    assert garbage_kept["ce_splice"] != garbage_all["ce_splice"]
