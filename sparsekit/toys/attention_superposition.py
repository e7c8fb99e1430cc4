"""Attention-head superposition toy: can 2 heads carry 5 "true" heads' patterns and OV circuits?

Ground truth: n_true heads with fixed random OV matrices OV_h [d_model, d_model], each entry nonzero
with probability ``ov_density`` (values N(0, 1 / (d_model * ov_density)), so a head's output has about
unit variance at any density; a head drawn empty gets one entry). With ``ov_norm="equal"`` each head's
OV is then rescaled to the Frobenius norm it has in expectation, sqrt(d_model), so sparse heads no
longer differ in size by chance (at density 0.05 the drawn norms spread about fourfold). A sample is a residual stream
resid [T, d_model] and one attention pattern P_h [T, T] per true head: head h is on in a sample with
probability ``p_head`` (else its whole pattern is zero); each query row of a head that is on is active
with probability ``p_active`` (else all zero) and then attends uniformly to ``pattern_keys`` distinct
random keys (row-stochastic and sparse). ``resid="gaussian"`` draws resid ~ N(0, 1); ``resid="onehot"``
makes each position a random token t of a d_model-token vocabulary, resid_t = sqrt(d_model) e_t (the
same second moment), so a head reads one row of its OV per attended key. Head h's output is scaled by
``importance_decay ** h`` (its importance, as in Toy Models of Superposition: decay 1 is uniform). The
target is

    y = ReLU( sum_h decay^h P_h @ resid @ OV_h )                               [T, d_model]

The model sees the true patterns and learns one mixing matrix M [n_heads, n_true], used twice:
head_j = sum_i M[j, i] P_i and OV'_j = sum_i M[j, i] OV_i, with prediction
y_hat = ReLU( sum_j head_j @ resid @ OV'_j ), trained by MSE with Adam on fresh batches, at a
constant learning rate (``schedule="constant"``) or one decayed along a cosine to lr / 100
(``schedule="cosine"``).
Feature i is *represented* when column M[:, i] has norm above ``threshold``; the geometry of the
represented columns (norms, pairwise angles) is the thing to look at, as in Elhage et al. 2022.

Training never builds the patterns: ``draw_batch`` draws each row's keys (``distinct_keys``),
``head_reads`` gathers P_h @ resid from them, and ``mixing_loss`` computes the model as one GEMM through
G = M^T M. ``sample_batch`` (dense patterns), ``true_output`` and ``mixed_output`` are the reference
they are tested against (same values up to rounding; about 2.5x slower per step).

Defaults (small enough for a few seconds per run on one CPU thread): n_true=5, n_heads=2,
T=n_tokens=8, d_model=8, ov_density=0.1, pattern_keys=1, p_active=1.0, p_head=1.0,
importance_decay=1.0, resid="gaussian", M init N(0, 1/n_true), Adam lr=1e-2 constant, batch=256,
steps=2000, threshold=0.5 (a fully kept feature has norm ~1: its own term scales as |M_i|^2).
"""
from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass, replace
from itertools import combinations
from typing import NamedTuple

import torch
from torch import Tensor
from tqdm import tqdm

from sparsekit._util.seeding import derive_seed
from sparsekit._util.validate import check_seed, is_number, positive_int, positive_number

RESIDS = ("gaussian", "onehot")
OV_NORMS = ("expected", "equal")
SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class AttentionToyConfig:
    n_true: int = 5
    n_heads: int = 2
    n_tokens: int = 8
    d_model: int = 8
    ov_density: float = 0.1
    pattern_keys: int = 1
    p_active: float = 1.0
    p_head: float = 1.0
    importance_decay: float = 1.0
    resid: str = "gaussian"
    schedule: str = "constant"
    ov_norm: str = "expected"
    steps: int = 2000
    batch: int = 256
    lr: float = 1e-2
    threshold: float = 0.5
    seed: int = 0

    def __post_init__(self):
        for name in ("n_true", "n_heads", "n_tokens", "d_model", "pattern_keys", "steps", "batch"):
            positive_int(name, getattr(self, name))
        if self.pattern_keys > self.n_tokens:
            raise ValueError(f"pattern_keys={self.pattern_keys} exceeds n_tokens={self.n_tokens}")
        for name in ("ov_density", "p_active", "p_head", "importance_decay"):
            value = getattr(self, name)
            if not is_number(value) or not 0 < value <= 1:
                raise ValueError(f"{name} must be a fraction in (0, 1], got {value!r}")
        if self.resid not in RESIDS:
            raise ValueError(f"resid must be one of {', '.join(RESIDS)}, got {self.resid!r}")
        if self.ov_norm not in OV_NORMS:
            raise ValueError(f"ov_norm must be one of {', '.join(OV_NORMS)}, got {self.ov_norm!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        positive_number("lr", self.lr)
        positive_number("threshold", self.threshold)
        check_seed(self.seed)


def sparse_ov(cfg: AttentionToyConfig) -> Tensor:
    """The true OV matrices [n_true, d_model, d_model], drawn from cfg.seed, head h scaled by
    importance_decay ** h."""
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, 0))
    shape = (cfg.n_true, cfg.d_model, cfg.d_model)
    mask = torch.rand(shape, generator=gen) < cfg.ov_density
    values = torch.randn(shape, generator=gen) / math.sqrt(cfg.d_model * cfg.ov_density)
    empty = ~mask.flatten(1).any(1)
    if empty.any():  # an all-zero head would be a feature with nothing to represent
        flat = torch.randint(cfg.d_model * cfg.d_model, (cfg.n_true,), generator=gen)
        mask.flatten(1)[empty, flat[empty]] = True
    ov = values * mask
    if cfg.ov_norm == "equal":
        ov = ov * (math.sqrt(cfg.d_model) / ov.flatten(1).norm(dim=1))[:, None, None]
    importance = cfg.importance_decay ** torch.arange(cfg.n_true, dtype=torch.float32)
    return ov * importance[:, None, None]


class Draw(NamedTuple):
    """One batch's random draws: keys [B, T, H, K] (the keys each query row of each true head attends,
    K = pattern_keys, distinct), on [B, T, H, 1] (bool: that row attends at all), resid [B, T, d_model]."""
    keys: Tensor
    on: Tensor
    resid: Tensor


def distinct_keys(shape: tuple, n_tokens: int, k: int, generator: torch.Generator) -> Tensor:
    """k distinct keys of range(n_tokens) per entry of shape -> [*shape, k], every k-subset equally likely
    (Floyd's algorithm: for top = n_tokens - k .. n_tokens - 1 draw r in [0, top], take top if r is taken).
    k random draws of shape instead of sorting n_tokens uniforms per row."""
    chosen = []
    for top in range(n_tokens - k, n_tokens):
        r = torch.randint(top + 1, shape, generator=generator)
        if chosen:
            taken = (r == chosen[0])
            for c in chosen[1:]:
                taken |= r == c
            r = torch.where(taken, top, r)
        chosen.append(r)
    return torch.stack(chosen, -1)


def draw_batch(cfg: AttentionToyConfig, generator: torch.Generator) -> Draw:
    """The random draws of one batch of cfg.batch samples (see Draw), in a fixed order from generator."""
    B, H, T, d, K = cfg.batch, cfg.n_true, cfg.n_tokens, cfg.d_model, cfg.pattern_keys
    if K == 1:
        keys = torch.randint(T, (B, T, H, 1), generator=generator)
    else:
        keys = distinct_keys((B, T, H), T, K, generator)
    on = torch.rand(B, T, H, 1, generator=generator) < cfg.p_active
    if cfg.resid == "gaussian":
        resid = torch.randn(B, T, d, generator=generator)
    else:
        tokens = torch.randint(d, (B, T, 1), generator=generator)
        resid = torch.zeros(B, T, d).scatter_(-1, tokens, math.sqrt(d))
    if cfg.p_head < 1:  # drawn only when used
        on = on & (torch.rand(B, 1, H, 1, generator=generator) < cfg.p_head)
    return Draw(keys, on, resid)


def dense_patterns(draw: Draw, n_tokens: int) -> Tensor:
    """The attention patterns of a draw as dense matrices [B, H, T, T] (rows: 0, or 1/K on the K keys):
    the reference form, which the fast path (head_reads) never builds."""
    keys, on = draw.keys.transpose(1, 2), draw.on.transpose(1, 2)  # [B, H, T, K], [B, H, T, 1]
    B, H, T, K = keys.shape
    return torch.zeros(B, H, T, n_tokens).scatter_(-1, keys, 1.0 / K) * on


def sample_batch(cfg: AttentionToyConfig, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Reference form of a batch: patterns [batch, n_true, T, T], resid [batch, T, d_model]."""
    draw = draw_batch(cfg, generator)
    return dense_patterns(draw, cfg.n_tokens), draw.resid


def head_reads(draw: Draw) -> Tensor:
    """What each true head reads at each query, P_h @ resid, without building P: [B, T, H, d_model].
    A row attending K keys is the mean of their resid rows (summed in key order), a row off is 0."""
    keys, on, resid = draw
    B, T, H, K = keys.shape
    rows = keys + (torch.arange(B) * resid.shape[1]).view(B, 1, 1, 1)
    rows = rows.permute(3, 0, 1, 2).flatten()  # key slot outermost: each slot's rows are contiguous
    gathered = resid.reshape(-1, resid.shape[-1]).index_select(0, rows).view(K, B, T, H, -1)
    read = gathered[0]
    for slot in range(1, K):
        read = read + gathered[slot]
    return read * (on * (1.0 / K))


def true_output(patterns: Tensor, resid: Tensor, ov: Tensor) -> Tensor:
    """Reference: ReLU(sum_h P_h @ resid @ OV_h): patterns [B, H, T, T], resid [B, T, d], ov [H, d, d] -> [B, T, d]."""
    return torch.relu(torch.einsum("bhtd,hde->bte", patterns @ resid.unsqueeze(1), ov))


def mixed_output(M: Tensor, patterns: Tensor, resid: Tensor, ov: Tensor) -> Tensor:
    """Reference: ReLU(sum_j (sum_i M_ji P_i) @ resid @ (sum_i M_ji OV_i)): M [n_heads, n_true] -> [B, T, d]."""
    heads = torch.einsum("ji,bitk->bjtk", M, patterns)
    return torch.relu(torch.einsum("bjtd,jde->bte", heads @ resid.unsqueeze(1), torch.einsum("ji,ide->jde", M, ov)))


def mixing_loss(M: Tensor, read: Tensor, ov: Tensor) -> tuple[Tensor, Tensor]:
    """The training loss, mean((mixed - true)^2), from head_reads' read [B, T, H, d] -> (loss, loss of M = 0).

    Fast form of the reference (mixed_output vs true_output, same value up to rounding): with
    G = M^T M [H, H], sum_j (sum_i M_ji read_i) @ (sum_k M_jk OV_k) = sum_i read_i @ (sum_k G_ik OV_k),
    so the model is one GEMM [B*T, H*d] @ [H*d, d], the shape of the target's."""
    B, T, H, d = read.shape
    flat = read.reshape(B * T, H * d)
    with torch.no_grad():
        target = torch.relu(flat @ ov.reshape(H * d, -1))
    mixed_ov = ((M.t() @ M) @ ov.reshape(H, -1)).reshape(H * d, -1)
    return (torch.relu(flat @ mixed_ov) - target).pow(2).mean(), target.pow(2).mean()


def column_geometry(M: Tensor, threshold: float) -> dict:
    """Norms of M's columns [n_true], which exceed threshold, and the pairwise angles (degrees) between
    represented columns, keyed "i-k"."""
    M = M.detach().double().cpu()
    norms = M.norm(dim=0)
    represented = [i for i in range(M.shape[1]) if norms[i] > threshold]
    angles = {}
    for i, k in combinations(represented, 2):
        cos = float(M[:, i] @ M[:, k] / (norms[i] * norms[k]))
        angles[f"{i}-{k}"] = math.degrees(math.acos(max(-1.0, min(1.0, cos))))
    return {"norms": [float(n) for n in norms], "represented": represented,
            "n_represented": len(represented), "angles_deg": angles}


def learning_rate(cfg: AttentionToyConfig, step: int) -> float:
    """The learning rate of step (0-based): cfg.lr, or with schedule="cosine" decayed along a cosine from
    cfg.lr at step 0 to lr / 100 at step cfg.steps (CosineAnnealingLR's closed form)."""
    if cfg.schedule == "constant":
        return cfg.lr
    floor = cfg.lr / 100
    return floor + (cfg.lr - floor) * (1 + math.cos(math.pi * step / cfg.steps)) / 2


class Adam:
    """Adam (Kingma & Ba; torch.optim.Adam's defaults: betas 0.9, 0.999, eps 1e-8, no weight decay) on
    one small tensor, in a handful of in-place ops: torch.optim.Adam costs ~150 us a step on a [2, 5] M,
    as much as the rest of a small toy step. tests pin it to torch.optim.Adam."""

    def __init__(self, param: Tensor, betas=(0.9, 0.999), eps: float = 1e-8):
        self.param, self.betas, self.eps, self.steps = param, betas, eps, 0
        self.m, self.v = torch.zeros_like(param), torch.zeros_like(param)

    @torch.no_grad()
    def step(self, grad: Tensor, lr: float) -> None:
        b1, b2 = self.betas
        self.steps += 1
        self.m.lerp_(grad, 1 - b1)
        self.v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (self.v.sqrt() / math.sqrt(1 - b2 ** self.steps)).add_(self.eps)
        self.param.addcdiv_(self.m, denom, value=-lr / (1 - b1 ** self.steps))


def train_mixing(cfg: AttentionToyConfig, progress: bool = True) -> dict:
    """Fit M; returns the config, M [n_heads, n_true] as lists, losses, and column_geometry(M)."""
    ov = sparse_ov(cfg)
    init = torch.Generator().manual_seed(derive_seed(cfg.seed, 1))
    M = (torch.randn(cfg.n_heads, cfg.n_true, generator=init) / math.sqrt(cfg.n_true)).requires_grad_()
    optimizer = Adam(M)
    data = torch.Generator().manual_seed(derive_seed(cfg.seed, 2))
    losses = []
    bar = tqdm(range(cfg.steps), desc=f"attention toy (ov_density={cfg.ov_density:g}, seed={cfg.seed})",
               disable=not progress, leave=False)
    for step in bar:
        loss, _ = mixing_loss(M, head_reads(draw_batch(cfg, data)), ov)
        grad, = torch.autograd.grad(loss, M)
        optimizer.step(grad, learning_rate(cfg, step))
        losses.append(loss.item())
        if step % 100 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    held_out = torch.Generator().manual_seed(derive_seed(cfg.seed, 3))
    with torch.no_grad():
        draw = draw_batch(replace(cfg, batch=max(cfg.batch, 4096)), held_out)
        final, zero = (x.item() for x in mixing_loss(M, head_reads(draw), ov))  # zero: the loss of M = 0
    return {"config": asdict(cfg), "M": M.detach().tolist(), "loss_first": losses[0],
            "loss_last_step": losses[-1], "loss": final, "loss_M_zero": zero,
            **column_geometry(M, cfg.threshold)}


def plot_columns(result: dict, path) -> None:
    """Scatter M's columns (first two heads), arrows from the origin, threshold circle dashed."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Circle

    M = torch.tensor(result["M"])
    cfg = result["config"]
    fig = Figure(figsize=(4.2, 4.2))  # no pyplot: the caller's backend is left as it is
    ax = fig.subplots()
    for i in range(M.shape[1]):
        x, y = float(M[0, i]), float(M[1, i]) if M.shape[0] > 1 else 0.0
        color = "C0" if i in result["represented"] else "0.6"
        ax.annotate("", (x, y), (0, 0), arrowprops=dict(arrowstyle="->", color=color, lw=1.5))
        ax.scatter([x], [y], color=color, zorder=3)
        ax.annotate(f"f{i} ({result['norms'][i]:.2f})", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.add_patch(Circle((0, 0), cfg["threshold"], fill=False, ls="--", color="0.5", lw=0.8))
    lim = max(1.2 * float(M.abs().max()), 1.2 * cfg["threshold"])
    ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", xlabel="M[0, i] (head 0)",
           ylabel="M[1, i] (head 1)")
    ax.axhline(0, color="0.85", lw=0.5)
    ax.axvline(0, color="0.85", lw=0.5)
    ax.set_title(f"columns of M: ov_density={cfg['ov_density']:g}, {result['n_represented']}/{cfg['n_true']} "
                 f"represented", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


SWEEP_DENSITIES = (0.05, 0.1, 0.2, 0.4, 0.7, 1.0)
SWEEP_FIELDS = ("ov_density", "seed", "n_represented", "loss", "loss_M_zero", "norms")


def sweep(cfg: AttentionToyConfig, densities=SWEEP_DENSITIES, seeds: int = 3, progress: bool = True) -> list[dict]:
    """One train_mixing per (density, seed in cfg.seed .. cfg.seed + seeds - 1); rows of SWEEP_FIELDS."""
    runs = [(d, cfg.seed + s) for d in densities for s in range(positive_int("seeds", seeds))]
    rows = []
    for density, seed in tqdm(runs, desc="attention sweep", disable=not progress):
        result = train_mixing(replace(cfg, ov_density=density, seed=seed), progress=False)
        rows.append({"ov_density": density, "seed": seed, "n_represented": result["n_represented"],
                     "loss": result["loss"], "loss_M_zero": result["loss_M_zero"],
                     "norms": " ".join(f"{n:.3f}" for n in result["norms"])})
    return rows


def write_sweep(rows: list[dict], csv_path, png_path, n_true: int) -> list[dict]:
    """sweep.csv, and sweep.png: features represented (mean, min-max over seeds) vs OV density.
    Returns the per-density summary [{ov_density, mean, min, max, seeds}]."""
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SWEEP_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    densities = sorted({r["ov_density"] for r in rows})
    summary = []
    for d in densities:
        counts = [r["n_represented"] for r in rows if r["ov_density"] == d]
        summary.append({"ov_density": d, "mean": sum(counts) / len(counts), "min": min(counts),
                        "max": max(counts), "seeds": len(counts)})
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.8, 3.4))
    ax = fig.subplots()
    mean = [s["mean"] for s in summary]
    ax.fill_between(densities, [s["min"] for s in summary], [s["max"] for s in summary], alpha=0.25,
                    label="min–max over seeds")
    ax.plot(densities, mean, "o-", label="mean")
    for r in rows:
        ax.scatter(r["ov_density"], r["n_represented"], s=8, color="0.4", zorder=3)
    ax.set(xscale="log", xlabel="OV density (fraction of nonzero entries)", ylabel="features represented",
           ylim=(-0.2, n_true + 0.2))
    ax.legend(fontsize=8)
    ax.set_title(f"{summary[0]['seeds']} seeds per density", fontsize=9)
    fig.tight_layout()
    fig.savefig(png_path, dpi=80)
    return summary
