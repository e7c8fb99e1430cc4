"""feature_report streams: on tiny random TransformerLens models it equals the dense computation
(every activation in one [N, T, n_latents] tensor, kept here as the reference) for any batch size,
ties included, and no tensor near N x T x n_latents elements is ever built."""
import pytest
import torch
from helpers.lm_cases import axis_dictionary, random_contexts, tiny_transformer
from torch.utils._python_dispatch import TorchDispatchMode

import sparsekit
from sparsekit.analysis.lm_features import feature_activations, feature_report, token_shares
from sparsekit.analysis.top_examples import Histograms, TopContexts


@pytest.fixture(scope="module")
def tiny():
    return tiny_transformer(n_layers=2, seed=int(torch.randint(0, 1000, ())))


def dense_reference(model, sae, tokens, hook, max_features, examples, window, bins, batch_contexts=16):
    """The report computed from every activation at once (the pre-streaming feature_report), with
    total orders: a context's first position with its largest value; contexts by value, then index.
    batch_contexts: the model's forward batches (a random model's activations move by an ulp or so
    with the batch's size, so an exact comparison runs the same batches)."""
    acts = feature_activations(model, sae, tokens, hook, batch_contexts)     # [N, T, n]
    n_tokens = tokens.shape[0] * (tokens.shape[1] - 1)
    fires = (acts > 0).sum((0, 1))
    density = fires.double() / n_tokens
    alive = torch.nonzero(fires > 0)[:, 0]
    chosen = alive[torch.argsort(density[alive], descending=True, stable=True)]
    chosen = chosen if max_features is None else chosen[:max_features]
    maxima = acts.max(1).values                                              # [N, n]
    first_max = torch.argmax((acts == maxima[:, None]).to(torch.uint8), dim=1)
    shares = token_shares(acts[:, 1:, chosen], tokens[:, 1:])
    features = []
    for slot, f in enumerate(chosen.tolist()):
        rows = []
        for context in torch.argsort(maxima[:, f], descending=True, stable=True)[:examples].tolist():
            if maxima[context, f] <= 0:
                break
            position = int(first_max[context, f])
            lo, hi = max(1, position - window), min(tokens.shape[1], position + window + 1)
            rows.append({"context": context, "max_position": position - lo, "max_act": float(maxima[context, f]),
                         "tokens": [f"<{int(t)}>" for t in tokens[context, lo:hi]],
                         "acts": [round(float(a), 4) for a in acts[context, lo:hi, f]]})
        nonzero = acts[..., f][acts[..., f] > 0]
        high = float(nonzero.max())
        edges = torch.linspace(0.0, high, bins + 1)
        features.append({"id": f, "density": float(density[f]), "max_act": high, "mean_act": float(nonzero.double().mean()),
                         "edges": [round(float(e), 5) for e in edges],
                         "counts": [int(c) for c in torch.histc(nonzero, bins=bins, min=0.0, max=float(edges[-1]))],
                         "examples": rows, "token_share": float(shares[slot])})
    return {"tokens": n_tokens, "dead": int((fires == 0).sum()), "features": features}


def assert_report_matches(report, reference):
    assert report["tokens"] == reference["tokens"] and report["census"]["dead"] == reference["dead"]
    assert [f["id"] for f in report["features"]] == [f["id"] for f in reference["features"]]
    for got, want in zip(report["features"], reference["features"]):
        assert got["density"] == want["density"] and got["max_act"] == want["max_act"]
        assert got["mean_act"] == pytest.approx(want["mean_act"], rel=1e-5)
        assert got["histogram"] == {"edges": want["edges"], "counts": want["counts"]}, got["id"]
        assert got["examples"] == want["examples"], got["id"]
        assert got["token_share"] == pytest.approx(want["token_share"], abs=1e-4)


def random_topk(d, n, k):
    return sparsekit.TopKSAE(d, n, k, seed=int(torch.randint(0, 10_000, ())))


@pytest.mark.parametrize("batch_contexts", [1, 3, 7, 40])
@pytest.mark.parametrize("which", ["axis-relu", "topk"])
def test_streamed_report_equals_the_dense_computation_for_any_batch_size(tiny, which, batch_contexts):
    hook = "blocks.1.hook_resid_post" if which == "topk" else "blocks.0.hook_mlp_out"
    sae = random_topk(16, 48, 5) if which == "topk" else axis_dictionary(16)
    tokens = random_contexts(13, 11, seed=int(torch.randint(0, 10_000, ())))
    report = feature_report(tiny, sae, tokens, hook, max_features=None, examples=4, window=3, bins=7,
                            batch_contexts=batch_contexts)
    assert_report_matches(report, dense_reference(tiny, sae, tokens, hook, None, 4, 3, 7, batch_contexts))
    assert report["census"]["reported"] == len(report["features"]) > 0


@pytest.mark.parametrize("batch_contexts", [1, 2, 5])
def test_ties_within_and_across_contexts_resolve_like_the_dense_computation(tiny, batch_contexts):
    """At hook_embed a token's activation depends on its id only (exactly, whatever the batch): with 3
    token ids every value recurs at several positions of a context and in many contexts, so every
    top-k choice is a tie; one dense reference serves every batch size."""
    tokens = torch.randint(1, 4, (12, 9))
    tokens[:, 0] = 0
    sae = axis_dictionary(16)
    report = feature_report(tiny, sae, tokens, "hook_embed", max_features=20, examples=5, window=2, bins=4,
                            batch_contexts=batch_contexts)
    reference = dense_reference(tiny, sae, tokens, "hook_embed", 20, 5, 2, 4)
    assert_report_matches(report, reference)
    tied = [f for f in report["features"] if len({e["max_act"] for e in f["examples"]}) < len(f["examples"])]
    assert tied  # the case really has ties


class LargestTensor(TorchDispatchMode):
    """Records the most elements of any tensor an op returns while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("which", ["topk", "relu"])
def test_no_tensor_of_contexts_by_positions_by_latents_is_built(tiny, which):
    n, contexts, length = 512, 128, 9
    sae = random_topk(16, n, 4) if which == "topk" else sparsekit.ReLUSAE(16, n, l1_coeff=1.0, seed=1)
    tokens = random_contexts(contexts, length, seed=int(torch.randint(0, 10_000, ())))
    with LargestTensor() as seen:
        report = feature_report(tiny, sae, tokens, "blocks.0.hook_resid_post", max_features=None, examples=4,
                                window=2, batch_contexts=4)
    dense = contexts * (length - 1) * n
    assert report["census"]["reported"] > 0
    assert seen.largest <= dense // 8, (seen.largest, dense)
    with LargestTensor() as seen:  # the dense reference does build it: the probe sees such a tensor
        feature_activations(tiny, sae, tokens, "blocks.0.hook_resid_post")
    assert seen.largest >= contexts * length * n


def test_top_contexts_keep_the_k_best_across_calls_in_a_total_order():
    n, k = 6, 3
    values = torch.randint(1, 4, (40,)).float()      # many ties
    latents = torch.randint(0, n, (40,))
    contexts = torch.arange(40) // 4                   # 10 contexts of 4 entries each
    positions = torch.arange(40) % 4
    one = TopContexts(n, k)
    one.add(values, latents, contexts, positions)
    split = TopContexts(n, k)
    for lo in range(0, 40, 8):                         # two whole contexts per call
        split.add(values[lo:lo + 8], latents[lo:lo + 8], contexts[lo:lo + 8], positions[lo:lo + 8])
    for top in (one, split):
        for latent in range(n):
            mine = latents == latent
            best = {}
            for v, c, p in zip(values[mine].tolist(), contexts[mine].tolist(), positions[mine].tolist()):
                if c not in best or v > best[c][0]:
                    best[c] = (v, p)
            expected = sorted(best.items(), key=lambda item: (-item[1][0], item[0]))[:k]
            got = [(c, (v, p)) for v, c, p in zip(top.values[latent].tolist(), top.contexts[latent].tolist(),
                                                  top.positions[latent].tolist()) if c >= 0]
            assert got == expected


def test_histogram_bins_match_histc_including_the_maximum():
    maxima = torch.rand(5) * 10
    values = torch.rand(300) * 10
    slots = torch.randint(0, 5, (300,))
    values = torch.minimum(values, maxima[slots])
    values[:5] = maxima                                # each maximum itself lands in the last bin
    slots[:5] = torch.arange(5)
    hist = Histograms(maxima, 9)
    hist.add(values[:150], slots[:150])
    hist.add(values[150:], slots[150:])
    for s in range(5):
        expected = torch.histc(values[slots == s], bins=9, min=0.0, max=float(maxima[s]))
        assert hist.counts[s].tolist() == [int(c) for c in expected]


@pytest.mark.parametrize("argument, value, message", [
    ("examples", 0, "examples must be a positive int"),
    ("bins", 2.5, "bins must be a positive int"),
    ("window", -1, "window must be a non-negative int"),
    ("max_features", -3, "max_features must be None or a non-negative int"),
    ("batch_contexts", 0, "batch_contexts must be a positive int"),
])
def test_bad_report_arguments_are_named(tiny, argument, value, message):
    with pytest.raises(ValueError, match=message):
        feature_report(tiny, axis_dictionary(16), random_contexts(2, 5), "blocks.0.hook_resid_post",
                       **{argument: value})
