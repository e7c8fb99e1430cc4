"""Direct effects between the nodes of a prompt's frozen replacement model: an attribution graph
(Ameisen et al. 2025, "Circuit Tracing", transformer-circuits.pub, "Attribution graphs").

Nodes, in this order: the active features (CLT layer, position, latent), the error nodes (one per
block and position: that MLP output's error term, ``replacement.Replacement.errors``), the token
embeddings (one per position: ``blocks.0.hook_resid_pre``) and the logits of interest at the last
position. With attention patterns and norm scales frozen the replacement is affine in (feature
activations a, errors e, embeddings x0), so each target's value is

    value_t = sum_f A[t, f] + sum_e A[t, e] + sum_p A[t, p] + bias_t          (completeness)

with A[t, s] = a_s * d value_t / d a_s for a feature s (its activation times the derivative through
its decoder output; other features held at their values: the *direct* effect), and
A[t, s] = <v_s, d value_t / d v_s> for an error or embedding vector v_s. bias_t collects every bias
(b_dec, b_enc, attention and norm biases): the target's value with all sources at zero. A feature
target's value is its pre-activation (its activation, for an active TopK feature); a logit target's
is the logit minus the mean logit over the vocabulary, as in the paper.

Computed with autograd on B copies of the frozen replacement at once, one copy per target: one
forward and one backward give B rows of A. Feature targets' copies stop after their layer's block.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from sparsekit._util.validate import positive_int
from sparsekit.sae.clt import CrossLayerTranscoder

from .replacement import Replacement, clt_pass, record_prompt

KINDS = ("feature", "error", "embedding", "logit")


@dataclass
class Graph:
    """An attribution graph. adjacency [N, N] float64: adjacency[target, source] = direct effect;
    nodes: one dict per node (kind, layer (model layer; embeddings -1, logits n_layers), position,
    token (the prompt's token there; a logit's: its token), latent (features), activation (features'
    value, errors' and embeddings' vector norm, logits' demeaned value), probability (logits));
    values [N]: each target's value (feature pre-activation, demeaned logit; 0 for sources);
    logit_weights [N]: each logit node's probability, 0 elsewhere; tokens: the prompt's token strings;
    directions [F, d_model]: each feature's summed decoder output (raw scale), for top-token labels;
    unembed [d_model, vocab]."""
    adjacency: Tensor
    nodes: list
    values: Tensor
    logit_weights: Tensor
    tokens: list
    directions: Tensor | None = None
    unembed: Tensor | None = None
    token_text: object = None
    settings: dict = field(default_factory=dict)

    def kind_indices(self, kind: str) -> Tensor:
        return torch.tensor([i for i, node in enumerate(self.nodes) if node["kind"] == kind], dtype=torch.int64)


def token_strings(model, ids) -> list[str]:
    """Token ids -> their text (the model's tokenizer), or "#id" without one."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return [f"#{int(i)}" for i in ids]
    return [tokenizer.decode([int(i)]) for i in ids]


def choose_logits(logits: Tensor, logit_tokens, max_logits: int, logit_prob: float) -> tuple[Tensor, Tensor]:
    """The last position's logits [vocab] -> (token ids [K], probabilities [K]): logit_tokens when
    given, else the most likely tokens until their probabilities sum to logit_prob, at most max_logits."""
    probs = logits.double().softmax(-1)
    if logit_tokens is not None:
        ids = torch.as_tensor(list(logit_tokens), dtype=torch.int64)
        if ids.dim() != 1 or ids.numel() == 0 or bool((ids < 0).any()) or bool((ids >= probs.numel()).any()):
            raise ValueError(f"logit_tokens must be token ids in 0..{probs.numel() - 1}, got {list(logit_tokens)!r}")
        return ids, probs[ids.to(probs.device)].cpu()
    order = probs.argsort(descending=True)[:max_logits]
    cumulative = probs[order].cumsum(0)
    count = int((cumulative < logit_prob).sum()) + 1
    ids = order[:min(count, order.numel())]
    return ids.cpu(), probs[ids].cpu()


def attribute(model, clt: CrossLayerTranscoder, prompt, logit_tokens=None, max_logits: int = 10,
              logit_prob: float = 0.95, batch_size: int = 32, special_ids="tokenizer",
              progress: bool = True) -> Graph:
    """The attribution graph of prompt (text, BOS prepended, or token ids [T] starting with BOS) under
    the CLT's frozen replacement of model: every direct effect into every active feature and every
    logit of interest (logit_tokens, or the most likely next tokens up to logit_prob / max_logits).
    batch_size: targets per forward/backward pass. See the module docstring for the definitions."""
    max_logits = positive_int("max_logits", max_logits)
    batch_size = positive_int("batch_size", batch_size)
    if not (isinstance(logit_prob, (int, float)) and 0 < logit_prob <= 1):
        raise ValueError(f"logit_prob must be in (0, 1], got {logit_prob!r}")
    record = record_prompt(model, clt, prompt, special_ids)
    rep = Replacement(model, clt, record)
    feats = rep.features
    F, M, T = feats.layer.shape[0], model.cfg.n_layers, record.tokens.shape[0]
    logit_ids, logit_probs = choose_logits(record.logits[-1], logit_tokens, max_logits, logit_prob)
    K = logit_ids.shape[0]
    N = F + M * T + T + K
    error_start, embed_start, logit_start = F, F + M * T, F + M * T + T
    adjacency = torch.zeros(N, N, dtype=torch.float64)
    values = torch.zeros(N, dtype=torch.float64)
    acts, errors, resid0 = rep.activations, rep.errors(), record.resid0
    targets = [("feature", i) for i in range(F)] + [("logit", k) for k in range(K)]
    chunks = []
    for kind in ("feature", "logit"):
        mine = [t for t in targets if t[0] == kind]
        chunks += [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
    with clt_pass(clt, progress, len(targets), "target", f"attribution ({N} nodes)") as advance:
        for chunk in chunks:
            B = len(chunk)
            index = torch.tensor([i for _, i in chunk], dtype=torch.int64)
            a = acts.expand(B, F).clone().requires_grad_(True)
            e = errors.expand(B, *errors.shape).clone().requires_grad_(True)
            x0 = resid0.expand(B, *resid0.shape).clone().requires_grad_(True)
            if chunk[0][0] == "feature":
                stop = clt.first_layer + int(feats.layer[index].max()) + 1
                _, captured = rep.forward(a, e, x0, stop_at_layer=stop if stop < M else None)
                value = rep.preactivation(captured, feats.layer[index], feats.position[index], feats.latent[index])
                rows = index
            else:
                logits, _ = rep.forward(a, e, x0)
                last = logits[:, -1]
                ids = logit_ids[index].to(last.device)
                value = last[torch.arange(B, device=last.device), ids] - last.mean(-1)
                rows = logit_start + index
            a_grad, e_grad, x_grad = torch.autograd.grad(value.sum(), (a, e, x0), allow_unused=True)
            with torch.no_grad():
                if a_grad is not None:
                    adjacency[rows, :F] = (a_grad * acts).double().cpu()
                if e_grad is not None:
                    adjacency[rows, error_start:embed_start] = (e_grad * errors).sum(-1).reshape(B, M * T).double().cpu()
                if x_grad is not None:
                    adjacency[rows, embed_start:logit_start] = (x_grad * resid0).sum(-1).double().cpu()
                values[rows] = value.detach().double().cpu()
            advance(B)
    tokens = token_strings(model, record.tokens)
    nodes = []
    for i in range(F):
        layer, pos = int(feats.layer[i]), int(feats.position[i])
        nodes.append({"kind": "feature", "layer": clt.first_layer + layer, "position": pos, "token": tokens[pos],
                      "latent": int(feats.latent[i]), "feature": i, "activation": float(feats.activation[i])})
    norms = errors.norm(dim=-1).double().cpu()
    for m in range(M):
        for pos in range(T):
            nodes.append({"kind": "error", "layer": m, "position": pos, "token": tokens[pos],
                          "covered": bool(clt.first_layer <= m < clt.first_layer + clt.n_layers and record.keep[pos]),
                          "activation": float(norms[m, pos])})
    for pos in range(T):
        nodes.append({"kind": "embedding", "layer": -1, "position": pos, "token": tokens[pos],
                      "activation": float(resid0[pos].norm())})
    logit_text = token_strings(model, logit_ids)
    for k in range(K):
        nodes.append({"kind": "logit", "layer": M, "position": T - 1, "token": logit_text[k],
                      "token_id": int(logit_ids[k]), "probability": float(logit_probs[k]),
                      "activation": float(values[logit_start + k])})
    weights = torch.zeros(N, dtype=torch.float64)
    weights[logit_start:] = logit_probs.double()
    with torch.no_grad():
        directions = torch.stack([sum(rep.writes[t][i] for t in range(clt.n_layers)) for i in range(F)]) if F else None
    return Graph(adjacency, nodes, values, weights, tokens, directions, model.W_U.detach(),
                 getattr(model, "tokenizer", None),
                 {"logit_prob": logit_prob, "max_logits": max_logits, "clt_layers": clt.layers(),
                  "k_per_layer": clt.k_per_layer, "latents_per_layer": clt.latents_per_layer})
