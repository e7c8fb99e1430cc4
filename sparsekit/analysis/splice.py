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
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn

from sparsekit.sae.base import SparseDictionary


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


def _apply(sae: SparseDictionary, x: Tensor, width: int, what: str) -> Tensor:
    """sae.reconstruct on x [..., width] -> [..., d_out] in x's dtype and device."""
    if x.ndim == 0 or x.shape[-1] != width:
        got = x.shape[-1] if x.ndim else "a scalar"
        raise ValueError(f"{what} has width {got}, but the dictionary's d_in is {width}")
    leading = x.shape[:-1]
    if x.numel() == 0:
        return x.new_zeros(*leading, sae.d_out)
    flat = x.reshape(-1, width).to(device=sae.W_enc.device, dtype=sae.W_enc.dtype)
    return sae.reconstruct(flat).reshape(*leading, sae.d_out).to(device=x.device, dtype=x.dtype)


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
def splice(model: nn.Module, hook_name: str, sae: SparseDictionary,
           input_hook: str | None = None) -> Iterator[nn.Module]:
    """Within the block, the output of module ``hook_name`` is replaced by the dictionary's output.

    SAE: output [..., d_in] -> ``sae.reconstruct(output)`` (input_scale applied, output_scale undone).
    Transcoder: ``input_hook`` names the module whose output x [..., d_in] is the transcoder's input;
    the output of ``hook_name`` [..., d_out] is replaced by ``sae.reconstruct(x)`` from the x of the
    same forward pass (so ``input_hook`` must run before ``hook_name``). Yields the model.
    """
    target = _module(model, hook_name)
    if sae.transcoder and input_hook is None:
        raise ValueError("a transcoder predicts hook_name's output from another activation: pass input_hook")
    if not sae.transcoder and input_hook is not None:
        raise ValueError(f"input_hook={input_hook!r} is for transcoders; an SAE reconstructs hook_name's own output")

    if not sae.transcoder:
        def replace(module, args, output):
            return _apply(sae, _tensor_output(output, hook_name), sae.d_in, f"the activation at {hook_name!r}")

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
        y_hat = _apply(sae, x, sae.d_in, f"the transcoder input at {input_hook!r}")
        if output.shape[:-1] != y_hat.shape[:-1] or output.shape[-1] != sae.d_out:
            raise ValueError(f"the activation at {hook_name!r} has shape {tuple(output.shape)}, but the transcoder "
                             f"predicts {tuple(y_hat.shape)} (d_out={sae.d_out}) from {input_hook!r}")
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
