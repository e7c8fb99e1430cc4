"""BatchTopK sparse autoencoder (Bussmann et al. 2024, "BatchTopK Sparse Autoencoders").

Training keeps the B*k largest activations over the whole batch (L0 = k on average, varying per
row). Inference uses a global threshold instead, the running mean of the smallest activation kept
in training batches: f = relu(pre) * (pre > threshold), dense [B, n].
"""
from __future__ import annotations

import math

import torch

from sparsekit import ops
from sparsekit._util.validate import positive_int

from .base import SparseDictionary
from .registry import Hyperparameter, register


@register
class BatchTopKSAE(SparseDictionary):
    architecture = "batchtopk"
    hyperparameter_specs = (Hyperparameter("k", int, "active latents per token"),
                            Hyperparameter("threshold_momentum", float, "momentum of the inference threshold's running mean",
                                           required=False, default=0.99, flag=False))
    code_kind = "batchtopk"
    batch_by_latent_buffers = 2
    saelens_architecture = "jumprelu"  # exported with every latent's threshold = the global inference threshold
    saelens_transcoder_architecture = "jumprelu_transcoder"
    unit_norm_decoder = True

    def __init__(self, d_in: int, n_latents: int, k: int, threshold_momentum: float = 0.99, **kwargs):
        super().__init__(d_in, n_latents, **kwargs)
        self.k = positive_int("k", k)
        if self.k > self.n_latents:
            raise ValueError(f"k={k} exceeds n_latents={n_latents}")
        if not 0 <= threshold_momentum < 1:
            raise ValueError(f"threshold_momentum must be in [0, 1), got {threshold_momentum!r}")
        self.threshold_momentum = float(threshold_momentum)
        # Not yet estimated: -1. A buffer, so it is saved and restored with the parameters.
        self.register_buffer("threshold", torch.tensor(-1.0, dtype=self.W_enc.dtype, device=self.W_enc.device))

    def inference_thresholds(self):
        """The learned global threshold for every latent [n] (float64), floored as ``encode`` does in evaluation."""
        if float(self.threshold) < 0:
            raise ValueError("BatchTopKSAE has no inference threshold yet (threshold=-1): train it before exporting")
        theta = max(float(self.threshold), 1e-30)
        return torch.full((self.n_latents,), theta, dtype=torch.float64, device=self.b_enc.device)

    def _batchtopk_k(self) -> int:
        return self.k

    def encode(self, x):
        """Training: BatchTopKCodes over the batch (and the threshold estimate is updated).
        Evaluation: dense codes [B, n] through the global threshold."""
        if self.training:
            codes = ops.batchtopk_encode(x, self.W_enc, self.b_enc, self.k, pre_bias=self.pre_encoder_bias())
            self.update_threshold(codes.values.detach())
            return codes
        if self.threshold < 0:
            raise RuntimeError("BatchTopKSAE has no inference threshold yet: train it (or call .train()) first")
        theta = max(float(self.threshold), 1e-30)  # exp(log) of a positive number; 0 would be -inf
        log_threshold = torch.full_like(self.b_enc, math.log(theta))
        return torch.relu(ops.jumprelu_encode(x, self.W_enc, self.encoder_bias(), log_threshold))

    @torch.no_grad()
    def update_threshold(self, kept) -> None:
        """Running mean of the smallest positive kept activation; tensor ops only, so the update
        traces under torch.compile without graph breaks."""
        smallest = torch.where(kept > 0, kept, torch.full_like(kept, float("inf"))).min()
        blended = self.threshold * self.threshold_momentum + (1 - self.threshold_momentum) * smallest
        updated = torch.where(self.threshold < 0, smallest, blended)
        self.threshold.copy_(torch.where(torch.isfinite(smallest), updated, self.threshold))
