"""Skip transcoders: any transcoder architecture with skip=True adds a linear path x @ W_skip from its
input to its output (zero at the start), trained with the rest, saved and loaded, and exported to
and imported from SAELens's "skip_transcoder" (ReLU) layout with the same outputs."""
import pytest
import torch
from helpers.seeds import fresh_seed

import sparsekit
from sparsekit.training.memory import estimate_training_memory

KWARGS = {"topk": dict(k=4), "batchtopk": dict(k=4), "relu": dict(l1_coeff=1e-3), "jumprelu": dict(l0_coeff=1e-3),
          "gated": dict(l1_coeff=1e-3)}


def skip_transcoder(architecture, seed=0, dtype=torch.float64):
    tc = sparsekit.Transcoder(10, 40, 6, architecture=architecture, skip=True, dtype=dtype, seed=seed,
                              **KWARGS[architecture])
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for param in tc.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=gen, dtype=param.dtype))
        if architecture == "batchtopk":
            tc.threshold.fill_(0.4)  # as after training: reconstruct uses the inference threshold
    return tc


@pytest.mark.parametrize("architecture", sorted(KWARGS))
def test_the_skip_path_adds_x_at_w_skip_in_forward_and_reconstruct(architecture):
    seed = fresh_seed()
    tc = skip_transcoder(architecture, seed)
    plain = sparsekit.Transcoder(10, 40, 6, architecture=architecture, dtype=torch.float64, **KWARGS[architecture])
    plain.load_state_dict({k: v for k, v in tc.state_dict().items() if k != "W_skip"})
    x, y = torch.randn(16, 10, dtype=torch.float64), torch.randn(16, 6, dtype=torch.float64)
    torch.testing.assert_close(tc(x, y).x_hat, plain(x, y).x_hat + x @ tc.W_skip, msg=f"seed {seed}")
    tc.input_scale, tc.output_scale = plain.input_scale, plain.output_scale = 1.3, 0.7
    torch.testing.assert_close(tc.reconstruct(x), plain.reconstruct(x) + (1.3 * x) @ tc.W_skip / 0.7)


def test_w_skip_starts_at_zero_learns_and_only_transcoders_take_it():
    tc = sparsekit.Transcoder(10, 40, 6, k=4, skip=True)
    assert torch.count_nonzero(tc.W_skip) == 0 and tc.config()["skip"] is True
    assert "skip" not in sparsekit.Transcoder(10, 40, 6, k=4).config()
    x = torch.randn(64, 10)
    y = x @ torch.randn(10, 6)  # a purely linear target: the skip path is the whole answer
    sparsekit.train(tc, (x.repeat(20, 1), y.repeat(20, 1)),
                    sparsekit.TrainConfig(batch_size=64, lr=1e-2, total_tokens=64 * 60, eval_tokens=0, progress=False))
    assert torch.count_nonzero(tc.W_skip) > 0
    with pytest.raises(ValueError, match="applies to transcoders only"):
        sparsekit.TopKSAE(10, 40, k=4, skip=True)
    with pytest.raises(ValueError, match="skip must be True or False"):
        sparsekit.Transcoder(10, 40, 6, k=4, skip="yes")


def test_save_load_and_the_memory_estimate_count_w_skip(tmp_path):
    tc = skip_transcoder("topk", dtype=torch.float32)
    back = sparsekit.load(tc.save(tmp_path / "tc"))
    assert back.skip and torch.equal(back.W_skip, tc.W_skip)
    with_skip = estimate_training_memory(10, 40, 64, k=4, d_out=6, skip=True).parts["parameters"]
    without = estimate_training_memory(10, 40, 64, k=4, d_out=6).parts["parameters"]
    assert with_skip - without == 10 * 6 * 4


@pytest.mark.parametrize("scales", [(1.0, 1.0), (0.4, 2.2)])
def test_a_relu_skip_transcoder_round_trips_through_saelens(tmp_path, scales):
    tc = skip_transcoder("relu")
    tc.input_scale, tc.output_scale = scales
    tc.export_saelens(tmp_path, hook_name="blocks.0.hook_resid_pre")
    x = 2.0 * torch.randn(30, 10, dtype=torch.float64) + 0.5
    torch.testing.assert_close(sparsekit.load_saelens(tmp_path).reconstruct(x), tc.reconstruct(x), rtol=1e-10, atol=1e-10)
    sae_lens = pytest.importorskip("sae_lens")
    lens = sae_lens.SAE.load_from_disk(str(tmp_path)).eval()
    assert type(lens).__name__ == "SkipTranscoder"
    with torch.no_grad():
        torch.testing.assert_close(lens(x), tc.reconstruct(x), rtol=1e-10, atol=1e-10)


def test_other_skip_transcoders_are_not_exported_and_latent_sharding_refuses_them(tmp_path):
    with pytest.raises(NotImplementedError, match="skip transcoder is ReLU only"):
        skip_transcoder("jumprelu").export_saelens(tmp_path, hook_name="blocks.0.hook_resid_pre")
    from sparsekit.training.parallel.sharded import LatentShardedTopK
    with pytest.raises(ValueError, match="skip transcoder cannot be latent-sharded"):
        LatentShardedTopK.from_dictionary(skip_transcoder("topk", dtype=torch.float32))
