"""The C++ backward kernels are deterministic: bitwise the same across runs and thread counts."""
import torch

import sparsekit
from sparsekit.ops.backend import _C


def _topk_step_grads(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B, d, n, k = 256, 32, 512, 16
    x = torch.randn(B, d, generator=g)
    params = [torch.randn(d, n, generator=g).requires_grad_(), torch.randn(n, generator=g).requires_grad_(),
              torch.randn(n, d, generator=g).requires_grad_(), torch.randn(d, generator=g).requires_grad_()]
    W_enc, b_enc, W_dec, b_dec = params
    codes = sparsekit.topk_encode(x, W_enc, b_enc, k)
    batch_codes = sparsekit.batchtopk_encode(x, W_enc, b_enc, k)
    y = sparsekit.sparse_decode(codes.values, codes.indices, W_dec, b_dec)
    y2 = sparsekit.sparse_decode_coo(*batch_codes, W_dec, b_dec, B)
    ((y - x).pow(2).sum() + (y2 - x).pow(2).sum()).backward()
    return [p.grad.clone() for p in params]


def test_gradients_are_bitwise_identical_across_thread_counts(monkeypatch):
    monkeypatch.delenv("SPARSEKIT_BACKEND", raising=False)
    before = _C.get_num_threads()
    try:
        _C.set_num_threads(1)
        single = _topk_step_grads()
        _C.set_num_threads(2)
        double = _topk_step_grads()
        again = _topk_step_grads()
    finally:
        _C.set_num_threads(before)
    for a, b, c in zip(single, double, again):
        assert torch.equal(a, b) and torch.equal(b, c)
