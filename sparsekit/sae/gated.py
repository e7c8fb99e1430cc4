"""Gated sparse autoencoder (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated
Sparse Autoencoders").

Which latents fire and how strongly are decided apart, with the encoder weights shared:

    gate = (x - b_dec) @ W_enc + b_enc                      which fire: 1[gate > 0]
    mag  = (x - b_dec) @ (W_enc * exp(r_mag)) + b_mag       how strongly: relu(mag)
    f = 1[gate > 0] * relu(mag);  x_hat = f @ W_dec + b_dec

b_enc is the paper's b_gate. The step 1[gate > 0] passes no gradient, so the gate learns from two
terms on relu(gate): the L1 penalty ``l1_coeff * sum_i relu(gate_i)`` and the auxiliary
reconstruction ``||x - (relu(gate) @ W_dec' + b_dec')||^2`` through a frozen copy of the decoder
(W_dec', b_dec' detached). This is the paper's original loss, with decoder rows held at unit norm.
The authors note (a comment on their LessWrong post, 2024) that weighting the L1 by free decoder
norms, Anthropic's April 2024 penalty, needs the decoder frozen in both terms or in neither. Frozen
in one only, it trains worse. Measured here with that mix on planted data (64 features in 24
dimensions, 2,000 steps of 512): the decoder rows shrank to a mean norm of 0.02 and L0 rose to 77
of 96 latents. Codes are dense [B, n].
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from sparsekit import ops
from sparsekit._util.validate import positive_number

from .base import SAEOutput, SparseDictionary
from .registry import Hyperparameter, register


@register
class GatedSAE(SparseDictionary):
    architecture = "gated"
    hyperparameter_specs = (Hyperparameter("l1_coeff", float, "L1 coefficient"),)
    code_kind = "dense"
    batch_by_latent_buffers = 5  # counted, not measured: gate, magnitude, codes, relu(gate), a gradient
    parameters_per_latent = 2    # r_mag, b_mag
    saelens_architecture = "gated"
    unit_norm_decoder = True

    def __init__(self, d_in: int, n_latents: int, l1_coeff: float, **kwargs):
        super().__init__(d_in, n_latents, **kwargs)
        self.l1_coeff = positive_number("l1_coeff", l1_coeff)
        self.r_mag = nn.Parameter(torch.zeros_like(self.b_enc))
        self.b_mag = nn.Parameter(torch.zeros_like(self.b_enc))
        self.sparsity_weight = 1.0  # the trainer's L1 warm-up scales the penalty through this

    def magnitude_weights(self) -> tuple[Tensor, Tensor]:
        """(W_mag [d_in, n], its bias with the pre-encoder bias folded in [n]): mag = x @ W_mag + bias."""
        W_mag = self.W_enc * self.r_mag.exp()
        return W_mag, self.b_mag - self.pre_encoder_bias() @ W_mag

    def gate(self, x: Tensor) -> Tensor:
        """The gate's pre-activations [B, n] of x [B, d_in]."""
        return torch.addmm(self.encoder_bias(), x, self.W_enc)

    def encode(self, x: Tensor) -> Tensor:
        """x [B, d_in] -> dense codes [B, n] = 1[gate > 0] * relu(mag)."""
        return self._codes(x, self.gate(x))

    def _codes(self, x: Tensor, gate: Tensor) -> Tensor:
        W_mag, b_mag = self.magnitude_weights()
        return (gate > 0).to(gate.dtype) * ops.relu_encode(x, W_mag, b_mag)

    def forward(self, x: Tensor, y: Tensor | None = None) -> SAEOutput:
        if self.transcoder and y is None:
            raise ValueError("a transcoder needs its target y [B, d_out]")
        target = y if self.transcoder else x
        gate = self.gate(x)
        codes = self._codes(x, gate)
        x_hat = self.output(codes, x)
        active_gate = torch.relu(gate)
        via_gate = torch.addmm(self.b_dec.detach(), active_gate, self.W_dec.detach())
        l1 = active_gate.sum(-1).mean()
        losses = {"mse": (x_hat - target).pow(2).sum(-1).mean(),
                  "l1": self.sparsity_weight * self.l1_coeff * l1,
                  "gate_reconstruction": (via_gate - target).pow(2).sum(-1).mean()}
        return SAEOutput(x_hat, codes, losses)
