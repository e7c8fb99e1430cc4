"""ops.topk_encode_with_latents (the dead-latent remedies' shared encoder pass), ops.topk_positions
and ops.ghost_grad_loss_from_pre against the plain-torch reference: values, selections and every
gradient, on the reference and the C++ path, with the float32 tiles in one block and in many
column blocks (both GEMM libraries), and with the bf16 screen forced on (the latents' columns are
then recomputed in float32); float64 gradcheck; bad input."""
import pytest
import torch

from sparsekit import ops
from sparsekit.ops import reference
from sparsekit.ops.cpu import encode

B, D_IN, N, K = 40, 16, 300, 4


def grid(shape, gen, dtype, levels: int, step: float) -> torch.Tensor:
    """Values in {-levels, ..., levels} * step (step a power of two)."""
    return torch.randint(-levels, levels + 1, shape, generator=gen).to(dtype) * step


def draw(dtype=torch.float32, n_dead=60, seed=None):
    """float32: inputs on grids of powers of two: every pre-activation and partial sum (of
    (x - pre_bias) @ W_enc + b_enc, or x @ W_enc with the folded bias) is a multiple of 2^-7 below
    2^4, exact in float32 whatever the summation order, so each path's selection is the reference's
    exactly, exact ties included (ties go to the lower index on every path). Gaussian inputs left
    near-ties (1e-7 apart) to each GEMM's rounding: 3 draws in 2,000 then differed in order.
    float64 (gradcheck): Gaussian, so that no selection sits on a tie."""
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    if dtype == torch.float64:
        x = torch.randn(B, D_IN, generator=gen, dtype=dtype)
        W_enc = torch.randn(D_IN, N, generator=gen, dtype=dtype) / D_IN ** 0.5
        b_enc = torch.randn(N, generator=gen, dtype=dtype) * 0.1
        pre_bias = torch.randn(D_IN, generator=gen, dtype=dtype) * 0.3
    else:
        x = grid((B, D_IN), gen, dtype, 8, 1 / 8)
        W_enc = grid((D_IN, N), gen, dtype, 4, 1 / 16)
        b_enc = grid((N,), gen, dtype, 8, 1 / 64)
        pre_bias = grid((D_IN,), gen, dtype, 4, 1 / 8)
    latents = torch.randperm(N, generator=gen)[:n_dead]
    return x, W_enc, b_enc, pre_bias, latents, gen


def outputs(codes, latent_pass):
    """The differentiable outputs as one list, and the selections."""
    tensors = [codes.values]
    tensors.append(latent_pass.pre if latent_pass.pre is not None else latent_pass.codes.values)
    selections = [codes.indices] + ([latent_pass.codes.indices] if latent_pass.codes is not None else [])
    return tensors, selections


@pytest.fixture(params=["one block", "column blocks, numpy", "whole rows, torch"])
def tiles(request, monkeypatch):
    if request.param == "column blocks, numpy":  # 8 columns per block: L's columns spread over many blocks
        monkeypatch.setenv("SPARSEKIT_CPU_GEMM", "numpy")
        monkeypatch.setattr(encode, "L2_TILE_BYTES", 8 * 4 * B)
    elif request.param == "whole rows, torch":
        monkeypatch.setenv("SPARSEKIT_CPU_GEMM", "torch")
        monkeypatch.setattr(encode, "TILE_BYTES", 7 * N * 4)  # 7-row tiles
    return request.param


@pytest.mark.parametrize("backend,screen", [("torch", "off"), ("cpp", "off"), ("cpp", "on")])
@pytest.mark.parametrize("k_latents", [0, 1, 7, 60])
def test_codes_latent_pass_and_gradients_match_the_reference(backend, screen, k_latents, tiles, monkeypatch):
    monkeypatch.setenv("SPARSEKIT_BACKEND", backend)
    monkeypatch.setenv("SPARSEKIT_BF16_SCREEN", screen)
    x, W_enc, b_enc, pre_bias, latents, gen = draw()
    leaves = [t.clone().requires_grad_() for t in (x, W_enc, b_enc, pre_bias)]
    got, got_sel = outputs(*ops.topk_encode_with_latents(*leaves[:3], K, latents, k_latents, pre_bias=leaves[3]))
    ref_leaves = [t.clone().requires_grad_() for t in (x, W_enc, b_enc, pre_bias)]
    xr, Wr, br, pr = ref_leaves
    values, indices, pre, latent_values, latent_indices = reference.topk_encode_with_latents(
        xr - pr, Wr, br, K, latents, k_latents)
    want = [values, pre if k_latents == 0 else latent_values]
    want_sel = [indices] + ([latent_indices] if k_latents else [])
    for g, w in zip(got_sel, want_sel):
        assert torch.equal(g, w)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    weights = [torch.randn(t.shape, generator=gen) for t in want]
    got_grads = torch.autograd.grad(sum((g * w).sum() for g, w in zip(got, weights)), leaves)
    want_grads = torch.autograd.grad(sum((g * w).sum() for g, w in zip(want, weights)), ref_leaves)
    for name, g, w in zip(("x", "W_enc", "b_enc", "pre_bias"), got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_latent_pre_activations_come_in_the_callers_order_of_latents(backend, monkeypatch):
    monkeypatch.setenv("SPARSEKIT_BACKEND", backend)
    x, W_enc, b_enc, pre_bias, latents, _ = draw()
    assert not torch.equal(latents, latents.sort().values)
    _, latent_pass = ops.topk_encode_with_latents(x, W_enc, b_enc, K, latents, 0, pre_bias=pre_bias)
    torch.testing.assert_close(latent_pass.pre, ((x - pre_bias) @ W_enc + b_enc)[:, latents], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_main_codes_equal_topk_encode(backend, monkeypatch):
    monkeypatch.setenv("SPARSEKIT_BACKEND", backend)
    x, W_enc, b_enc, pre_bias, latents, _ = draw()
    codes, _ = ops.topk_encode_with_latents(x, W_enc, b_enc, K, latents, 5, pre_bias=pre_bias)
    plain = ops.topk_encode(x, W_enc, b_enc, K, pre_bias=pre_bias)
    assert torch.equal(codes.indices, plain.indices) and torch.equal(codes.values, plain.values)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("k_latents", [0, 3])
def test_gradcheck_float64(backend, k_latents, monkeypatch):
    monkeypatch.setenv("SPARSEKIT_BACKEND", backend)
    x, W_enc, b_enc, pre_bias, latents, _ = draw(torch.float64, n_dead=9)
    x, W_enc, b_enc, pre_bias = x[:6, :5], W_enc[:5, :30].contiguous(), b_enc[:30], pre_bias[:5]
    latents = torch.randperm(30)[:6]

    def f(*inputs):
        codes, latent_pass = ops.topk_encode_with_latents(*inputs[:3], 3, latents, k_latents, pre_bias=inputs[3])
        return tuple(outputs(codes, latent_pass)[0])

    inputs = [t.clone().requires_grad_() for t in (x, W_enc, b_enc, pre_bias)]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_topk_positions_are_the_stable_descending_order(backend, monkeypatch):
    monkeypatch.setenv("SPARSEKIT_BACKEND", backend)
    pre = torch.randn(30, 50).round(decimals=1)  # ties: the lower column first
    assert torch.equal(ops.topk_positions(pre, 9), reference.topk_positions(pre, 9))


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_ghost_loss_from_pre_equals_ghost_grad_loss_value_and_gradients(backend, monkeypatch):
    monkeypatch.setenv("SPARSEKIT_BACKEND", backend)
    x, W_enc, b_enc, pre_bias, latents, gen = draw(torch.float64)
    W_dec = torch.randn(N, D_IN, generator=gen, dtype=torch.float64)
    residual = torch.randn(B, D_IN, generator=gen, dtype=torch.float64)
    mse = torch.tensor(0.7, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, W_enc, b_enc, pre_bias)]
    _, latent_pass = ops.topk_encode_with_latents(*leaves[:3], K, latents, 0, pre_bias=leaves[3])
    got = ops.ghost_grad_loss_from_pre(latent_pass.pre, W_dec, latents, residual, mse)
    got_grads = torch.autograd.grad(got, leaves)
    ref_leaves = [t.clone().requires_grad_() for t in (x, W_enc, b_enc, pre_bias)]
    xr, Wr, br, pr = ref_leaves
    want = reference.ghost_grad_loss(xr - pr, Wr, br, W_dec, latents, residual, mse)
    want_grads = torch.autograd.grad(want, ref_leaves)
    torch.testing.assert_close(got, want)
    for name, g, w in zip(("x", "W_enc", "b_enc", "pre_bias"), got_grads, want_grads):
        torch.testing.assert_close(g, w, msg=name)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_ghost_loss_from_pre_gradient_is_that_of_the_loss_with_its_detached_factors_frozen(backend, monkeypatch):
    monkeypatch.setenv("SPARSEKIT_BACKEND", backend)
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    pre = torch.randn(6, 4, generator=gen, dtype=torch.float64) * 0.5
    W_dec = torch.randn(9, 3, generator=gen, dtype=torch.float64)
    dead = torch.tensor([1, 4, 6, 8])
    r = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    mse, eps = torch.tensor(0.3, dtype=torch.float64), 1e-8
    ghost0 = torch.exp(pre) @ W_dec[dead]
    scale = r.norm(dim=-1, keepdim=True) / (2 * ghost0.norm(dim=-1, keepdim=True) + eps)
    factor = mse / (reference.squared_error(ghost0 * scale, r) + eps)

    def frozen(p):
        return reference.squared_error((torch.exp(p) @ W_dec[dead]) * scale, r) * factor

    p = pre.clone().requires_grad_()
    expected = torch.autograd.grad(frozen(p), p)[0]
    got = torch.autograd.grad(ops.ghost_grad_loss_from_pre(p, W_dec, dead, r, mse, eps), p)[0]
    torch.testing.assert_close(got, expected)
    assert torch.autograd.gradcheck(frozen, [p], eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("change,message", [
    (dict(latents=torch.tensor([3, 3])), "latents must not repeat"),
    (dict(latents=torch.tensor([], dtype=torch.int64)), "latents must name at least one"),
    (dict(latents=torch.tensor([N])), "latents"),
    (dict(latents=torch.tensor([1.0])), "latents"),
    (dict(k_latents=3), "k_latents must be an int in \\[0, 2\\]"),
    (dict(k_latents=-1), "k_latents"),
])
def test_bad_latents_are_refused_naming_the_argument(change, message):
    x, W_enc, b_enc, pre_bias, _, _ = draw()
    args = dict(latents=torch.tensor([1, 5]), k_latents=0) | change
    with pytest.raises(ValueError, match=message):
        ops.topk_encode_with_latents(x, W_enc, b_enc, K, pre_bias=pre_bias, **args)


def test_ghost_loss_from_pre_refuses_a_pre_dead_of_the_wrong_width():
    with pytest.raises(ValueError, match="pre_dead"):
        ops.ghost_grad_loss_from_pre(torch.randn(4, 3), torch.randn(9, 2), torch.tensor([1, 2]), torch.randn(4, 2),
                                     torch.tensor(0.5))
