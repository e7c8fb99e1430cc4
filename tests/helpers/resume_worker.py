"""A training run for test_resume.py, run as a subprocess: `python resume_worker.py DIR [slow] [resume]`.

Trains a TopK SAE with AuxK on a shuffled TensorSource, checkpointing every 2 batches into DIR,
and saves the final dictionary to DIR/final. With "slow", each step sleeps, and each checkpoint
write sleeps between writing its tensor file and renaming its folder into place, so the parent
can kill it mid-run and mid-write.
"""
import sys
import time

import torch

import sparsekit
from sparsekit.activations import TensorSource

directory, flags = sys.argv[1], set(sys.argv[2:])
torch.set_num_threads(2)
gen = torch.Generator().manual_seed(0)
features = torch.nn.functional.normalize(torch.randn(40, 16, generator=gen), dim=-1)
x = (torch.rand(5000, 40, generator=gen) < 0.05).float() * torch.rand(5000, 40, generator=gen) @ features

if "slow" in flags:
    original = sparsekit.TopKSAE.forward

    def slow_forward(self, *args, **kwargs):
        time.sleep(0.05)
        return original(self, *args, **kwargs)

    sparsekit.TopKSAE.forward = slow_forward

    from sparsekit.training import checkpoint
    original_save = checkpoint.save_file

    def slow_save(*args, **kwargs):
        original_save(*args, **kwargs)
        time.sleep(0.15)  # the temporary folder holds a tensor file, not yet a checksum or a name

    checkpoint.save_file = slow_save

sae = sparsekit.TopKSAE(16, 64, k=3)
cfg = sparsekit.TrainConfig(batch_size=128, lr=3e-3, total_tokens=128 * 60, eval_tokens=256, log_every=4,
                            dead_strategy="auxk", dead_window_tokens=128 * 5, checkpoint_dir=directory,
                            checkpoint_every_tokens=256, progress=False)
result = sparsekit.train(sae, TensorSource(x, batch_size=100, shuffle=True, seed=3), cfg, resume="resume" in flags)
sae.save(f"{directory}/final")
print("done", result.metrics["step"])
