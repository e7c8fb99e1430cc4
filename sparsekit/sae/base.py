"""What every sparse dictionary shares: parameters, normalisation, the forward contract, save/load.

Parameters: W_enc [d_in, n], b_enc [n], W_dec [n, d_out], b_dec [d_out]; a transcoder adds b_in [d_in],
and a skip transcoder (``skip=True``) a linear path W_skip [d_in, d_out] from its input straight to its
output: x_hat = f @ W_dec + b_dec + x @ W_skip (Dunefsky et al. 2024; Paulo et al. 2025, "Transcoders
beat sparse autoencoders for interpretability", train it with their transcoders).
An SAE (d_out == d_in, not a transcoder) subtracts b_dec from its input before encoding (Towards
Monosemanticity); a transcoder subtracts its own b_in instead.

Dictionaries work on normalised activations: ``input_scale`` and ``output_scale`` (stored in
cfg.json) multiply raw activations on the way in; ``reconstruct`` undoes them on the way out.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from sparsekit import ops
from sparsekit._util.validate import is_int, positive_int

from .allocation import check_dictionary_memory
from .hub import push_to_hub
from .persistence import save_dictionary
from .registry import Hyperparameter
from .saelens import export_saelens


def _floating_dtype(dtype) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype (torch.float32, torch.float64, ...), got {dtype!r}")
    return dtype


def _device(device):
    if device is None:
        return None
    try:
        return torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device must be a torch.device or a name such as 'cpu' or 'cuda:0', got {device!r}") from None


class SAEOutput(NamedTuple):
    """x_hat [B, d_out] (normalised space), codes (TopKCodes, BatchTopKCodes, SparseCodes or dense [B, n]),
    losses: named scalar terms; the training objective is their sum."""
    x_hat: Tensor
    codes: Any
    losses: dict


def init_parameters(module: nn.Module, n_latents: int, gen: torch.Generator, factory: dict) -> None:
    """Give ``module`` (with d_in, d_out, transcoder set) its parameters for ``n_latents`` latents:
    W_enc [d_in, n], b_enc [n], W_dec [n, d_out], b_dec [d_out] (and b_in [d_in] for a transcoder),
    drawn from ``gen``, plus unit input/output scales. Decoder rows are random on the unit sphere;
    the encoder is the decoder's transpose when shapes allow (Conerly et al. 2024; Gao et al. 2024),
    else a matching-scale random matrix. Used by whole dictionaries and by latent shards alike."""
    W_dec = nn.functional.normalize(torch.randn(n_latents, module.d_out, generator=gen, dtype=torch.float64), dim=-1)
    if module.d_in == module.d_out:
        # contiguous: a clone of the transpose would keep its column-major strides, every encoder
        # call would then copy W_enc ([d_in, n]), and torch's fused Adam mis-updates it.
        W_enc = W_dec.t().contiguous()
    else:
        W_enc = nn.functional.normalize(torch.randn(module.d_in, n_latents, generator=gen, dtype=torch.float64), dim=0)
    module.W_enc = nn.Parameter(W_enc.to(**factory))
    module.b_enc = nn.Parameter(torch.zeros(n_latents, **factory))
    module.W_dec = nn.Parameter(W_dec.to(**factory))
    module.b_dec = nn.Parameter(torch.zeros(module.d_out, **factory))
    if module.transcoder:
        module.b_in = nn.Parameter(torch.zeros(module.d_in, **factory))
    module.input_scale = 1.0
    module.output_scale = 1.0


class SparseDictionary(nn.Module):
    """Base class; subclasses implement ``encode`` and the sparsity loss in ``sparsity_losses``, and
    declare the architecture's facts (``sparsekit.sae.registry``) as class attributes."""

    architecture = "base"
    hyperparameter_specs: tuple[Hyperparameter, ...] = ()
    code_kind = "dense"                    # what encode returns while training: "topk", "batchtopk", "dense"
    batch_by_latent_buffers = 1            # [B, n]-sized tensors one training step holds at once
    trained_by_train = True                # sparsekit.train trains it (registry.trainable)
    parameters_per_latent = 0              # parameters beyond W_enc, b_enc, W_dec (JumpReLU: its threshold)
    saelens_architecture: str | None = None             # SAELens 6.x's name for it (None: no equivalent)
    saelens_transcoder_architecture: str | None = None  # ... and for it as a transcoder
    unit_norm_decoder = False  # subclasses that keep decoder rows at unit norm set this

    def __init__(self, d_in: int, n_latents: int, d_out: int | None = None, transcoder: bool = False,
                 dtype: torch.dtype = torch.float32, device=None, seed: int | None = 0, skip: bool = False):
        super().__init__()
        self.d_in = positive_int("d_in", d_in)
        self.n_latents = positive_int("n_latents", n_latents)
        self.d_out = self.d_in if d_out is None else positive_int("d_out", d_out)
        if not transcoder and self.d_out != self.d_in:
            raise ValueError(f"d_out={self.d_out} differs from d_in={self.d_in}: use sparsekit.Transcoder")
        self.transcoder = bool(transcoder)
        factory = dict(dtype=_floating_dtype(dtype), device=_device(device))
        if seed is not None and (not is_int(seed) or seed < 0):
            raise ValueError(f"seed must be a non-negative int or None, got {seed!r}")
        # validate, then allocate: a size this host or device cannot hold is refused before one byte
        check_dictionary_memory(type(self).__name__, self.d_in, self.n_latents, self.d_out, self.transcoder,
                                skip is True and self.transcoder, type(self).parameters_per_latent, factory["dtype"],
                                factory["device"])
        gen = torch.Generator(device="cpu")
        if seed is not None:
            gen.manual_seed(seed)
        init_parameters(self, self.n_latents, gen, factory)
        if not isinstance(skip, bool):
            raise ValueError(f"skip must be True or False, got {skip!r}")
        if skip and not self.transcoder:
            raise ValueError("skip=True adds a path from the input to the output: it applies to transcoders only")
        self.skip = skip
        # Where this dictionary came from (model, hook, dataset, tokens trained, ...): filled by whoever
        # trains it, written into cfg.json by save() and read back by load(); never needed to run it.
        self.metadata: dict = {}
        if skip:  # starts at zero: the dictionary alone, until training finds a linear part worth taking
            self.W_skip = nn.Parameter(torch.zeros(self.d_in, self.d_out, **factory))

    # --- configuration ----------------------------------------------------------------------

    def hyperparameters(self) -> dict:
        """Architecture-specific constructor arguments (k, l1_coeff, ...), as hyperparameter_specs lists them."""
        return {spec.name: getattr(self, spec.name) for spec in self.hyperparameter_specs}

    def inference_thresholds(self) -> Tensor | None:
        """Per-latent thresholds [n] (float64) an exported copy encodes with, None for
        architectures without them (see sparsekit.sae.saelens)."""
        return None

    def config(self) -> dict:
        """Everything needed to rebuild this dictionary (cfg.json)."""
        return {"architecture": self.architecture, "d_in": self.d_in, "n_latents": self.n_latents,
                "d_out": self.d_out, "transcoder": self.transcoder, "dtype": str(self.W_enc.dtype).split(".")[-1],
                "input_scale": self.input_scale, "output_scale": self.output_scale,
                **({"skip": True} if self.skip else {}), **self.hyperparameters()}

    # --- the forward contract ---------------------------------------------------------------

    def pre_encoder_bias(self) -> Tensor:
        """The bias subtracted from inputs before encoding: b_dec for an SAE, b_in for a transcoder."""
        return self.b_in if self.transcoder else self.b_dec

    def encoder_input(self, x: Tensor) -> Tensor:
        """x [B, d_in] minus the pre-encoder bias."""
        return x - self.pre_encoder_bias()

    def encoder_bias(self, latents: Tensor | None = None) -> Tensor:
        """b_enc - pre_encoder_bias @ W_enc [n] (or only the given latents [m] -> [m]): encoding x
        with it equals encoding x - pre_bias with b_enc. Folding the pre-encoder bias in keeps the
        input out of autograd: its gradient becomes a GEMV instead of a [B, d] gradient through the
        encoder (a whole GEMM for dense encoders)."""
        if latents is None:
            return self.b_enc - self.pre_encoder_bias() @ self.W_enc
        return self.b_enc[latents] - self.pre_encoder_bias() @ self.W_enc[:, latents]

    def encode(self, x: Tensor):
        raise NotImplementedError

    def loss_codes(self, x: Tensor):
        """The codes ``forward`` computes its losses from: ``encode(x)`` unless a dictionary has a
        faster form for training (ReLUSAE: sparse codes when they are sparse)."""
        return self.encode(x)

    def decode(self, codes) -> Tensor:
        """Codes -> x_hat [B, d_out]: TopK and BatchTopK codes decode sparsely, dense codes by GEMM."""
        if isinstance(codes, ops.TopKCodes):
            return ops.sparse_decode(codes.values, codes.indices, self.W_dec, self.b_dec)
        if isinstance(codes, (ops.BatchTopKCodes, ops.SparseCodes)):
            return ops.sparse_decode_coo(codes.values, codes.rows, codes.cols, self.W_dec, self.b_dec,
                                         self._coo_batch_size(codes))
        return torch.addmm(self.b_dec, codes, self.W_dec)

    def _coo_batch_size(self, codes) -> int:
        """The batch size B of COO codes: carried by SparseCodes, B*k / k for BatchTopKCodes."""
        if isinstance(codes, ops.SparseCodes):
            return codes.batch_size
        return codes.values.shape[0] // self._batchtopk_k()

    def _batchtopk_k(self) -> int:
        raise TypeError(f"{type(self).__name__} does not produce BatchTopK codes")

    def sparsity_losses(self, codes, x: Tensor) -> dict:
        """Named sparsity penalty terms for a batch (none by default)."""
        return {}

    def forward(self, x: Tensor, y: Tensor | None = None) -> SAEOutput:
        """x [B, d_in] (normalised) -> SAEOutput. The target is y for a transcoder, x otherwise.

        losses["mse"] = mean over the batch of ||target - x_hat||^2 summed over features.
        """
        if self.transcoder and y is None:
            raise ValueError("a transcoder needs its target y [B, d_out]")
        return self.output_from_codes(self.loss_codes(x), x, y)

    def output_from_codes(self, codes, x: Tensor, y: Tensor | None = None) -> SAEOutput:
        """``forward``'s output and losses from codes already computed for x."""
        target = y if self.transcoder else x
        x_hat = self.output(codes, x)
        losses = {"mse": (x_hat - target).pow(2).sum(-1).mean(), **self.sparsity_losses(codes, x)}
        return SAEOutput(x_hat, codes, losses)

    def output(self, codes, x: Tensor) -> Tensor:
        """The prediction [B, d_out] from codes and the input x [B, d_in] they encode: ``decode(codes)``,
        plus x @ W_skip for a skip transcoder."""
        x_hat = self.decode(codes)
        return torch.addmm(x_hat, x, self.W_skip) if self.skip else x_hat

    def dense_codes(self, codes) -> Tensor:
        """Any codes as a dense [B, n] tensor (for analysis)."""
        if isinstance(codes, ops.TopKCodes):
            dense = codes.values.new_zeros(codes.values.shape[0], self.n_latents)
            return dense.scatter(1, codes.indices, codes.values)
        if isinstance(codes, (ops.BatchTopKCodes, ops.SparseCodes)):
            dense = codes.values.new_zeros(self._coo_batch_size(codes), self.n_latents)
            return dense.index_put((codes.rows, codes.cols), codes.values, accumulate=True)
        return codes

    def fire_counts(self, codes) -> Tensor:
        """How many rows of the batch activated each latent: [n] int64."""
        if isinstance(codes, ops.TopKCodes):
            active = codes.indices[codes.values > 0]
        elif isinstance(codes, (ops.BatchTopKCodes, ops.SparseCodes)):
            active = codes.cols[codes.values > 0]
        else:
            return (codes > 0).sum(0)
        return torch.bincount(active, minlength=self.n_latents)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Raw activations in, raw reconstruction out: scale, encode, decode, unscale. Always the
        inference path (eval mode for the call: a BatchTopK dictionary uses its threshold)."""
        was_training = self.training
        self.eval()
        try:
            scaled = x * self.input_scale
            x_hat = self.output(self.encode(scaled), scaled)
        finally:
            self.train(was_training)
        return x_hat / self.output_scale

    # --- training-time constraints ----------------------------------------------------------

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Project out of each decoder row's gradient its component along the row (unit-norm
        decoders only; call between backward and the optimizer step)."""
        if not self.unit_norm_decoder or self.W_dec.grad is None:
            return
        ops.remove_parallel_rows_(self.W_dec.grad, self.W_dec)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale decoder rows to unit norm (unit-norm decoders only; call after each step)."""
        if self.unit_norm_decoder:
            ops.normalize_rows_(self.W_dec)

    # --- initialisation ---------------------------------------------------------------------

    @torch.no_grad()
    def init_decoder_bias(self, sample: Tensor, method: str = "geometric_median", y: Tensor | None = None) -> None:
        """Set b_dec (and b_in for a transcoder) from a sample of normalised activations.

        method: "mean", "geometric_median" (Weiszfeld iterations; Towards Monosemanticity) or "zeros".
        A transcoder's b_dec comes from its targets y, b_in from its inputs.
        """
        center = {"mean": lambda t: t.mean(0), "geometric_median": geometric_median,
                  "zeros": lambda t: torch.zeros_like(t[0])}
        if method not in center:
            raise ValueError(f"method must be one of {', '.join(center)}, got {method!r}")
        if self.transcoder:
            if y is None:
                raise ValueError("a transcoder's b_dec is initialised from targets: pass y")
            self.b_in.copy_(center[method](sample.to(self.b_in)))
            self.b_dec.copy_(center[method](y.to(self.b_dec)))
        else:
            self.b_dec.copy_(center[method](sample.to(self.b_dec)))

    # --- persistence ------------------------------------------------------------------------

    def save(self, directory) -> Path:
        """Write sae.safetensors + cfg.json into directory (created if missing)."""
        return save_dictionary(self, directory)

    def export_saelens(self, directory, hook_name: str | None = None, metadata: dict | None = None) -> Path:
        """Write SAELens 6.x's layout: sae_weights.safetensors + cfg.json (see sparsekit.sae.saelens);
        hook_name defaults to self.metadata["hook"]."""
        return export_saelens(self, directory, metadata=metadata, hook_name=hook_name)

    def push_to_hub(self, repo_id: str, **kwargs):
        """Upload what save() writes to the Hugging Face Hub repo ``repo_id`` (see sparsekit.sae.hub.push_to_hub)."""
        return push_to_hub(self, repo_id, **kwargs)


def geometric_median(points: Tensor, iterations: int = 100, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances. [N, d] -> [d]."""
    points = points.double()
    median = points.mean(0)
    for _ in range(iterations):
        weights = 1.0 / (points - median).norm(dim=-1).clamp_min(1e-12)
        update = (weights[:, None] * points).sum(0) / weights.sum()
        if (update - median).norm() <= tol * (1 + median.norm()):
            median = update
            break
        median = update
    return median

