"""splice / zero_ablate / loss_recovered on small MLPs: the spliced model equals the model run with
the activation replaced by hand, and hooks never outlive the block."""
import pytest
import torch
from torch import nn

import sparsekit
from sparsekit.analysis.splice import loss_recovered, splice, zero_ablate

D_IN, HIDDEN, D_MID, CLASSES = 6, 8, 5, 3


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, D_MID), nn.Tanh(),
                         nn.Linear(D_MID, CLASSES))


class Block(nn.Module):
    """A TransformerLens-like layout: a named identity module marks the activation."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(HIDDEN, HIDDEN)
        self.hook_mid = nn.Identity()

    def forward(self, x):
        return torch.relu(self.hook_mid(self.fc(x)))


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(D_IN, HIDDEN)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.unembed = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.unembed(x)


def perturbed_topk(d, n=32, k=4, seed=0):
    sae = sparsekit.TopKSAE(d, n, k, seed=seed)
    with torch.no_grad():
        for param in sae.parameters():
            param.add_(0.1 * torch.randn_like(param))
    sae.input_scale = sae.output_scale = 1.9
    return sae.eval()


def identity_sae(d, scale=4.0):
    """A ReLU SAE that reconstructs exactly: W_enc = [I, -I], W_dec = [I; -I], so
    relu(x) - relu(-x) = x (scale a power of two, so scaling is exact too)."""
    sae = sparsekit.ReLUSAE(d, 2 * d, l1_coeff=1e-3)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
    sae.input_scale = sae.output_scale = scale
    return sae


def hook_count(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def test_splice_equals_manual_replacement_with_leading_dims():
    model, sae = mlp(), perturbed_topk(HIDDEN)
    x = torch.randn(3, 4, D_IN)  # [batch, pos, d]: leading dims are flattened and restored
    with torch.no_grad():
        h = model[:2](x)
        expected = model[2:](sae.reconstruct(h.reshape(-1, HIDDEN)).reshape(3, 4, HIDDEN))
        with splice(model, "1", sae) as spliced:
            got = spliced(x)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, model(x))  # the splice did change something


def test_exact_reconstruction_changes_nothing():
    model, x = Nested(), torch.randn(10, D_IN)
    clean = model(x)
    with splice(model, "blocks.1.hook_mid", identity_sae(HIDDEN)):
        spliced = model(x)
    torch.testing.assert_close(spliced, clean)


def test_hooks_removed_after_exit_and_after_exception():
    model, sae, x = mlp(), perturbed_topk(HIDDEN), torch.randn(5, D_IN)
    clean = model(x)
    with splice(model, "1", sae):
        assert hook_count(model) == 1
    assert hook_count(model) == 0
    with pytest.raises(KeyError):
        with splice(model, "1", sae):
            raise KeyError("raised inside the block")
    assert hook_count(model) == 0
    with pytest.raises(KeyError):
        with zero_ablate(model, "1"):
            raise KeyError("raised inside the block")
    assert hook_count(model) == 0
    torch.testing.assert_close(model(x), clean)


def test_error_inside_the_hook_removes_hooks_and_names_widths():
    model = mlp()
    with pytest.raises(ValueError, match=r"width 8.*d_in is 5"):
        with splice(model, "1", perturbed_topk(D_MID)):
            model(torch.randn(2, D_IN))
    assert hook_count(model) == 0


def test_unknown_hook_name_is_named():
    with pytest.raises(ValueError, match="blocks.7.hook_mid"):
        with splice(Nested(), "blocks.7.hook_mid", perturbed_topk(HIDDEN)):
            pass
    with pytest.raises(ValueError, match="'nope'"):
        with zero_ablate(mlp(), "nope"):
            pass


def test_splice_keeps_model_dtype_and_sae_mode():
    model = mlp().double()
    sae = sparsekit.BatchTopKSAE(HIDDEN, 32, 4)
    with torch.no_grad():
        sae.threshold.fill_(0.05)
    sae.train()
    with splice(model, "1", sae):
        out = model(torch.randn(4, D_IN, dtype=torch.float64))
        assert not sae.training  # inference threshold, not batch top-k
    assert out.dtype == torch.float64
    assert sae.training and float(sae.threshold) == pytest.approx(0.05)  # mode restored, threshold untouched


def test_transcoder_splice_predicts_output_from_captured_input():
    model = mlp()
    tc = sparsekit.Transcoder(HIDDEN, 24, D_MID, k=4)  # ReLU output (hook "1") -> Linear output (hook "2")
    with torch.no_grad():
        for param in tc.parameters():
            param.add_(0.1 * torch.randn_like(param))
    tc.input_scale, tc.output_scale = 1.5, 0.5
    tc.eval()
    x = torch.randn(2, 3, D_IN)
    with torch.no_grad():
        mid_in = model[:2](x)
        expected = model[3:](tc.reconstruct(mid_in.reshape(-1, HIDDEN)).reshape(2, 3, D_MID))
        with splice(model, "2", tc, input_hook="1"):
            got = model(x)
    torch.testing.assert_close(got, expected)
    assert hook_count(model) == 0


def test_transcoder_needs_input_hook_and_sae_refuses_one():
    model = mlp()
    tc = sparsekit.Transcoder(HIDDEN, 24, D_MID, k=4)
    with pytest.raises(ValueError, match="input_hook"):
        with splice(model, "2", tc):
            pass
    with pytest.raises(ValueError, match="input_hook='0'"):
        with splice(model, "1", perturbed_topk(HIDDEN), input_hook="0"):
            pass
    with pytest.raises(ValueError, match="input_hook='missing'"):
        with splice(model, "2", tc, input_hook="missing"):
            pass


def test_transcoder_input_must_run_first():
    model, tc = mlp(), sparsekit.Transcoder(D_MID, 24, HIDDEN, k=4).eval()
    with pytest.raises(RuntimeError, match="ran before input_hook"):
        with splice(model, "1", tc, input_hook="2"):
            model(torch.randn(2, D_IN))
    assert hook_count(model) == 0


def test_zero_ablate_replaces_activation_with_zeros():
    model, x = mlp(), torch.randn(7, D_IN)
    with torch.no_grad():
        expected = model[2:](torch.zeros(7, HIDDEN))
        with zero_ablate(model, "1"):
            got = model(x)
    torch.testing.assert_close(got, expected)


def test_loss_recovered_formula():
    assert loss_recovered(clean=2.0, spliced=2.5, zero=7.0) == pytest.approx(0.9)
    assert loss_recovered(2.0, 2.0, 7.0) == 1.0
    assert loss_recovered(2.0, 7.0, 7.0) == 0.0
    assert loss_recovered(torch.tensor(2.0), torch.tensor(3.0), torch.tensor(4.0)) == pytest.approx(0.5)
    assert loss_recovered(clean=0.9, spliced=0.8, zero=0.1) == pytest.approx(0.875)  # accuracy recovered
    with pytest.raises(ValueError, match="undefined"):
        loss_recovered(3.0, 2.0, 3.0)


def test_ce_recovered_is_one_for_an_exact_dictionary():
    model, x = mlp(), torch.randn(64, D_IN)
    labels = torch.randint(0, CLASSES, (64,))
    ce = nn.functional.cross_entropy
    with torch.no_grad():
        clean = ce(model(x), labels)
        with splice(model, "1", identity_sae(HIDDEN)):
            spliced = ce(model(x), labels)
        with zero_ablate(model, "1"):
            zero = ce(model(x), labels)
    assert loss_recovered(clean, spliced, zero) == pytest.approx(1.0, abs=1e-5)


def test_splice_works_on_a_transformer_lens_hook_point():
    hook_points = pytest.importorskip("transformer_lens.hook_points")

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(D_IN, HIDDEN)
            self.hook_hidden = hook_points.HookPoint()
            self.fc2 = nn.Linear(HIDDEN, CLASSES)

        def forward(self, x):
            return self.fc2(self.hook_hidden(torch.relu(self.fc1(x))))

    torch.manual_seed(0)
    model, x = Tiny(), torch.randn(4, 3, D_IN)  # [batch, pos, d]: leading dims are flattened
    sae = sparsekit.TopKSAE(HIDDEN, 16, k=2)
    hidden = torch.relu(model.fc1(x))
    expected = model.fc2(sae.reconstruct(hidden.reshape(-1, HIDDEN)).reshape(hidden.shape))
    with splice(model, "hook_hidden", sae):
        spliced = model(x)
    torch.testing.assert_close(spliced, expected)
    assert not model.hook_hidden._forward_hooks
    torch.testing.assert_close(model(x), model.fc2(hidden))
