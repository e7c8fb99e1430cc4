"""`sparsekit demo`: the `make demo` job.

By default the compact MNIST study (``sparsekit.studies.mnist_study``): train a 64-unit ReLU MLP, scan four
dictionary algorithms over sizes and sparsity settings on its hidden layer, test the error curves
for elbows, compare dead-latent remedies, read the features, and write runs/mnist-demo/report.html
and summary.json. Any `sparsekit mnist` flag works here too.

`sparsekit demo --synthetic` runs the earlier demo instead: a TopK dictionary learns a known sparse
code. Synthetic activations (sparsekit.toys.superposition): n_true unit-norm directions in d dimensions,
each firing with probability p_active. ``sparsekit.train`` fits a TopK SAE with AuxK; the report
gives the held-out fraction of variance unexplained (FVU), L0, dead latents, and how well the
decoder recovers the planted directions (mean max cosine similarity, and the count above 0.9).
"""
from __future__ import annotations

from sparsekit.ops.backend import backends
from sparsekit.sae import TopKSAE
from sparsekit.toys.superposition import SuperpositionData, recovery_per_feature
from sparsekit.training.config import TrainConfig
from sparsekit.training.loop import train


def run_synthetic(d: int = 64, n_true: int = 256, n_latents: int = 512, k: int = 8, p_active: float = 0.02,
                  batch: int = 1024, lr: float = 2e-3, total_tokens: int = 6_000_000, seed: int = 0,
                  log_every: int = 200, output_dir: str | None = None, progress: bool = True) -> dict:
    """Train and return the final held-out metrics plus "recovery" and "recovered"."""
    data = SuperpositionData(n_true, d, p_active=p_active, seed=seed)
    print(f"sparsekit demo: TopK SAE d={d} n_latents={n_latents} k={k} on {n_true} planted directions "
          f"(each active with p={p_active}); {total_tokens:,} tokens; backends {backends()}")
    sae = TopKSAE(d, n_latents, k, seed=seed)
    cfg = TrainConfig(batch_size=batch, lr=lr, total_tokens=total_tokens, dead_strategy="auxk",
                      dead_window_tokens=50 * batch, eval_tokens=8 * batch, log_every=log_every,
                      output_dir=output_dir, progress=progress, seed=seed)
    result = train(sae, data.source(batch_size=batch, seed=seed + 1), cfg)
    for record in result.history:
        print(f"step {record['step']:6d}  fvu {record['fvu']:.4f}  l0 {record['l0']:.2f}  "
              f"dead {record['dead_frac']:.3f}  aux {record['aux_loss']:.4f}")
    per_feature = recovery_per_feature(sae, data.features)
    return {**result.metrics, "recovery": float(per_feature.mean()), "recovered": int((per_feature > 0.9).sum()),
            "n_true": n_true}
