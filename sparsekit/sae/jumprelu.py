"""JumpReLU sparse autoencoder (Rajamanoharan et al. 2024, "Jumping Ahead").

f = pre * (pre > theta) with per-latent thresholds theta = exp(log_threshold);
loss = mse + l0_coeff * mean over the batch of the number of active latents. Both the JumpReLU and
the L0 step pass gradients to the thresholds through straight-through estimators with a
rectangle kernel of width ``bandwidth``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from sparsekit import ops
from sparsekit._util.validate import positive_number

from .base import SAEOutput, SparseDictionary
from .registry import Hyperparameter, register


@register
class JumpReLUSAE(SparseDictionary):
    architecture = "jumprelu"
    hyperparameter_specs = (Hyperparameter("l0_coeff", float, "L0 coefficient"),
                            Hyperparameter("bandwidth", float, "straight-through bandwidth", required=False, default=1e-3),
                            Hyperparameter("init_threshold", float, "initial threshold", required=False, default=1e-3))
    code_kind = "dense"
    batch_by_latent_buffers = 4
    parameters_per_latent = 1    # log_threshold
    saelens_architecture = "jumprelu"
    saelens_transcoder_architecture = "jumprelu_transcoder"
    unit_norm_decoder = True

    def __init__(self, d_in: int, n_latents: int, l0_coeff: float, bandwidth: float = 1e-3,
                 init_threshold: float = 1e-3, **kwargs):
        super().__init__(d_in, n_latents, **kwargs)
        self.l0_coeff = positive_number("l0_coeff", l0_coeff)
        self.bandwidth = positive_number("bandwidth", bandwidth)
        self.init_threshold = positive_number("init_threshold", init_threshold)
        self.log_threshold = nn.Parameter(torch.full_like(self.b_enc, math.log(self.init_threshold)))
        self.sparsity_weight = 1.0

    def inference_thresholds(self):
        """theta = exp(log_threshold) [n] (float64)."""
        return self.log_threshold.detach().double().exp()

    def encode(self, x):
        """x [B, d_in] -> dense codes [B, n]."""
        return ops.jumprelu_encode(x, self.W_enc, self.encoder_bias(), self.log_threshold, self.bandwidth)

    def forward(self, x, y=None) -> SAEOutput:
        if self.transcoder and y is None:
            raise ValueError("a transcoder needs its target y [B, d_out]")
        target = y if self.transcoder else x
        pre = torch.addmm(self.encoder_bias(), x, self.W_enc)
        codes = ops.jumprelu(pre, self.log_threshold, self.bandwidth)
        x_hat = self.output(codes, x)
        l0 = ops.heaviside_step(pre, self.log_threshold, self.bandwidth).sum(-1).mean()
        losses = {"mse": (x_hat - target).pow(2).sum(-1).mean(), "l0": self.sparsity_weight * self.l0_coeff * l0}
        return SAEOutput(x_hat, codes, losses)
