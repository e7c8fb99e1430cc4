"""Dead latents against dictionary size on a real LM: sizes x dead-latent remedies, one cached layer.

The research note's claims (issue 24, item 2): under resampling the fraction of dead latents grows with
the dictionary's size (over half dead for very large ones); ghost grads leave very few dead and match or
beat resampling at an equal number of alive latents, at about twice the compute. This scan measures
both on SmolLM2-135M (``sparsekit lm-study dead-latents``):

- activations at one hook (default ``blocks.3.hook_resid_pre``) on the built-in corpus, cached once in
  bfloat16 (``cache_activations``) and shared by every cell; CE/KL on a fixed held-out set of contexts;
- a cell per (remedy, size): a TopK SAE (k fixed, so every cell has the same L0 and only the remedy and
  the size differ) trained for the same tokens with ``dead_strategy`` none, resample, ghost or auxk;
- per cell (``cells/<id>/result.json``): dead fraction in training (no firing in the last
  ``dead_window_tokens``), alive latents, held-out FVU, L0, CE loss recovered and KL, seconds per step.

Resumable: a cell whose result exists is skipped; a cell killed while training continues from its last
checkpoint (``checkpoint_every_tokens``: a quarter of the run), so a killed scan loses at most a quarter
of one cell. The cell id hashes every setting that changes its result.

The rules, fixed before any result was seen (``verdicts``):

- "dead fraction grows with size under resampling" holds when, over the sizes scanned with resampling,
  the dead fraction never falls by more than 0.01 from one size to the next larger and the largest
  size's exceeds the smallest's by at least 0.05 (absolute); with fewer than three sizes: not measured.
- "ghost grads >= resampling at equal alive latents" holds when, at each size scanned with both, ghost's
  held-out FVU is at most resampling's FVU interpolated (linearly in log alive latents, between the
  resampling cells) at ghost's alive count, plus 0.005, for at least half of the ghost cells inside
  resampling's alive range; cells outside that range are reported, not judged; none inside: not measured.
- "ghost grads cost about twice the compute" is reported as ghost's seconds per step over the plain
  (none) cell's at each size: a measurement, no verdict.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sparsekit._util.atomic import atomic_write_bytes
from sparsekit.sae import TopKSAE
from sparsekit.training.config import TrainConfig
from sparsekit.training.loop import train

from .tables import markdown_table, write_rows_csv

REMEDIES = ("none", "resample", "ghost", "auxk")
RESULT = "result.json"


@dataclass(frozen=True)
class DeadLatentPlan:
    """What the scan trains: every field but ``out``-like ones enters each cell's id."""
    hook: str = "blocks.3.hook_resid_pre"
    sizes: tuple = (1024, 2048, 4096, 8192, 16384)
    remedies: tuple = REMEDIES
    k: int = 32
    train_tokens: int = 1_048_576
    eval_tokens: int = 4096
    context_len: int = 128
    batch_size: int = 4096
    lr: float = 1e-3
    dead_window_tokens: int = 262_144
    corpus: str = "shakespeare"
    cache_dtype: str = "bfloat16"
    seed: int = 0

    def check(self) -> None:
        if not self.sizes or any(not isinstance(s, int) or s < 2 for s in self.sizes):
            raise ValueError(f"sizes must be ints >= 2, got {self.sizes!r}")
        unknown = [r for r in self.remedies if r not in REMEDIES]
        if not self.remedies or unknown:
            raise ValueError(f"remedies must be among {', '.join(REMEDIES)}, got {self.remedies!r}")
        if not 0 < self.k < min(self.sizes):
            raise ValueError(f"k must be in 1..{min(self.sizes) - 1} (the smallest size), got {self.k}")
        for name in ("train_tokens", "eval_tokens", "batch_size", "dead_window_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.train_tokens < self.batch_size:
            raise ValueError(f"train_tokens ({self.train_tokens}) must be at least one batch ({self.batch_size})")

    def cells(self) -> list[tuple[str, int]]:
        """(remedy, size) in the order the scan runs them: small sizes first, every remedy per size."""
        return [(remedy, size) for size in sorted(self.sizes) for remedy in self.remedies]


def cell_config(plan: DeadLatentPlan, remedy: str, folder: Path) -> TrainConfig:
    """The trainer's settings for one cell (checkpoints every quarter of its run under folder)."""
    quarter = max(plan.batch_size, plan.train_tokens // 4 // plan.batch_size * plan.batch_size)
    return TrainConfig(batch_size=plan.batch_size, lr=plan.lr, total_tokens=plan.train_tokens, eval_tokens=0,
                       dead_strategy=remedy, dead_window_tokens=min(plan.dead_window_tokens, plan.train_tokens),
                       log_every=10**9, seed=plan.seed, checkpoint_dir=str(folder / "checkpoints"),
                       checkpoint_every_tokens=quarter, output_dir=str(folder))


def cell_id(plan: DeadLatentPlan, model_name: str, remedy: str, size: int) -> str:
    settings = {k: v for k, v in dataclasses.asdict(plan).items() if k not in ("sizes", "remedies")}
    if remedy == "resample":
        # The trainer's resampling points are part of what a resample cell trains (they changed once:
        # the old default, 2.5-10% of the run, came before any latent could count as dead).
        settings["resample_at_tokens"] = cell_config(plan, remedy, Path(".")).resample_schedule()
    text = json.dumps({"model": model_name, "remedy": remedy, "size": size, **settings}, sort_keys=True)
    return f"{remedy}-{size}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def train_cell(plan: DeadLatentPlan, source, remedy: str, size: int, d: int, folder: Path,
               progress: bool = False) -> tuple[TopKSAE, dict]:
    """Train one cell's TopK SAE (resuming from folder/checkpoints when a killed run left one) ->
    (sae, {dead_frac_train, alive, steps, seconds, seconds_per_step})."""
    torch.manual_seed(plan.seed)
    sae = TopKSAE(d, size, plan.k)
    cfg = dataclasses.replace(cell_config(plan, remedy, folder), progress=progress)
    started = time.perf_counter()
    result = train(sae, source, cfg, resume=True)
    seconds = time.perf_counter() - started
    steps = int(result.metrics["step"])
    dead = float(result.metrics["dead_frac"])
    return sae, {"dead_frac_train": dead, "alive": round(size * (1 - dead)), "steps": steps,
                 "seconds": round(seconds, 2), "seconds_per_step": round(seconds / max(steps, 1), 4)}


def run_scan(plan: DeadLatentPlan, model, out, contexts: torch.Tensor | None = None,
             progress: bool = True) -> list[dict]:
    """Every cell of plan on model -> result rows (also out/scan.csv, out/summary.md, out/dead_latents.png).

    model: a HookedTransformer; contexts [N, context_len] (BOS first) instead of the corpus's (tests)."""
    from sparsekit.activations.shards import ShardSource
    from sparsekit.activations.store import cache_activations, corpus_contexts, model_name
    from sparsekit.analysis.lm_metrics import Splice, evaluate_splices

    plan.check()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    per_context = plan.context_len - 1
    n_train, n_eval = -(-plan.train_tokens // per_context), -(-plan.eval_tokens // per_context)
    if contexts is None:
        contexts = corpus_contexts(model, plan.corpus, plan.context_len, max_contexts=n_train + n_eval)
    if contexts.shape[0] < n_train + n_eval or contexts.shape[1] != plan.context_len:
        raise ValueError(f"contexts must be at least [{n_train + n_eval}, {plan.context_len}] for train_tokens="
                         f"{plan.train_tokens} and eval_tokens={plan.eval_tokens}, got {tuple(contexts.shape)}")
    eval_contexts = contexts[:n_eval]  # the held-out set comes first: fixed whatever train_tokens is
    shards = cache_activations(model, contexts[n_eval:n_eval + n_train], (plan.hook,), out / "acts",
                               batch_size=plan.batch_size, dtype=plan.cache_dtype, progress=progress)
    name = model_name(model)
    (out / "plan.json").write_text(json.dumps({"model": name, **dataclasses.asdict(plan)}, indent=1))
    rows = []
    cells = plan.cells()
    for number, (remedy, size) in enumerate(cells, 1):
        folder = out / "cells" / cell_id(plan, name, remedy, size)
        if (folder / RESULT).is_file():
            rows.append(json.loads((folder / RESULT).read_text()))
            print(f"[dead-latents] {number}/{len(cells)} {remedy} n={size}: done before, reused", flush=True)
            continue
        folder.mkdir(parents=True, exist_ok=True)
        source = ShardSource(shards.directory, batch_size=plan.batch_size, epochs=None, seed=plan.seed)
        sae, trained = train_cell(plan, source, remedy, size, shards.d, folder, progress=progress)
        metrics = evaluate_splices(model, eval_contexts, {"sae": Splice(sae, plan.hook)})["sae"]
        row = {"remedy": remedy, "n_latents": size, **trained,
               **{key: round(float(metrics[key]), 5) for key in ("fvu", "l0", "ce_recovered", "kl", "dead_frac")}}
        row["dead_frac_eval"] = row.pop("dead_frac")
        atomic_write_bytes(folder / RESULT, json.dumps(row, indent=1).encode())
        rows.append(row)
        print(f"[dead-latents] {number}/{len(cells)} {remedy} n={size}: dead {row['dead_frac_train']:.3f}, "
              f"FVU {row['fvu']:.4f}, CE recovered {row['ce_recovered']:.4f}, {row['seconds_per_step']:.3f} s/step",
              flush=True)
    write_rows_csv(rows, out / "scan.csv")
    found = verdicts(rows)
    (out / "summary.md").write_text(summary_markdown(plan, name, rows, found))
    plot(rows, out / "dead_latents.png")
    for line in found.values():
        print(f"[dead-latents] {line}")
    return rows


def _by_size(rows: list[dict], remedy: str) -> list[dict]:
    return sorted((r for r in rows if r["remedy"] == remedy), key=lambda r: r["n_latents"])


def _interpolate_log(x: float, xs: list[float], ys: list[float]) -> float | None:
    """ys at x, linear in log x between the two nearest xs (sorted); None outside [xs[0], xs[-1]]."""
    if not xs or x < xs[0] or x > xs[-1] or x <= 0:
        return None
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 <= x <= x1:
            if x1 == x0 or x0 <= 0:
                return y0
            t = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + t * (y1 - y0)
    return ys[0] if x == xs[0] else None


def grows_with_size(rows: list[dict]) -> str:
    """The rule for "dead fraction grows with size under resampling" (module docstring)."""
    resampled = _by_size(rows, "resample")
    if len(resampled) < 3:
        return "not measured (fewer than three sizes with resampling)"
    dead = [r["dead_frac_train"] for r in resampled]
    drops = [a - b for a, b in zip(dead, dead[1:]) if a - b > 0.01]
    rise = dead[-1] - dead[0]
    figures = ", ".join(f"n={r['n_latents']}: {r['dead_frac_train']:.3f}" for r in resampled)
    held = not drops and rise >= 0.05
    return f"{'holds' if held else 'does not hold'} (dead fraction under resampling: {figures}; rise {rise:+.3f})"


def ghost_matches_resampling(rows: list[dict]) -> str:
    """The rule for "ghost grads >= resampling at equal alive latents" (module docstring)."""
    resampled = sorted(_by_size(rows, "resample"), key=lambda r: r["alive"])
    ghost = _by_size(rows, "ghost")
    if not resampled or not ghost:
        return "not measured (needs both ghost and resample cells)"
    xs, ys = [float(r["alive"]) for r in resampled], [r["fvu"] for r in resampled]
    judged, wins, outside = [], 0, []
    for cell in ghost:
        expected = _interpolate_log(float(cell["alive"]), xs, ys)
        if expected is None:
            outside.append(f"n={cell['n_latents']} ({cell['alive']} alive)")
            continue
        win = cell["fvu"] <= expected + 0.005
        wins += win
        judged.append(f"n={cell['n_latents']}: ghost FVU {cell['fvu']:.4f} at {cell['alive']} alive vs "
                      f"resampling {expected:.4f}")
    note = f"; outside resampling's alive range: {', '.join(outside)}" if outside else ""
    if not judged:
        return f"not measured (no ghost cell inside resampling's alive range{note})"
    held = wins * 2 >= len(judged)
    return f"{'holds' if held else 'does not hold'} ({wins} of {len(judged)}: {'; '.join(judged)}{note})"


def ghost_cost(rows: list[dict]) -> str:
    plain = {r["n_latents"]: r for r in rows if r["remedy"] == "none"}
    ratios = [f"n={r['n_latents']}: {r['seconds_per_step'] / plain[r['n_latents']]['seconds_per_step']:.2f}x"
              for r in _by_size(rows, "ghost") if r["n_latents"] in plain and plain[r["n_latents"]]["seconds_per_step"]]
    return f"ghost grads' seconds per step over the plain step's: {', '.join(ratios) or 'not measured'}"


def verdicts(rows: list[dict]) -> dict[str, str]:
    return {"grows": f"Dead fraction grows with size under resampling: {grows_with_size(rows)}",
            "ghost": f"Ghost grads >= resampling at equal alive latents: {ghost_matches_resampling(rows)}",
            "cost": f"Cost: {ghost_cost(rows)}"}


def summary_markdown(plan: DeadLatentPlan, model: str, rows: list[dict], found: dict[str, str]) -> str:
    columns = ["remedy", "n_latents", "dead_frac_train", "alive", "fvu", "l0", "ce_recovered", "kl",
               "seconds_per_step"]
    lines = [f"# Dead latents vs dictionary size: {model}, {plan.hook}", "",
             f"TopK SAEs (k={plan.k}), {plan.train_tokens:,} training tokens each (batch {plan.batch_size}, "
             f"lr {plan.lr}), dead = no firing in the last {plan.dead_window_tokens:,} training tokens; FVU, L0, "
             f"CE loss recovered and KL on {plan.eval_tokens:,} held-out tokens.", "",
             *markdown_table(sorted(rows, key=lambda r: (r["n_latents"], REMEDIES.index(r["remedy"]))), columns)]
    lines += ["", *[f"- {line}" for line in found.values()], ""]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Dead fraction vs size, and held-out FVU vs alive latents, one line per remedy."""
    if not rows:
        return
    from matplotlib.figure import Figure  # no pyplot: the caller's backend (a notebook's) is left as it is

    figure = Figure(figsize=(10, 4))
    left, right = figure.subplots(1, 2)
    for remedy in REMEDIES:
        cells = _by_size(rows, remedy)
        if not cells:
            continue
        left.plot([r["n_latents"] for r in cells], [r["dead_frac_train"] for r in cells], marker="o", label=remedy)
        right.plot([max(r["alive"], 1) for r in cells], [r["fvu"] for r in cells], marker="o", label=remedy)
    left.set(xscale="log", xlabel="latents", ylabel="dead fraction (training window)", ylim=(-0.02, 1.02))
    right.set(xscale="log", xlabel="alive latents", ylabel="held-out FVU")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
