"""Training through an LMActivationSource (a tiny random-weight HookedTransformer) stopped mid-run and
resumed with train(..., resume=True) ends with bit-identical parameters to a run that never stopped:
the source's state (epoch, position in the shuffled windows) travels in the checkpoint."""
import pytest
import torch
from helpers.lm_cases import random_contexts, tiny_transformer

import sparsekit
from sparsekit.activations.store import LMActivationSource


class Interrupted(Exception):
    pass


class CrashingSource(LMActivationSource):
    """An LMActivationSource whose `crash_at`-th batch (counted over every iteration) raises instead."""

    def __init__(self, *args, crash_at: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.crash_at, self.served = crash_at, 0

    def __iter__(self):
        for batch in super().__iter__():
            self.served += 1
            if self.served == self.crash_at:
                raise Interrupted(f"stopped at batch {self.served}")
            yield batch


@pytest.fixture(scope="module")
def tiny():
    return tiny_transformer(n_layers=2, seed=6)


@pytest.mark.parametrize("hooks", ["blocks.1.hook_resid_pre", ("blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out")])
def test_training_from_an_lm_source_resumes_bit_identically(tiny, tmp_path, hooks, capsys):
    tokens = random_contexts(40, 12, seed=8)  # 440 rows an epoch; the run reads ~1.9 epochs

    def source(cls=LMActivationSource, **extra):
        return cls(tiny, tokens, hooks, batch_size=48, seed=3, epochs=None, buffer_contexts=8, batch_contexts=5,
                   **extra)

    def dictionary():
        torch.manual_seed(11)
        return sparsekit.Transcoder(16, 48, 16, k=4) if isinstance(hooks, tuple) else sparsekit.TopKSAE(16, 48, k=4)

    def config(folder):
        return sparsekit.TrainConfig(batch_size=64, lr=3e-3, total_tokens=64 * 12, eval_tokens=64, log_every=4,
                                     dead_strategy="auxk", dead_window_tokens=256, progress=False,
                                     checkpoint_dir=str(folder), checkpoint_every_tokens=128, seed=5)

    whole = sparsekit.train(dictionary(), source(), config(tmp_path / "whole"))
    with pytest.raises(Interrupted):
        sparsekit.train(dictionary(), source(CrashingSource, crash_at=12), config(tmp_path / "stopped"))
    written = sorted(p.name for p in (tmp_path / "stopped").glob("step_*"))
    assert written and written[-1] < "step_000000012"  # stopped part-way, after some checkpoints
    capsys.readouterr()
    resumed = sparsekit.train(dictionary(), source(), config(tmp_path / "stopped"), resume=True)
    assert f"sparsekit: resumed from {tmp_path / 'stopped' / written[-1]}" in capsys.readouterr().err
    for name, tensor in whole.sae.state_dict().items():
        assert torch.equal(tensor, resumed.sae.state_dict()[name]), name
    assert resumed.metrics["fvu"] == whole.metrics["fvu"]
