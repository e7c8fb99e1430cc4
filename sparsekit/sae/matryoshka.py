"""Matryoshka BatchTopK sparse autoencoder (Bussmann et al. 2025, "Learning Multi-Level Features with
Matryoshka Sparse Autoencoders"; Nabeshima 2024, "Matryoshka Sparse Autoencoders", LessWrong).

A BatchTopK dictionary (sparsekit.sae.batchtopk: the B*k largest activations over the whole
batch, a global threshold at inference) whose nested prefixes must each reconstruct on their own.
With widths m_1 < m_2 < ... < m_G = n, the first m_g latents form prefix g:

    x_hat_g = sum_{j < m_g} f_j W_dec[j] + b_dec          losses: mse_g = mean_B ||target - x_hat_g||^2

The objective sums them, as SAELens 6.54's matryoshka_batchtopk training SAE does (its loss is the
full dictionary's mse plus one ``inner_mse_loss_<width>`` per inner width; the paper sums too).
``losses["mse"]`` is the full dictionary's (m_G = n), so the trainer's fvu and mse are the whole
dictionary's; ``losses["mse_prefix_<m>"]`` is each inner prefix's. Early latents learn to be
useful alone, which keeps general features from being absorbed by specific ones.

The prefixes cost one sparse decode, not G: each selected entry belongs to exactly one group
(m_{g-1} <= col < m_g), so the entries are decoded once into G stacked copies of the batch (output
row g*B + row), giving each group's contribution c_g [B, d_out]; prefix g is b_dec + c_1 + ... + c_g
(a cumulative sum). Through ``sparsekit.ops.sparse_decode_coo``, so every backend runs it.

Hyperparameters: k (active latents per row on average, as BatchTopK), matryoshka_widths (SAELens's
name: strictly increasing positive ints ending at n_latents), threshold_momentum. Inference is
BatchTopK's: dense codes through the learned global threshold; exported to SAELens as "jumprelu"
with every threshold equal to it, as SAELens saves a trained Matryoshka dictionary for inference.
A skip transcoder's linear path x @ W_skip joins every prefix (it is not part of the dictionary).
"""
from __future__ import annotations

import torch
from torch import Tensor

from sparsekit import ops
from sparsekit._util.validate import is_int

from .base import SAEOutput
from .batchtopk import BatchTopKSAE
from .registry import Hyperparameter, register


def check_widths(matryoshka_widths, n_latents: int) -> tuple[int, ...]:
    """matryoshka_widths (a sequence of ints) -> a tuple, or a ValueError naming it: positive,
    strictly increasing, ending at n_latents."""
    if isinstance(matryoshka_widths, (str, bytes)) or not hasattr(matryoshka_widths, "__len__"):
        raise ValueError(f"matryoshka_widths must be a list of ints ending at n_latents={n_latents}, "
                         f"got {matryoshka_widths!r}")
    widths = tuple(matryoshka_widths)
    if not widths or not all(is_int(w) for w in widths):
        raise ValueError(f"matryoshka_widths must be a non-empty list of ints, got {matryoshka_widths!r}")
    widths = tuple(int(w) for w in widths)
    if widths[0] < 1:
        raise ValueError(f"matryoshka_widths must be positive, got {list(widths)}")
    if any(a >= b for a, b in zip(widths, widths[1:])):
        raise ValueError(f"matryoshka_widths must be strictly increasing, got {list(widths)}")
    if widths[-1] != n_latents:
        raise ValueError(f"matryoshka_widths must end at n_latents={n_latents}, got {list(widths)}")
    return widths


@register
class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    architecture = "matryoshka_batchtopk"
    hyperparameter_specs = (
        Hyperparameter("k", int, "active latents per token"),
        Hyperparameter("matryoshka_widths", tuple, "nested prefix widths, strictly increasing, ending at "
                       "n_latents (e.g. 128,512,2048)", element=int),
        Hyperparameter("threshold_momentum", float, "momentum of the inference threshold's running mean",
                       required=False, default=0.99, flag=False))
    code_kind = "batchtopk"
    # BatchTopK's two [B, n] buffers; the prefixes add [G, B, d_out] (and its gradient), not [B, n].
    batch_by_latent_buffers = 2
    saelens_architecture = "jumprelu"  # SAELens saves trained Matryoshka dictionaries for inference as JumpReLU
    saelens_transcoder_architecture = "jumprelu_transcoder"

    def __init__(self, d_in: int, n_latents: int, k: int, matryoshka_widths, threshold_momentum: float = 0.99,
                 **kwargs):
        super().__init__(d_in, n_latents, k=k, threshold_momentum=threshold_momentum, **kwargs)
        self.matryoshka_widths = check_widths(matryoshka_widths, self.n_latents)
        # The group boundaries m_1..m_{G-1}: not saved (cfg.json holds the widths), but on the parameters' device.
        inner = torch.tensor(self.matryoshka_widths[:-1], dtype=torch.int64, device=self.W_enc.device)
        self.register_buffer("group_starts", inner, persistent=False)

    def hyperparameters(self) -> dict:
        # A list, as cfg.json reads back (load compares each field with the rebuilt config).
        return {**super().hyperparameters(), "matryoshka_widths": list(self.matryoshka_widths)}

    def group_contributions(self, codes) -> Tensor:
        """Each group's share of the decode: [G, B, d_out], group g holding latents m_{g-1} <= j < m_g
        (no bias). COO codes (training) are decoded once, entry e into row group(e) * B + row(e);
        dense codes [B, n] (evaluation) by one GEMM per group."""
        G = len(self.matryoshka_widths)
        if isinstance(codes, (ops.BatchTopKCodes, ops.SparseCodes)):
            batch = self._coo_batch_size(codes)
            group = torch.bucketize(codes.cols, self.group_starts, right=True)
            zero_bias = torch.zeros_like(self.b_dec)
            stacked = ops.sparse_decode_coo(codes.values, group * batch + codes.rows, codes.cols, self.W_dec,
                                            zero_bias, G * batch)
            return stacked.view(G, batch, self.d_out)
        if isinstance(codes, ops.TopKCodes):
            codes = self.dense_codes(codes)
        bounds = (0, *self.matryoshka_widths)
        return torch.stack([codes[:, a:b] @ self.W_dec[a:b] for a, b in zip(bounds, bounds[1:])])

    def prefix_outputs(self, codes, x: Tensor) -> Tensor:
        """Every prefix's prediction [G, B, d_out]: b_dec plus the contributions of groups 1..g (and
        x @ W_skip for a skip transcoder); the last is ``output(codes, x)``."""
        prefixes = self.group_contributions(codes).cumsum(0) + self.b_dec
        return prefixes + x @ self.W_skip if self.skip else prefixes

    @torch.no_grad()
    def prefix_reconstructions(self, x: Tensor) -> Tensor:
        """Raw activations x [B, d_in] -> each prefix's raw reconstruction [G, B, d_out], through the
        inference path (eval mode for the call), as ``reconstruct`` gives the last."""
        was_training = self.training
        self.eval()
        try:
            scaled = x * self.input_scale
            prefixes = self.prefix_outputs(self.encode(scaled), scaled)
        finally:
            self.train(was_training)
        return prefixes / self.output_scale

    def forward(self, x: Tensor, y: Tensor | None = None) -> SAEOutput:
        """x [B, d_in] (normalised) -> SAEOutput with x_hat the full dictionary's [B, d_out] and
        losses "mse" (the full dictionary) and "mse_prefix_<m>" per inner width m, each the mean
        over the batch of the squared error summed over features; the objective is their sum."""
        if self.transcoder and y is None:
            raise ValueError("a transcoder needs its target y [B, d_out]")
        target = y if self.transcoder else x
        codes = self.loss_codes(x)
        prefixes = self.prefix_outputs(codes, x)
        errors = (prefixes - target).pow(2).sum(-1).mean(-1)  # [G]
        losses = {"mse": errors[-1],
                  **{f"mse_prefix_{m}": errors[g] for g, m in enumerate(self.matryoshka_widths[:-1])}}
        return SAEOutput(prefixes[-1], codes, losses)
