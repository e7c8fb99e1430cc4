"""Invariants every backend must keep, checked with hypothesis on drawn shapes and data (float64):

- decoding is linear in the code values;
- permuting the latents (columns of W_enc with b_enc, rows of W_dec, JumpReLU thresholds with
  them) permutes the codes the same way and leaves the reconstruction unchanged, away from ties;
- gradients of a loss that sums over rows add up when the batch is split in two.
"""
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import sparsekit
from sparsekit import ops

BACKENDS = ["torch", "cpp"]
SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def shapes(draw, max_batch=12):
    n = draw(st.integers(1, 24))
    return dict(batch=draw(st.integers(1, max_batch)), d=draw(st.integers(1, 10)), n=n, k=draw(st.integers(1, n)),
                seed=draw(st.integers(0, 2**31 - 1)))


def randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def close(a, b, what=""):
    a, b = a.detach(), b.detach()
    scale = max(float(b.abs().max()) if b.numel() else 0.0, 1.0)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10 * scale, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(s=shapes(), a=st.floats(-1e3, 1e3), b=st.floats(-1e3, 1e3))
def test_decode_is_linear_in_values(backend, monkeypatch, s, a, b):
    monkeypatch.setenv("SPARSEKIT_BACKEND", backend)
    gen = torch.Generator().manual_seed(s["seed"])
    W_dec, b_dec = randn(gen, s["n"], s["d"]), randn(gen, s["d"])
    v1, v2 = randn(gen, s["batch"], s["k"]), randn(gen, s["batch"], s["k"])
    indices = torch.randint(0, s["n"], (s["batch"], s["k"]), generator=gen)  # repeats allowed: they add up
    decode = lambda v: ops.sparse_decode(v, indices, W_dec, b_dec) - b_dec
    close(decode(a * v1 + b * v2), a * decode(v1) + b * decode(v2), "TopK codes")
    rows, cols = torch.arange(s["batch"]).repeat_interleave(s["k"]), indices.reshape(-1)
    decode_coo = lambda v: ops.sparse_decode_coo(v.reshape(-1), rows, cols, W_dec, b_dec, s["batch"]) - b_dec
    close(decode_coo(a * v1 + b * v2), a * decode_coo(v1) + b * decode_coo(v2), "COO codes")


def make_sae(architecture: str, d: int, n: int, k: int, seed: int):
    kwargs = {"topk": dict(k=k), "batchtopk": dict(k=k), "relu": dict(l1_coeff=1e-3), "jumprelu": dict(l0_coeff=1e-3)}
    cls = {"topk": sparsekit.TopKSAE, "batchtopk": sparsekit.BatchTopKSAE, "relu": sparsekit.ReLUSAE,
           "jumprelu": sparsekit.JumpReLUSAE}[architecture]
    sae = cls(d, n, dtype=torch.float64, seed=seed, **kwargs[architecture])
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # biases and thresholds away from their zero initialisation
        sae.b_enc.copy_(randn(gen, n) * 0.3)
        sae.b_dec.copy_(randn(gen, d) * 0.3)
        if architecture == "jumprelu":
            sae.log_threshold.copy_(randn(gen, n) * 0.3 - 1.5)
    return sae


def permuted(sae, perm):
    """The same dictionary with latent j of the copy being latent perm[j] of the original."""
    copy = make_sae(sae.architecture, sae.d_in, sae.n_latents, getattr(sae, "k", 1), 0)
    with torch.no_grad():
        copy.W_enc.copy_(sae.W_enc[:, perm])
        copy.b_enc.copy_(sae.b_enc[perm])
        copy.W_dec.copy_(sae.W_dec[perm])
        copy.b_dec.copy_(sae.b_dec)
        if sae.architecture == "jumprelu":
            copy.log_threshold.copy_(sae.log_threshold[perm])
    return copy


def gap_to_decisions(sae, x) -> float:
    """The smallest distance from a pre-activation to a decision the architecture makes (the
    k-th/(k+1)-th boundary, zero, the JumpReLU threshold): permutation invariance holds beyond it."""
    pre = (sae.encoder_input(x) @ sae.W_enc + sae.b_enc).detach()
    gaps = [pre.abs().min()]
    if sae.architecture == "topk":  # the order of every row (values come sorted)
        top = torch.sort(pre, dim=-1, descending=True).values
        if top.shape[-1] > 1:
            gaps.append((top[:, :-1] - top[:, 1:]).min())
    if sae.architecture == "batchtopk":  # the order of the positive entries kept, and the one after
        top = torch.sort(torch.relu(pre).reshape(-1), descending=True).values
        top = top[:min(sae.k * x.shape[0] + 1, int((top > 0).sum()))]
        if top.numel() > 1:
            gaps.append((top[:-1] - top[1:]).min())
    if sae.architecture == "jumprelu":
        gaps.append((pre - torch.exp(sae.log_threshold.detach())).abs().min())
    return float(torch.stack([torch.as_tensor(g, dtype=torch.float64) for g in gaps]).min())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("architecture", ["topk", "batchtopk", "relu", "jumprelu"])
@SETTINGS
@given(s=shapes(), perm_seed=st.integers(0, 2**31 - 1))
def test_permuting_latents_permutes_codes_and_keeps_the_reconstruction(backend, architecture, monkeypatch, s,
                                                                      perm_seed):
    monkeypatch.setenv("SPARSEKIT_BACKEND", backend)
    sae = make_sae(architecture, s["d"], s["n"], s["k"], s["seed"] % 10_000)
    x = randn(torch.Generator().manual_seed(s["seed"]), s["batch"], s["d"])
    assume(gap_to_decisions(sae, x) > 1e-8)
    perm = torch.randperm(s["n"], generator=torch.Generator().manual_seed(perm_seed))
    other = permuted(sae, perm)
    codes, codes_p = sae.encode(x), other.encode(x)
    if architecture == "topk":
        assert torch.equal(perm[codes_p.indices], codes.indices)
        close(codes_p.values, codes.values, "values")
    elif architecture == "batchtopk":  # flat COO, row-major: compare as maps (row, latent) -> value
        # Zero values (fewer positive activations than B*k) are kept by flat index: those differ.
        as_dict = lambda c, cols: {(int(r), int(j)): float(v) for v, r, j in zip(c.values.detach(), c.rows, cols) if v > 0}
        mapped, original = as_dict(codes_p, perm[codes_p.cols]), as_dict(codes, codes.cols)
        assert mapped.keys() == original.keys()
        close(torch.tensor([mapped[key] for key in original]), torch.tensor(list(original.values())), "values")
    else:
        close(codes_p, codes[:, perm], "dense codes")
    close(other.decode(codes_p), sae.decode(codes), "reconstruction")


def split_gradients(function, inputs: dict, split: int, per_row: dict):
    """Gradients of sum(function(**inputs)) on the whole batch and as the sum over two halves.
    per_row: the names of inputs whose first axis is the batch."""
    def grads(rows):
        leaves = {n: (t[rows] if n in per_row else t).detach().clone().requires_grad_(t.is_floating_point())
                  for n, t in inputs.items()}
        loss = function(**leaves)
        wanted = [n for n, t in leaves.items() if t.requires_grad and n not in per_row]
        return dict(zip(wanted, torch.autograd.grad(loss, [leaves[n] for n in wanted])))
    whole = grads(slice(None))
    first, second = grads(slice(None, split)), grads(slice(split, None))
    return whole, {n: first[n] + second[n] for n in whole}


OP_LOSSES = {  # a loss summed over rows, with fixed random weights on the outputs
    "topk_encode": lambda x, W_enc, b_enc, k, w: (ops.topk_encode(x, W_enc, b_enc, int(k)).values * w[:, :int(k)]).sum(),
    "relu_encode": lambda x, W_enc, b_enc, k, w: (ops.relu_encode(x, W_enc, b_enc) * w[:, :W_enc.shape[1]]).sum(),
    "jumprelu_encode": lambda x, W_enc, b_enc, k, w: (
        ops.jumprelu_encode(x, W_enc, b_enc, b_enc.detach() * 0 - 1.0, 0.05) * w[:, :W_enc.shape[1]]).sum(),
    "sparse_decode": lambda x, W_enc, b_enc, k, w: (
        ops.sparse_decode(x[:, :int(k)], torch.arange(int(k)).repeat(x.shape[0], 1) % W_enc.shape[0],
                          W_enc, b_enc) * w[:, :b_enc.shape[0]]).sum(),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(OP_LOSSES))
@SETTINGS
@given(s=shapes(max_batch=16))
def test_gradients_of_a_sum_split_across_batches_add_up(backend, op, monkeypatch, s):
    monkeypatch.setenv("SPARSEKIT_BACKEND", backend)
    assume(s["batch"] >= 2)
    gen = torch.Generator().manual_seed(s["seed"])
    d, n, k = s["d"], s["n"], s["k"]
    if op == "sparse_decode":  # values [B, k] from x's columns, W_dec [n, d] in W_enc's place
        d = max(d, k)
        inputs = dict(x=randn(gen, s["batch"], d), W_enc=randn(gen, n, d), b_enc=randn(gen, d))
    else:
        inputs = dict(x=randn(gen, s["batch"], d), W_enc=randn(gen, d, n), b_enc=randn(gen, n))
    inputs.update(k=torch.tensor(k), w=randn(gen, s["batch"], max(n, d)))
    split = 1 + s["seed"] % (s["batch"] - 1)
    whole, halves = split_gradients(OP_LOSSES[op], inputs, split, per_row={"x", "w"})
    assert set(whole) == {"W_enc", "b_enc"}
    for name in whole:
        close(halves[name], whole[name], name)
