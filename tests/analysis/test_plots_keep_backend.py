"""No library code switches the caller's matplotlib backend (a notebook's inline one, say): every
plot is drawn on an explicit ``matplotlib.figure.Figure`` and saved, with no pyplot and no
``matplotlib.use``. Run in a subprocess that picks the non-Agg "svg" backend first, then makes
every sparsekit plot on tiny inputs: the backend is still "svg" afterwards, pyplot was never
imported, and each PNG was written."""
import json
import re
import subprocess
import sys
from pathlib import Path

SPARSEKIT = Path(__file__).resolve().parents[2] / "sparsekit"


PLOTS = r"""
import json, sys
from pathlib import Path
import matplotlib
matplotlib.use("svg")
import numpy as np
import torch
import sparsekit

out = Path(sys.argv[1])
pngs = {}

# train(): the feature density plot in output_dir.
gen = torch.Generator().manual_seed(0)
cfg = sparsekit.TrainConfig(batch_size=64, total_tokens=256, eval_tokens=64, progress=False,
                            output_dir=str(out / "train"))
sparsekit.train(sparsekit.TopKSAE(8, 32, k=3), torch.randn(1024, 8, generator=gen), cfg)
pngs["train"] = str(out / "train" / "feature_density.png")

# The MNIST study's figures (PNG bytes).
from sparsekit.analysis import mnist_plots
figures = {
    "error_curves": mnist_plots.error_curves_png({"topk_auxk": [(16, 0.5), (64, 0.2)], "batchtopk": [(16, 0.4)]},
                                                 "dictionary size", "FVU", integer_x=True),
    "dead_study": mnist_plots.dead_study_png({"topk_auxk": [{"n_latents": 16, "dead_frac": 0.1, "alive": 14,
                                                             "fvu": 0.3}]}),
    "per_digit": mnist_plots.per_digit_png({"topk_auxk": list(range(10))}),
    "logit_heatmap": mnist_plots.logit_heatmap_png(torch.randn(3, 10, generator=gen), [1, 4, 9], [0, 3, 7]),
}
for name, data in figures.items():
    (out / f"{name}.png").write_bytes(data)
    pngs[name] = str(out / f"{name}.png")

# Toy: attention superposition (columns and sweep).
from sparsekit.toys.attention_superposition import AttentionToyConfig, plot_columns, train_mixing, write_sweep
result = train_mixing(AttentionToyConfig(steps=5, seed=0), progress=False)
plot_columns(result, out / "m_columns.png")
rows = [{"ov_density": d, "seed": s, "n_represented": s + 1, "loss": 0.1, "loss_M_zero": 1.0, "norms": "1 0.5"}
        for d in (0.1, 0.5) for s in (0, 1)]
write_sweep(rows, out / "sweep.csv", out / "sweep.png", n_true=5)
pngs["m_columns"], pngs["sweep"] = str(out / "m_columns.png"), str(out / "sweep.png")

# Study: dead latents vs dictionary size.
from sparsekit.studies.dead_latents_lm import plot as plot_dead_latents
plot_dead_latents([{"remedy": r, "n_latents": n, "dead_frac_train": 0.1, "alive": n - 1, "fvu": 0.3}
                   for r in ("none", "ghost") for n in (64, 128)], out / "dead_latents.png")
pngs["dead_latents"] = str(out / "dead_latents.png")
from sparsekit.studies.features_by_depth import plot as plot_depth
plot_depth([{"layer": l, "single_token_frac": 0.5, "median_context_dependence": 0.4, "coherent_frac": 0.1,
             "median_density": 0.01, "dead_frac_eval": 0.0} for l in (0, 5)], out / "features_by_depth.png")
pngs["features_by_depth"] = str(out / "features_by_depth.png")

# Circuits: the edge-validation scatter.
from sparsekit.analysis.circuits.validation import validation_plot
edges = [{"source_kind": kind, "predicted": float(i), "frozen": 0.9 * i, "unfrozen": 0.5 * i}
         for i, kind in enumerate(["feature", "error", "embedding", "error"])]
figures = {mode: {"pearson": 1.0, "spearman": 1.0, "slope": 0.9, "count": 4} for mode in ("frozen", "unfrozen")}
validation_plot({"edges": edges, "figures": figures}, out / "validation.png")
pngs["validation"] = str(out / "validation.png")

# Toy: sparse base model report (overview, facets, magnitude).
from sparsekit.toys.sparse_base_model import SparseBaseConfig, train_sparse_base
from sparsekit.toys.sparse_base_neurons import analyse_model, collect
from sparsekit.toys.sparse_base_report import write_report
torch.set_num_threads(1)
trained = train_sparse_base(SparseBaseConfig(tokens=8 * 16 * 40, l1=1e-3, seed=1, d_model=16, n_heads=2, d_mlp=32,
                                             n_ctx=16, batch_size=8, warmup_steps=5),
                            progress=False, cache_dir=out / "cache")
neurons = analyse_model(trained, collect(trained, max_contexts=40), min_fires=20, progress=False)
write_report(trained, neurons, out / "sparse_base", positions=600, min_fires=20, max_density=1.0, top=3)
for name in ("overview", "facets", "magnitude"):
    pngs[name] = str(out / "sparse_base" / f"{name}.png")

print(json.dumps({"backend": matplotlib.get_backend(), "pyplot_imported": "matplotlib.pyplot" in sys.modules,
                  "pngs": pngs}))
"""


def test_every_plot_leaves_the_callers_backend_alone_and_writes_its_png(tmp_path):
    result = subprocess.run([sys.executable, "-c", PLOTS, str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["backend"] == "svg"
    assert report["pyplot_imported"] is False
    assert len(report["pngs"]) == 13
    for name, path in report["pngs"].items():
        data = Path(path).read_bytes()
        assert len(data) > 1000 and data.startswith(b"\x89PNG\r\n\x1a\n"), name


def test_no_module_switches_the_backend_or_imports_pyplot():
    use = re.compile(r"matplotlib\s*\.\s*use\s*\(")
    pyplot = re.compile(r"^\s*(import\s+matplotlib\.pyplot|from\s+matplotlib\s+import\s+pyplot|"
                        r"from\s+matplotlib\.pyplot\s+import)", re.MULTILINE)
    switching, importing = [], []
    for path in sorted(SPARSEKIT.rglob("*.py")):
        source = path.read_text()
        name = path.relative_to(SPARSEKIT).as_posix()
        if use.search(source):
            switching.append(name)
        if pyplot.search(source):
            importing.append(name)
    assert switching == [] and importing == []
