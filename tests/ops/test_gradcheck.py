"""torch.autograd.gradcheck in float64 for every op, on the reference and the C++ path."""
import pytest
import torch
from helpers.op_cases import frozen_ghost_loss, make_case

import sparsekit

SMOOTH_OPS = ["topk_encode", "batchtopk_encode", "relu_encode", "jumprelu_encode", "sparse_decode",
              "sparse_decode_coo"]


@pytest.mark.parametrize("backend_name", ["torch", "cpp"])
@pytest.mark.parametrize("op", SMOOTH_OPS)
def test_gradcheck_float64(op, backend_name, monkeypatch):
    monkeypatch.setenv("SPARSEKIT_BACKEND", backend_name)
    case = make_case(op, seed=7, dtype=torch.float64, batch=5, d_in=4, n=9, k=3)
    # JumpReLU's threshold gradient is a pseudo-derivative by design: checked in test_op_semantics.
    names = [n for n in case.leaves if n != "log_threshold"]
    leaves = {n: t.clone() for n, t in case.leaves.items()}

    def f(*inputs):
        leaves.update(zip(names, inputs))
        out = getattr(sparsekit.ops, op)(**case.arguments(leaves))
        return out[0] if isinstance(out, tuple) else out

    inputs = [case.leaves[n].clone().requires_grad_() for n in names]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend_name", ["torch", "cpp"])
def test_ghost_grad_loss_gradient_is_that_of_the_loss_with_its_detached_factors_frozen(backend_name, monkeypatch):
    # The loss value is mse_main by construction, so its true derivative is ~0; the gradient it
    # must give is the one of the same expression with the detached factors held constant.
    monkeypatch.setenv("SPARSEKIT_BACKEND", backend_name)
    case = make_case("ghost_grad_loss", seed=8, dtype=torch.float64, batch=6, d_in=4, n=9, n_dead=3)
    frozen = frozen_ghost_loss(case)
    inputs = [case.leaves[n].clone().requires_grad_() for n in ("x", "W_enc", "b_enc")]
    assert torch.autograd.gradcheck(frozen, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)
    expected = torch.autograd.grad(frozen(*inputs), inputs)
    leaves = dict(zip(("x", "W_enc", "b_enc"), (t.detach().clone().requires_grad_() for t in inputs)))
    loss = sparsekit.ghost_grad_loss(**case.arguments(leaves))
    actual = torch.autograd.grad(loss, list(leaves.values()))
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-7, atol=1e-10)
