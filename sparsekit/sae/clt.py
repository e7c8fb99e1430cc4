"""Cross-layer transcoders (CLTs): each feature reads one layer's MLP input and writes to that
layer's MLP output and to every later covered one (Anthropic, Ameisen et al. 2025, "Circuit Tracing:
Revealing Computational Graphs in Language Models"; Lindsey et al. 2025, "On the Biology of a Large
Language Model"). Per-layer transcoders (PLTs) are the L = 1 case, or ``reach=1`` over L layers.

Over L consecutive layers (``first_layer`` .. ``first_layer + L - 1``), with n latents per layer:

    f_l     = TopK_k((x_l - b_in[l]) @ W_enc_l + b_enc_l), ReLU'd        x_l [B, d_in], f_l [B, n]
    y_hat_t = b_dec[t] + sum_{l <= t < l + reach} f_l @ W_dec_{l -> t}   y_hat_t [B, d_out]

The activation is TopK per layer (Gao et al. 2024), not the JumpReLU + tanh sparsity penalty of
Ameisen et al. 2025: TopK fixes L0 per layer, needs no penalty schedule, and runs on sparsekit's
fused TopK encoder and sparse decoder (TopK CLTs are also trained elsewhere, e.g. by EleutherAI's
clt-training, a sparsify fork, and crosscode's TopkCrossLayerTranscoder).

The stacked decoder: layer l's decoders to its ``span(l) = min(reach, L - l)`` targets are one
matrix W_dec_l [n, span(l) * d_out] (row i = latent i's decoder to target l, then l + 1, ...), so a
code of layer l writes all its targets in ONE sparse decode (``sparsekit.ops.sparse_decode``): L
decodes per step, not L(L + 1)/2. Decoder rows (the whole stacked row) are kept at unit norm, as
TopK's are.

Storage (sae.safetensors, read back by ``sparsekit.load``; cfg.json's d_in, n_latents, d_out are
checked against W_enc's and W_dec's axes before anything is built):

    W_enc [d_in, L * n]      column block l is layer l's encoder (latent j of the CLT is layer j // n's)
    b_enc [L * n]            b_in [L, d_in]           b_dec [L, d_out]
    W_dec [n * S, d_out]     S = sum_l span(l); layer l's rows n * (S_<l) ... viewed as W_dec_l
    layer_input_scale [L], layer_output_scale [L]     per-layer normalisation (E||x_l||^2 = d_in)

n_latents in cfg.json is the total L * n; ``input_scale`` / ``output_scale`` stay 1.0 (every layer
has its own scale above). Training: ``sparsekit.training.clt.train_clt``; the objective is the sum
over target layers of each layer's MSE on normalised targets.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from sparsekit import ops
from sparsekit._util.validate import is_int, positive_int

from .allocation import check_bytes
from .persistence import save_dictionary
from .registry import Hyperparameter, register

SEND_TO_TRAIN_CLT = ("a cross-layer transcoder spans several layers: build it with n_layers= "
                     "(CrossLayerTranscoder) and train it with `sparsekit train-clt`")


class CLTOutput(NamedTuple):
    """y_hat [B, L, d_out] (normalised space); codes: one TopKCodes per layer (values, indices [B, k]);
    layer_mse [L]: each target layer's mean over the batch of the squared error summed over features;
    losses: {"mse": layer_mse.sum()}, the training objective."""
    y_hat: Tensor
    codes: list
    layer_mse: Tensor
    losses: dict


@register
class CrossLayerTranscoder(nn.Module):
    """A TopK cross-layer transcoder over n_layers consecutive layers (see the module docstring).

    d_in, d_out: the width of each layer's input and target; n_latents: latents over all layers
    (n_layers * latents per layer); k_per_layer: active latents per token in each layer; reach:
    how many targets a layer's features write, starting at their own (None: every later covered
    layer; 1: side-by-side per-layer transcoders); first_layer: the model layer of layer 0 (a label
    for hooks and reports).
    """

    architecture = "clt"
    hyperparameter_specs = (
        Hyperparameter("n_layers", int, "consecutive layers covered", flag=False),
        Hyperparameter("k_per_layer", int, "active latents per token in each layer", flag=False),
        Hyperparameter("reach", int, "targets each layer's features write (None: all later layers)",
                       required=False, flag=False),
        Hyperparameter("first_layer", int, "the model layer of the first covered layer", required=False,
                       default=0, flag=False))
    code_kind = "topk"
    batch_by_latent_buffers = 1
    parameters_per_latent = 0
    saelens_architecture = None
    saelens_transcoder_architecture = None
    trained_by_train = False  # its own trainer: sparsekit.training.clt.train_clt
    unit_norm_decoder = True
    transcoder = True
    skip = False

    def __init__(self, d_in: int, n_latents: int, d_out: int | None = None, n_layers: int | None = None,
                 k_per_layer: int | None = None, reach: int | None = None, first_layer: int = 0,
                 transcoder: bool = True, dtype: torch.dtype = torch.float32, device=None, seed: int | None = 0):
        super().__init__()
        if n_layers is None:
            raise ValueError(SEND_TO_TRAIN_CLT)
        if transcoder is not True:
            raise ValueError(f"transcoder must be True for a cross-layer transcoder, got {transcoder!r}")
        self.d_in = positive_int("d_in", d_in)
        self.d_out = self.d_in if d_out is None else positive_int("d_out", d_out)
        self.n_layers = positive_int("n_layers", n_layers)
        self.n_latents = positive_int("n_latents", n_latents)
        if self.n_latents % self.n_layers:
            raise ValueError(f"n_latents={n_latents} must be a multiple of n_layers={n_layers} (latents per layer "
                             f"times layers)")
        self.latents_per_layer = self.n_latents // self.n_layers
        if k_per_layer is None:
            raise ValueError("k_per_layer is required: active latents per token in each layer")
        self.k_per_layer = positive_int("k_per_layer", k_per_layer)
        if self.k_per_layer > self.latents_per_layer:
            raise ValueError(f"k_per_layer={k_per_layer} exceeds the {self.latents_per_layer} latents per layer")
        self.reach = None if reach is None else positive_int("reach", reach)
        if not is_int(first_layer) or first_layer < 0:
            raise ValueError(f"first_layer must be a non-negative int, got {first_layer!r}")
        self.first_layer = first_layer
        if seed is not None and (not is_int(seed) or seed < 0):
            raise ValueError(f"seed must be a non-negative int or None, got {seed!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating torch.dtype (torch.float32, torch.float64, ...), got {dtype!r}")
        try:
            factory = dict(dtype=dtype, device=None if device is None else torch.device(device))
        except (RuntimeError, TypeError, ValueError):
            raise ValueError(f"device must be a torch.device or a name such as 'cpu' or 'cuda:0', got {device!r}") from None
        L, n = self.n_layers, self.latents_per_layer
        self.spans = tuple(min(self.reach or L, L - layer) for layer in range(L))
        # row offsets of each layer's block in W_dec [n * sum(spans), d_out]
        self.row_starts = tuple(n * sum(self.spans[:layer]) for layer in range(L + 1))
        rows = self.row_starts[-1]
        item = torch.empty((), dtype=factory["dtype"], device="meta").element_size()
        params = self.d_in * L * n + L * n + rows * self.d_out + L * (self.d_in + self.d_out)
        check_bytes(params * item + 8 * (params + max(rows * self.d_out, self.d_in * L * n)), factory["device"],
                    f"CrossLayerTranscoder(d_in={self.d_in}, n_latents={self.n_latents}, n_layers={L})")
        gen = torch.Generator(device="cpu")
        if seed is not None:
            gen.manual_seed(seed)
        W_dec = self._blocks_to_rows(torch.randn(n, rows // n * self.d_out, generator=gen, dtype=torch.float64))
        W_enc = nn.functional.normalize(torch.randn(self.d_in, L * n, generator=gen, dtype=torch.float64), dim=0)
        self.W_enc = nn.Parameter(W_enc.to(**factory))
        self.b_enc = nn.Parameter(torch.zeros(L * n, **factory))
        self.W_dec = nn.Parameter(W_dec.to(**factory))
        self.b_in = nn.Parameter(torch.zeros(L, self.d_in, **factory))
        self.b_dec = nn.Parameter(torch.zeros(L, self.d_out, **factory))
        self.register_buffer("layer_input_scale", torch.ones(L, **factory))
        self.register_buffer("layer_output_scale", torch.ones(L, **factory))
        self.input_scale = 1.0
        self.output_scale = 1.0
        self.metadata: dict = {}

    def _blocks_to_rows(self, W: Tensor) -> Tensor:
        """A random [n, sum(spans) * d_out] draw -> W_dec's layout [n * sum(spans), d_out], each
        layer's stacked rows [n, span * d_out] at unit norm."""
        n, d = self.latents_per_layer, self.d_out
        pieces, col = [], 0
        for span in self.spans:
            block = nn.functional.normalize(W[:, col:col + span * d], dim=-1)
            pieces.append(block.reshape(n * span, d))
            col += span * d
        return torch.cat(pieces)

    # --- configuration ----------------------------------------------------------------------

    def hyperparameters(self) -> dict:
        return {"n_layers": self.n_layers, "k_per_layer": self.k_per_layer, "reach": self.reach,
                "first_layer": self.first_layer}

    def config(self) -> dict:
        """Everything needed to rebuild this CLT (cfg.json)."""
        return {"architecture": self.architecture, "d_in": self.d_in, "n_latents": self.n_latents,
                "d_out": self.d_out, "transcoder": True, "dtype": str(self.W_enc.dtype).split(".")[-1],
                "input_scale": self.input_scale, "output_scale": self.output_scale, **self.hyperparameters()}

    def layers(self) -> list[int]:
        """The model layers covered, in order."""
        return list(range(self.first_layer, self.first_layer + self.n_layers))

    # --- the pieces ---------------------------------------------------------------------------

    def encoder(self, layer: int) -> Tensor:
        """Layer ``layer``'s encoder W_enc_l [d_in, n] (a column block of W_enc)."""
        n = self.latents_per_layer
        return self.W_enc[:, layer * n:(layer + 1) * n]

    def decoder(self, layer: int) -> Tensor:
        """Layer ``layer``'s stacked decoder W_dec_l [n, span(l) * d_out]: a view of W_dec, no copy."""
        start, stop = self.row_starts[layer], self.row_starts[layer + 1]
        return self.W_dec[start:stop].view(self.latents_per_layer, self.spans[layer] * self.d_out)

    def decoder_to(self, layer: int, target: int) -> Tensor:
        """W_dec_{layer -> target} [n, d_out]; target in layer .. layer + span(layer) - 1 (CLT indices)."""
        offset = target - layer
        if not 0 <= offset < self.spans[layer]:
            raise ValueError(f"layer {layer}'s features write targets {layer}..{layer + self.spans[layer] - 1}, "
                             f"not {target}")
        return self.decoder(layer)[:, offset * self.d_out:(offset + 1) * self.d_out]

    # --- the forward contract ---------------------------------------------------------------

    def _check_stack(self, name: str, t: Tensor, width: int) -> None:
        if not isinstance(t, Tensor) or t.dim() != 3 or t.shape[1:] != (self.n_layers, width):
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be [B, n_layers={self.n_layers}, {width}], got {got}")

    def encode(self, x: Tensor) -> list[ops.TopKCodes]:
        """x [B, L, d_in] (normalised) -> one TopKCodes(values [B, k], indices [B, k]) per layer,
        indices within the layer (0 .. n - 1)."""
        self._check_stack("x", x, self.d_in)
        n = self.latents_per_layer
        # one split per parameter: its backward writes the gradient in one pass, where L slices would
        # each add a zero-filled gradient of the whole parameter
        encoders, biases = self.W_enc.split(n, dim=1), self.b_enc.split(n)
        return [ops.topk_encode(x[:, layer], encoders[layer], biases[layer], self.k_per_layer,
                                pre_bias=self.b_in[layer]) for layer in range(self.n_layers)]

    def decode(self, codes: list) -> Tensor:
        """One TopKCodes per layer -> y_hat [B, L, d_out]: layer l's codes decoded once through its
        stacked decoder into all its span(l) targets, then summed per target, plus b_dec."""
        if not isinstance(codes, (list, tuple)) or len(codes) != self.n_layers:
            raise ValueError(f"codes must be a list of {self.n_layers} TopKCodes (one per layer)")
        batch, n, L = codes[0].values.shape[0], self.latents_per_layer, self.n_layers
        blocks = self.W_dec.split([n * span for span in self.spans])  # one split: see encode
        y_hat = self.b_dec.expand(batch, L, self.d_out)
        for layer, (values, indices) in enumerate(codes):
            span = self.spans[layer]
            zero = self.W_dec.new_zeros(span * self.d_out)
            decoder = blocks[layer].view(n, span * self.d_out)
            written = ops.sparse_decode(values, indices, decoder, zero)  # [B, span * d_out]
            # out of place: padded to all L targets (in-place slice updates cost a full copy each in backward)
            y_hat = y_hat + nn.functional.pad(written.view(batch, span, self.d_out), (0, 0, layer, L - layer - span))
        return y_hat

    def forward(self, x: Tensor, y: Tensor | None = None) -> CLTOutput:
        """x [B, L, d_in], y [B, L, d_out] (normalised) -> CLTOutput; losses["mse"] sums the layers' MSEs."""
        if y is None:
            raise ValueError("a cross-layer transcoder needs its targets y [B, n_layers, d_out]")
        self._check_stack("y", y, self.d_out)
        codes = self.encode(x)
        y_hat = self.decode(codes)
        layer_mse = (y_hat - y).pow(2).sum(-1).mean(0)
        return CLTOutput(y_hat, codes, layer_mse, {"mse": layer_mse.sum()})

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Raw inputs x [B, L, d_in] -> raw predicted MLP outputs [B, L, d_out]."""
        scaled = x * self.layer_input_scale[:, None].to(x.dtype) * self.input_scale
        y_hat = self.decode(self.encode(scaled.to(self.W_enc.dtype)))
        return y_hat / (self.layer_output_scale[:, None] * self.output_scale)

    def fire_counts(self, codes: list) -> Tensor:
        """How many rows of the batch activated each latent: [n_latents] int64, layer-major."""
        n = self.latents_per_layer
        counts = [torch.bincount(c.indices[c.values > 0], minlength=n) for c in codes]
        return torch.cat(counts)

    # --- training-time constraints ----------------------------------------------------------

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Project out of each stacked decoder row's gradient its component along the row."""
        if self.W_dec.grad is None:
            return
        n = self.latents_per_layer
        for layer in range(self.n_layers):
            start, stop = self.row_starts[layer], self.row_starts[layer + 1]
            width = self.spans[layer] * self.d_out
            ops.remove_parallel_rows_(self.W_dec.grad[start:stop].view(n, width), self.W_dec[start:stop].view(n, width))

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale each latent's stacked decoder row (all its targets together) to unit norm."""
        for layer in range(self.n_layers):
            ops.normalize_rows_(self.decoder(layer).detach())

    @torch.no_grad()
    def init_from_sample(self, x: Tensor, y: Tensor) -> None:
        """Per-layer scales (E||x_l||^2 = d_in, E||y_l||^2 = d_out) from raw x [r, L, d_in], y [r, L, d_out],
        then b_in and b_dec from the means of the scaled sample."""
        self._check_stack("x", x, self.d_in)
        self._check_stack("y", y, self.d_out)
        for scale, sample in ((self.layer_input_scale, x), (self.layer_output_scale, y)):
            mean_sq = sample.double().pow(2).sum(-1).mean(0)  # [L]
            scale.copy_(torch.where(mean_sq > 0, (sample.shape[-1] / mean_sq).sqrt(), torch.ones_like(mean_sq)))
        self.b_in.copy_((x.double() * self.layer_input_scale.double()[:, None]).mean(0))
        self.b_dec.copy_((y.double() * self.layer_output_scale.double()[:, None]).mean(0))

    def scale_batch(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Raw x [B, L, d_in], y [B, L, d_out] -> the normalised pair, in the parameters' dtype and device."""
        factory = dict(dtype=self.W_enc.dtype, device=self.W_enc.device)
        return (x.to(**factory) * self.layer_input_scale[:, None] * self.input_scale,
                y.to(**factory) * self.layer_output_scale[:, None] * self.output_scale)

    # --- persistence ------------------------------------------------------------------------

    def save(self, directory) -> Path:
        """Write sae.safetensors + cfg.json (``sparsekit.load`` reads it back)."""
        return save_dictionary(self, directory)


def reference_forward(clt: CrossLayerTranscoder, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """The spec, in plain PyTorch from the CLT's parameters: dense TopK codes per layer (stable
    descending sort: ties to the lower index), then each target layer t summed over its source layers
    l <= t with its own [n, d_out] decoder block. x [B, L, d_in], y [B, L, d_out] -> (y_hat
    [B, L, d_out], layer_mse [L])."""
    n, k, L = clt.latents_per_layer, clt.k_per_layer, clt.n_layers
    dense = []
    for layer in range(L):
        W = clt.W_enc[:, layer * n:(layer + 1) * n]
        pre = (x[:, layer] - clt.b_in[layer]) @ W + clt.b_enc[layer * n:(layer + 1) * n]
        kept = torch.sort(pre.detach(), dim=-1, descending=True, stable=True).indices[:, :k]
        mask = torch.zeros_like(pre).scatter(1, kept, 1.0)
        dense.append(torch.relu(pre) * mask)
    outputs = []
    for target in range(L):
        out = clt.b_dec[target].expand(x.shape[0], clt.d_out)
        for layer in range(target + 1):
            offset = target - layer
            if offset >= clt.spans[layer]:
                continue
            start = clt.row_starts[layer]
            block = clt.W_dec[start:clt.row_starts[layer + 1]].view(n, clt.spans[layer], clt.d_out)[:, offset]
            out = out + dense[layer] @ block
        outputs.append(out)
    y_hat = torch.stack(outputs, 1)
    return y_hat, (y_hat - y).pow(2).sum(-1).mean(0)
