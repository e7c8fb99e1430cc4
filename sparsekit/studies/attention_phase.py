"""The attention-superposition phase scan: where, if anywhere, does sparse OV give superposition?

The claim under test (the research note): with a sparse OV circuit, 5 true attention heads are
represented in 2 learned heads, in a geometry like Toy Models of Superposition; with a dense OV
circuit there is little superposition. The toy is ``sparsekit.toys.attention_superposition``; the
note leaves open the knobs scanned here (``KNOBS``): n_heads (5 true heads into 2 or 3), p_head (a
true head is on in a sample), p_active (a query row of a head that is on attends), pattern_keys (keys
per attending row: attention-pattern sparsity), importance_decay (head h's output scaled by
decay^h), resid (Gaussian residual stream or one-hot tokens), d_model and n_tokens (T).

Design (bounded; every run ``steps`` Adam steps on batches of ``batch``):

1. Coarse: the base cell (the first level of every knob), each other level alone (one factor at a
   time), then cells drawn at random from the rest of the factorial (seeded, so the same cells every
   time) up to ``coarse_cells``. Each cell runs at the sparsest and the densest OV density of
   ``densities`` with ``seeds`` seeds, constant learning rate: 2 x seeds runs per cell.
2. Refinement around where the geometry changes: the ``refine_closest`` cells with the largest
   score (below) and the ``refine_opposite`` cells with the smallest (the strongest opposite trend)
   run at every density of ``densities``, with the constant schedule and the longer one
   (``long_factor`` x the steps, cosine decay to lr / 100).
3. Equal OV norms: the base cell and the refined cells at every density with every true head's OV
   rescaled to the same norm (constant schedule). Added after the coarse runs showed that at OV
   density 0.05 the drawn OV norms differ about fourfold between heads (a chance importance spread,
   ``diagnostics``), so that OV sparsity and head importance can be told apart.

Every finished run is appended as one JSON line to ``phase.jsonl`` (keyed by a hash of its whole
config); a rerun skips the keys already there, so a killed scan continues where it stopped.

The rule, fixed before any result was looked at. Per run, excess = max(0, heads represented -
n_heads): the true heads kept beyond what the learned heads hold one each (represented: column norm
of M above the toy's threshold, 0.5). Per cell and variant (constant, cosine, equal_norm), with at
least 2 seeds at each end:

- S = mean excess at the sparsest OV density, D = mean excess at the densest;
- the cell **shows the note's picture** when S >= 1 and D <= 0.5 (sparse OV: on average at least one
  head beyond n_heads; dense OV: at most half a head);
- score = S - D (heads of superposition gained by making OV sparse); the **closest** cell has the
  largest score (ties: larger S, then the earlier cell);
- every other cell is put in the first class it fits: "superposed at both ends" (S >= 1 and D > 0.5),
  "opposite trend" (D - S >= 0.5), "no superposition" (S < 1 and D < 1), "weak trend" (the rest).

The verdict is "shown" when any cell and variant shows the picture, else "not shown", with the
closest cell and the count of cells in each class. Geometry per cell and density is reported beside
it (mean norm of represented columns, the smallest and median angle between them), not judged.
"""
from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import os
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sparsekit._util.atomic import atomic_write_bytes
from sparsekit._util.validate import is_int, positive_int
from sparsekit.toys.attention_superposition import AttentionToyConfig, train_mixing

# knob -> levels; the first level is the base cell's
KNOBS = {
    "n_heads": (2, 3),
    "p_head": (1.0, 0.3, 0.1),
    "p_active": (1.0, 0.25),
    "pattern_keys": (1, 4),
    "importance_decay": (1.0, 0.7),
    "resid": ("gaussian", "onehot"),
    "d_model": (8, 32),
    "n_tokens": (8, 16),
}
VARIANTS = {"constant": "constant", "cosine": "cosine", "equal_norm": "constant"}  # variant -> lr schedule
LATE_FIELDS = {"ov_norm": "expected"}
# in every run key: records of another version of the toy's draws (1: dense patterns from sorted
# uniforms, before 2026-12-05) are not reused by a rerun into the same folder
TOY_VERSION = 2
CLASSES = ("note's picture", "superposed at both ends", "opposite trend", "no superposition", "weak trend")
CSV_COLUMNS = ("cell", "variant", "ov_density", *KNOBS, "seeds", "represented_mean", "represented_min",
               "represented_max", "excess_mean", "norm_mean", "angle_min", "angle_median", "loss_ratio")


@dataclass(frozen=True)
class PhaseDesign:
    """The scan's size: coarse cells, seeds, OV densities (first and last are the ends compared),
    the refinement, and the training budget per run."""
    coarse_cells: int = 50
    seeds: int = 3
    densities: tuple = (0.05, 0.1, 0.2, 0.4, 1.0)
    refine_closest: int = 3
    refine_opposite: int = 1
    steps: int = 1000
    batch: int = 128
    long_factor: int = 3
    lr: float = 1e-2
    design_seed: int = 0
    knobs: dict = field(default_factory=lambda: dict(KNOBS))

    def __post_init__(self):
        for name in ("coarse_cells", "seeds", "steps", "batch", "long_factor"):
            positive_int(name, getattr(self, name))
        for name in ("refine_closest", "refine_opposite"):
            value = getattr(self, name)
            if not is_int(value) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if self.seeds < 2:
            raise ValueError(f"seeds must be at least 2 (the rule compares seed means), got {self.seeds}")
        if len(self.densities) < 2 or list(self.densities) != sorted(set(self.densities)):
            raise ValueError(f"densities must be at least 2 increasing OV densities, got {self.densities}")
        unknown = set(self.knobs) - set(KNOBS)
        if unknown:
            raise ValueError(f"knobs: {sorted(unknown)} not among {', '.join(KNOBS)}")
        if any(not levels for levels in self.knobs.values()):
            raise ValueError(f"knobs: every knob needs at least one level, got {self.knobs}")


FULL = PhaseDesign()
QUICK = PhaseDesign(coarse_cells=3, seeds=2, densities=(0.05, 0.3, 1.0), refine_closest=1, refine_opposite=0,
                    steps=30, batch=16, long_factor=2,
                    knobs={"n_heads": (2, 3), "p_head": (1.0, 0.3), "d_model": (8,), "n_tokens": (8,)})
DESIGNS = {"full": FULL, "quick": QUICK}


def coarse_cells(design: PhaseDesign) -> list[dict]:
    """The coarse cells as knob settings: base, one factor at a time, then a seeded random sample of
    the rest of the factorial, coarse_cells in all (fewer when the factorial is smaller)."""
    knobs = design.knobs
    base = {k: levels[0] for k, levels in knobs.items()}
    cells = [base] + [{**base, k: level} for k, levels in knobs.items() for level in levels[1:]]
    rest = [dict(zip(knobs, combo)) for combo in itertools.product(*knobs.values())]
    rest = [c for c in rest if c not in cells]
    random.Random(design.design_seed).shuffle(rest)
    return (cells + rest)[:design.coarse_cells]


def cell_name(cell: dict) -> str:
    """A short readable id: the knobs that differ from the toy's defaults, or "base"."""
    defaults = asdict(AttentionToyConfig())
    parts = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in cell.items() if defaults[k] != v]
    return ",".join(parts) or "base"


def run_config(design: PhaseDesign, cell: dict, ov_density: float, seed: int, variant: str) -> AttentionToyConfig:
    """One run of a cell: variant "constant" (steps at a constant lr), "cosine" (long_factor x steps,
    cosine decay) or "equal_norm" (constant, every true head's OV at the same norm)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    keys = cell.get("pattern_keys", 1)
    if keys > cell.get("n_tokens", AttentionToyConfig.n_tokens):
        raise ValueError(f"cell {cell_name(cell)}: pattern_keys={keys} exceeds n_tokens")
    steps = design.steps * (design.long_factor if variant == "cosine" else 1)
    extra = {"ov_norm": "equal"} if variant == "equal_norm" else {}
    return AttentionToyConfig(**cell, ov_density=ov_density, seed=seed, schedule=VARIANTS[variant], steps=steps,
                              batch=design.batch, lr=design.lr, **extra)


def run_key(cfg: AttentionToyConfig) -> str:
    """The hash of every setting of a run and of TOY_VERSION: equal keys, equal results. A setting added
    to the toy after records were written (LATE_FIELDS) is left out at its default, so those records
    keep their keys."""
    settings = {k: v for k, v in asdict(cfg).items() if LATE_FIELDS.get(k, object()) != v}
    settings["toy_version"] = TOY_VERSION
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def run_one(cfg: AttentionToyConfig) -> dict:
    """One toy run -> its JSONL record (config, M, losses, geometry, seconds)."""
    import torch

    torch.set_num_threads(1)  # tiny tensors: a second thread only adds contention
    start = time.perf_counter()
    result = train_mixing(cfg, progress=False)
    return {"key": run_key(cfg), **result, "seconds": round(time.perf_counter() - start, 3)}


def read_records(path: Path) -> dict:
    """key -> record from a phase.jsonl; a torn last line (a run killed while writing) is ignored."""
    records = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "key" in record:
                records[record["key"]] = record
    return records


def _append(path: Path, record: dict) -> None:
    _append_text(path, json.dumps(record) + "\n")


def _append_text(path: Path, text: str) -> None:
    with open(path, "a") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def run_configs(configs: list, path: Path, workers: int = 1, progress: bool = True, desc: str = "runs") -> dict:
    """Run every config whose key is not yet in path (appending each record as it finishes) -> all records."""
    from tqdm.auto import tqdm

    records = read_records(path)
    if path.is_file() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
        _append_text(path, "\n")  # end a torn last line, so the next record starts a line of its own
    todo = list({run_key(c): c for c in configs if run_key(c) not in records}.values())
    bar = tqdm(total=len(todo), desc=desc, unit="run", disable=not progress or not todo, dynamic_ncols=True)
    if workers <= 1 or len(todo) <= 1:
        for cfg in todo:
            record = run_one(cfg)
            _append(path, record)
            records[record["key"]] = record
            bar.update()
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # spawn, not fork: a child forked after torch's OpenMP pool started can deadlock
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for future in as_completed([pool.submit(run_one, cfg) for cfg in todo]):
                record = future.result()
                _append(path, record)
                records[record["key"]] = record
                bar.update()
    bar.close()
    return records


def excess(n_represented: int, n_heads: int) -> int:
    """True heads represented beyond one per learned head."""
    return max(0, n_represented - n_heads)


def classify(sparse_excess: list, dense_excess: list) -> dict:
    """The rule (module docstring) on one cell and variant: the excess per seed at the sparsest and
    the densest OV density -> S, D, score, shows (the note's picture) and the class."""
    if len(sparse_excess) < 2 or len(dense_excess) < 2:
        raise ValueError(f"the rule needs at least 2 seeds at each end, got {len(sparse_excess)} and {len(dense_excess)}")
    S, D = statistics.fmean(sparse_excess), statistics.fmean(dense_excess)
    if S >= 1 and D <= 0.5:
        label = CLASSES[0]
    elif S >= 1:
        label = CLASSES[1]
    elif D - S >= 0.5:
        label = CLASSES[2]
    elif D < 1:
        label = CLASSES[3]
    else:
        label = CLASSES[4]
    return {"S": S, "D": D, "score": S - D, "shows": label == CLASSES[0], "class": label}


def _n_heads(cell: dict) -> int:
    return cell.get("n_heads", AttentionToyConfig.n_heads)


def _angles(record: dict) -> list:
    return list(record["angles_deg"].values())


def summarise(records: dict, design: PhaseDesign, cells: list, variants=("constant",)) -> list:
    """One row per (cell, variant, density) with any runs: CSV_COLUMNS."""
    rows = []
    for cell in cells:
        for variant in variants:
            for density in design.densities:
                runs = [records[k] for k in (run_key(run_config(design, cell, density, s, variant))
                                              for s in range(design.seeds)) if k in records]
                if not runs:
                    continue
                counts = [r["n_represented"] for r in runs]
                norms = [r["norms"][i] for r in runs for i in r["represented"]]
                angles = [a for r in runs for a in _angles(r)]
                rows.append({"cell": cell_name(cell), "variant": variant, "ov_density": density, **cell,
                             "seeds": len(runs), "represented_mean": statistics.fmean(counts),
                             "represented_min": min(counts), "represented_max": max(counts),
                             "excess_mean": statistics.fmean(excess(c, _n_heads(cell)) for c in counts),
                             "norm_mean": statistics.fmean(norms) if norms else None,
                             "angle_min": min(angles) if angles else None,
                             "angle_median": statistics.median(angles) if angles else None,
                             "loss_ratio": statistics.fmean(r["loss"] / r["loss_M_zero"] for r in runs)})
    return rows


def judge(records: dict, design: PhaseDesign, cells: list, variants) -> list:
    """classify() for every (cell, variant) with >= 2 seeds at both ends -> [{cell, variant, ...}]."""
    lo, hi = design.densities[0], design.densities[-1]
    out = []
    for index, cell in enumerate(cells):
        for variant in variants:
            ends = []
            for density in (lo, hi):
                keys = (run_key(run_config(design, cell, density, s, variant)) for s in range(design.seeds))
                ends.append([excess(records[k]["n_represented"], _n_heads(cell)) for k in keys if k in records])
            if min(map(len, ends)) >= 2:
                out.append({"cell": cell_name(cell), "index": index, "knobs": cell, "variant": variant,
                            **classify(*ends)})
    return out


def largest_heads_kept(record: dict) -> bool:
    """Diagnostic (not part of the rule): are a run's represented heads exactly its largest true heads
    by OV norm |OV_h|_F (the size of head h's output for a Gaussian resid)? When yes, the run is keeping
    the most important heads, as Toy Models of Superposition's dense-feature regime does."""
    from sparsekit.toys.attention_superposition import sparse_ov

    ov_norms = sparse_ov(AttentionToyConfig(**record["config"])).flatten(1).norm(dim=1)
    largest = set(ov_norms.argsort(descending=True)[:record["n_represented"]].tolist())
    return largest == set(record["represented"])


def ov_norm_spread(record: dict) -> float:
    """Diagnostic: the ratio of the largest to the smallest true head's OV norm in a run."""
    from sparsekit.toys.attention_superposition import sparse_ov

    ov_norms = sparse_ov(AttentionToyConfig(**record["config"])).flatten(1).norm(dim=1)
    return float(ov_norms.max() / ov_norms.min())


def diagnostics(records: dict, design: PhaseDesign) -> dict:
    """Per OV end, over every constant-variant run: the share whose represented heads are the
    largest by OV norm, and the median largest / smallest OV-norm ratio."""
    out = {}
    for density in (design.densities[0], design.densities[-1]):
        runs = [r for r in records.values()
                if r["config"]["ov_density"] == density and r["config"]["schedule"] == "constant"
                and r["config"].get("ov_norm", "expected") == "expected"]
        if runs:
            out[f"{density:g}"] = {"runs": len(runs),
                                   "largest_heads_kept": statistics.fmean(largest_heads_kept(r) for r in runs),
                                   "ov_norm_ratio_median": statistics.median(ov_norm_spread(r) for r in runs)}
    return out


def verdict(judged: list) -> dict:
    """The overall verdict from judge()'s rows: shown or not, the closest (cell, variant), the
    count per class."""
    if not judged:
        raise ValueError("no cell has 2 seeds at both OV ends: nothing to judge")
    closest = max(judged, key=lambda j: (j["score"], j["S"], -j["index"]))
    counts = {label: sum(j["class"] == label for j in judged) for label in CLASSES}
    return {"shown": any(j["shows"] for j in judged), "closest": closest, "classes": counts,
            "judged": len(judged)}


def refinement_cells(judged: list, design: PhaseDesign) -> list:
    """The cells refined: the refine_closest highest scores and the refine_opposite lowest."""
    ranked = sorted(judged, key=lambda j: (-j["score"], -j["S"], j["index"]))
    chosen = ranked[:design.refine_closest]
    if design.refine_opposite:
        chosen += [j for j in ranked[::-1][:design.refine_opposite] if j not in chosen]
    return [j["knobs"] for j in chosen]


def run_phase(out, design: PhaseDesign = FULL, workers: int = 1, progress: bool = True) -> dict:
    """The whole scan into out/: phase.jsonl (every run), phase.csv, phase.png, phase_summary.json.
    Returns the summary (the verdict, the refined cells, wall time)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "phase.jsonl"
    start = time.perf_counter()
    cells = coarse_cells(design)
    ends = (design.densities[0], design.densities[-1])
    coarse = [run_config(design, c, d, s, "constant") for c in cells for d in ends for s in range(design.seeds)]
    records = run_configs(coarse, path, workers, progress, desc="attention phase: coarse")
    refined = refinement_cells(judge(records, design, cells, ("constant",)), design)
    fine = [run_config(design, c, d, s, variant) for c in refined for variant in ("constant", "cosine")
            for d in design.densities for s in range(design.seeds)]
    records = run_configs(fine, path, workers, progress, desc="attention phase: refinement")
    # sparse OV heads differ in size by chance; the same cells with equal OV norms tell that apart
    equal = [cells[0]] + [c for c in refined if c != cells[0]]
    even = [run_config(design, c, d, s, "equal_norm") for c in equal for d in design.densities
            for s in range(design.seeds)]
    records = run_configs(even, path, workers, progress, desc="attention phase: equal OV norms")
    judged = judge(records, design, cells, tuple(VARIANTS))
    rows = summarise(records, design, cells, tuple(VARIANTS))
    write_csv(rows, out / "phase.csv")
    summary = {"design": {k: v for k, v in asdict(design).items()}, "verdict": verdict(judged),
               "refined": [cell_name(c) for c in refined], "equal_norm": [cell_name(c) for c in equal],
               "judged": judged,
               "diagnostics": diagnostics(records, design),
               "runs": len(records), "run_seconds": round(sum(r["seconds"] for r in records.values()), 1),
               "wall_seconds": round(time.perf_counter() - start, 1)}
    plot_phase(judged, rows, records, design, equal, summary["verdict"], out / "phase.png")
    atomic_write_bytes(out / "phase_summary.json", json.dumps(summary, indent=1).encode())
    return summary


def write_csv(rows: list, path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_bytes(path, buffer.getvalue().encode())


def verdict_lines(summary: dict) -> list:
    """The verdict in plain sentences, as printed and written to the docs."""
    v = summary["verdict"]
    c = v["closest"]
    lines = [f"note's picture (S >= 1 and D <= 0.5): {'SHOWN' if v['shown'] else 'NOT SHOWN'}: "
             f"{v['classes'][CLASSES[0]]} of {v['judged']} (cell, variant) pairs show it",
             f"closest: {c['cell']} ({c['variant']}): S = {c['S']:.2f}, D = {c['D']:.2f} "
             f"heads beyond n_heads (score {c['score']:+.2f}), class '{c['class']}'",
             "classes: " + ", ".join(f"{label} {n}" for label, n in v["classes"].items())]
    for density, d in summary.get("diagnostics", {}).items():
        lines.append(f"OV density {density}: in {d['largest_heads_kept']:.0%} of {d['runs']} runs the represented "
                     f"heads are the largest by OV norm (median largest/smallest OV norm {d['ov_norm_ratio_median']:.2f})")
    return lines


def plot_phase(judged, rows, records, design, refined, verdict_, path) -> None:
    """Four panels: (a) excess heads at sparse vs dense OV per cell, the note's region shaded;
    (b) heads represented against OV density in the refined cells; (c) angle between represented
    columns against the product of their norms, sparse vs dense ends; (d) the closest cell's columns."""
    import torch
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 7.6))
    (a, b), (c, d) = fig.subplots(2, 2)
    top = max([1.0] + [j["S"] for j in judged] + [j["D"] for j in judged]) + 0.3
    a.fill_between([1, top], -0.1, 0.5, color="C2", alpha=0.15, label="the note's picture")
    a.plot([-0.1, top], [-0.1, top], color="0.7", lw=0.8)
    for variant, marker in (("constant", "o"), ("cosine", "s"), ("equal_norm", "^")):
        pts = [j for j in judged if j["variant"] == variant]
        a.scatter([j["S"] for j in pts], [j["D"] for j in pts], marker=marker, s=22, alpha=0.7,
                  label=f"{variant} ({len(pts)})")
    close = verdict_["closest"]
    a.annotate(close["cell"], (close["S"], close["D"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    a.set(xlim=(-0.1, top), ylim=(-0.1, top), xlabel=f"S: excess heads at OV density {design.densities[0]:g}",
          ylabel=f"D: excess heads at OV density {design.densities[-1]:g}")
    a.set_title("(a) per cell: true heads beyond n_heads, mean over seeds", fontsize=9)
    a.legend(fontsize=7, loc="upper left")
    names = {cell_name(cell) for cell in refined}
    for i, name in enumerate(sorted(names)):
        for variant, ls in (("constant", "-"), ("cosine", "--"), ("equal_norm", ":")):
            pts = [r for r in rows if r["cell"] == name and r["variant"] == variant]
            if pts:
                b.plot([r["ov_density"] for r in pts], [r["represented_mean"] for r in pts], ls, marker="o",
                       ms=3, color=f"C{i % 10}", label=name if variant == "constant" else None)
    b.set(xscale="log", xlabel="OV density", ylabel="heads represented (mean over seeds)")
    b.set_title(f"(b) refined cells: solid constant lr, dashed cosine x{design.long_factor} steps,\n"
                "dotted equal OV norms", fontsize=9)
    b.legend(fontsize=5, loc="best")
    for density, color in ((design.densities[0], "C0"), (design.densities[-1], "C3")):
        xs, ys = [], []
        for r in records.values():
            if r["config"]["ov_density"] != density or r["config"].get("ov_norm", "expected") != "expected":
                continue
            for pair, angle in r["angles_deg"].items():
                i, k = map(int, pair.split("-"))
                xs.append(angle)
                ys.append(r["norms"][i] * r["norms"][k])
        c.scatter(xs, ys, s=6, alpha=0.4, color=color, label=f"OV density {density:g} ({len(xs)} pairs)")
    c.set(xlabel="angle between represented columns of M (degrees)", ylabel="product of their norms", xlim=(0, 180))
    c.set_title("(c) geometry of every run's represented columns", fontsize=9)
    c.legend(fontsize=7)
    for density, color in ((design.densities[0], "C0"), (design.densities[-1], "C3")):
        cfg = run_config(design, close["knobs"], density, 0, close["variant"])
        record = records.get(run_key(cfg))
        if record is None:
            continue
        M = torch.tensor(record["M"])
        for i in range(M.shape[1]):
            x, y = float(M[0, i]), float(M[1, i]) if M.shape[0] > 1 else 0.0
            d.annotate("", (x, y), (0, 0), arrowprops=dict(arrowstyle="->", color=color, lw=1.2))
            d.annotate(f"{i}", (x, y), fontsize=7, color=color)
        d.plot([], [], color=color, label=f"OV density {density:g}: {record['n_represented']} represented")
    d.set(aspect="equal", xlim=(-1.3, 1.3), ylim=(-1.3, 1.3), xlabel="M[0, i]", ylabel="M[1, i]")
    d.set_title("(d) closest cell, seed 0: columns of M (heads 0, 1)", fontsize=9)
    d.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=70)
