"""The two things a feature report asks of a language model, for TransformerLens and Hugging Face
models alike: "tokens -> activations at a hook" and "decoder direction -> logit effect".

    lm = as_lm(hooked_transformer)                      # LensModel: hook names, W_out / W_O, W_U
    lm = as_lm(AutoModelForCausalLM..., tokenizer)      # HFModel: module paths, lm_head
    x = lm.activations(tokens, hook)                    # [b * (T - 1), d] float32, positions 1..T-1
    logits = lm.unembed(lm.residual_directions(hook, sae.W_dec))   # [m, vocab] (None: no direct path)

``lm_features`` (top contexts, histograms, logit effects, ``feature_report``) reads models only
through this seam, so one report and one dashboard serve both kinds.

Activations: ``LensModel`` runs ``run_with_cache`` up to the last block the hook needs
(``activations.store.hook_activations``); ``HFModel`` captures the module path with the forward hooks
the activation cache for transformers models uses (``activations.hf.HFModuleSource``: ``:input`` for
what a module receives, the pass stopped once the module has run). Both give every position but 0,
context-major, as float32 on the CPU.

Logit effects read a direction as direct logit attribution does: its path into the residual stream,
then the unembedding, linearly. ``LensModel``: ``W_out`` for ``blocks.L.mlp.hook_post``, ``W_O`` for
``blocks.L.attn.hook_z``, identity for any d_model-wide hook, then ``W_U`` (the final norm's scale is
already folded into ``W_U`` by ``fold_ln``). ``HFModel``: identity for a hidden_size-wide path; the
weight of the linear layer whose input the path names (``...mlp.down_proj:input``, ``...o_proj:input``:
the analogue of W_out and W_O; ``nn.Linear`` or GPT-2's ``Conv1D``); then the final norm's
elementwise ``weight`` times ``lm_head.weight`` (the same fold done here). What is approximated, in
both: the final norm's per-token normalisation (dividing by the RMS or standard deviation, and
LayerNorm's mean removal) is ignored, and so are the norm's and the unembedding's biases; a path that
is d_model wide but not the residual stream (a norm's output, e.g. ``...mlp:input``) is read as if it
were. A final norm with no ``weight`` (or one scaled by ``1 + weight``, as Gemma's) is not folded
exactly: ``HFModel.logit_path`` says which modules were used.
"""
from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from sparsekit.activations.hf import HFModuleSource, find_modules, split_side
from sparsekit.activations.store import check_hooks, hook_activations, stop_layer

_MLP_POST = re.compile(r"^blocks\.(\d+)\.mlp\.hook_post$")
_HOOK_Z = re.compile(r"^blocks\.(\d+)\.attn\.hook_z$")
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_norm", "norm_f")


def _decode(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id]) if tokenizer is not None else f"<{token_id}>"


class LensModel:
    """A TransformerLens ``HookedTransformer`` seen through the seam (hooks: its hook names)."""

    def __init__(self, model):
        if getattr(model, "hook_dict", None) is None:
            raise ValueError(f"model must be a TransformerLens HookedTransformer, got {type(model).__name__}")
        self.model = model
        self.tokenizer = getattr(model, "tokenizer", None)
        self.name = str(getattr(model.cfg, "model_name", ""))

    def check_hook(self, hook: str) -> None:
        check_hooks(self.model, hook)

    def activations(self, tokens: Tensor, hook: str) -> Tensor:
        """tokens [b, T] -> the activations at hook [b * (T - 1), d] float32 CPU (position 0 dropped;
        hook_z's heads flattened)."""
        return hook_activations(self.model, tokens, [hook], stop_layer(self.model, [hook]))[0]

    def residual_directions(self, hook: str, directions: Tensor) -> Tensor | None:
        """Directions [m, d] at hook as they enter the residual stream [m, d_model] (None: no known matrix)."""
        mlp, z = _MLP_POST.match(hook), _HOOK_Z.match(hook)
        if mlp:
            return directions @ self.model.blocks[int(mlp.group(1))].mlp.W_out.detach().float()
        if z:
            W_O = self.model.blocks[int(z.group(1))].attn.W_O.detach().float()  # [heads, d_head, d_model]
            return directions @ W_O.reshape(-1, W_O.shape[-1])
        return directions if directions.shape[1] == self.model.cfg.d_model else None

    def unembed(self, residual: Tensor) -> Tensor:
        """Residual directions [m, d_model] -> their direct logit effects [m, d_vocab] (W_U, no b_U)."""
        return residual @ self.model.W_U.detach().float()

    def token_string(self, token_id: int) -> str:
        return _decode(self.tokenizer, token_id)

    def to_tokens(self, text: str) -> Tensor:
        return self.model.to_tokens(text, prepend_bos=True)


class HFModel:
    """A Hugging Face causal LM (``AutoModelForCausalLM``) and its tokenizer, seen through the seam
    (hooks: module paths as in ``activations.hf``; a glob matching several modules concatenates them).
    The tokenizer gives token strings and BOS; without one tokens read ``<id>``."""

    def __init__(self, model: nn.Module, tokenizer=None):
        if not isinstance(model, nn.Module) or not callable(getattr(model, "get_output_embeddings", None)):
            raise ValueError(f"model must be a transformers causal LM (with get_output_embeddings), got "
                             f"{type(model).__name__}")
        self.lm_head = model.get_output_embeddings()
        if self.lm_head is None or getattr(self.lm_head, "weight", None) is None:
            raise ValueError(f"model {type(model).__name__} has no output embedding (lm_head): not a causal LM")
        self.model, self.tokenizer = model.eval(), tokenizer
        config = getattr(model, "config", None)
        self.name = str(getattr(config, "name_or_path", "") or type(model).__name__)
        self.d_model = self.lm_head.weight.shape[1]
        self.final_norm, self._final_norm_name = self._find_final_norm()
        self._sources: dict[str, HFModuleSource] = {}

    def _find_final_norm(self) -> tuple[nn.Module | None, str | None]:
        """The norm just before lm_head: a module of the base model named one of FINAL_NORM_NAMES at
        depth 1 or 2 (model.norm, transformer.ln_f, model.decoder.final_layer_norm) with a d_model weight."""
        for name, module in self.model.named_modules():
            parts = name.split(".")
            weight = getattr(module, "weight", None)
            if 2 <= len(parts) <= 3 and parts[-1] in FINAL_NORM_NAMES and isinstance(weight, Tensor) \
                    and weight.shape == (self.d_model,):
                return module, name
        return None, None

    @property
    def logit_path(self) -> str:
        """The modules a direction is read through, e.g. 'model.norm weight, then lm_head'."""
        head = next((n for n, m in self.model.named_modules() if m is self.lm_head), "lm_head")
        return (f"{self._final_norm_name} weight, then {head}" if self.final_norm is not None
                else f"{head} (no final norm weight found)")

    def _source(self, hook: str) -> HFModuleSource:
        if hook not in self._sources:
            placeholder = torch.zeros(1, 2, dtype=torch.int64)  # the source is only asked for activations()
            self._sources[hook] = HFModuleSource(self.model, placeholder, hook, exclude_bos=True)
        return self._sources[hook]

    def check_hook(self, hook: str) -> None:
        self._source(hook)

    def activations(self, tokens: Tensor, hook: str) -> Tensor:
        """tokens [b, T] -> the activations at the module path [b * (T - 1), d] float32 CPU (position 0
        dropped), from forward hooks; the forward pass stops once the module has run."""
        return self._source(hook).activations(tokens.long())[0].float().cpu()

    def residual_directions(self, hook: str, directions: Tensor) -> Tensor | None:
        """Directions [m, d] at a module path as they enter the residual stream [m, d_model]: through the
        weight of the linear layer whose :input the path names (when it maps d to d_model); else
        themselves when d == d_model; None otherwise (or for a glob matching several modules)."""
        name, side = split_side(hook)
        names = find_modules(self.model, name)
        if len(names) != 1:
            return None
        module = self.model.get_submodule(names[0])
        weight = getattr(module, "weight", None)
        if side == "input" and isinstance(weight, Tensor) and weight.dim() == 2:
            matrix = None
            if isinstance(module, nn.Linear):          # y = x W^T: W [out, in]
                matrix = weight.detach().float().T
            elif type(module).__name__ == "Conv1D":    # transformers' GPT-2 layer: y = x W, W [in, out]
                matrix = weight.detach().float()
            if matrix is not None and matrix.shape == (directions.shape[1], self.d_model):
                return directions @ matrix             # before the width test: o_proj's input may be d_model wide
        return directions if directions.shape[1] == self.d_model else None

    def unembed(self, residual: Tensor) -> Tensor:
        """Residual directions [m, d_model] -> direct logit effects [m, vocab]: (r * final norm weight)
        @ lm_head.weight^T (no biases; see the module docstring for what is approximated)."""
        if self.final_norm is not None:
            residual = residual * self.final_norm.weight.detach().float()
        return residual @ self.lm_head.weight.detach().float().T

    def token_string(self, token_id: int) -> str:
        return _decode(self.tokenizer, token_id)

    def to_tokens(self, text: str) -> Tensor:
        if self.tokenizer is None or self.tokenizer.bos_token_id is None:
            raise ValueError("texts as strings need a tokenizer with a BOS token: pass HFModel(model, tokenizer) "
                             "or token tensors")
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return torch.tensor([[self.tokenizer.bos_token_id, *ids]], dtype=torch.int64)


def as_lm(model, tokenizer=None):
    """A model seen through the seam: a LensModel or HFModel as it is; a HookedTransformer -> LensModel;
    a transformers causal LM -> HFModel(model, tokenizer)."""
    if isinstance(model, (LensModel, HFModel)):
        return model
    if getattr(model, "hook_dict", None) is not None:
        return LensModel(model)
    return HFModel(model, tokenizer)
