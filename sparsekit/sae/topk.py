"""TopK sparse autoencoder (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

f = TopK_k((x - b_dec) @ W_enc + b_enc), ReLU'd; x_hat = f @ W_dec + b_dec. No sparsity penalty:
k fixes L0. Decoder rows are kept at unit norm. Dead latents: AuxK in the trainer.
"""
from __future__ import annotations

from torch import Tensor

from sparsekit import ops
from sparsekit._util.validate import positive_int

from .base import SAEOutput, SparseDictionary
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

    def forward_with_latents(self, x: Tensor, y: Tensor | None, latents: Tensor,
                             k_latents: int = 0) -> tuple[SAEOutput, ops.LatentPass]:
        """``forward`` plus what the dead-latent remedies read of the latents [m] from the same
        encoder pass (``ops.topk_encode_with_latents``: their pre-activations when k_latents is 0,
        else their top-k_latents codes)."""
        if self.transcoder and y is None:
            raise ValueError("a transcoder needs its target y [B, d_out]")
        codes, latent_pass = ops.topk_encode_with_latents(x, self.W_enc, self.b_enc, self.k, latents, k_latents,
                                                          pre_bias=self.pre_encoder_bias())
        return self.output_from_codes(codes, x, y), latent_pass
