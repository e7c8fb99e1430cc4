"""dead_latents.auxk_loss against the formula written out densely: the k_aux largest dead
pre-activations (ReLU'd) reconstruct the detached residual; loss = MSE / the residual's variance.
Both of its branches (dense backward when most dead latents are kept, sparse otherwise), value and
every parameter's gradient, on each CPU backend (and with the bf16-screened encoder forced on)."""
import pytest
import torch

import sparsekit
from sparsekit.training.dead_latents import auxk_loss


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
