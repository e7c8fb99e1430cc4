"""How much of a language model's behaviour a dictionary keeps: CE loss recovered, KL, FVU, L0.

    metrics = lm_splice_metrics(model, eval_tokens, "blocks.3.hook_resid_post", sae)
    metrics = lm_splice_metrics(model, eval_tokens, "blocks.3.hook_mlp_out", transcoder,
                                input_hook="blocks.3.ln2.hook_normalized")

Three forward passes per batch of contexts: clean; spliced (the activation at ``hook`` replaced by
the dictionary's reconstruction, or for a transcoder by its prediction from ``input_hook``); and
zero-ablated (the activation at ``hook`` set to 0). Position 0 (BOS) is left clean in both
interventions, as it was excluded from training; losses are next-token cross-entropies over the
predictions made at positions 1..T-2 (the ones an intervention can change).
CE loss recovered = (L_zero - L_splice) / (L_zero - L_clean) (``sparsekit.loss_recovered``);
KL = mean over those positions of KL(clean || spliced) in nats; kl_zero the same for zero-ablation.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..sae.base import SparseDictionary
from ..splice import loss_recovered
from .store import _check_contexts, check_hooks, flatten_positions


def _reconstruct(sae: SparseDictionary, x: Tensor) -> Tensor:
    """x [b, pos, ...] -> the dictionary's output [b, pos, d_out] (eval mode, scales applied)."""
    flat = flatten_positions(x)
    out = sae.reconstruct(flat.reshape(-1, flat.shape[-1]).to(sae.W_enc.dtype))
    return out.reshape(flat.shape[0], flat.shape[1], -1).to(x.dtype)


def _next_token_losses(logits: Tensor, tokens: Tensor) -> Tensor:
    """Per-token CE [b, T-2] of the predictions at positions 1..T-2."""
    log_probs = logits[:, 1:-1].log_softmax(-1)
    return -log_probs.gather(-1, tokens[:, 2:, None])[..., 0]


@torch.no_grad()
def lm_splice_metrics(model, tokens: Tensor, hook: str, sae: SparseDictionary, input_hook: str | None = None,
                      batch_contexts: int = 8) -> dict:
    """Clean / spliced / zero-ablated CE, ce_recovered, kl, kl_zero, and the dictionary's fvu, l0, dead_frac,
    dense_frac on the same tokens [N, T] (contexts starting with BOS; T >= 3).

    hook: where the activation is replaced. SAE: its input is that activation. Transcoder: pass
    input_hook (its input; must run before hook). Activations [b, pos, heads, d_head] are flattened.
    """
    from ..train import DENSE_THRESHOLD

    tokens = _check_contexts(tokens)
    if tokens.shape[1] < 3:
        raise ValueError(f"tokens must have >= 3 positions (BOS, one spliced input, one target), got {tokens.shape[1]}")
    if not isinstance(sae, SparseDictionary):
        raise ValueError(f"sae must be a sparsekit dictionary, got {type(sae).__name__}")
    if sae.transcoder != (input_hook is not None):
        raise ValueError("a transcoder needs input_hook (the activation it reads); an SAE takes none")
    names = check_hooks(model, hook if input_hook is None else (input_hook, hook))
    was_training = sae.training
    sae.eval()
    totals = {"clean": 0.0, "splice": 0.0, "zero": 0.0, "kl": 0.0, "kl_zero": 0.0}
    count = 0
    sq_err = 0.0
    target_sum = target_sq = None
    fires = torch.zeros(sae.n_latents, dtype=torch.int64)
    rows = 0
    try:
        for start in range(0, tokens.shape[0], batch_contexts):
            batch = tokens[start:start + batch_contexts].to(model.cfg.device)
            seen: dict[str, Tensor] = {}

            def record(act, hook):
                seen[hook.name] = act.detach()

            clean_logits = model.run_with_hooks(batch, fwd_hooks=[(n, record) for n in names])
            x = flatten_positions(seen[names[0]])[:, 1:]
            target = flatten_positions(seen[names[-1]])[:, 1:]

            def replace(act, hook):
                source = seen_now[input_hook] if input_hook is not None else act
                new = _reconstruct(sae, source).reshape(act.shape[0], act.shape[1], *act.shape[2:])
                new[:, 0] = act[:, 0]
                return new

            seen_now: dict[str, Tensor] = {}
            hooks = [(hook, replace)]
            if input_hook is not None:
                hooks.insert(0, (input_hook, lambda act, hook: seen_now.__setitem__(hook.name, act.detach())))
            splice_logits = model.run_with_hooks(batch, fwd_hooks=hooks)

            def zero(act, hook):
                new = torch.zeros_like(act)
                new[:, 0] = act[:, 0]
                return new

            zero_logits = model.run_with_hooks(batch, fwd_hooks=[(hook, zero)])
            for name, logits in (("clean", clean_logits), ("splice", splice_logits), ("zero", zero_logits)):
                totals[name] += float(_next_token_losses(logits, batch).sum())
            clean_lp = clean_logits[:, 1:-1].log_softmax(-1)
            for name, logits in (("kl", splice_logits), ("kl_zero", zero_logits)):
                totals[name] += float((clean_lp.exp() * (clean_lp - logits[:, 1:-1].log_softmax(-1))).sum())
            count += batch.shape[0] * (batch.shape[1] - 2)

            flat_x = x.reshape(-1, x.shape[-1]).to(sae.W_enc.dtype)
            flat_t = target.reshape(-1, target.shape[-1]).double()
            codes = sae.encode(flat_x * sae.input_scale)
            prediction = sae.decode(codes).double() / sae.output_scale
            sq_err += float((prediction - flat_t).pow(2).sum())
            target_sum = flat_t.sum(0) if target_sum is None else target_sum + flat_t.sum(0)
            target_sq = flat_t.pow(2).sum(0) if target_sq is None else target_sq + flat_t.pow(2).sum(0)
            fires += sae.fire_counts(codes).cpu()
            rows += flat_x.shape[0]
    finally:
        sae.train(was_training)
    variance = float((target_sq - target_sum.pow(2) / rows).sum())
    density = fires.double() / rows
    ce = {name: totals[name] / count for name in ("clean", "splice", "zero")}
    return {"ce_clean": ce["clean"], "ce_splice": ce["splice"], "ce_zero": ce["zero"],
            "ce_recovered": loss_recovered(ce["clean"], ce["splice"], ce["zero"]), "kl": totals["kl"] / count,
            "kl_zero": totals["kl_zero"] / count,
            "fvu": sq_err / max(variance, 1e-30), "l0": float(fires.sum()) / rows,
            "dead_frac": float((fires == 0).double().mean()), "dense_frac": float((density > DENSE_THRESHOLD).double().mean()),
            "tokens": rows}
