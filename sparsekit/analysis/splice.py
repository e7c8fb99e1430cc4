"""Splice a dictionary into a model: replace the activation at a module with its reconstruction.

    with splice(model, "blocks.3.hook_resid_post", sae):
        loss_splice = loss_fn(model(tokens))
    with zero_ablate(model, "blocks.3.hook_resid_post"):
        loss_zero = loss_fn(model(tokens))
    ce_recovered = loss_recovered(loss_clean, loss_splice, loss_zero)

A hook name is a dotted module path (``model.get_submodule``), so any nn.Module works:
TransformerLens ``HookPoint``s, the MNIST MLPs, ``nn.Sequential`` indices ("1"). The module's
output, a tensor [..., d], is flattened to [N, d] for the dictionary and restored to its shape,
dtype and device. Hooks are removed on exit, exceptions included.

Error term and interventions (Marks et al. 2024's "SAE error" node; SAELens's ``use_error_term``):

    with splice(model, "blocks.6.hook_resid_post", sae, error_term=True, interventions={12: 8.0, 40: "ablate"}):
        logits = model(tokens)

``error_term=True`` adds back what the dictionary misses, computed from the unmodified activation:
output = reconstruct(x) + (x_true - reconstruct(x)), so the model runs unchanged until an
intervention edits a code. ``interventions`` maps latents to edits of their codes (the dictionary's
normalised code units, the values ``encode`` and the feature reports give):

    value          clamp: the code is set to value at every position, where the latent fired or not
    "ablate"       the code is set to 0 (where it did not fire it already is)
    ("scale", s)   the code is multiplied by s (only where it fired: 0 stays 0)
    ("add", a)     a is added to the code at every position (steering; see sparsekit.analysis.steering)

Codes are computed with the dictionary's own ``encode``, edited (``edit_codes``) and decoded with its
own ``output``. A TopK dictionary's codes list only its k largest latents per row, so an edited latent
outside them is added as an extra entry (k + m entries): "clamp" and "add" act where the latent did
not fire, as on the dense codes of every other architecture; the other latents keep their codes, the
top-k is not re-selected. Decoding is affine in the codes, so with the error term an edit moves the
output by exactly (new - old) @ W_dec[latents] / output_scale (tested), whatever the architecture.
"""
from __future__ import annotations

import math
import numbers
import operator
from contextlib import ExitStack, contextmanager
from typing import Iterator, NamedTuple

import torch
from torch import Tensor, nn

from sparsekit import ops
from sparsekit.sae.base import SparseDictionary

_SPELLING = "a finite number (clamp), 'ablate', ('scale', s) or ('add', a)"


class Edit(NamedTuple):
    """One checked intervention: latent, rule ("clamp", "ablate", "scale", "add") and its number."""
    latent: int
    rule: str
    value: float


def check_latent(name: str, latent, n_latents: int) -> int:
    if isinstance(latent, bool) or not hasattr(latent, "__index__"):
        raise ValueError(f"{name} must be an int latent index, got {latent!r}")
    try:
        index = operator.index(latent)
    except TypeError:  # a tensor with more than one element, a float tensor
        raise ValueError(f"{name} must be an int latent index, got {latent!r}") from None
    if not 0 <= index < n_latents:
        raise ValueError(f"{name}={index} is out of range: the dictionary has n_latents={n_latents}")
    return index


def check_finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_interventions(interventions, n_latents: int) -> list[Edit]:
    """{latent: value | "ablate" | ("scale", s) | ("add", a)} -> [Edit], in the dict's order.

    Latents must be ints in [0, n_latents), each named once; numbers finite. None or {} -> []."""
    if interventions is None:
        return []
    if not isinstance(interventions, dict):
        raise ValueError(f"interventions must be a dict {{latent: {_SPELLING}}}, got {type(interventions).__name__}")
    edits, seen = [], set()
    for latent, spec in interventions.items():
        index = check_latent(f"interventions key {latent!r}", latent, n_latents)
        if index in seen:
            raise ValueError(f"interventions names latent {index} twice")
        seen.add(index)
        name = f"interventions[{index}]"
        if isinstance(spec, str):
            if spec != "ablate":
                raise ValueError(f"{name} must be {_SPELLING}, got {spec!r}")
            edits.append(Edit(index, "ablate", 0.0))
        elif isinstance(spec, tuple):
            if len(spec) != 2 or spec[0] not in ("scale", "add"):
                raise ValueError(f"{name} must be {_SPELLING}, got {spec!r}")
            edits.append(Edit(index, spec[0], check_finite(f"{name}[1] ({spec[0]})", spec[1])))
        elif isinstance(spec, numbers.Real) and not isinstance(spec, bool):
            edits.append(Edit(index, "clamp", check_finite(name, spec)))
        else:
            raise ValueError(f"{name} must be {_SPELLING}, got {spec!r}")
    return edits


def _latent_codes(sae: SparseDictionary, codes, latents: Tensor) -> Tensor:
    """The code values of the given latents: codes of any kind for B rows, latents [m] int64 -> [B, m]
    (0 where a latent did not fire)."""
    if isinstance(codes, ops.TopKCodes):
        hits = codes.indices.unsqueeze(-1) == latents  # [B, k, m]
        return (codes.values.unsqueeze(-1) * hits).sum(1)
    if isinstance(codes, (ops.BatchTopKCodes, ops.SparseCodes)):
        column = torch.full((sae.n_latents,), -1, dtype=torch.long, device=latents.device)
        column[latents] = torch.arange(len(latents), device=latents.device)
        position = column[codes.cols]
        keep = position >= 0
        out = codes.values.new_zeros(sae._coo_batch_size(codes), len(latents))
        return out.index_put((codes.rows[keep], position[keep]), codes.values[keep], accumulate=True)
    return codes[:, latents]


def edit_codes(sae: SparseDictionary, codes, interventions: dict) -> tuple:
    """Apply interventions ({latent: ...}, see the module docstring) to a dictionary's codes for B rows.

    Returns (edited codes, old [B, m], new [B, m]) with m the number of edited latents, in the
    interventions' order. Dense codes stay dense [B, n]; TopK codes [B, k] become TopK codes
    [B, k + m] (edited latents' old entries zeroed, one new entry per latent and row, values sorted
    descending again); COO codes become SparseCodes (edited latents' old entries dropped, new ones
    added, rows kept in row-major order). ``sae.decode`` of the result is decode(codes) +
    (new - old) @ W_dec[latents]."""
    return _edit(sae, codes, check_interventions(interventions, sae.n_latents))


def _edit(sae: SparseDictionary, codes, edits: list[Edit]) -> tuple:
    """edit_codes with checked edits."""
    values = codes.values if isinstance(codes, tuple) else codes
    latents = torch.tensor([e.latent for e in edits], dtype=torch.long, device=values.device)
    old = _latent_codes(sae, codes, latents)
    if not edits:
        return codes, old, old
    new = torch.stack([_rule(e, old[:, j]) for j, e in enumerate(edits)], dim=1)
    if isinstance(codes, ops.TopKCodes):
        kept = codes.values.masked_fill(torch.isin(codes.indices, latents), 0)
        merged_values = torch.cat([kept, new], dim=1)
        merged_indices = torch.cat([codes.indices, latents.expand(new.shape[0], -1)], dim=1)
        order = merged_values.argsort(dim=1, descending=True, stable=True)
        edited = ops.TopKCodes(merged_values.gather(1, order), merged_indices.gather(1, order))
    elif isinstance(codes, (ops.BatchTopKCodes, ops.SparseCodes)):
        keep = ~torch.isin(codes.cols, latents)
        batch = new.shape[0]
        rows = torch.cat([codes.rows[keep], torch.arange(batch, device=latents.device).repeat_interleave(len(edits))])
        cols = torch.cat([codes.cols[keep], latents.repeat(batch)])
        vals = torch.cat([codes.values[keep], new.reshape(-1)])
        order = rows.argsort(stable=True)
        edited = ops.SparseCodes(vals[order], rows[order], cols[order], batch)
    else:
        edited = codes.clone()
        edited[:, latents] = new
    return edited, old, new


def _rule(edit: Edit, old: Tensor) -> Tensor:
    """A latent's new codes [B] from its old ones [B]."""
    if edit.rule == "clamp":
        return torch.full_like(old, edit.value)
    if edit.rule == "ablate":
        return torch.zeros_like(old)
    if edit.rule == "scale":
        return old * edit.value
    return old + edit.value


def _module(model: nn.Module, hook_name: str, argument: str = "hook_name") -> nn.Module:
    try:
        return model.get_submodule(hook_name)
    except AttributeError:
        raise ValueError(f"{argument}={hook_name!r} names no module of {type(model).__name__}") from None


def _tensor_output(output, hook_name: str) -> Tensor:
    if not isinstance(output, Tensor):
        raise ValueError(f"module {hook_name!r} returns {type(output).__name__}, expected a Tensor: "
                         f"hook a module whose output is the activation itself")
    return output


def _apply(sae: SparseDictionary, x: Tensor, width: int, what: str, edits: list[Edit],
           target: Tensor | None) -> Tensor:
    """The dictionary's output for x [..., width] -> [..., d_out] in x's dtype and device.

    edits: interventions on the codes. target: the true activation [..., d_out] for the error term
    (None: no error term); the result is then target + (edited - clean reconstruction), which is the
    target itself when nothing is edited, and gradients reach the target through it."""
    if x.ndim == 0 or x.shape[-1] != width:
        got = x.shape[-1] if x.ndim else "a scalar"
        raise ValueError(f"{what} has width {got}, but the dictionary's d_in is {width}")
    leading = x.shape[:-1]
    out_dtype, out_device = (x.dtype, x.device) if target is None else (target.dtype, target.device)
    if x.numel() == 0:
        return x.new_zeros(*leading, sae.d_out) if target is None else target
    flat = x.reshape(-1, width).to(device=sae.W_enc.device, dtype=sae.W_enc.dtype)
    if not edits and target is None:
        return sae.reconstruct(flat).reshape(*leading, sae.d_out).to(device=out_device, dtype=out_dtype)
    with torch.no_grad():  # what reconstruct does, with the codes edited on the way
        scaled = flat * sae.input_scale
        codes = sae.encode(scaled)
        clean = sae.output(codes, scaled)
        edited = sae.output(_edit(sae, codes, edits)[0], scaled) if edits else clean
        if target is None:
            return (edited / sae.output_scale).reshape(*leading, sae.d_out).to(device=out_device, dtype=out_dtype)
        # reconstruct + (target - reconstruct) with the edit, written so that no edit leaves target exact
        change = ((edited - clean) / sae.output_scale).reshape(*leading, sae.d_out)
    return target + change.to(device=out_device, dtype=out_dtype)


@contextmanager
def _hooked(*registrations) -> Iterator[None]:
    """Register forward hooks [(module, hook), ...]; remove them all on exit, whatever happens."""
    with ExitStack() as stack:
        for module, hook in registrations:
            stack.callback(module.register_forward_hook(hook).remove)
        yield


@contextmanager
def _eval_mode(sae: SparseDictionary) -> Iterator[None]:
    # Splicing is evaluation: a BatchTopK dictionary must use its inference threshold (and not
    # update it), whatever mode its owner left it in.
    was_training = sae.training
    sae.eval()
    try:
        yield
    finally:
        sae.train(was_training)


@contextmanager
def splice(model: nn.Module, hook_name: str, sae: SparseDictionary, input_hook: str | None = None,
           error_term: bool = False, interventions: dict | None = None) -> Iterator[nn.Module]:
    """Within the block, the output of module ``hook_name`` is replaced by the dictionary's output.

    SAE: output [..., d_in] -> ``sae.reconstruct(output)`` (input_scale applied, output_scale undone).
    Transcoder: ``input_hook`` names the module whose output x [..., d_in] is the transcoder's input;
    the output of ``hook_name`` [..., d_out] is replaced by ``sae.reconstruct(x)`` from the x of the
    same forward pass (so ``input_hook`` must run before ``hook_name``). Yields the model.

    error_term: add back (true output - reconstruction), so the model is unchanged but for the edits.
    interventions: {latent: value | "ablate" | ("scale", s) | ("add", a)}, applied to the codes
    before decoding (see the module docstring).
    """
    target = _module(model, hook_name)
    if sae.transcoder and input_hook is None:
        raise ValueError("a transcoder predicts hook_name's output from another activation: pass input_hook")
    if not sae.transcoder and input_hook is not None:
        raise ValueError(f"input_hook={input_hook!r} is for transcoders; an SAE reconstructs hook_name's own output")
    if not isinstance(error_term, bool):
        raise ValueError(f"error_term must be True or False, got {error_term!r}")
    edits = check_interventions(interventions, sae.n_latents)

    if not sae.transcoder:
        def replace(module, args, output):
            output = _tensor_output(output, hook_name)
            return _apply(sae, output, sae.d_in, f"the activation at {hook_name!r}", edits,
                          output if error_term else None)

        with _eval_mode(sae), _hooked((target, replace)):
            yield model
        return

    source = _module(model, input_hook, "input_hook")
    captured: list[Tensor] = []

    def capture(module, args, output):
        captured[:] = [_tensor_output(output, input_hook)]

    def predict(module, args, output):
        output = _tensor_output(output, hook_name)
        if not captured:
            raise RuntimeError(f"module {hook_name!r} ran before input_hook={input_hook!r} in this forward pass: "
                               f"the transcoder's input must come first")
        x = captured.pop()
        if output.shape[:-1] != x.shape[:-1] or output.shape[-1] != sae.d_out:
            raise ValueError(f"the activation at {hook_name!r} has shape {tuple(output.shape)}, but the transcoder "
                             f"predicts {(*x.shape[:-1], sae.d_out)} (d_out={sae.d_out}) from {input_hook!r}")
        y_hat = _apply(sae, x, sae.d_in, f"the transcoder input at {input_hook!r}", edits,
                       output if error_term else None)
        return y_hat.to(device=output.device, dtype=output.dtype)

    with _eval_mode(sae), _hooked((source, capture), (target, predict)):
        yield model


@contextmanager
def zero_ablate(model: nn.Module, hook_name: str) -> Iterator[nn.Module]:
    """Within the block, the output of module ``hook_name`` is replaced by zeros. Yields the model."""
    target = _module(model, hook_name)

    def zeros(module, args, output):
        return torch.zeros_like(_tensor_output(output, hook_name))

    with _hooked((target, zeros)):
        yield model


def loss_recovered(clean: float, spliced: float, zero: float) -> float:
    """(L_zero - L_splice) / (L_zero - L_clean): 1 when splicing costs nothing, 0 when it is as bad
    as zero-ablating. The same formula gives accuracy recovered from accuracies."""
    clean, spliced, zero = (float(v) for v in (clean, spliced, zero))
    if zero == clean:
        raise ValueError(f"zero-ablated and clean values are equal ({zero}): the ratio is undefined")
    return (zero - spliced) / (zero - clean)
