"""splice / zero_ablate / loss_recovered on small MLPs and a tiny TransformerLens model: the spliced
model equals the model run with the activation replaced by hand, the error term leaves it unchanged,
an intervention moves the activation by exactly decoder rows x code change (every architecture, SAE
and transcoder), and hooks never outlive the block."""
import pytest
import torch
from helpers.dictionary_cases import ARCHITECTURES, make_dictionary
from helpers.dictionary_cases import D_IN as TC_IN
from helpers.dictionary_cases import D_OUT as TC_OUT
from helpers.lm_cases import random_contexts, tiny_transformer
from torch import nn

import sparsekit
from sparsekit.analysis.splice import check_interventions, edit_codes, loss_recovered, splice, zero_ablate

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


# --- the error term and interventions -----------------------------------------------------------------

def fresh_seed():
    return int(torch.randint(0, 2**31 - 1, ()))


def wide_mlp(seed):
    """Linear(4, 12) -> ReLU ("1", width TC_IN) -> Linear(12, 7) ("2", width TC_OUT) -> Tanh -> Linear(7, 3)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, TC_IN), nn.ReLU(), nn.Linear(TC_IN, TC_OUT), nn.Tanh(), nn.Linear(TC_OUT, 3)).double()


def seen_output(model, hook_name, splice_kwargs, x):
    """(model output, the activation at hook_name as later modules see it) inside a splice."""
    seen = []
    with splice(model, hook_name, **splice_kwargs):
        handle = model.get_submodule(hook_name).register_forward_hook(lambda m, a, out: seen.append(out))
        try:
            out = model(x)
        finally:
            handle.remove()
    return out, seen[0]


def dictionary_case(architecture, transcoder, seed):
    """(model, hook_name, splice kwargs, x [B, 4], the dictionary's input at the hook [B, d_in])."""
    model, x = wide_mlp(seed), torch.randn(9, 4, dtype=torch.float64)
    sae = make_dictionary(architecture, transcoder, dtype=torch.float64, seed=seed % 1000)
    kwargs = dict(sae=sae, input_hook="1") if transcoder else dict(sae=sae)
    with torch.no_grad():
        return model, "2" if transcoder else "1", kwargs, x, model[:2](x)


@pytest.mark.parametrize("transcoder", [False, True], ids=["sae", "transcoder"])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_error_term_without_interventions_leaves_the_model_unchanged(architecture, transcoder):
    model, hook_name, kwargs, x, _ = dictionary_case(architecture, transcoder, fresh_seed())
    with torch.no_grad():
        clean = model(x)
        spliced, _ = seen_output(model, hook_name, kwargs, x)
        kept, _ = seen_output(model, hook_name, dict(kwargs, error_term=True), x)
    assert not torch.allclose(spliced, clean)  # the dictionary alone is not exact ...
    torch.testing.assert_close(kept, clean, rtol=0, atol=0)  # ... with its error added back it is
    assert hook_count(model) == 0


def code_changes(sae, h, interventions):
    """Old and new codes [B, m] of the intervened latents, computed independently of edit_codes."""
    dense = sae.dense_codes(sae.encode(h * sae.input_scale))
    latents = list(interventions)
    old = dense[:, latents]
    new = old.clone()
    for j, spec in enumerate(interventions.values()):
        if spec == "ablate":
            new[:, j] = 0
        elif isinstance(spec, tuple):
            new[:, j] = old[:, j] * spec[1] if spec[0] == "scale" else old[:, j] + spec[1]
        else:
            new[:, j] = spec
    return latents, old, new


def random_interventions(sae, h, gen):
    """Four distinct latents, one of each rule: one that fires somewhere, one that fires nowhere when
    the codes leave such a latent (TopK: it is outside every row's top-k)."""
    fired = sae.dense_codes(sae.encode(h * sae.input_scale)).ne(0).any(0)
    order = torch.randperm(sae.n_latents, generator=gen)
    never = [int(i) for i in order if not fired[i]]
    some = [int(i) for i in order if fired[i]]
    picks = ([never[0]] if never else []) + [i for i in some if i not in never[:1]][:4]
    picks = picks[:4]
    value = float(torch.randn((), generator=gen, dtype=torch.float64)) * 3
    rules = [value, ("add", -1.7), ("scale", 2.5), "ablate"]
    return dict(zip(picks, rules))


@pytest.mark.parametrize("transcoder", [False, True], ids=["sae", "transcoder"])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_intervention_moves_the_output_by_decoder_rows_times_code_change(architecture, transcoder):
    seed = fresh_seed()
    model, hook_name, kwargs, x, h = dictionary_case(architecture, transcoder, seed)
    sae = kwargs["sae"]
    interventions = random_interventions(sae, h, torch.Generator().manual_seed(seed))
    latents, old, new = code_changes(sae, h, interventions)
    assert not torch.equal(old, new)
    with torch.no_grad():
        true_activation = model[:3](x) if transcoder else h
        _, edited = seen_output(model, hook_name, dict(kwargs, error_term=True, interventions=interventions), x)
        _, edited_alone = seen_output(model, hook_name, dict(kwargs, interventions=interventions), x)
    change = (new - old) @ sae.W_dec.detach()[latents] / sae.output_scale
    torch.testing.assert_close(edited, true_activation + change, msg=f"seed {seed}")
    torch.testing.assert_close(edited_alone, sae.reconstruct(h) + change, msg=f"seed {seed}")


def test_clamping_a_topk_latent_outside_the_top_k_sets_it_at_every_position():
    seed = fresh_seed()
    model, hook_name, kwargs, x, h = dictionary_case("topk", False, seed)
    sae = kwargs["sae"]
    codes = sae.encode(h * sae.input_scale)
    outside = [i for i in range(sae.n_latents) if not (codes.indices == i).any()]
    latent, value = outside[seed % len(outside)], 0.5 + float(torch.rand(()))
    with torch.no_grad():
        _, edited = seen_output(model, hook_name, dict(kwargs, error_term=True, interventions={latent: value}), x)
    torch.testing.assert_close(edited - h, (value * sae.W_dec[latent] / sae.output_scale).expand_as(h).detach())


def test_skip_transcoder_interventions_move_only_the_decoded_part():
    seed = fresh_seed()
    model, x = wide_mlp(seed), torch.randn(6, 4, dtype=torch.float64)
    tc = sparsekit.Transcoder(TC_IN, 40, TC_OUT, k=5, skip=True, dtype=torch.float64, seed=seed % 1000)
    with torch.no_grad():
        for param in tc.parameters():
            param.add_(0.2 * torch.randn_like(param))
    tc.input_scale, tc.output_scale = 1.5, 0.75
    with torch.no_grad():
        h, y = model[:2](x), model[:3](x)
        interventions = {int(i): ("add", 2.0) for i in torch.randperm(40)[:3]}
        latents, old, new = code_changes(tc, h, interventions)
        _, edited = seen_output(model, "2", dict(sae=tc, input_hook="1", interventions=interventions), x)
        _, kept = seen_output(model, "2", dict(sae=tc, input_hook="1", error_term=True, interventions=interventions), x)
    change = (new - old) @ tc.W_dec[latents] / tc.output_scale
    torch.testing.assert_close(edited, tc.reconstruct(h) + change)
    torch.testing.assert_close(kept, y + change)


def test_error_term_passes_gradients_to_earlier_layers_as_the_clean_model_does():
    seed = fresh_seed()
    model, hook_name, kwargs, x, h = dictionary_case("topk", False, seed)
    first = model[0].weight
    clean_grad, = torch.autograd.grad(model(x).square().sum(), first)
    with splice(model, hook_name, error_term=True, interventions={3: 1.5}, **kwargs):
        steered_grad, = torch.autograd.grad(model(x).square().sum(), first)
    # the edit is a constant shift: the gradient still flows, from the shifted operating point
    assert steered_grad.abs().sum() > 0 and not torch.equal(steered_grad, clean_grad)
    with splice(model, hook_name, error_term=True, **kwargs):
        kept_grad, = torch.autograd.grad(model(x).square().sum(), first)
    torch.testing.assert_close(kept_grad, clean_grad, rtol=0, atol=0)


@pytest.mark.parametrize("make_codes", ["batchtopk_training", "relu_sparse"])
def test_edit_codes_on_coo_codes_keeps_row_major_order_and_decodes_the_change(make_codes):
    seed = fresh_seed()
    if make_codes == "batchtopk_training":
        sae = make_dictionary("batchtopk", dtype=torch.float64, seed=seed % 1000).train()
        x = torch.randn(7, TC_IN, dtype=torch.float64)
        codes = sae.encode(x)
        assert isinstance(codes, sparsekit.BatchTopKCodes)
    else:
        sae = sparsekit.ReLUSAE(TC_IN, 48, l1_coeff=1e-3, dtype=torch.float64, seed=seed % 1000)
        x = torch.randn(7, TC_IN, dtype=torch.float64)
        dense = sae.encode(x)
        rows, cols = dense.nonzero(as_tuple=True)
        codes = sparsekit.SparseCodes(dense[rows, cols], rows, cols, 7)
    dense = sae.dense_codes(codes)
    fired = int(dense.ne(0).any(0).nonzero()[0])
    interventions = {fired: ("scale", -3.0), (fired + 1) % 48: 1.25, (fired + 2) % 48: ("add", 0.5)}
    edited, old, new = edit_codes(sae, codes, interventions)
    latents = list(interventions)
    assert isinstance(edited, sparsekit.SparseCodes) and edited.batch_size == 7
    assert bool((edited.rows[1:] >= edited.rows[:-1]).all())
    torch.testing.assert_close(old, dense[:, latents])
    expected = dense.clone()
    expected[:, latents] = new
    torch.testing.assert_close(sae.dense_codes(edited), expected)
    torch.testing.assert_close(sae.decode(edited) - sae.decode(codes), (new - old) @ sae.W_dec.detach()[latents])


def test_edit_codes_on_topk_codes_stays_topk_with_sorted_values():
    sae = make_dictionary("topk", dtype=torch.float64, seed=fresh_seed() % 1000)
    codes = sae.encode(torch.randn(5, TC_IN, dtype=torch.float64))
    edited, old, new = edit_codes(sae, codes, {0: 9.0, int(codes.indices[0, 0]): "ablate"})
    assert isinstance(edited, sparsekit.TopKCodes) and edited.values.shape == (5, sae.k + 2)
    assert bool((edited.values[:, 1:] <= edited.values[:, :-1]).all())
    assert (edited.indices[:, 0] == 0).all()  # the clamped 9.0 is every row's largest code
    expected = sae.dense_codes(codes)
    expected[:, [0, int(codes.indices[0, 0])]] = new
    torch.testing.assert_close(sae.dense_codes(edited), expected)


def test_no_interventions_edit_nothing():
    sae = make_dictionary("relu", dtype=torch.float64)
    codes = sae.encode(torch.randn(3, TC_IN, dtype=torch.float64))
    for nothing in (None, {}):
        edited, old, new = edit_codes(sae, codes, nothing)
        assert edited is codes and old.shape == new.shape == (3, 0)


@pytest.mark.parametrize("interventions, message", [
    ({-1: 1.0}, r"interventions key -1.*out of range.*n_latents=48"),
    ({48: 1.0}, r"interventions key 48.*=48 is out of range"),
    ({2.0: 1.0}, r"interventions key 2.0 must be an int latent index"),
    ({True: 1.0}, r"interventions key True must be an int"),
    ({"3": 1.0}, r"interventions key '3' must be an int"),
    ({3: 1.0, torch.tensor(3): 2.0}, r"interventions names latent 3 twice"),
    ({3: float("nan")}, r"interventions\[3\] must be a finite number, got nan"),
    ({3: float("-inf")}, r"interventions\[3\] must be a finite number"),
    ({3: "zero"}, r"interventions\[3\] must be a finite number \(clamp\), 'ablate'.*got 'zero'"),
    ({3: ("scale",)}, r"interventions\[3\] must be .*got \('scale',\)"),
    ({3: ("multiply", 2.0)}, r"interventions\[3\] must be .*got \('multiply', 2.0\)"),
    ({3: ("scale", float("inf"))}, r"interventions\[3\]\[1\] \(scale\) must be a finite number, got inf"),
    ({3: ("add", "1")}, r"interventions\[3\]\[1\] \(add\) must be a finite number, got '1'"),
    ({3: None}, r"interventions\[3\] must be"),
    ({3: True}, r"interventions\[3\] must be"),
    ([(3, 1.0)], r"interventions must be a dict"),
])
def test_bad_interventions_are_refused_naming_the_argument(interventions, message):
    with pytest.raises(ValueError, match=message):
        check_interventions(interventions, 48)
    model, sae = wide_mlp(0), make_dictionary("topk", dtype=torch.float64)
    with pytest.raises(ValueError, match=message):
        with splice(model, "1", sae, interventions=interventions):
            pass
    assert hook_count(model) == 0


def test_interventions_accept_numpy_and_tensor_latents_and_numpy_values():
    np = pytest.importorskip("numpy")
    edits = check_interventions({np.int64(4): np.float32(2.5), torch.tensor(7): ("scale", np.float64(0.5))}, 48)
    assert [(e.latent, e.rule, e.value) for e in edits] == [(4, "clamp", 2.5), (7, "scale", 0.5)]


def test_error_term_must_be_a_bool():
    with pytest.raises(ValueError, match="error_term must be True or False, got 'yes'"):
        with splice(mlp(), "1", perturbed_topk(HIDDEN), error_term="yes"):
            pass


def perturbed(sae, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in sae.parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=gen))
    sae.input_scale, sae.output_scale = 1.25, 0.8
    return sae.eval()


def test_error_term_and_interventions_on_a_transformer_lens_model():
    pytest.importorskip("transformer_lens")
    seed = fresh_seed()
    model, tokens = tiny_transformer(n_layers=2, seed=seed % 1000), random_contexts(3, 8, seed=seed)
    sae = perturbed(sparsekit.TopKSAE(16, 48, k=4, seed=seed % 1000), seed)
    tc = perturbed(sparsekit.Transcoder(16, 48, 16, architecture="jumprelu", l0_coeff=1e-3, seed=seed % 1000), seed)
    cases = [("blocks.0.hook_resid_post", dict(sae=sae)),
             ("blocks.1.hook_mlp_out", dict(sae=tc, input_hook="blocks.1.ln2.hook_normalized"))]
    with torch.no_grad():
        clean, cache = model.run_with_cache(tokens)
        for hook_name, kwargs in cases:
            with splice(model, hook_name, error_term=True, **kwargs):
                torch.testing.assert_close(model(tokens), clean, msg=f"{hook_name}, seed {seed}")
            interventions = {5: 3.0, 11: ("add", -2.0)}
            dictionary_input = cache[kwargs.get("input_hook", hook_name)].reshape(-1, 16)
            latents, old, new = code_changes(kwargs["sae"], dictionary_input, interventions)
            change = ((new - old) @ kwargs["sae"].W_dec[latents] / kwargs["sae"].output_scale).reshape(3, 8, 16)
            expected = model.run_with_hooks(tokens, fwd_hooks=[(hook_name, lambda act, hook: act + change)])
            with splice(model, hook_name, error_term=True, interventions=interventions, **kwargs):
                steered = model(tokens)
            torch.testing.assert_close(steered, expected, msg=f"{hook_name}, seed {seed}")
            assert not torch.allclose(steered, clean)
    assert hook_count(model) == 0
