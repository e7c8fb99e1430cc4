"""The ops compose with torch.compile: no graph breaks, and a compiled TopK step matches eager."""
import torch

import sparsekit


def _sae(seed=0, d=16, n=96):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(d, n, generator=g).div_(d ** 0.5).requires_grad_(), torch.zeros(n, requires_grad=True),
            torch.randn(n, d, generator=g).div_(d ** 0.5).requires_grad_(), torch.zeros(d, requires_grad=True)]


def _topk_loss(x, W_enc, b_enc, W_dec, b_dec, k=6):
    codes = sparsekit.topk_encode(x, W_enc, b_enc, k)
    x_hat = sparsekit.sparse_decode(codes.values, codes.indices, W_dec, b_dec)
    return (x_hat - x).pow(2).sum(-1).mean()


def test_topk_ops_trace_without_graph_breaks(monkeypatch):
    monkeypatch.delenv("SPARSEKIT_BACKEND", raising=False)
    x = torch.randn(32, 16)
    explanation = torch._dynamo.explain(_topk_loss)(x, *_sae())
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_compiled_topk_training_step_matches_eager(monkeypatch):
    monkeypatch.delenv("SPARSEKIT_BACKEND", raising=False)
    torch._dynamo.reset()
    x = torch.randn(48, 16, generator=torch.Generator().manual_seed(1))
    eager_params, compiled_params = _sae(), _sae()
    compiled_loss = torch.compile(_topk_loss, fullgraph=True)
    for params, fn in ((eager_params, _topk_loss), (compiled_params, compiled_loss)):
        optimizer = torch.optim.Adam(params, lr=1e-2)
        for _ in range(2):
            optimizer.zero_grad()
            loss = fn(x, *params)
            loss.backward()
            optimizer.step()
        params.append(loss.detach())
    for eager, compiled in zip(eager_params, compiled_params):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def _dictionaries():
    return {"topk": sparsekit.TopKSAE(16, 64, 4), "batchtopk": sparsekit.BatchTopKSAE(16, 64, 4),
            "relu": sparsekit.ReLUSAE(16, 64, 0.1), "jumprelu": sparsekit.JumpReLUSAE(16, 64, 1e-3, bandwidth=0.05)}


def test_every_dictionary_forward_traces_without_graph_breaks(monkeypatch):
    monkeypatch.delenv("SPARSEKIT_BACKEND", raising=False)
    x = torch.randn(32, 16)
    for name, sae in _dictionaries().items():
        explanation = torch._dynamo.explain(lambda x: sum(sae(x).losses.values()))(x)
        assert explanation.graph_break_count == 0, (name, explanation.break_reasons)


def test_compiled_relu_l1_dictionary_step_matches_eager(monkeypatch):
    monkeypatch.delenv("SPARSEKIT_BACKEND", raising=False)
    torch._dynamo.reset()
    x = torch.randn(48, 16, generator=torch.Generator().manual_seed(2))
    results = []
    for compiled in (False, True):
        sae = sparsekit.ReLUSAE(16, 64, 0.1, seed=0)
        optimizer = torch.optim.Adam(sae.parameters(), lr=1e-2)

        def loss_fn(x):
            return sum(sae(x).losses.values())

        fn = torch.compile(loss_fn, fullgraph=True) if compiled else loss_fn
        for _ in range(2):
            optimizer.zero_grad()
            fn(x).backward()
            sae.remove_parallel_decoder_grad()
            optimizer.step()
            sae.normalize_decoder()
        results.append([p.detach().clone() for p in sae.parameters()])
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
