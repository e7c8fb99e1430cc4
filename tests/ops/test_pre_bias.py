"""The encoders' optional pre_bias (an SAE's b_dec subtracted before encoding): codes and
gradients equal those of the fold b_enc - pre_bias @ W_enc on every backend, and bad pre_bias
values are refused by name."""
import pytest
import torch

import sparsekit
from sparsekit import ops


def _leaves(seed: int, dtype, batch=7, d_in=5, n=11):
    gen = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=gen, dtype=dtype)  # noqa: E731
    return {"x": make(batch, d_in), "W_enc": make(d_in, n), "b_enc": make(n), "pre_bias": make(d_in)}


def _run(op, leaves, k, fold: bool):
    inputs = {name: t.clone().requires_grad_() for name, t in leaves.items()}
    if fold:
        bias = inputs["b_enc"] - inputs["pre_bias"] @ inputs["W_enc"]
        codes = getattr(ops, op)(inputs["x"], inputs["W_enc"], bias, k)
    else:
        codes = getattr(ops, op)(inputs["x"], inputs["W_enc"], inputs["b_enc"], k, pre_bias=inputs["pre_bias"])
    weights = torch.linspace(-1, 2, codes.values.numel(), dtype=codes.values.dtype).reshape(codes.values.shape)
    (codes.values * weights).sum().backward()
    return codes, {name: t.grad for name, t in inputs.items()}


# float64 is not a Triton dtype: Triton runs float32 only
@pytest.mark.parametrize("backend_name, dtype", [("torch", torch.float32), ("torch", torch.float64),
                                                 ("cpp", torch.float32), ("cpp", torch.float64),
                                                 ("triton", torch.float32)])
@pytest.mark.parametrize("op", ["topk_encode", "batchtopk_encode"])
def test_pre_bias_matches_the_folded_bias_in_codes_and_every_gradient(op, backend_name, dtype, monkeypatch):
    leaves = _leaves(3, dtype)
    if backend_name == "triton":
        pytest.importorskip("triton")
        from helpers.triton_device import on_device

        leaves = dict(zip(leaves, on_device(*leaves.values())))  # CUDA where there is one, else the interpreter
    monkeypatch.setenv("SPARSEKIT_BACKEND", backend_name)
    codes, grads = _run(op, leaves, 3, fold=False)
    monkeypatch.setenv("SPARSEKIT_BACKEND", "torch")
    expected_codes, expected_grads = _run(op, leaves, 3, fold=True)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    for got, want in zip(codes, expected_codes):
        if got.dtype == torch.int64:
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, **tol)
    for name in leaves:
        torch.testing.assert_close(grads[name], expected_grads[name], **tol, msg=f"gradient of {name}")


@pytest.mark.parametrize("op", ["topk_encode", "batchtopk_encode"])
def test_pre_bias_gradcheck_on_the_cpp_backend(op, monkeypatch):
    monkeypatch.setenv("SPARSEKIT_BACKEND", "cpp")
    leaves = _leaves(5, torch.float64)
    inputs = [leaves[n].clone().requires_grad_() for n in ("x", "W_enc", "b_enc", "pre_bias")]
    f = lambda x, W, b, p: getattr(ops, op)(x, W, b, 3, pre_bias=p).values  # noqa: E731
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("op", ["topk_encode", "batchtopk_encode"])
@pytest.mark.parametrize("bad, message", [
    (lambda p: p[:-1], "pre_bias has size 4 on axis 0, expected 5"),
    (lambda p: p[None], "pre_bias must be 1-D"),
    (lambda p: p.double(), "pre_bias has dtype torch.float64"),
    (lambda p: p.numpy(), "pre_bias must be a torch.Tensor"),
    (lambda p: torch.full_like(p, float("nan")), "pre_bias contains NaN or Inf"),
])
def test_bad_pre_bias_is_refused_by_name(op, bad, message):
    leaves = _leaves(1, torch.float32)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        getattr(ops, op)(leaves["x"], leaves["W_enc"], leaves["b_enc"], 2, pre_bias=bad(leaves["pre_bias"]))


def test_topk_sae_training_step_gradients_match_the_reference_backend(monkeypatch):
    # The SAE passes b_dec as pre_bias: its gradient (and W_enc's) must be what the folded
    # reference path gives.
    grads = {}
    for backend_name in ("torch", "cpp"):
        monkeypatch.setenv("SPARSEKIT_BACKEND", backend_name)
        sae = sparsekit.TopKSAE(6, 20, 3, seed=0, dtype=torch.float64)
        with torch.no_grad():
            sae.b_dec.normal_(generator=torch.Generator().manual_seed(2))
        x = torch.randn(9, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        sae(x).losses["mse"].backward()
        grads[backend_name] = {name: p.grad.clone() for name, p in sae.named_parameters()}
    for name, want in grads["torch"].items():
        torch.testing.assert_close(grads["cpp"][name], want, rtol=1e-10, atol=1e-10, msg=f"gradient of {name}")


def _edges_into(grad_fn, leaf) -> int:
    """How many edges of the autograd graph below grad_fn lead into leaf's gradient accumulator."""
    count, seen, stack = 0, set(), [grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        for child, _ in fn.next_functions:
            if child is not None and getattr(child, "variable", None) is leaf:
                count += 1
            stack.append(child)
    return count


@pytest.mark.parametrize("op", ["topk_encode", "batchtopk_encode"])
def test_triton_pre_bias_gradient_needs_neither_grad_x_nor_a_dense_weight_gradient(op, monkeypatch):
    # An SAE's b_dec: x is data, so the sparse backward must not be asked for grad x (a transposed
    # copy of W_enc and a gather), and W_enc's gradient must be the sparse pass's alone: one edge into
    # its accumulator (the fold b - p @ W adds a second, a dense -p ⊗ dL/db; the torch backend, which
    # folds, shows it).
    pytest.importorskip("triton")
    from helpers.triton_device import on_device, spy_on_grad_x_requests

    asked = spy_on_grad_x_requests(monkeypatch)
    leaves = _leaves(4, torch.float32)
    leaves = dict(zip(leaves, on_device(*leaves.values())))  # CUDA where there is one, else the interpreter
    for backend_name, edges in (("triton", 1), ("torch", 2)):
        monkeypatch.setenv("SPARSEKIT_BACKEND", backend_name)
        inputs = {name: t.clone().requires_grad_(name != "x") for name, t in leaves.items()}
        codes = getattr(ops, op)(inputs["x"], inputs["W_enc"], inputs["b_enc"], 3, pre_bias=inputs["pre_bias"])
        assert _edges_into(codes.values.grad_fn, inputs["W_enc"]) == edges, backend_name
        codes.values.sum().backward()
    assert asked == [False]
