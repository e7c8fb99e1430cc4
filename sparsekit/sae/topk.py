"""TopK sparse autoencoder (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

f = TopK_k((x - b_dec) @ W_enc + b_enc), ReLU'd; x_hat = f @ W_dec + b_dec. No sparsity penalty:
k fixes L0. Decoder rows are kept at unit norm. Dead latents: AuxK in the trainer.
"""
from __future__ import annotations

from sparsekit import ops
from sparsekit._util.validate import positive_int

from .base import SparseDictionary
from .registry import Hyperparameter, register


@register
class TopKSAE(SparseDictionary):
    architecture = "topk"
    hyperparameter_specs = (Hyperparameter("k", int, "active latents per token"),)
    code_kind = "topk"
    batch_by_latent_buffers = 1
    saelens_architecture = "topk"
    unit_norm_decoder = True

    def __init__(self, d_in: int, n_latents: int, k: int, **kwargs):
        super().__init__(d_in, n_latents, **kwargs)
        self.k = positive_int("k", k)
        if self.k > self.n_latents:
            raise ValueError(f"k={k} exceeds n_latents={n_latents}")

    def encode(self, x) -> ops.TopKCodes:
        """x [B, d_in] -> TopKCodes(values [B, k], indices [B, k])."""
        return ops.topk_encode(x, self.W_enc, self.b_enc, self.k, pre_bias=self.pre_encoder_bias())
