"""ReLU + L1 sparse autoencoder (Bricken et al. 2023, "Towards Monosemanticity").

f = relu((x - b_dec) @ W_enc + b_enc); x_hat = f @ W_dec + b_dec;
loss = mse + l1_coeff * sum_i f_i, with decoder rows held at unit norm. With
``decoder_norm_penalty=True`` (Anthropic's April 2024 update) the rows are free and the penalty is
l1_coeff * sum_i f_i * ||W_dec[i]||.
"""
from __future__ import annotations

from sparsekit import ops
from sparsekit._util.validate import positive_number

from .base import SparseDictionary
from .registry import Hyperparameter, register


@register
class ReLUSAE(SparseDictionary):
    architecture = "relu"
    hyperparameter_specs = (Hyperparameter("l1_coeff", float, "L1 coefficient"),
                            Hyperparameter("decoder_norm_penalty", bool, "free decoder rows, L1 weighted by their norms",
                                           required=False, default=False, flag=False))
    code_kind = "dense"
    batch_by_latent_buffers = 3
    saelens_architecture = "standard"
    saelens_transcoder_architecture = "transcoder"

    def __init__(self, d_in: int, n_latents: int, l1_coeff: float, decoder_norm_penalty: bool = False, **kwargs):
        super().__init__(d_in, n_latents, **kwargs)
        self.l1_coeff = positive_number("l1_coeff", l1_coeff)
        self.decoder_norm_penalty = bool(decoder_norm_penalty)
        self.unit_norm_decoder = not self.decoder_norm_penalty
        self.sparsity_weight = 1.0  # the trainer's L1 warm-up scales the penalty through this

    def encode(self, x):
        """x [B, d_in] -> dense codes [B, n]."""
        return ops.relu_encode(x, self.W_enc, self.encoder_bias())

    def loss_codes(self, x):
        """The training forward's codes: SparseCodes when at most ops.SPARSE_RELU_MAX_DENSITY of
        them are positive (then decode and backward are sparse), else dense [B, n]."""
        if not self.training:
            return self.encode(x)
        return ops.relu_encode_adaptive(x, self.W_enc, self.b_enc, pre_bias=self.pre_encoder_bias(),
                                        max_density=ops.SPARSE_RELU_MAX_DENSITY)

    def sparsity_losses(self, codes, x) -> dict:
        if isinstance(codes, ops.SparseCodes):
            weighted = codes.values * self.W_dec.norm(dim=-1)[codes.cols] if self.decoder_norm_penalty else codes.values
            return {"l1": self.sparsity_weight * self.l1_coeff * weighted.sum() / codes.batch_size}
        weighted = codes * self.W_dec.norm(dim=-1) if self.decoder_norm_penalty else codes
        return {"l1": self.sparsity_weight * self.l1_coeff * weighted.sum(-1).mean()}
