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


def sample_batch(cfg: AttentionToyConfig, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """patterns [batch, n_true, T, T] (rows: 0, or 1/pattern_keys on pattern_keys keys); resid [batch, T, d_model]."""
    B, H, T, d = cfg.batch, cfg.n_true, cfg.n_tokens, cfg.d_model
    # the pattern_keys smallest of T uniforms: a uniform random key set (the set argsort()[..., :k] picks, cheaper)
    uniforms = torch.rand(B, H, T, T, generator=generator)
    if cfg.pattern_keys == 1:
        keys = uniforms.argmin(-1, keepdim=True)
    else:
        keys = uniforms.topk(cfg.pattern_keys, dim=-1, largest=False).indices
    patterns = torch.zeros(B, H, T, T).scatter_(-1, keys, 1.0 / cfg.pattern_keys)
    active = torch.rand(B, H, T, 1, generator=generator) < cfg.p_active
    if cfg.resid == "gaussian":
        resid = torch.randn(B, T, d, generator=generator)
    else:
        tokens = torch.randint(d, (B, T, 1), generator=generator)
        resid = torch.zeros(B, T, d).scatter_(-1, tokens, math.sqrt(d))
    if cfg.p_head < 1:  # drawn only when used, so the default stream is the one it always was
        active = active & (torch.rand(B, H, 1, 1, generator=generator) < cfg.p_head)
    return patterns * active, resid


def true_output(patterns: Tensor, resid: Tensor, ov: Tensor) -> Tensor:
    """ReLU(sum_h P_h @ resid @ OV_h): patterns [B, H, T, T], resid [B, T, d], ov [H, d, d] -> [B, T, d]."""
    return _true_from_read(patterns @ resid.unsqueeze(1), ov)


def mixed_output(M: Tensor, patterns: Tensor, resid: Tensor, ov: Tensor) -> Tensor:
    """ReLU(sum_j (sum_i M_ji P_i) @ resid @ (sum_i M_ji OV_i)): M [n_heads, n_true] -> [B, T, d]."""
    return _mixed_from_read(M, patterns @ resid.unsqueeze(1), ov)


def _true_from_read(read: Tensor, ov: Tensor) -> Tensor:
    """read = P_h @ resid [B, H, T, d] (shared by target and model in a training step) -> [B, T, d]."""
    return torch.relu(torch.einsum("bhtd,hde->bte", read, ov))


def _mixed_from_read(M: Tensor, read: Tensor, ov: Tensor) -> Tensor:
    heads_read = torch.einsum("ji,bitd->bjtd", M, read)
    return torch.relu(torch.einsum("bjtd,jde->bte", heads_read, torch.einsum("ji,ide->jde", M, ov)))


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


def train_mixing(cfg: AttentionToyConfig, progress: bool = True) -> dict:
    """Fit M; returns the config, M [n_heads, n_true] as lists, losses, and column_geometry(M)."""
    ov = sparse_ov(cfg)
    init = torch.Generator().manual_seed(derive_seed(cfg.seed, 1))
    M = (torch.randn(cfg.n_heads, cfg.n_true, generator=init) / math.sqrt(cfg.n_true)).requires_grad_()
    optimizer = torch.optim.Adam([M], lr=cfg.lr)
    scheduler = None
    if cfg.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.steps, eta_min=cfg.lr / 100)
    data = torch.Generator().manual_seed(derive_seed(cfg.seed, 2))
    losses = []
    bar = tqdm(range(cfg.steps), desc=f"attention toy (ov_density={cfg.ov_density:g}, seed={cfg.seed})",
               disable=not progress, leave=False)
    for step in bar:
        patterns, resid = sample_batch(cfg, data)
        read = patterns @ resid.unsqueeze(1)
        loss = (_mixed_from_read(M, read, ov) - _true_from_read(read, ov)).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
        if step % 100 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    held_out = torch.Generator().manual_seed(derive_seed(cfg.seed, 3))
    with torch.no_grad():
        patterns, resid = sample_batch(replace(cfg, batch=max(cfg.batch, 4096)), held_out)
        target = true_output(patterns, resid, ov)
        final = (mixed_output(M, patterns, resid, ov) - target).pow(2).mean().item()
        zero = target.pow(2).mean().item()  # the loss of M = 0
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
