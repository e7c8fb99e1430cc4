"""How much of a language model's behaviour a dictionary keeps: CE loss recovered, KL, FVU, L0.

    metrics = lm_splice_metrics(model, eval_tokens, "blocks.3.hook_resid_post", sae)
    metrics = lm_splice_metrics(model, eval_tokens, "blocks.3.hook_mlp_out", transcoder,
                                input_hook="blocks.3.ln2.hook_normalized")
    both = evaluate_splices(model, eval_tokens, {"sae": Splice(sae, "blocks.3.hook_mlp_out"),
                                                 "transcoder": Splice(tc, "blocks.3.hook_mlp_out",
                                                                      "blocks.3.ln2.hook_normalized")})

Per batch of contexts: one clean pass (records every hook the dictionaries read, and the clean
log-probabilities); one zero-ablated pass per distinct hook (the activation there set to 0); one
spliced pass per dictionary (the activation at ``hook`` replaced by the dictionary's reconstruction,
or for a transcoder by its prediction from the clean activation at ``input_hook``, which runs before
``hook`` and so is the same in the spliced pass). Every intervened pass restarts at the block of its
hook from the clean ``blocks.L.hook_resid_pre`` (``start_at_layer``; the blocks before it are
unchanged by the intervention). Position 0 (BOS) and every special token (EOS, pad, ... anywhere:
``special_ids``) are left clean in both interventions and out of FVU/L0, as they were excluded from
training; losses are next-token cross-entropies over the predictions made at
positions 1..T-2 (the ones an intervention can change).
CE loss recovered = (L_zero - L_splice) / (L_zero - L_clean) (``sparsekit.loss_recovered``);
KL = mean over those positions of KL(clean || spliced) in nats; kl_zero the same for zero-ablation.

Every result also carries the names SAELens's evals use for the same quantities (``SAELENS_NAMES``:
``ce_loss_score`` = ce_recovered, ``ce_loss_with_sae`` = ce_splice, ``ce_loss_without_sae`` = ce_clean,
``ce_loss_with_ablation`` = ce_zero, ``kl_div_with_sae`` = kl, ``kl_div_with_ablation`` = kl_zero,
``explained_variance`` = 1 - fvu) and its ``kl_div_score`` = (kl_zero - kl) / kl_zero. SAELens averages
explained variance per batch; here it is over all evaluated tokens at once.
"""
from __future__ import annotations

import re
from typing import Mapping, NamedTuple

import torch
from torch import Tensor

from sparsekit.activations.store import check_contexts, check_hooks, flatten_positions, resolve_special_ids
from sparsekit.activations.text import kept_positions
from sparsekit.sae.base import SparseDictionary

from .splice import loss_recovered

_BLOCK = re.compile(r"^blocks\.(\d+)\.")


SAELENS_NAMES = {"ce_loss_score": "ce_recovered", "ce_loss_with_sae": "ce_splice", "ce_loss_without_sae": "ce_clean",
                 "ce_loss_with_ablation": "ce_zero", "kl_div_with_sae": "kl", "kl_div_with_ablation": "kl_zero"}


def with_saelens_names(metrics: dict) -> dict:
    """metrics (evaluate_splices's keys) plus the same values under SAELens's eval names, kl_div_score
    and explained_variance."""
    named = {alias: metrics[ours] for alias, ours in SAELENS_NAMES.items() if ours in metrics}
    if "kl" in metrics and "kl_zero" in metrics:
        named["kl_div_score"] = (metrics["kl_zero"] - metrics["kl"]) / metrics["kl_zero"] if metrics["kl_zero"] else float("nan")
    if "fvu" in metrics:
        named["explained_variance"] = 1.0 - metrics["fvu"]
    return {**metrics, **named}


class Splice(NamedTuple):
    """One dictionary to evaluate: it replaces the activation at ``hook``; a transcoder reads ``input_hook``."""
    sae: SparseDictionary
    hook: str
    input_hook: str | None = None


def _reconstruct(sae: SparseDictionary, x: Tensor) -> Tensor:
    """x [b, pos, ...] -> the dictionary's output [b, pos, d_out] (eval mode, scales applied)."""
    flat = flatten_positions(x)
    out = sae.reconstruct(flat.reshape(-1, flat.shape[-1]).to(sae.W_enc.dtype))
    return out.reshape(flat.shape[0], flat.shape[1], -1).to(x.dtype)


def _next_token_losses(log_probs: Tensor, tokens: Tensor) -> Tensor:
    """log_probs [b, T-2, vocab] of the predictions at positions 1..T-2 -> per-token CE [b, T-2]."""
    return -log_probs.gather(-1, tokens[:, 2:, None])[..., 0]


def restart_layer(model, hook: str) -> int | None:
    """The block whose clean ``hook_resid_pre`` an intervention at ``hook`` can restart from (None: the
    embedding; shortformer models, whose blocks also need the positional embedding, always start there)."""
    match = _BLOCK.match(hook)
    if match is None or getattr(model.cfg, "positional_embedding_type", "") == "shortformer":
        return None
    return int(match.group(1))


def _check_splices(model, splices) -> dict[str, Splice]:
    if not isinstance(splices, Mapping) or not splices:
        raise ValueError("splices must be a non-empty dict {name: Splice(sae, hook, input_hook)}")
    checked = {}
    for name, spec in splices.items():
        if not isinstance(spec, tuple) or not 2 <= len(spec) <= 3:
            raise ValueError(f"splices[{name!r}] must be Splice(sae, hook, input_hook=None), got {type(spec).__name__}")
        spec = Splice(*spec)
        if not isinstance(spec.sae, SparseDictionary):
            raise ValueError(f"sae must be a sparsekit dictionary, got {type(spec.sae).__name__}")
        if spec.sae.transcoder != (spec.input_hook is not None):
            raise ValueError("a transcoder needs input_hook (the activation it reads); an SAE takes none")
        check_hooks(model, spec.hook if spec.input_hook is None else (spec.input_hook, spec.hook))
        if spec.input_hook is not None:
            layers = [_BLOCK.match(h) for h in (spec.input_hook, spec.hook)]
            if all(layers) and int(layers[0].group(1)) > int(layers[1].group(1)):
                raise ValueError(f"splices[{name!r}]: input_hook {spec.input_hook} must run before hook {spec.hook} "
                                 f"(the transcoder reads the clean activation there)")
        checked[str(name)] = spec
    return checked


class _Totals:
    """Running sums of one dictionary's reconstruction statistics over the evaluation tokens."""

    def __init__(self, n_latents: int):
        self.sq_err = 0.0
        self.target_sum = self.target_sq = None
        self.fires = torch.zeros(n_latents, dtype=torch.int64)
        self.rows = 0

    def add(self, sae: SparseDictionary, x: Tensor, target: Tensor) -> None:
        flat_x = x.reshape(-1, x.shape[-1]).to(sae.W_enc.dtype)
        flat_t = target.reshape(-1, target.shape[-1]).double()
        scaled = flat_x * sae.input_scale
        codes = sae.encode(scaled)
        prediction = sae.output(codes, scaled).double() / sae.output_scale
        self.sq_err += float((prediction - flat_t).pow(2).sum())
        self.target_sum = flat_t.sum(0) if self.target_sum is None else self.target_sum + flat_t.sum(0)
        self.target_sq = flat_t.pow(2).sum(0) if self.target_sq is None else self.target_sq + flat_t.pow(2).sum(0)
        self.fires += sae.fire_counts(codes).cpu()
        self.rows += flat_x.shape[0]

    def metrics(self) -> dict:
        from sparsekit.training.metrics import DENSE_THRESHOLD
        variance = float((self.target_sq - self.target_sum.pow(2) / self.rows).sum())
        density = self.fires.double() / self.rows
        return {"fvu": self.sq_err / max(variance, 1e-30), "l0": float(self.fires.sum()) / self.rows,
                "dead_frac": float((self.fires == 0).double().mean()),
                "dense_frac": float((density > DENSE_THRESHOLD).double().mean()), "tokens": self.rows}


@torch.no_grad()
def evaluate_splices(model, tokens: Tensor, splices: Mapping[str, Splice], batch_contexts: int = 8,
                     progress: bool = False, special_ids="tokenizer") -> dict[str, dict]:
    """Every dictionary's metrics on the same tokens [N, T] (contexts starting with BOS; T >= 3), with
    the clean pass and each hook's zero-ablated pass shared: {name: {"ce_clean", "ce_splice", "ce_zero",
    "ce_recovered", "kl", "kl_zero", "fvu", "l0", "dead_frac", "dense_frac", "tokens"} and the same under
    SAELens's names (``with_saelens_names``)}.

    splices: {name: Splice(sae, hook, input_hook=None)} (see the module docstring). Activations
    [b, pos, heads, d_head] are flattened. progress: a tqdm bar with tokens/s. special_ids: positions
    holding these tokens (default "tokenizer": the model's tokenizer's BOS, EOS, pad, ...; None: position
    0 only) are left clean in every intervention and left out of FVU, L0 and dead counts, as they are
    left out of training (``sparsekit.activations.store``).
    """
    tokens = check_contexts(tokens)
    if tokens.shape[1] < 3:
        raise ValueError(f"tokens must have >= 3 positions (BOS, one spliced input, one target), got {tokens.shape[1]}")
    if not isinstance(batch_contexts, int) or batch_contexts < 1:
        raise ValueError(f"batch_contexts must be a positive int, got {batch_contexts!r}")
    splices = _check_splices(model, splices)
    special = resolve_special_ids(model, special_ids)
    zero_hooks = sorted({s.hook for s in splices.values()})
    starts = {hook: restart_layer(model, hook) for hook in zero_hooks}
    recorded = sorted({n for s in splices.values() for n in (s.hook, s.input_hook) if n is not None} |
                      {f"blocks.{layer}.hook_resid_pre" for layer in starts.values() if layer is not None})
    was_training = {name: s.sae.training for name, s in splices.items()}
    for s in splices.values():
        s.sae.eval()
    ce = {"clean": 0.0, **{f"zero:{h}": 0.0 for h in zero_hooks}, **{f"splice:{n}": 0.0 for n in splices}}
    kl = {**{f"zero:{h}": 0.0 for h in zero_hooks}, **{f"splice:{n}": 0.0 for n in splices}}
    stats = {name: _Totals(s.sae.n_latents) for name, s in splices.items()}
    count = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=tokens.numel(), unit="tok", unit_scale=True, dynamic_ncols=True,
                   desc=f"CE/KL ({len(splices)} dictionaries, {len(zero_hooks)} zero-ablations)")
    try:
        for first in range(0, tokens.shape[0], batch_contexts):
            batch = tokens[first:first + batch_contexts].to(model.cfg.device)
            keep = kept_positions(batch, special).to(batch.device)  # [b, T]: False at 0 and special tokens
            seen: dict[str, Tensor] = {}

            def record(act, hook):
                seen[hook.name] = act.detach()

            clean_logits = model.run_with_hooks(batch, fwd_hooks=[(n, record) for n in recorded])
            clean_lp = clean_logits[:, 1:-1].log_softmax(-1)
            del clean_logits
            clean_p = clean_lp.exp()
            ce["clean"] += float(_next_token_losses(clean_lp, batch).sum())

            def intervened(key: str, hook: str, replace) -> None:
                """One pass with ``replace(act) -> new`` at hook (position 0 and special tokens kept clean):
                its CE and KL."""
                def swap(act, hook):
                    new = replace(act).reshape(act.shape)
                    clean = ~keep.reshape(*keep.shape, *([1] * (act.ndim - 2)))
                    return torch.where(clean, act, new)

                layer = starts[hook]
                if layer is None:
                    logits = model.run_with_hooks(batch, fwd_hooks=[(hook, swap)])
                else:
                    logits = model.run_with_hooks(seen[f"blocks.{layer}.hook_resid_pre"], start_at_layer=layer,
                                                  fwd_hooks=[(hook, swap)])
                lp = logits[:, 1:-1].log_softmax(-1)
                del logits
                ce[key] += float(_next_token_losses(lp, batch).sum())
                kl[key] += float((clean_p * (clean_lp - lp)).sum())

            for hook in zero_hooks:
                intervened(f"zero:{hook}", hook, torch.zeros_like)
            for name, s in splices.items():
                source = seen[s.input_hook] if s.input_hook is not None else None
                intervened(f"splice:{name}", s.hook,
                           lambda act, s=s, source=source: _reconstruct(s.sae, act if source is None else source))
                stats[name].add(s.sae, flatten_positions(seen[s.input_hook or s.hook])[keep],
                                flatten_positions(seen[s.hook])[keep])
            count += batch.shape[0] * (batch.shape[1] - 2)
            if bar is not None:
                bar.update(batch.numel())
    finally:
        for name, s in splices.items():
            s.sae.train(was_training[name])
        if bar is not None:
            bar.close()
    results = {}
    for name, s in splices.items():
        clean, spliced, zero = ce["clean"] / count, ce[f"splice:{name}"] / count, ce[f"zero:{s.hook}"] / count
        results[name] = with_saelens_names({
            "ce_clean": clean, "ce_splice": spliced, "ce_zero": zero, "ce_recovered": loss_recovered(clean, spliced, zero),
            "kl": kl[f"splice:{name}"] / count, "kl_zero": kl[f"zero:{s.hook}"] / count, **stats[name].metrics()})
    return results


def lm_splice_metrics(model, tokens: Tensor, hook: str, sae: SparseDictionary, input_hook: str | None = None,
                      batch_contexts: int = 8, progress: bool = False, special_ids="tokenizer") -> dict:
    """One dictionary's clean / spliced / zero-ablated CE, ce_recovered, kl, kl_zero, fvu, l0, dead_frac,
    dense_frac on tokens [N, T] (contexts starting with BOS; T >= 3); see ``evaluate_splices``.

    hook: where the activation is replaced. SAE: its input is that activation. Transcoder: pass
    input_hook (its input; must run before hook).
    """
    if not isinstance(sae, SparseDictionary):
        raise ValueError(f"sae must be a sparsekit dictionary, got {type(sae).__name__}")
    return evaluate_splices(model, tokens, {"sae": Splice(sae, hook, input_hook)}, batch_contexts, progress,
                            special_ids)["sae"]
