"""A new architecture is one module: a SparseDictionary subclass that declares its facts under
@register. Declared here, in a test, the CLI trains it with its own flags, the memory estimate
counts its buffers, save/load round-trips it, Transcoder builds it, and the SAELens export says
it has no equivalent: no table elsewhere names it."""
import numpy as np
import pytest
import torch

import sparsekit
from sparsekit import ops
from sparsekit.cli.train import build_parser, main
from sparsekit.sae import ARCHITECTURES, Hyperparameter, SparseDictionary, Transcoder, register
from sparsekit.training.memory import estimate_training_memory


class ShiftedReLUSAE(SparseDictionary):
    """f = relu(pre - shift), L1 penalty: the whole architecture."""
    architecture = "shifted_relu"
    hyperparameter_specs = (Hyperparameter("l1_coeff", float, "L1 coefficient"),
                            Hyperparameter("shift", float, "subtracted from every pre-activation"))
    code_kind = "dense"
    batch_by_latent_buffers = 3
    parameters_per_latent = 0
    saelens_architecture = None
    saelens_transcoder_architecture = None

    def __init__(self, d_in, n_latents, l1_coeff, shift, **kwargs):
        super().__init__(d_in, n_latents, **kwargs)
        self.l1_coeff, self.shift = float(l1_coeff), float(shift)

    def encode(self, x):
        return ops.relu_encode(x, self.W_enc, self.encoder_bias() - self.shift)

    def sparsity_losses(self, codes, x):
        return {"l1": self.l1_coeff * codes.sum(-1).mean()}


@pytest.fixture
def registered():
    register(ShiftedReLUSAE)
    yield ShiftedReLUSAE
    ARCHITECTURES.pop(ShiftedReLUSAE.architecture)


def run_cli(*args) -> int:
    try:
        main([str(a) for a in args])
    except SystemExit as stop:
        return stop.code
    return 0


def test_the_cli_trains_a_new_architecture_with_its_own_flags(registered, tmp_path, capsys):
    x = np.random.default_rng(0).standard_normal((1024, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "out"
    code = run_cli("--data", tmp_path / "x.npy", "--architecture", "shifted_relu", "--n-latents", 32,
                   "--l1-coeff", "1e-3", "--shift", "0.05", "--batch-size", 128, "--total-tokens", 1024,
                   "--eval-tokens", 128, "--no-progress", "--device", "cpu", "--out", out)
    assert code == 0, capsys.readouterr().err
    loaded = sparsekit.load(out)
    assert type(loaded) is ShiftedReLUSAE and loaded.shift == 0.05 and loaded.l1_coeff == 1e-3
    assert "shifted_relu SAE" in capsys.readouterr().out


def test_the_cli_lists_the_new_flag_and_requires_it(registered, tmp_path, capsys):
    help_text = build_parser().format_help()
    assert "--shift" in help_text and "shifted_relu" in help_text
    np.save(tmp_path / "x.npy", np.ones((64, 8), np.float32))
    assert run_cli("--data", tmp_path / "x.npy", "--architecture", "shifted_relu", "--n-latents", 32,
                   "--l1-coeff", "1e-3", "--no-progress") == 2
    assert "--shift is required for a shifted_relu dictionary" in capsys.readouterr().err
    assert run_cli("--data", tmp_path / "x.npy", "--architecture", "topk", "--n-latents", 32, "--k", 4,
                   "--shift", "0.1", "--no-progress") == 2
    assert "--shift applies to shifted_relu dictionaries, not topk" in capsys.readouterr().err


def test_the_memory_estimate_reads_the_declared_buffers(registered):
    estimate = estimate_training_memory(8, 32, 128, architecture="shifted_relu")
    assert estimate.parts["batch_by_latent_buffers"] == 3 * 128 * 32 * 4
    assert estimate.parts["sparse_codes"] == 0


def test_save_load_transcoder_and_export_follow_the_class(registered, tmp_path):
    tc = Transcoder(8, 32, 4, architecture="shifted_relu", l1_coeff=1e-3, shift=0.1)
    assert type(tc) is ShiftedReLUSAE and tc.transcoder and tc.d_out == 4
    with pytest.raises(ValueError, match="k applies to topk/batchtopk/matryoshka_batchtopk transcoders"):
        Transcoder(8, 32, 4, k=2, architecture="shifted_relu", l1_coeff=1e-3, shift=0.1)
    sae = ShiftedReLUSAE(8, 32, l1_coeff=1e-3, shift=0.1)
    again = sparsekit.load(sae.save(tmp_path / "sae"))
    x = torch.randn(5, 8)
    torch.testing.assert_close(again.reconstruct(x), sae.reconstruct(x))
    with pytest.raises(ValueError, match="'shifted_relu' has no SAELens equivalent"):
        sae.export_saelens(tmp_path / "saelens", hook_name="blocks.0.hook_resid_pre")


def test_registering_a_class_that_omits_a_fact_fails_naming_it():
    class Incomplete(SparseDictionary):
        pass
    with pytest.raises(TypeError, match="Incomplete must declare its own architecture name"):
        register(Incomplete)
