"""The MNIST scan: dictionary algorithms x sizes x sparsity settings on one MLP hidden layer.

Methods (each trained with ``sparsekit.train`` on the layer's activations of the 60,000 training
images, and evaluated on the 10,000 test images):

| method | dictionary | dead-latent remedy | sparsity setting |
| --- | --- | --- | --- |
| relu_resample | ReLUSAE (unit-norm decoder) | resampling | l1_coeff |
| relu_ghost | ReLUSAE (unit-norm decoder) | ghost grads | l1_coeff |
| topk_auxk | TopKSAE | AuxK | k |
| batchtopk | BatchTopKSAE | AuxK | k |

A grid is sizes x sparsity settings per method: the size sweep runs at the method's middle
("headline") sparsity and the sparsity sweep at the largest size. Every cell writes
``cells/<cell id>/result.json`` (and the dictionary), and a cell whose result exists is skipped, so an
interrupted scan resumes where it stopped. The cell id includes a hash of every setting that
changes its result (the MLP, the layer, the training settings), so changed settings never reuse an
old cell. Results table (``scan.csv``), one row per cell:

- fvu: fraction of variance unexplained on the test activations (raw units);
- l0: mean active latents per test image; dead_frac: share of latents that fire on no test image;
- acc_recovered: (acc_zero - acc_spliced) / (acc_zero - acc_clean) (``sparsekit.loss_recovered``),
  with the reconstruction spliced in at the layer (``sparsekit.splice``) and the layer zero-ablated;
- template_score and digits_covered from ``sparsekit.analysis.mnist_features``;
- train_dead_frac: the trainer's own count (no firing in the last dead_window_tokens training tokens).
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor

from sparsekit._util.atomic import atomic_write_bytes
from sparsekit._util.validate import is_int
from sparsekit.analysis.mnist_features import analyse_features
from sparsekit.analysis.splice import loss_recovered, splice, zero_ablate
from sparsekit.sae import BatchTopKSAE, ReLUSAE, TopKSAE, load
from sparsekit.training.config import TrainConfig
from sparsekit.training.loop import train

# method -> (dictionary class, dead_strategy, name of the sparsity setting)
METHODS = {
    "relu_resample": (ReLUSAE, "resample", "l1_coeff"),
    "relu_ghost": (ReLUSAE, "ghost", "l1_coeff"),
    "topk_auxk": (TopKSAE, "auxk", "k"),
    "batchtopk": (BatchTopKSAE, "auxk", "k"),
}
CSV_COLUMNS = ("method", "n_latents", "sparsity_param", "sparsity", "fvu", "l0", "dead_frac", "alive",
               "acc_spliced", "acc_clean", "acc_zero", "acc_recovered", "template_score", "digits_covered",
               "train_dead_frac", "train_seconds", "cell")


@dataclass(frozen=True)
class ScanGrid:
    """Dictionary sizes, the k values (TopK, BatchTopK) and L1 coefficients (ReLU) to try, and the
    training budget per cell. The middle entry of ks / l1_coeffs is the headline sparsity."""
    sizes: tuple = (16, 64, 256, 512)
    ks: tuple = (2, 4, 8, 16)
    l1_coeffs: tuple = (0.5, 1.0, 3.0, 10.0)
    steps: int = 400
    batch_size: int = 512
    lr: float = 3e-3
    dead_window_tokens: int = 20_480   # a third of an epoch of MNIST
    resample_at: tuple = (0.2, 0.4, 0.6)  # fractions of the run
    methods: tuple = tuple(METHODS)
    seed: int = 0

    def __post_init__(self):
        for name in ("sizes", "ks", "l1_coeffs", "methods"):
            if not getattr(self, name):
                raise ValueError(f"ScanGrid.{name} must not be empty")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"ScanGrid.methods: {unknown} not among {', '.join(METHODS)}")
        if any(not is_int(v) or v < 1 for v in (*self.sizes, *self.ks)):
            raise ValueError(f"ScanGrid.sizes and ks must be positive ints, got {self.sizes}, {self.ks}")
        if any(not v > 0 for v in self.l1_coeffs):
            raise ValueError(f"ScanGrid.l1_coeffs must be positive, got {self.l1_coeffs}")

    def settings(self, method: str) -> tuple:
        return self.l1_coeffs if METHODS[method][2] == "l1_coeff" else self.ks

    def headline(self, method: str):
        values = self.settings(method)
        return values[(len(values) - 1) // 2]

    def cells(self) -> list[tuple[str, int, float]]:
        """(method, n_latents, sparsity) for the size sweep at the headline sparsity and the sparsity
        sweep at the largest size; k values above a size are left out."""
        out = []
        for method in self.methods:
            largest = max(self.sizes)
            wanted = [(n, self.headline(method)) for n in sorted(self.sizes)]
            wanted += [(largest, s) for s in self.settings(method) if (largest, s) not in wanted]
            out += [(method, n, s) for n, s in wanted if METHODS[method][2] != "k" or s <= n]
        return out


COMPACT = ScanGrid()
FULL = ScanGrid(sizes=(16, 32, 64, 128, 256, 512, 1024, 2048), ks=(1, 2, 4, 8, 16, 32),
                l1_coeffs=(0.3, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0), steps=2000)
GRIDS = {"compact": COMPACT, "full": FULL}


@dataclass
class LayerData:
    """One hidden layer's activations: train [60000, hidden]; test [10000, hidden] with the test
    images [10000, 784] and labels; the model and its clean / zero-ablated test accuracy."""
    model: torch.nn.Module
    layer: int
    model_key: str
    train: Tensor
    test: Tensor
    test_images: Tensor
    test_labels: Tensor
    acc_clean: float
    acc_zero: float

    @property
    def hook(self) -> str:
        return f"layers.{self.layer}.act"


def spliced_accuracy(data: LayerData, sae) -> float:
    from sparsekit.toys.mnist_mlp import accuracy
    with splice(data.model, data.hook, sae):
        return accuracy(data.model, data.test_images, data.test_labels)


def zero_ablated_accuracy(model, hook: str, images: Tensor, labels: Tensor) -> float:
    from sparsekit.toys.mnist_mlp import accuracy
    with zero_ablate(model, hook):
        return accuracy(model, images, labels)


def cell_id(grid: ScanGrid, data: LayerData, method: str, n_latents: int, sparsity) -> str:
    settings = {"model": data.model_key, "layer": data.layer, "method": method, "n": n_latents, "sparsity": sparsity,
                **{k: v for k, v in dataclasses.asdict(grid).items() if k not in ("sizes", "ks", "l1_coeffs", "methods")}}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    return f"{method}_n{n_latents}_{METHODS[method][2]}{sparsity:g}_{digest}"


def build_dictionary(method: str, d_in: int, n_latents: int, sparsity, seed: int):
    cls, _, param = METHODS[method]
    return cls(d_in, n_latents, **{param: sparsity}, seed=seed)


def run_cell(grid: ScanGrid, data: LayerData, method: str, n_latents: int, sparsity, folder: Path,
             progress: bool = False) -> dict:
    """Train one dictionary and evaluate it -> the CSV row; writes folder/result.json and folder/sae."""
    sae = build_dictionary(method, data.train.shape[1], n_latents, sparsity, grid.seed)
    total = grid.steps * grid.batch_size
    cfg = TrainConfig(batch_size=grid.batch_size, lr=grid.lr, total_tokens=total, eval_tokens=0,
                      dead_window_tokens=grid.dead_window_tokens, dead_strategy=METHODS[method][1],
                      resample_at_tokens=tuple(int(total * f) for f in grid.resample_at), seed=grid.seed,
                      log_every=max(1, grid.steps // 4), progress=progress)
    start = time.perf_counter()
    result = train(sae, data.train, cfg)
    seconds = time.perf_counter() - start
    row = evaluate_cell(data, sae)
    row.update(method=method, n_latents=n_latents, sparsity_param=METHODS[method][2], sparsity=sparsity,
               train_dead_frac=result.metrics["dead_frac"], train_seconds=round(seconds, 2), cell=folder.name)
    sae.save(folder / "sae")
    atomic_write_bytes(folder / "result.json", json.dumps(row, indent=1).encode())  # last: marks the cell done
    return row


@torch.no_grad()
def evaluate_cell(data: LayerData, sae) -> dict:
    """fvu, l0, dead_frac, alive, accuracies, template_score, digits_covered on the test split."""
    features = analyse_features(data.model, data.layer, sae, data.test, data.test_images, data.test_labels)
    reconstruction = torch.cat([sae.reconstruct(data.test[i:i + 4096]) for i in range(0, data.test.shape[0], 4096)])
    error = float((reconstruction - data.test).double().pow(2).sum())
    variance = float((data.test - data.test.mean(0)).double().pow(2).sum())
    l0 = float(features.fire_rate.sum())  # mean over images of the number of active latents
    acc_spliced = spliced_accuracy(data, sae)
    alive = int(features.alive.sum())
    return {"fvu": error / variance, "l0": l0, "dead_frac": 1 - alive / sae.n_latents, "alive": alive,
            "acc_spliced": acc_spliced, "acc_clean": data.acc_clean, "acc_zero": data.acc_zero,
            "acc_recovered": loss_recovered(data.acc_clean, acc_spliced, data.acc_zero),
            "template_score": features.template_score,
            "digits_covered": sum(1 for c in features.per_digit if c > 0)}


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one intra-op thread within the block: these matrices are too small to gain from a
    second, and a second OpenMP thread sharing a core with another busy process slows training
    ten- to fiftyfold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_scan(grid: ScanGrid, data: LayerData, out: Path, progress: bool = True, verbose: bool = False) -> list[dict]:
    """Every cell of the grid (skipping those already done in out/cells) -> rows; writes out/scan.csv.
    Runs on one thread (``one_thread``)."""
    with one_thread():
        return _run_scan(grid, data, Path(out), progress, verbose)


def _run_scan(grid: ScanGrid, data: LayerData, out: Path, progress: bool, verbose: bool) -> list[dict]:
    from tqdm.auto import tqdm

    rows = []
    cells = grid.cells()
    bar = tqdm(cells, desc="mnist scan", unit="cell", disable=not progress, dynamic_ncols=True)
    for method, n_latents, sparsity in bar:
        folder = out / "cells" / cell_id(grid, data, method, n_latents, sparsity)
        done = folder / "result.json"
        if done.is_file():
            row = json.loads(done.read_text())
        else:
            bar.set_postfix_str(f"{method} n={n_latents} {METHODS[method][2]}={sparsity:g}")
            folder.mkdir(parents=True, exist_ok=True)
            row = run_cell(grid, data, method, n_latents, sparsity, folder, progress=verbose)
        rows.append(row)
    write_csv(rows, out / "scan.csv")
    return rows


def load_cell_dictionary(out: Path, row: dict):
    return load(Path(out) / "cells" / row["cell"] / "sae")


def write_csv(rows: list[dict], path: Path) -> None:
    import io
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_bytes(path, buffer.getvalue().encode())
