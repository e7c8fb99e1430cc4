"""dead_latents.auxk_loss against the formula written out densely: the k_aux largest dead
pre-activations (ReLU'd) reconstruct the detached residual; loss = MSE / the residual's variance.
Both of its branches (dense backward when most dead latents are kept, sparse otherwise), value and
every parameter's gradient, on each CPU backend (and with the bf16-screened encoder forced on);
the same for AuxK and ghost grads fed by the encoder's own pass (the trainer's shared pass)."""
import pytest
import torch

import sparsekit
from sparsekit.training.dead_latents import auxk_loss, ghost_loss, shared_pass_k


def dense_auxk(sae, x, residual, dead, k_aux):
    pre = (x - sae.b_dec) @ sae.W_enc[:, dead] + sae.b_enc[dead]
    k = min(k_aux, dead.numel())
    kept = torch.zeros_like(pre, dtype=torch.bool).scatter_(1, pre.detach().topk(k, dim=1).indices, True)
    reconstruction = (torch.relu(pre) * kept) @ sae.W_dec[dead]
    mse = (reconstruction - residual).pow(2).sum(-1).mean()
    return mse / (residual - residual.mean(0)).pow(2).sum(-1).mean()


@pytest.mark.parametrize("backend,screen", [("torch", "off"), ("cpp", "off"), ("cpp", "on")])
@pytest.mark.parametrize("n_dead,k_aux", [(40, 16), (40, 64), (60, 4)])  # dense, all kept, sparse branch
def test_auxk_loss_and_gradients_match_the_dense_formula(backend, screen, n_dead, k_aux, monkeypatch):
    monkeypatch.setenv("SPARSEKIT_BACKEND", backend)
    monkeypatch.setenv("SPARSEKIT_BF16_SCREEN", screen)
    gen = torch.Generator().manual_seed(n_dead + k_aux)
    sae = sparsekit.TopKSAE(24, 96, 4).double()
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(24, generator=gen, dtype=torch.float64))
        sae.b_enc.copy_(torch.randn(96, generator=gen, dtype=torch.float64) * 0.1)
    x = torch.randn(30, 24, generator=gen, dtype=torch.float64) + sae.b_dec.detach()
    residual = torch.randn(30, 24, generator=gen, dtype=torch.float64)
    dead = torch.randperm(96, generator=gen)[:n_dead]
    got = auxk_loss(sae, x, residual, dead, k_aux)
    got_grads = torch.autograd.grad(got, list(sae.parameters()), allow_unused=True)
    want = dense_auxk(sae, x, residual, dead, k_aux)
    want_grads = torch.autograd.grad(want, list(sae.parameters()), allow_unused=True)
    torch.testing.assert_close(got, want)
    for (name, _), g, w in zip(sae.named_parameters(), got_grads, want_grads):
        if w is None:
            assert g is None or not g.any(), name
        else:
            torch.testing.assert_close(g, w, msg=name)


def planted(n_dead, seed_extra=0):
    gen = torch.Generator().manual_seed(torch.seed() % 2**31 + seed_extra)
    sae = sparsekit.TopKSAE(24, 96, 4)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(24, generator=gen))
        sae.b_enc.copy_(torch.randn(96, generator=gen) * 0.1)
    x = torch.randn(30, 24, generator=gen) + sae.b_dec.detach()
    residual = torch.randn(30, 24, generator=gen)
    dead = torch.randperm(96, generator=gen)[:n_dead].sort().values
    return sae, x, residual, dead


def assert_same_loss_and_gradients(sae, got, want):
    params = list(sae.parameters())
    got_grads = torch.autograd.grad(got, params, allow_unused=True)
    want_grads = torch.autograd.grad(want, params, allow_unused=True)
    torch.testing.assert_close(got, want)
    for (name, _), g, w in zip(sae.named_parameters(), got_grads, want_grads):
        if w is None:
            assert g is None or not g.any(), name
        else:
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("backend,screen", [("torch", "off"), ("cpp", "off"), ("cpp", "on")])
@pytest.mark.parametrize("n_dead,k_aux,mode", [(40, 16, 0), (40, 64, 0), (60, 4, 4)])  # dense, all kept, sparse
def test_auxk_from_the_encoders_own_pass_matches_the_dense_formula(backend, screen, n_dead, k_aux, mode, monkeypatch):
    # The trainer's shared pass: main loss + AuxK from one encoder pass, against the main loss
    # from sae(x) plus the dense formula; the screen forced on takes the float32 recompute of the
    # dead columns.
    monkeypatch.setenv("SPARSEKIT_BACKEND", backend)
    monkeypatch.setenv("SPARSEKIT_BF16_SCREEN", screen)
    sae, x, residual, dead = planted(n_dead)
    k_shared = shared_pass_k(sae, ("auxk",), dead, k_aux)
    assert k_shared == mode
    out, shared = sae.forward_with_latents(x, None, dead, k_shared)
    got = out.losses["mse"] + auxk_loss(sae, x, residual, dead, k_aux, shared=shared)
    want = sae(x).losses["mse"] + dense_auxk(sae, x, residual, dead, k_aux)
    assert_same_loss_and_gradients(sae, got, want)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_ghost_from_the_encoders_own_pass_matches_ghost_grad_loss(backend, monkeypatch):
    monkeypatch.setenv("SPARSEKIT_BACKEND", backend)
    sae, x, residual, dead = planted(30)
    out, shared = sae.forward_with_latents(x, None, dead, shared_pass_k(sae, ("ghost",), dead, 12))
    assert shared.pre is not None
    got = out.losses["mse"] + ghost_loss(sae, x, residual, dead, out.losses["mse"], shared=shared)
    plain = sae(x)
    want = plain.losses["mse"] + ghost_loss(sae, x, residual, dead, plain.losses["mse"])
    assert_same_loss_and_gradients(sae, got, want)


def test_shared_pass_is_asked_only_by_a_remedy_that_reads_dead_latents_of_a_topk_dictionary():
    sae, _, _, dead = planted(40)
    assert shared_pass_k(sae, ("resample",), dead, 16) is None
    assert shared_pass_k(sae, ("auxk",), dead[:0], 16) is None
    assert shared_pass_k(sparsekit.BatchTopKSAE(24, 96, 4), ("auxk",), dead, 16) is None
    assert shared_pass_k(sae, ("auxk",), dead, 4) == 4  # sparse: k_aux keeps 1/10 of the dead latents
    assert shared_pass_k(sae, ("auxk", "ghost"), dead, 4) == 0  # ghost grads need every one
