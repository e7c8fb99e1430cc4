"""pytest-benchmark: every op in sparsekit.ops, forward+backward, reference vs C++.

    .venv/bin/python -m pytest -q bench/test_ops_benchmark.py --benchmark-only --benchmark-group-by=group

Each op is one benchmark group with two members: "reference" (SPARSEKIT_BACKEND=torch, the
plain-PyTorch spec in sparsekit.ops.reference) and "cpp" (SPARSEKIT_BACKEND=cpp, sparsekit._C).
sparsekit reads the variable on every call, so a monkeypatched environment switches backends.

Shapes are moderate (B=1024, d=256, n=4096, k=32) so the suite takes a minute or two. Gradients
go where a training step needs them: the parameters and the codes' values, not x (activations
carry no gradient when an SAE is trained). This file lives under bench/, outside the main suite
(`pytest tests`).
"""
from __future__ import annotations

import pytest
import torch

import sparsekit
from sparsekit.ops.backend import _C

B, D, N, K = 1024, 256, 4096, 32
DEAD_FRACTION = 0.10          # ghost_grad_loss: this share of the latents is dead
JUMPRELU_BANDWIDTH = 1e-3
BACKENDS = {"reference": "torch", "cpp": "cpp"}


@pytest.fixture(params=list(BACKENDS))
def backend(request, monkeypatch):
    """Forces one backend for the test; its name is the benchmark's parameter id."""
    if request.param == "cpp" and _C is None:
        pytest.skip("sparsekit._C is not built")
    monkeypatch.setenv("SPARSEKIT_BACKEND", BACKENDS[request.param])
    return request.param


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.requires_grad_(True)


@pytest.fixture
def data() -> dict:
    """Seeded inputs shared by all ops: an encoder, a decoder, x, TopK codes and their COO form."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, D, generator=gen)
    W_dec = torch.randn(N, D, generator=gen)
    W_dec /= W_dec.norm(dim=-1, keepdim=True)
    indices = torch.rand(B, N, generator=gen).topk(K, dim=-1).indices  # K distinct latents per row
    return {
        "x": x,
        "W_enc": _leaf(W_dec.t().contiguous()),
        "b_enc": _leaf(torch.zeros(N)),
        "W_dec": _leaf(W_dec.clone()),
        "b_dec": _leaf(torch.zeros(D)),
        "log_threshold": _leaf(torch.full((N,), -1.0)),
        "values": _leaf(torch.rand(B, K, generator=gen)),
        "indices": indices,
        "rows": torch.arange(B).repeat_interleave(K),
        "residual": torch.randn(B, D, generator=gen),
        "dead_idx": torch.randperm(N, generator=gen)[: int(N * DEAD_FRACTION)],
        "gen": gen,
    }


def _forward_backward(fn, leaves: list[torch.Tensor], grad_out: torch.Tensor | None = None):
    """A benchmark body: clear the leaves' gradients, run fn, backpropagate grad_out (or 1 for a
    scalar output)."""
    def run():
        for leaf in leaves:
            leaf.grad = None
        out = fn()
        out.backward(grad_out)
    return run


def _grad_like(shape, data) -> torch.Tensor:
    return torch.randn(shape, generator=data["gen"])


def test_topk_encode(benchmark, backend, data):
    benchmark.group = "topk_encode"
    d = data
    benchmark(_forward_backward(lambda: sparsekit.topk_encode(d["x"], d["W_enc"], d["b_enc"], K).values,
                                [d["W_enc"], d["b_enc"]], _grad_like((B, K), d)))


def test_batchtopk_encode(benchmark, backend, data):
    benchmark.group = "batchtopk_encode"
    d = data
    benchmark(_forward_backward(lambda: sparsekit.batchtopk_encode(d["x"], d["W_enc"], d["b_enc"], K).values,
                                [d["W_enc"], d["b_enc"]], _grad_like((B * K,), d)))


def test_relu_encode(benchmark, backend, data):
    benchmark.group = "relu_encode"
    d = data
    benchmark(_forward_backward(lambda: sparsekit.relu_encode(d["x"], d["W_enc"], d["b_enc"]),
                                [d["W_enc"], d["b_enc"]], _grad_like((B, N), d)))


def test_jumprelu_encode(benchmark, backend, data):
    benchmark.group = "jumprelu_encode"
    d = data
    benchmark(_forward_backward(
        lambda: sparsekit.jumprelu_encode(d["x"], d["W_enc"], d["b_enc"], d["log_threshold"], JUMPRELU_BANDWIDTH),
        [d["W_enc"], d["b_enc"], d["log_threshold"]], _grad_like((B, N), d)))


def test_sparse_decode(benchmark, backend, data):
    benchmark.group = "sparse_decode"
    d = data
    benchmark(_forward_backward(lambda: sparsekit.sparse_decode(d["values"], d["indices"], d["W_dec"], d["b_dec"]),
                                [d["values"], d["W_dec"], d["b_dec"]], _grad_like((B, D), d)))


def test_sparse_decode_coo(benchmark, backend, data):
    benchmark.group = "sparse_decode_coo"
    d = data
    values = _leaf(d["values"].detach().reshape(-1).clone())
    cols = d["indices"].reshape(-1)
    benchmark(_forward_backward(
        lambda: sparsekit.sparse_decode_coo(values, d["rows"], cols, d["W_dec"], d["b_dec"], B),
        [values, d["W_dec"], d["b_dec"]], _grad_like((B, D), d)))


def test_ghost_grad_loss(benchmark, backend, data):
    benchmark.group = f"ghost_grad_loss ({DEAD_FRACTION:.0%} dead)"
    d = data
    mse_main = torch.tensor(1.0)
    benchmark(_forward_backward(
        lambda: sparsekit.ghost_grad_loss(d["x"], d["W_enc"], d["b_enc"], d["W_dec"], d["dead_idx"],
                                          d["residual"], mse_main),
        [d["W_enc"], d["b_enc"]]))
