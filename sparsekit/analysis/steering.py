"""Steering a language model with one dictionary feature, and reading what the feature promotes.

    with steer(model, "blocks.20.hook_resid_post", sae, latent=123, strength=8.0):
        logits = model(tokens)                      # every position: activation + 8 * W_dec[123] / output_scale
    tokens = promoted_tokens(model, sae, "blocks.20.hook_resid_post", 123, top=10)   # [(id, text, logit effect)]
    steering_effect(model, contexts, "blocks.20.hook_resid_post", sae, 123, strengths=(-8.0, 0.0, 8.0))
    # {-8.0: mean log p(promoted tokens), 0.0: ..., 8.0: ...}

``steer`` is ``splice(..., error_term=True, interventions={latent: ("add", strength)})``: the error
term keeps the model exact except for the edit, and adding ``strength`` to the latent's code at
every position moves the activation by strength x the latent's decoder row (divided by the
dictionary's output_scale, in raw units). That is SAELens's and Neuronpedia's steering (the decoder
direction added with a coefficient, whether the feature fired or not); ``strength`` is in the
dictionary's code units, the activations the feature reports show, so "twice the feature's maximum
activation" reads directly. A negative strength pushes the other way. To pin a feature to a value
instead, pass ``interventions={latent: value}`` to splice; ``{latent: ("scale", s)}`` scales it
only where it fired; ``{latent: "ablate"}`` removes it.
"""
from __future__ import annotations

from contextlib import AbstractContextManager

import torch
from torch import Tensor, nn

from sparsekit.activations.store import check_contexts
from sparsekit.analysis.lm_features import residual_directions, token_string
from sparsekit.analysis.splice import check_finite, check_latent, splice
from sparsekit.sae.base import SparseDictionary


def steer(model: nn.Module, hook_name: str, sae: SparseDictionary, latent: int, strength: float,
          input_hook: str | None = None) -> AbstractContextManager[nn.Module]:
    """A context manager: within it, ``latent``'s code is raised by ``strength`` at every position of
    the activation at ``hook_name`` [..., d_out], with the error term kept (see the module docstring).
    Transcoders name their input with ``input_hook``, as in splice."""
    latent = check_latent("latent", latent, sae.n_latents)
    strength = check_finite("strength", strength)
    return splice(model, hook_name, sae, input_hook=input_hook, error_term=True,
                  interventions={latent: ("add", strength)})


@torch.no_grad()
def promoted_tokens(model, sae: SparseDictionary, hook: str, latent: int, top: int = 10) -> list[tuple[int, str, float]]:
    """The ``top`` tokens a feature's decoder direction promotes most through W_U, highest first:
    [(token id, text, logit effect)], read as ``lm_features.logit_effects`` reads them (the direction
    through W_out / W_O where the hook needs it, then W_U). hook: where the dictionary writes (an SAE's
    hook, a transcoder's output hook). Raises ValueError for a hook not written into the residual stream."""
    latent = check_latent("latent", latent, sae.n_latents)
    if isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= model.cfg.d_vocab:
        raise ValueError(f"top must be an int in [1, d_vocab={model.cfg.d_vocab}], got {top!r}")
    direction = residual_directions(model, hook, sae.W_dec.detach()[latent:latent + 1].float())
    if direction is None:
        raise ValueError(f"hook={hook!r}: its output does not enter the residual stream through a known matrix, "
                         f"so the feature has no direct logit effect")
    values, ids = (direction @ model.W_U.detach().float())[0].topk(top)
    return [(int(i), token_string(model, int(i)), float(v)) for i, v in zip(ids, values)]


@torch.no_grad()
def mean_log_prob(model, contexts: Tensor, token_ids, batch_contexts: int = 16) -> float:
    """Mean over contexts [N, T] (position 0, BOS, skipped) and over token_ids [m] of log p(token | prefix)
    under the model as it runs now (inside a splice or steer block, the intervened model)."""
    contexts = check_contexts(contexts)
    ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
    if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= model.cfg.d_vocab:
        raise ValueError(f"token_ids must be non-empty ids in [0, {model.cfg.d_vocab}), got {token_ids!r:.80}")
    total, count = 0.0, 0
    for start in range(0, contexts.shape[0], batch_contexts):
        logits = model(contexts[start:start + batch_contexts])[:, 1:]      # [b, T - 1, d_vocab]
        log_probs = logits.float().log_softmax(-1)[..., ids.to(logits.device)]  # [b, T - 1, m]
        total += float(log_probs.sum())
        count += log_probs.numel()
    return total / count


def steering_effect(model, contexts: Tensor, hook_name: str, sae: SparseDictionary, latent: int,
                    strengths=(-1.0, 0.0, 1.0), top: int = 10, input_hook: str | None = None) -> dict:
    """{strength: mean log-probability of the feature's ``top`` promoted tokens} over contexts [N, T],
    steering with each strength (``mean_log_prob`` under ``steer``). Strength 0 is the unsteered model
    (the error term makes it exact). A transcoder writes at hook_name and reads input_hook."""
    ids = [token for token, _, _ in promoted_tokens(model, sae, hook_name, latent, top)]
    effect = {}
    for strength in strengths:
        with steer(model, hook_name, sae, latent, strength, input_hook=input_hook):
            effect[float(strength)] = mean_log_prob(model, contexts, ids)
    return effect
