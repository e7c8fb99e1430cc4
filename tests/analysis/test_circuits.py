"""The replacement model and attribution graphs (sparsekit.analysis.circuits) on a tiny random
TransformerLens model in float64: the frozen replacement reproduces the real logits; direct effects
equal finite differences of the real model run by hand with patterns, norm scales and every other
MLP output frozen; effects into a node plus its bias sum to its value; the unfrozen replacement's CE
equals replacing the MLPs by hand, layer after layer; influence equals its path series; pruning keeps
the logits within max_nodes; the JSON names every node an edge uses."""
import json

import pytest
import torch
from helpers.lm_cases import random_contexts, tiny_transformer

from sparsekit.analysis.circuits import (
    attribute,
    graph_to_json,
    influence,
    prune,
    record_prompt,
    replacement_ce_kl,
    replacement_forward,
    write_graph_json,
)
from sparsekit.analysis.circuits.pruning import NoFeaturesKept, influence_share, normalized_adjacency
from sparsekit.analysis.circuits.replacement import FROZEN_HOOK, Replacement
from sparsekit.sae.clt import CrossLayerTranscoder

N_LAYERS, D, N = 4, 16, 24


@pytest.fixture(scope="module")
def model():
    m = tiny_transformer(N_LAYERS, seed=3)
    m.cfg.dtype = torch.float64  # LayerNorm casts back to cfg.dtype
    return m.to(torch.float64)


def make_clt(first_layer=1, n_layers=2, reach=None, seed=0):
    """A random float64 CLT with random biases and scales, so every term of the replacement is exercised."""
    clt = CrossLayerTranscoder(D, n_layers * N, n_layers=n_layers, k_per_layer=4, reach=reach, first_layer=first_layer,
                               dtype=torch.float64, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        clt.b_enc.copy_(torch.rand(clt.b_enc.shape, generator=gen, dtype=torch.float64) + 0.5)
        clt.b_in.copy_(0.1 * torch.randn(clt.b_in.shape, generator=gen, dtype=torch.float64))
        clt.b_dec.copy_(0.1 * torch.randn(clt.b_dec.shape, generator=gen, dtype=torch.float64))
        clt.layer_input_scale.copy_(torch.rand(n_layers, generator=gen, dtype=torch.float64) + 0.5)
        clt.layer_output_scale.copy_(torch.rand(n_layers, generator=gen, dtype=torch.float64) + 0.5)
    return clt.eval()


def prompt(seed=1, length=7):
    return random_contexts(1, length, seed)[0]


def frozen_by_hand(model, clt, record, mlp_delta=None, resid_delta=None):
    """The real model with every attention pattern, norm scale and MLP output put back from record,
    plus mlp_delta {(block, pos): vector} and resid_delta {pos: vector} -> (last-position logits
    [vocab], {CLT layer: its raw MLP input [T, d]}). Written without the Replacement class."""
    seen = {}

    def freeze(act, hook):
        return record.frozen[hook.name]

    def mlp_out(act, hook):
        m = int(hook.name.split(".")[1])
        out = record.mlp_out[m][None].clone()
        for (block, pos), vector in (mlp_delta or {}).items():
            if block == m:
                out[0, pos] += vector
        return out

    def resid(act, hook):
        out = act.clone()
        for pos, vector in (resid_delta or {}).items():
            out[0, pos] += vector
        return out

    def capture(act, hook):
        seen[int(hook.name.split(".")[1]) - clt.first_layer] = act[0]

    hooks = [(name, freeze) for name in record.frozen] + [("blocks.0.hook_resid_pre", resid)]
    hooks += [(f"blocks.{m}.hook_mlp_out", mlp_out) for m in range(model.cfg.n_layers)]
    hooks += [(f"blocks.{m}.ln2.hook_normalized", capture) for m in clt.layers()]
    with torch.no_grad():
        logits = model.run_with_hooks(record.tokens[None], fwd_hooks=hooks)
    return logits[0, -1], seen


def preactivation_by_hand(clt, seen, layer, pos, latent):
    col = layer * clt.latents_per_layer + latent
    x = seen[layer][pos] * clt.layer_input_scale[layer]
    with torch.no_grad():
        return float((x - clt.b_in[layer]) @ clt.W_enc[:, col] + clt.b_enc[col])


def target_value_by_hand(clt, graph, t, logits, seen):
    node = graph.nodes[t]
    if node["kind"] == "logit":
        return float(logits[node["token_id"]] - logits.mean())
    return preactivation_by_hand(clt, seen, node["layer"] - clt.first_layer, node["position"], node["latent"])


def source_delta(model, clt, graph, s, record, eps):
    """A source node's value scaled by (1 + eps), as (mlp_delta, resid_delta) for frozen_by_hand."""
    node = graph.nodes[s]
    pos = node["position"]
    if node["kind"] == "feature":
        layer = node["layer"] - clt.first_layer
        delta = {}
        for offset in range(clt.spans[layer]):
            scale = clt.layer_output_scale[layer + offset]
            row = clt.decoder_to(layer, layer + offset)[node["latent"]]
            delta[(node["layer"] + offset, pos)] = eps * node["activation"] * row / scale
        return delta, None
    if node["kind"] == "error":
        rep = Replacement(model, clt, record)
        return {(node["layer"], pos): eps * rep.errors()[node["layer"], pos]}, None
    return None, {pos: eps * record.resid0[pos]}


def test_frozen_replacement_reproduces_the_real_logits(model):
    clt = make_clt()
    tokens = prompt()
    real = model(tokens[None])[0]
    replaced = replacement_forward(model, clt, tokens, special_ids=None)
    torch.testing.assert_close(replaced, real, rtol=0, atol=1e-10)
    record = record_prompt(model, clt, tokens, special_ids=None)
    assert not bool(record.keep[0]) and bool(record.keep[1:].all())
    assert any(FROZEN_HOOK.search(name) and "pattern" in name for name in record.frozen)
    assert any(name.endswith("ln2.hook_scale") for name in record.frozen)


def test_replacement_error_nodes_are_true_minus_reconstruction(model):
    clt = make_clt(reach=1)
    record = record_prompt(model, clt, prompt(seed=4), special_ids=None)
    rep = Replacement(model, clt, record)
    errors = rep.errors()
    # uncovered blocks (0 and 3) and position 0 of covered ones: the whole MLP output is error
    torch.testing.assert_close(errors[0], record.mlp_out[0])
    torch.testing.assert_close(errors[3], record.mlp_out[3])
    torch.testing.assert_close(errors[1, 0], record.mlp_out[1, 0])
    x = torch.stack([record.mlp_in[layer, 1:] for layer in range(2)], 1)
    reconstruction = clt.reconstruct(x)
    torch.testing.assert_close(errors[1:3, 1:], (record.mlp_out[1:3, 1:] - reconstruction.transpose(0, 1)))


@pytest.mark.parametrize("reach", [None, 1])
def test_direct_effects_equal_finite_differences_of_the_frozen_model(model, reach):
    clt = make_clt(first_layer=1, n_layers=3 if reach is None else 2, reach=reach, seed=5)
    tokens = prompt(seed=2)
    graph = attribute(model, clt, tokens, max_logits=3, batch_size=7, special_ids=None, progress=False)
    record = record_prompt(model, clt, tokens, special_ids=None)
    features, logits = graph.kind_indices("feature"), graph.kind_indices("logit")
    assert features.numel() > 10 and logits.numel() == 3
    gen = torch.Generator().manual_seed(0)
    targets = torch.cat([features[-3:], logits[:2]])
    checked = nonzero = 0
    eps = 1e-4
    for t in targets.tolist():
        sources = torch.randperm(len(graph.nodes), generator=gen)[:25].tolist()
        sources += graph.adjacency[t].abs().argsort(descending=True)[:5].tolist()
        for s in sources:
            if graph.nodes[s]["kind"] == "logit":
                continue
            mlp_plus, resid_plus = source_delta(model, clt, graph, s, record, eps)
            mlp_minus, resid_minus = source_delta(model, clt, graph, s, record, -eps)
            plus = target_value_by_hand(clt, graph, t, *frozen_by_hand(model, clt, record, mlp_plus, resid_plus))
            minus = target_value_by_hand(clt, graph, t, *frozen_by_hand(model, clt, record, mlp_minus, resid_minus))
            expected = (plus - minus) / (2 * eps)
            assert graph.adjacency[t, s].item() == pytest.approx(expected, abs=1e-7), (graph.nodes[t], graph.nodes[s])
            checked += 1
            nonzero += abs(expected) > 1e-6
    assert checked >= 100 and nonzero >= 20


def test_effects_into_a_node_plus_its_bias_sum_to_its_value(model):
    clt = make_clt(seed=7)
    tokens = prompt(seed=6)
    graph = attribute(model, clt, tokens, max_logits=4, special_ids=None, progress=False)
    record = record_prompt(model, clt, tokens, special_ids=None)
    rep = Replacement(model, clt, record)
    features, logits = graph.kind_indices("feature"), graph.kind_indices("logit")
    # the targets' values are the real ones: active features' activations, demeaned real logits
    activations = torch.tensor([graph.nodes[i]["activation"] for i in features.tolist()], dtype=torch.float64)
    torch.testing.assert_close(graph.values[features], activations)
    last = record.logits[-1]
    ids = torch.tensor([graph.nodes[i]["token_id"] for i in logits.tolist()])
    torch.testing.assert_close(graph.values[logits], last[ids] - last.mean())
    # bias: each target's value with every source (activations, errors, embeddings) at zero
    F, M, T = features.numel(), model.cfg.n_layers, tokens.numel()
    with torch.no_grad():
        zeros = (torch.zeros(1, F, dtype=torch.float64), torch.zeros(1, M, T, D, dtype=torch.float64),
                 torch.zeros(1, T, D, dtype=torch.float64))
        out, captured = rep.forward(*zeros)
    for t in torch.cat([features, logits]).tolist():
        node = graph.nodes[t]
        if node["kind"] == "logit":
            bias = float(out[0, -1, node["token_id"]] - out[0, -1].mean())
        else:
            bias = preactivation_by_hand(clt, {k: v[0] for k, v in captured.items()},
                                         node["layer"] - clt.first_layer, node["position"], node["latent"])
        assert float(graph.adjacency[t].sum()) + bias == pytest.approx(float(graph.values[t]), abs=1e-9)
    # a feature has no edge from features of its own or later layers, nor from later positions
    layer = torch.tensor([n.get("layer", -1) for n in graph.nodes])
    position = torch.tensor([n["position"] for n in graph.nodes])
    block = graph.adjacency[features][:, features]
    later = (layer[features][None, :] >= layer[features][:, None]) | \
            (position[features][None, :] > position[features][:, None])
    assert bool((block[later] == 0).all()) and bool((block != 0).any())


def test_unfrozen_replacement_ce_equals_replacing_the_mlps_by_hand(model):
    clt = make_clt(seed=9)
    tokens = random_contexts(3, 9, seed=8)
    figures = replacement_ce_kl(model, clt, tokens, batch_contexts=2, special_ids=None)
    # by hand: feed each pass the previous pass's MLP inputs; after n_layers passes every covered
    # layer reads the replacement's own stream
    keep = torch.ones(tokens.shape, dtype=torch.bool)
    keep[:, 0] = False
    previous, current = {}, {}

    def capture(act, hook):
        current[int(hook.name.split(".")[1])] = act.detach().clone()

    def replace(act, hook):
        if not previous:
            return act
        m = int(hook.name.split(".")[1])
        x = torch.stack([previous[layer] for layer in clt.layers()], 2).reshape(-1, clt.n_layers, D)
        y = clt.reconstruct(x)[:, m - clt.first_layer].view(act.shape)
        return torch.where(keep[..., None], y, act)

    hooks = [(f"blocks.{m}.ln2.hook_normalized", capture) for m in clt.layers()]
    hooks += [(f"blocks.{m}.hook_mlp_out", replace) for m in clt.layers()]
    with torch.no_grad():
        for _ in range(clt.n_layers + 1):
            logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
            previous = dict(current)
        clean = model(tokens)
    lp = logits[:, 1:-1].log_softmax(-1)
    ce = float(-lp.gather(-1, tokens[:, 2:, None]).mean())
    clean_lp = clean[:, 1:-1].log_softmax(-1)
    kl = float((clean_lp.exp() * (clean_lp - lp)).sum(-1).mean())
    assert figures["ce_replacement"] == pytest.approx(ce, rel=1e-9)
    assert figures["kl"] == pytest.approx(kl, rel=1e-9)
    assert figures["ce_clean"] == pytest.approx(float(-clean_lp.gather(-1, tokens[:, 2:, None]).mean()), rel=1e-9)
    assert figures["tokens"] == 3 * 7 and figures["kl_zero"] > 0


def test_unfrozen_replacement_with_a_silent_clt_is_zero_ablation(model):
    clt = make_clt(seed=11)
    with torch.no_grad():
        clt.W_dec.zero_()
        clt.b_dec.zero_()
    figures = replacement_ce_kl(model, clt, random_contexts(2, 8, seed=3), special_ids=None)
    assert figures["ce_replacement"] == pytest.approx(figures["ce_zero"], rel=1e-12)
    assert figures["kl"] == pytest.approx(figures["kl_zero"], rel=1e-12)
    assert figures["ce_recovered"] == pytest.approx(0.0, abs=1e-9)


def test_influence_is_the_sum_over_paths_of_the_normalised_adjacency():
    gen = torch.Generator().manual_seed(4)
    N = 9
    A = torch.randn(N, N, generator=gen, dtype=torch.float64).tril(-1)  # acyclic: sources before targets
    A[:, 6:] = 0  # the last three nodes are logits (no outgoing edges)
    w = torch.tensor([0.0] * 6 + [0.5, 0.3, 0.2], dtype=torch.float64)
    A_n = normalized_adjacency(A)
    assert torch.allclose(A_n.sum(1)[1:], torch.ones(N - 1, dtype=torch.float64))
    series, power = torch.zeros_like(A_n), torch.eye(N, dtype=torch.float64)
    for _ in range(N):
        power = power @ A_n
        series += power
    torch.testing.assert_close(influence(A, w), w @ series)


def test_prune_keeps_every_logit_within_max_nodes_and_writes_json(model, tmp_path):
    clt = make_clt(n_layers=3, seed=13)
    graph = attribute(model, clt, prompt(seed=9, length=9), max_logits=3, special_ids=None, progress=False)
    pruned = prune(graph, max_nodes=20, rank="together")
    kinds = [node["kind"] for node in pruned.nodes]
    assert kinds.count("logit") == 3 and len(kinds) <= 20 < len(graph.nodes)
    assert pruned.settings["node_threshold"] == 0.8 and pruned.settings["edge_threshold"] == 0.98
    assert 0 < pruned.settings["edges_kept"] < pruned.settings["edges_before"]
    # ranked together, the kept nodes are the most influential ones of any kind
    scores = influence(graph.adjacency, graph.logit_weights)
    kept = [n["influence"] for n in pruned.nodes if n["kind"] != "logit"]
    dropped = sorted(scores[[i for i, n in enumerate(graph.nodes) if n["kind"] != "logit"]].tolist())
    assert min(kept) >= dropped[-len(kept) - 1] - 1e-12
    path = write_graph_json(pruned, tmp_path / "graph.json")
    data = json.loads(path.read_text())
    ids = {node["id"] for node in data["nodes"]}
    assert len(ids) == len(data["nodes"]) and data["edges"]
    assert all(edge["source"] in ids and edge["target"] in ids for edge in data["edges"])
    feature = next(node for node in data["nodes"] if node["kind"] == "feature")
    assert {"layer", "position", "token", "latent", "activation", "influence"} <= set(feature)
    assert len(feature["top_tokens"]) == 3
    # logit effects: the summed decoder output through W_U, largest and smallest first
    effect = pruned.directions[next(n["feature"] for n in pruned.nodes if n["kind"] == "feature")] @ pruned.unembed
    assert [value for _, value in feature["promoted"]] == pytest.approx(effect.topk(5).values.tolist())
    assert [value for _, value in feature["suppressed"]] == pytest.approx((-effect).topk(5).values.neg().tolist())
    assert feature["top_tokens"] == [token for token, _ in feature["promoted"][:3]]
    assert data == graph_to_json(pruned)


def error_dominated_graph(model, seed):
    """A graph whose error nodes carry almost all the influence, as with a CLT over few layers of a deep
    model: every error node's outgoing edges scaled up 1000-fold."""
    clt = make_clt(n_layers=3, seed=seed)
    graph = attribute(model, clt, prompt(seed=seed + 1, length=9), max_logits=3, special_ids=None, progress=False)
    graph.adjacency[:, graph.kind_indices("error")] *= 1000.0
    return graph


def test_prune_by_kind_keeps_the_most_influential_features_when_errors_dominate(model):
    seed = int(torch.randint(0, 10_000, ()))
    graph = error_dominated_graph(model, seed)
    scores = influence(graph.adjacency, graph.logit_weights)
    share = influence_share(graph, scores)
    assert share["error"] > 0.9 and share["feature"] < 0.1
    with pytest.warns(NoFeaturesKept, match="carry .* of the logit influence"):
        together = prune(graph, max_nodes=12, rank="together")
    assert together.settings["features_kept"] == 0
    pruned = prune(graph, max_nodes=12)
    kinds = [node["kind"] for node in pruned.nodes]
    assert pruned.settings["rank"] == "by_kind" and kinds.count("logit") == 3 and len(kinds) <= 12
    assert 0 < kinds.count("feature") == pruned.settings["features_kept"] and kinds.count("error") > 0
    # features first, within three quarters of the 9 non-logit places (6) while errors want the rest;
    # the kept ones are the most influential of their kind
    assert kinds.count("feature") <= 6
    for kind, cap in (("feature", 6), ("error", 9)):
        top = scores[graph.kind_indices(kind)].sort(descending=True).values[cap - 1]
        assert all(n["influence"] >= top - 1e-12 for n in pruned.nodes if n["kind"] == kind)


def test_prune_by_kind_features_cover_the_node_threshold_of_their_influence(model):
    graph = error_dominated_graph(model, int(torch.randint(0, 10_000, ())))
    scores = influence(graph.adjacency, graph.logit_weights)
    features = scores[graph.kind_indices("feature")].sort(descending=True).values
    needed = int((features.cumsum(0) / features.sum() < 0.5).sum()) + 1
    pruned = prune(graph, node_threshold=0.5, max_nodes=500)
    kept = pruned.settings["features_kept"]
    # all the needed ones fit the budget; only those left without a kept edge may go
    assert 0 < kept <= needed
    assert {n["latent"] for n in pruned.nodes if n["kind"] == "feature"} <= {
        graph.nodes[i]["latent"] for i in graph.kind_indices("feature")[scores[graph.kind_indices("feature")]
                                                                       .argsort(descending=True)[:needed]].tolist()}


def test_pruned_graph_json_has_no_nan_in_its_settings(model):
    clt = make_clt(n_layers=2, seed=int(torch.randint(0, 10_000, ())))
    graph = attribute(model, clt, prompt(), max_logits=2, special_ids=None, progress=False)
    graph.adjacency.zero_()  # no influence anywhere: the shares are NaN
    with pytest.warns(NoFeaturesKept):
        pruned = prune(graph, max_nodes=10)
    data = graph_to_json(pruned)
    assert data["settings"]["influence_share"] == {"feature": None, "error": None, "embedding": None}
    json.loads(json.dumps(data, allow_nan=False))


def test_bad_inputs_get_one_line_naming_the_argument(model):
    clt = make_clt()
    with pytest.raises(ValueError, match="clt must be a CrossLayerTranscoder"):
        attribute(model, object(), prompt())
    with pytest.raises(ValueError, match="clt covers layers 3-4"):
        record_prompt(model, make_clt(first_layer=3), prompt())
    with pytest.raises(ValueError, match="logit_prob"):
        attribute(model, clt, prompt(), logit_prob=1.5)
    with pytest.raises(ValueError, match="prompt is text"):
        record_prompt(model, clt, "no tokenizer here")
    graph = attribute(model, clt, prompt(), max_logits=2, special_ids=None, progress=False)
    with pytest.raises(ValueError, match="max_nodes=2 leaves no room"):
        prune(graph, max_nodes=2)
    with pytest.raises(ValueError, match="rank must be one of"):
        prune(graph, rank="kind")
