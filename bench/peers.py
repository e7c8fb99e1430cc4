"""sparsekit's training steps side by side with SAELens, a sparsify-style baseline and plain torch,
as ratios to the encoder GEMM of the same run; issues 10 and 25's targets; the TopK step pass by
pass against memory bandwidth (CPU).

    .venv/bin/python bench/peers.py                   # B=4096, d=512, n=16384, k=32, float32
    .venv/bin/python bench/peers.py --quick           # small shapes, for iteration
    .venv/bin/python bench/peers.py --scaling         # also the n / B / k scaling table
    .venv/bin/python bench/peers.py --output auto     # also bench/results/<date>-<cpu>-peers.md
    .venv/bin/python bench/peers.py --only sparsekit_topk_auxk,sparsekit_topk_auxk_separate
                                                      # just these rows (+ torch GEMM, TopK step)
    make bench-peers                                  # --scaling --output auto

Every step row is one full training step on the same x [B, d] (torch.randn, seed 0), each variant
with its own parameters and optimizer state:

- encoder GEMM alone (x @ W_enc into a preallocated output) through torch and through numpy's
  OpenBLAS (bench/step_table.py's rows): the floor; the faster one is the "fastest GEMM".
- sparsekit rows: the body of ``sparsekit.train``'s loop (forward, dead-latent remedy, loss check,
  backward, parallel-gradient projection, gradient clipping, Adam as the trainer builds it, decoder
  renormalisation, parameter check, fire counting, logging window). train.py exposes no per-step
  function, so ``TrainerStep`` replicates the loop body statement by statement, leaving out only the
  batching from a source; the "sparsekit.train() per step" row times the trainer itself
  ((6-step run - 2-step run) / 4) as a cross-check. TopK (default backend and the reference path,
  SPARSEKIT_BACKEND=torch), BatchTopK, ReLU+L1 at L0 ~ k, and TopK with AuxK / ghost grads with a
  fixed 10% and a fixed 50% of latents dead (the dead-latent tracker is set to report them dead
  before each step; issue 25's targets: <= 1.15x the plain step at 10%, <= 1.3x at 50%). The remedies
  read the dead latents from the encoder's own pass, as the trainer does on one process
  (``dead_latents.shared_pass_k``); the ``*_separate`` rows, timed only when ``--only`` names them,
  are the same steps with each remedy computing the dead pre-activations itself (as before issue 25;
  the rest of the remedies' code is today's).
- plain dense torch and a sparsify-style step (torch.topk encoder + ``F.embedding_bag`` decode,
  written here from the algorithm sparsify's documentation describes, no sparsify code):
  bench/step_table.py's steps (fused Adam, no decoder constraint).
- EleutherAI sparsify (``eai-sparsify``, imported unchanged): its ``SparseCoder`` (SparseCoderConfig
  with num_latents n and k, the rest at its defaults) stepped as its ``Trainer`` steps it:
  ``set_decoder_norm_to_unit_norm``, forward, loss = fvu + auxk_loss + multi_topk_fvu / 8 (its
  trainer's formula; both extra terms 0 here), backward,
  ``remove_gradient_parallel_to_decoder_directions``, its optimizer's step and zero_grad. Two rows:
  its default optimizer (``signum``: schedulefree's ScheduleFreeWrapper around its SignSGD, momentum
  0.95, its lr rule 5e-3 / sqrt(n / 2^14)) and ``adam`` (torch.optim.Adam as its trainer builds it
  without bitsandbytes, lr 2e-4 / sqrt(n / 2^14)). Its decoder is its eager one
  (``SPARSIFY_DISABLE_TRITON=1``, set here when there is no GPU: its Triton decoder needs one).
  Skipped, with a line saying so, when the package is not importable.
- SAELens: its ``TopKTrainingSAE`` with its defaults (only d_in, d_sae and k set) stepped by its own
  ``SAETrainer.step`` (training_forward_pass, backward, clip to 1.0, Adam, LR scheduler); once with
  no dead latents and once with AuxK active: 10% of latents marked dead through the trainer's
  ``n_forward_passes_since_fired`` (> dead_feature_window), which is how SAELens decides deadness.
  Skipped, with a line saying so, when sae_lens is not importable (the ``bench`` extra).

Rows are timed round-robin (bench/_timing.py), medians reported; peak RSS comes from one subprocess
per variant (build + 2 steps). ``--scaling`` adds a table of the sparsekit TopK step around the base
point, one axis at a time (n x4 and /4, B x4 and /4, k /2 and x4; not the cross product), with the
exponent of a log-log fit for each axis.

After the main table and its targets: the TopK step pass by pass against memory bandwidth measured
in the same run (bench/cpu_passes.py, which also runs alone; ``--no-passes`` leaves it out).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import (  # noqa: E402
    add_shape_arguments,
    backend_forced_to,
    env_set,
    output_path,
    peak_rss_gib,
    peak_rss_in_subprocesses,
    pin_thread_env,
    time_round_robin,
    time_with_cpu_share,
)

# The targets (issue 10, "Targets").
TARGET_STEP_OVER_TORCH_GEMM = 1.0
TARGET_STEP_OVER_FASTEST_GEMM = 1.3
TARGET_REMEDY_OVER_PLAIN = 1.15  # at --dead-fraction (10%)
# Issue 25's: the remedies at --dead-fraction-high (50%), and the TopK step on CPUs with AMX.
TARGET_REMEDY_HIGH_DEAD_OVER_PLAIN = 1.3
TARGET_STEP_OVER_TORCH_GEMM_AMX = 0.8
TARGET_RELU_OVER_TORCH_GEMM = 1.5
TARGET_PEAK_RSS_GIB = 1.1
LINEAR_TOLERANCE = 0.15  # a fitted exponent within 1 +- this counts as linear

SAELENS_VARIANTS = ("saelens_topk", "saelens_topk_auxk")
SPARSIFY_VARIANTS = ("sparsify_real", "sparsify_real_adam")
ROW_LABELS = {
    "gemm_torch": "encoder GEMM: torch.matmul(x, W_enc, out=)",
    "gemm_numpy": "encoder GEMM: numpy.matmul (OpenBLAS), out=",
    "gemm_torch_bf16": "encoder GEMM in bfloat16: torch.matmul (oneDNN), out= (not a target's yardstick)",
    "sparsekit_topk": "sparsekit TopK step (default backend), trainer's loop body",
    "sparsekit_topk_f32": "sparsekit TopK step, float32 encoder GEMM (SPARSEKIT_BF16_SCREEN=off)",
    "sparsekit_train": "sparsekit.train() per step, whole loop (cross-check of the row above)",
    "sparsekit_topk_reference": "sparsekit TopK step, reference path (SPARSEKIT_BACKEND=torch)",
    "sparsekit_batchtopk": "sparsekit BatchTopK step",
    "sparsekit_relu_l1": "sparsekit ReLU+L1 step at L0 ~ k",
    "sparsekit_topk_auxk": "sparsekit TopK + AuxK, {dead} dead",
    "sparsekit_topk_ghost": "sparsekit TopK + ghost grads, {dead} dead",
    "sparsekit_topk_auxk_high": "sparsekit TopK + AuxK, {dead_high} dead",
    "sparsekit_topk_ghost_high": "sparsekit TopK + ghost grads, {dead_high} dead",
    "sparsekit_topk_auxk_separate": "sparsekit TopK + AuxK, {dead} dead, without the shared pass (its own GEMM)",
    "sparsekit_topk_ghost_separate": "sparsekit TopK + ghost grads, {dead} dead, without the shared pass",
    "sparsekit_topk_auxk_high_separate": "sparsekit TopK + AuxK, {dead_high} dead, without the shared pass",
    "sparsekit_topk_ghost_high_separate": "sparsekit TopK + ghost grads, {dead_high} dead, without the shared pass",
    "torch_dense": "plain torch TopK step (dense codes @ W_dec)",
    "sparsify_style": "sparsify-style TopK step (torch.topk + F.embedding_bag; written here, not sparsify code)",
    "sparsify_real": "EleutherAI sparsify {sparsify} SparseCoder, eager decode, its default optimizer (signum)",
    "sparsify_real_adam": "EleutherAI sparsify {sparsify} SparseCoder, eager decode, its adam optimizer",
    "saelens_topk": "SAELens {version} TopKTrainingSAE + SAETrainer.step (defaults)",
    "saelens_topk_auxk": "SAELens {version} TopK, AuxK active ({dead} dead)",
}
# Rows timed only when --only names them: the remedies as they ran before issue 25's shared pass.
ONLY_VARIANTS = tuple(name for name in ROW_LABELS if name.endswith("_separate"))
STEP_VARIANTS = tuple(name for name in ROW_LABELS if not name.startswith("gemm") and name != "sparsekit_train"
                      and name not in ONLY_VARIANTS)
ALWAYS_TIMED = ("gemm_torch", "sparsekit_topk")  # every ratio's yardsticks
RSS_VARIANTS = ("baseline",) + STEP_VARIANTS  # baseline: imports and x, no step


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(parser)
    parser.add_argument("--dead-fraction", type=float, default=0.10,
                        help="share of latents dead in the first AuxK / ghost rows (default 0.10)")
    parser.add_argument("--dead-fraction-high", type=float, default=0.50,
                        help="share of latents dead in the second AuxK / ghost rows (default 0.50)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5, or 3 with --quick)")
    parser.add_argument("--threads", type=int, default=2,
                        help="threads for torch, OpenBLAS and sparsekit._C (default 2)")
    parser.add_argument("--scaling", action="store_true", help="also the n / B / k scaling table")
    parser.add_argument("--scaling-rounds", type=int, default=None,
                        help="timed rounds per scaling point (default 3, or 1 with --quick)")
    parser.add_argument("--rss", choices=("all", "topk", "none"), default="all",
                        help="peak RSS subprocesses: every variant (default), only the sparsekit TopK step and "
                             "the baseline (fast), or none")
    parser.add_argument("--no-passes", action="store_true",
                        help="leave out the table of the TopK step's passes against memory bandwidth")
    parser.add_argument("--no-trainer-check", action="store_true",
                        help="leave out the sparsekit.train() cross-check row (it runs 8 steps per round)")
    parser.add_argument("--only", metavar="ROWS",
                        help="time only these comma-separated rows (besides gemm_torch and sparsekit_topk, always "
                             "timed) and leave out the passes table, the trainer check and peak RSS; e.g. "
                             "sparsekit_topk_auxk,sparsekit_topk_auxk_separate. Rows: "
                             + ", ".join(name for name in ROW_LABELS if name != "sparsekit_train"))
    parser.add_argument("--bf16-gemm", choices=("auto", "on", "off"), default="auto",
                        help="time the bfloat16 encoder GEMM row: auto (default) only where the CPU has native "
                             "bf16 (avx512_bf16 or amx_bf16); without it oneDNN emulates bf16 and one call took "
                             "205 s on an AVX2-only EPYC, more than half of the whole bench")
    parser.add_argument("--output", metavar="FILE",
                        help="also write the tables as Markdown; 'auto' = bench/results/<date>-<cpu>-peers.md")
    parser.add_argument("--peak-rss-of", choices=RSS_VARIANTS + ("baseline_saelens",), metavar="VARIANT",
                        help="internal: build one variant, run two steps, print its peak RSS")
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 3 if args.quick else 5
    if args.scaling_rounds is None:
        args.scaling_rounds = 1 if args.quick else 3
    for name in ("rounds", "scaling_rounds", "threads", "batch", "d_in", "n_latents", "k"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.only is not None:
        args.only = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = [name for name in args.only if name not in ROW_LABELS or name == "sparsekit_train"]
        if unknown:
            parser.error(f"--only: unknown rows {', '.join(unknown)}")
        args.no_passes = args.no_trainer_check = True
        args.rss = "none"
    for name in ("dead_fraction", "dead_fraction_high"):
        if not 0 < getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be in (0, 1), got {getattr(args, name)}")
    return args


if __name__ == "__main__":
    # BLAS and OpenMP runtimes read their thread counts when they load: pin them before torch,
    # numpy's OpenBLAS and sparsekit._C are imported (they all compete for the same cores).
    pin_thread_env(parse_args().threads)

import torch  # noqa: E402
from cpu_passes import measure_passes, section_lines  # noqa: E402
from step_table import (  # noqa: E402
    FULL,
    Shapes,
    environment_lines,
    make_gemms,
    make_inputs,
    make_step,
    pin_threads,
    shapes_from,
    topk_encoder_gemm,
)

import sparsekit  # noqa: E402
from sparsekit.ops.cpu.screen import cpu_has_native_bf16  # noqa: E402
from sparsekit.training import guards as reliability  # noqa: E402
from sparsekit.training.dead_latents import DeadLatentTracker, auxk_loss, ghost_loss, shared_pass_k  # noqa: E402
from sparsekit.training.metrics import MetricWindow  # noqa: E402
from sparsekit.training.optimizer import adam, lr_factor  # noqa: E402

# --- sparsekit: the trainer's step -------------------------------------------------------------

def dead_latents(n: int, fraction: float) -> torch.Tensor:
    """A fixed random set of round(fraction * n) latent indices [m] int64 (seed 1)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(1))[: round(fraction * n)]


def calibrate_relu_bias(sae, x: torch.Tensor, k: int, sample_rows: int = 1024) -> None:
    """Shift b_enc by one constant so that on the first sample_rows rows of x exactly k of n
    pre-activations per row are positive on average: a trained ReLU SAE's sparsity (L0 ~ k) on
    a fresh dictionary, spread over all latents (each fires on ~k/n of rows)."""
    if k >= sae.n_latents:
        return
    with torch.no_grad():
        pre = x[:sample_rows] @ sae.W_enc + sae.encoder_bias()  # [rows, n]
        kept = pre.flatten().topk(pre.shape[0] * k + 1).values
        sae.b_enc -= (kept[-2] + kept[-1]) / 2  # between the (rows*k)-th and (rows*k+1)-th largest


class TrainerStep:
    """One step of ``sparsekit.train``'s loop on a fixed batch, statement by statement as the trainer
    runs it (single process, no LR warm-up or L1 warm-up, far from the LR decay). Written before the
    trainer had a per-step function; ``training.loop.take_step`` is one now, but it also draws the
    batch from a source and needs a started run. Left out: drawing the batch from a source. A fixed set of
    ``dead_fraction`` latents is reported dead by the tracker before every step."""

    def __init__(self, architecture: str, shapes: Shapes, remedy: str = "none", dead_fraction: float = 0.0,
                 backend: str | None = None, screen: str | None = None, shared_pass: bool = True):
        self.x = make_inputs(shapes)[0]  # the same x as every other row
        d, n, k = shapes.d, shapes.n, shapes.k
        self.sae = {"topk": lambda: sparsekit.TopKSAE(d, n, k), "batchtopk": lambda: sparsekit.BatchTopKSAE(d, n, k),
                    "relu": lambda: sparsekit.ReLUSAE(d, n, l1_coeff=1e-3)}[architecture]()
        if architecture == "relu":
            calibrate_relu_bias(self.sae, self.x, k)
        self.cfg = sparsekit.TrainConfig(batch_size=shapes.batch, total_tokens=shapes.batch * 10**6, eval_tokens=0,
                                         dead_strategy=remedy, progress=False, log_every=10**9)
        self.cfg.validate()
        self.backend, self.screen = backend, screen
        self.shared_pass = shared_pass  # False: each remedy computes the dead pre-activations itself (before issue 25)
        self.optimizer = adam(self.sae, self.cfg)
        self.tracker = DeadLatentTracker(n, self.cfg.dead_window_tokens)
        self.dead = dead_latents(n, dead_fraction) if dead_fraction else torch.zeros(0, dtype=torch.int64)
        self.strategies = self.cfg.strategies()
        self.k_aux = self.cfg.aux_k or max(1, d // 2)
        self.params = list(self.sae.parameters())
        self.window = MetricWindow()
        self.window_counts = torch.zeros(n, dtype=torch.int64)
        self.step = self.tokens = 0
        self.l0: list[float] = []  # active latents per row, each step
        self.aux_loss = 0.0  # the last step's AuxK / ghost term (0 when none ran)
        self.sae.train()

    def __call__(self) -> None:
        with backend_forced_to(self.backend), env_set("SPARSEKIT_BF16_SCREEN", self.screen):
            self._step()

    def _step(self) -> None:
        cfg, sae, optimizer, tracker = self.cfg, self.sae, self.optimizer, self.tracker
        tracker.tokens_since_fired[self.dead] = cfg.dead_window_tokens
        x = self.x * sae.input_scale
        target = x
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(cfg, self.tokens)
        if hasattr(sae, "sparsity_weight"):
            sae.sparsity_weight = 1.0  # no L1 warm-up
        dead = tracker.dead_indices(x.device)
        shared_k = shared_pass_k(sae, self.strategies, dead, self.k_aux) if self.shared_pass else None
        shared = None
        if shared_k is None:
            out = sae(x, None)
        else:  # the remedies read the dead latents from the encoder's own pass, as the trainer does
            out, shared = sae.forward_with_latents(x, None, dead, shared_k)
        losses = dict(out.losses)
        residual = target - out.x_hat
        if dead.numel():
            if "auxk" in self.strategies:
                losses["aux_loss"] = cfg.aux_coeff * auxk_loss(sae, x, residual, dead, self.k_aux, shared=shared)
            if "ghost" in self.strategies:
                losses["aux_loss"] = losses.get("aux_loss", 0) + ghost_loss(sae, x, residual, dead, losses["mse"],
                                                                            shared=shared)
        loss = sum(losses.values())
        reliability.check_loss(self.step, loss, losses, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_parallel_decoder_grad()
        if cfg.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip_norm)
        optimizer.step()
        sae.normalize_decoder()
        reliability.check_parameters(self.step, sae, cfg)
        with torch.no_grad():
            counts = sae.fire_counts(out.codes).cpu()
        tracker.update(counts, cfg.batch_size)
        self.window_counts += counts
        self.step += 1
        self.tokens += cfg.batch_size
        self.window.add(losses, target, out.x_hat, counts, cfg.batch_size)
        self.l0.append(float(counts.sum()) / x.shape[0])
        self.aux_loss = float(torch.as_tensor(losses.get("aux_loss", 0.0)).detach())


def make_train_run(shapes: Shapes, steps: int):
    """A closure running ``sparsekit.train`` for ``steps`` TopK steps on x repeated (a fresh
    dictionary each call, b_dec from the mean, no held-out split)."""
    from sparsekit.activations import TensorSource
    x = make_inputs(shapes)[0].repeat(steps, 1)
    cfg = sparsekit.TrainConfig(batch_size=shapes.batch, total_tokens=shapes.batch * steps, eval_tokens=0,
                                log_every=10**9, progress=False, b_dec_init="mean")

    def run() -> None:
        sae = sparsekit.TopKSAE(shapes.d, shapes.n, shapes.k)
        sparsekit.train(sae, TensorSource(x, batch_size=shapes.batch, shuffle=False), cfg)

    return run


# --- SAELens -----------------------------------------------------------------------------------

def saelens_version() -> str | None:
    """sae_lens's version, or None when it cannot be imported (the SAELens rows are then skipped)."""
    try:
        import sae_lens
        from sae_lens.saes.topk_sae import TopKTrainingSAE  # noqa: F401
        from sae_lens.training.sae_trainer import SAETrainer  # noqa: F401
    except Exception as error:  # ImportError, or a broken install of one of its dependencies
        global SAELENS_IMPORT_ERROR
        SAELENS_IMPORT_ERROR = f"{type(error).__name__}: {error}"
        return None
    return str(getattr(sae_lens, "__version__", "?"))


SAELENS_IMPORT_ERROR = ""


class SAELensStep:
    """One ``SAETrainer.step`` of SAELens's TopK training SAE (its defaults; trainer lr 3e-4, constant
    schedule). ``dead_fraction`` > 0 marks that share of latents dead before each step through
    ``n_forward_passes_since_fired`` so its AuxK loss is active."""

    def __init__(self, shapes: Shapes, dead_fraction: float = 0.0):
        from sae_lens.config import SAETrainerConfig
        from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
        from sae_lens.training.sae_trainer import SAETrainer

        self.x = make_inputs(shapes)[0]
        torch.manual_seed(0)  # SAELens initialises from torch's global generator
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=shapes.d, d_sae=shapes.n, k=shapes.k))
        lr = 3e-4  # SAETrainerConfig's and its runner config's default
        # lr_end: the runner config's default (lr / 10); SAETrainer asserts it is set.
        cfg = SAETrainerConfig(total_training_samples=shapes.batch * 10**6, train_batch_size_samples=shapes.batch,
                               lr=lr, lr_end=lr / 10)
        self.trainer = SAETrainer(cfg, sae, data_provider=iter(()))
        self.dead = dead_latents(shapes.n, dead_fraction) if dead_fraction else None
        self.aux_loss = 0.0  # the last step's auxiliary_reconstruction_loss

    def __call__(self) -> None:
        if self.dead is not None:
            self.trainer.n_forward_passes_since_fired[self.dead] = self.trainer.cfg.dead_feature_window + 1
        out = self.trainer.step(self.x)
        self.aux_loss = float(torch.as_tensor(out.losses.get("auxiliary_reconstruction_loss", 0.0)).detach())


# --- EleutherAI sparsify ----------------------------------------------------------------------

SPARSIFY_IMPORT_ERROR = ""


def sparsify_version() -> str | None:
    """eai-sparsify's version, or None when its ``sparsify`` cannot be imported (the rows are then
    skipped). Another PyPI package is also imported as ``sparsify``: only one with SparseCoder counts."""
    global SPARSIFY_IMPORT_ERROR
    if not torch.cuda.is_available():  # its own switch: with Triton installed it would pick the Triton decoder,
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # which needs a GPU; eager = F.embedding_bag
    try:
        from importlib.metadata import PackageNotFoundError, version

        with contextlib.redirect_stdout(sys.stderr):  # its import prints which decoder it chose
            import sparsify
            from sparsify import SparseCoder, SparseCoderConfig  # noqa: F401
            from sparsify.sign_sgd import SignSGD  # noqa: F401
        try:
            return version("eai-sparsify")
        except PackageNotFoundError:  # a source checkout on sys.path
            return f"{sparsify.__version__} (source, {Path(sparsify.__file__).parent})"
    except Exception as error:  # ImportError, PackageNotFoundError, a broken dependency
        SPARSIFY_IMPORT_ERROR = f"{type(error).__name__}: {error}"
        return None


class SparsifyStep:
    """One training step of eai-sparsify's SparseCoder, as its Trainer takes it (module docstring)."""

    def __init__(self, shapes: Shapes, optimizer: str = "signum"):
        from sparsify import SparseCoder, SparseCoderConfig

        self.x = make_inputs(shapes)[0]
        torch.manual_seed(0)  # sparsify initialises from torch's global generator
        self.sae = SparseCoder(shapes.d, SparseCoderConfig(num_latents=shapes.n, k=shapes.k), device="cpu",
                               dtype=torch.float32)
        scale = (shapes.n / 2**14) ** 0.5
        if optimizer == "signum":
            from schedulefree import ScheduleFreeWrapper
            from sparsify.sign_sgd import SignSGD
            self.optimizer = ScheduleFreeWrapper(SignSGD([dict(params=self.sae.parameters(), lr=5e-3 / scale)]),
                                                 momentum=0.95)
            self.optimizer.train()
        else:
            self.optimizer = torch.optim.Adam([dict(params=self.sae.parameters(), lr=2e-4 / scale)])

    def __call__(self) -> None:
        self.sae.set_decoder_norm_to_unit_norm()
        out = self.sae(self.x)
        (out.fvu + out.auxk_loss + out.multi_topk_fvu / 8).backward()
        self.sae.remove_gradient_parallel_to_decoder_directions()
        self.optimizer.step()
        self.optimizer.zero_grad()


# --- the variants ------------------------------------------------------------------------------

def build_step(variant: str, shapes: Shapes, dead_fraction: float, dead_fraction_high: float):
    """The closure that runs one training step of ``variant`` (the remedy rows with dead_fraction
    of latents dead, the ``_high`` ones with dead_fraction_high)."""
    builders = {
        "sparsekit_topk": lambda: TrainerStep("topk", shapes),
        "sparsekit_topk_f32": lambda: TrainerStep("topk", shapes, screen="off"),
        "sparsekit_topk_reference": lambda: TrainerStep("topk", shapes, backend="torch"),
        "sparsekit_batchtopk": lambda: TrainerStep("batchtopk", shapes),
        "sparsekit_relu_l1": lambda: TrainerStep("relu", shapes),
        "sparsekit_topk_auxk": lambda: TrainerStep("topk", shapes, remedy="auxk", dead_fraction=dead_fraction),
        "sparsekit_topk_ghost": lambda: TrainerStep("topk", shapes, remedy="ghost", dead_fraction=dead_fraction),
        "sparsekit_topk_auxk_high": lambda: TrainerStep("topk", shapes, remedy="auxk", dead_fraction=dead_fraction_high),
        "sparsekit_topk_ghost_high": lambda: TrainerStep("topk", shapes, remedy="ghost",
                                                         dead_fraction=dead_fraction_high),
        "sparsekit_topk_auxk_separate": lambda: TrainerStep("topk", shapes, remedy="auxk", dead_fraction=dead_fraction,
                                                            shared_pass=False),
        "sparsekit_topk_ghost_separate": lambda: TrainerStep("topk", shapes, remedy="ghost",
                                                             dead_fraction=dead_fraction, shared_pass=False),
        "sparsekit_topk_auxk_high_separate": lambda: TrainerStep("topk", shapes, remedy="auxk",
                                                                 dead_fraction=dead_fraction_high, shared_pass=False),
        "sparsekit_topk_ghost_high_separate": lambda: TrainerStep("topk", shapes, remedy="ghost",
                                                                  dead_fraction=dead_fraction_high, shared_pass=False),
        "torch_dense": lambda: make_step("dense", shapes),
        "sparsify_style": lambda: make_step("sparsify", shapes),
        "sparsify_real": lambda: SparsifyStep(shapes),
        "sparsify_real_adam": lambda: SparsifyStep(shapes, "adam"),
        "saelens_topk": lambda: SAELensStep(shapes),
        "saelens_topk_auxk": lambda: SAELensStep(shapes, dead_fraction),
    }
    return builders[variant]()


def peak_rss_child(variant: str, shapes: Shapes, dead_fraction: float, dead_fraction_high: float) -> None:
    """Runs in its own process: build the variant, run two steps, print the peak RSS as JSON."""
    if variant == "baseline":
        make_inputs(shapes)
    elif variant == "baseline_saelens":
        saelens_version()
        make_inputs(shapes)
    else:
        step = build_step(variant, shapes, dead_fraction, dead_fraction_high)
        step()
        step()
    print(json.dumps({"variant": variant, "peak_rss_gib": peak_rss_gib()}))


def child_args(args: argparse.Namespace, shapes: Shapes) -> list[str]:
    return ["--threads", str(args.threads), "--batch", str(shapes.batch), "--d-in", str(shapes.d),
            "--n-latents", str(shapes.n), "--k", str(shapes.k), "--dead-fraction", str(args.dead_fraction),
            "--dead-fraction-high", str(args.dead_fraction_high)]


# --- reporting ---------------------------------------------------------------------------------

def source_revision() -> str:
    """The git commit the code came from, and whether sparsekit/ or csrc/ had uncommitted changes."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "sparsekit", "csrc", "kernels"], cwd=root,
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    if not commit:
        return "unknown (not a git checkout)"
    return commit + (" with uncommitted changes in sparsekit/, csrc/ or kernels/" if dirty else "")


def verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def cpu_has_amx() -> bool:
    """Whether /proc/cpuinfo's flags name an AMX tile unit (amx_tile, amx_bf16 or amx_int8)."""
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line for line in info if line.startswith("flags")), "").split()
    except OSError:
        return False
    return any(flag.startswith("amx") for flag in flags)


def header_lines(args, shapes: Shapes, now, load_before: float, others_share: float, version: str | None) -> list[str]:
    gflop = 2 * shapes.batch * shapes.d * shapes.n / 1e9
    return [
        f"# sparsekit vs peers: training steps on the CPU ({now:%Y-%m-%d %H:%M %Z})",
        "",
        f"- shapes: {shapes}; encoder GEMM = 2*B*d*n = {gflop:.1f} GFLOP; dead latents in the AuxK/ghost rows: "
        f"{args.dead_fraction:.0%} and {args.dead_fraction_high:.0%}",
        *environment_lines(shapes, args.threads, args.rounds, load_before, others_share,
                           f" (commit {source_revision()}), sae_lens {version or 'not installed'}, eai-sparsify "
                           f"{getattr(args, 'sparsify_version', None) or 'not installed'}"),
    ]


def row_label(name: str, args, version: str | None, steps: dict) -> str:
    label = ROW_LABELS[name].format(dead=f"{args.dead_fraction:.0%}", dead_high=f"{args.dead_fraction_high:.0%}",
                                    version=version,
                                    sparsify=getattr(args, "sparsify_version", None))
    l0 = getattr(steps.get(name), "l0", None)
    if name == "sparsekit_relu_l1" and l0:
        label += f" (measured L0 {l0[0]:.1f} at the first step, {l0[-1]:.1f} at the last)"
    if name.removesuffix("_high").endswith(("_auxk", "_ghost")):
        label += f" (aux loss at the last step: {steps[name].aux_loss:.4g})"
    return label


def table_lines(medians: dict[str, float], times: dict[str, list[float]], peaks: dict[str, float], args,
                version: str | None, steps: dict, gflop: float) -> list[str]:
    torch_gemm = medians["gemm_torch"]
    fastest_name = min((name for name in ("gemm_torch", "gemm_numpy") if name in medians), key=medians.__getitem__)
    fastest = medians[fastest_name]
    plain = medians["sparsekit_topk"]
    lines = ["| row | median s | min-max s | x torch GEMM | x fastest GEMM | x sparsekit TopK step | GFLOP/s "
             "| peak RSS GiB |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name in ROW_LABELS:
        if name not in medians:
            continue
        med = medians[name]
        spread = (f"{min(times[name]):.3f}-{max(times[name]):.3f}" if name in times else "(6-step - 2-step) / 4")
        rate = f"{gflop / med:.0f}" if name.startswith("gemm") else ""
        peak = peaks.get(name)
        lines.append(f"| {row_label(name, args, version, steps)}{' (fastest GEMM)' if name == fastest_name else ''} "
                     f"| {med:.3f} | {spread} | {med / torch_gemm:.2f} | {med / fastest:.2f} | {med / plain:.2f} "
                     f"| {rate} | {'' if peak is None else f'{peak:.2f}'} |")
    if "baseline" in peaks:
        lines += ["", f"Peak RSS of a process with the imports and x but no step: {peaks['baseline']:.2f} GiB"
                  + (f"; with sae_lens imported as well: {peaks['baseline_saelens']:.2f} GiB (the SAELens rows "
                     f"include it)" if "baseline_saelens" in peaks else "") + "."]
    if args.rss != "all":
        lines += ["", f"Peak RSS measured for {', '.join(peaks) or 'no variant'} only (--rss {args.rss})."]
    return lines


def target_lines(medians: dict[str, float], peaks: dict[str, float], shapes: Shapes, args) -> list[str]:
    torch_gemm = medians["gemm_torch"]
    fastest_name = min((name for name in ("gemm_torch", "gemm_numpy") if name in medians), key=medians.__getitem__)
    fastest = medians[fastest_name]
    step = medians["sparsekit_topk"]
    lines = ["", "## Targets (issues 10 and 25)", ""]
    if shapes != FULL:
        lines += [f"(shapes {shapes} are not the issue's {FULL}: indicative only)", ""]
    r = step / torch_gemm
    lines.append(f"- TopK step <= {TARGET_STEP_OVER_TORCH_GEMM}x torch encoder GEMM: {r:.2f}x "
                 f"({step:.3f} s vs {torch_gemm:.3f} s) -> {verdict(r <= TARGET_STEP_OVER_TORCH_GEMM)}")
    lines.append(f"- TopK step <= {TARGET_STEP_OVER_TORCH_GEMM_AMX}x torch encoder GEMM on CPUs with AMX: "
                 + (f"{r:.2f}x -> {verdict(r <= TARGET_STEP_OVER_TORCH_GEMM_AMX)}" if cpu_has_amx() else
                    "-> not applicable (no AMX on this CPU)"))
    r = step / fastest
    lines.append(f"- TopK step <= {TARGET_STEP_OVER_FASTEST_GEMM}x fastest GEMM: {r:.2f}x ({step:.3f} s vs "
                 f"{fastest:.3f} s through {fastest_name.removeprefix('gemm_')}) -> "
                 f"{verdict(r <= TARGET_STEP_OVER_FASTEST_GEMM)}")
    for suffix, dead, target in (("", args.dead_fraction, TARGET_REMEDY_OVER_PLAIN),
                                 ("_high", args.dead_fraction_high, TARGET_REMEDY_HIGH_DEAD_OVER_PLAIN)):
        for name, remedy in ((f"sparsekit_topk_auxk{suffix}", "AuxK"), (f"sparsekit_topk_ghost{suffix}", "ghost grads")):
            if name not in medians:
                continue
            r = medians[name] / step
            lines.append(f"- {remedy} with {dead:.0%} dead <= {target}x plain TopK step: {r:.2f}x "
                         f"({medians[name]:.3f} s vs {step:.3f} s) -> {verdict(r <= target)}")
            if f"{name}_separate" in medians:
                lines.append(f"  - without the shared pass (each remedy's own GEMM over the dead columns), same run: "
                             f"{medians[f'{name}_separate'] / step:.2f}x")
    if "sparsekit_relu_l1" in medians:
        relu = medians["sparsekit_relu_l1"]
        r = relu / torch_gemm
        lines.append(f"- ReLU+L1 step at L0 ~ {shapes.k} <= {TARGET_RELU_OVER_TORCH_GEMM}x torch encoder GEMM: "
                     f"{r:.2f}x ({relu:.3f} s vs {torch_gemm:.3f} s) -> {verdict(r <= TARGET_RELU_OVER_TORCH_GEMM)}")
    peak = peaks.get("sparsekit_topk")
    lines.append(f"- peak RSS of the TopK step <= {TARGET_PEAK_RSS_GIB} GiB: " +
                 ("not measured (--rss none)" if peak is None else
                  f"{peak:.2f} GiB -> {verdict(peak <= TARGET_PEAK_RSS_GIB)}"))
    return lines


NOTES = [
    "",
    "How each row was built:",
    "- sparsekit rows: sparsekit.train's loop body replicated statement by statement (as training/loop.py's "
    "take_step runs it, minus drawing the batch): sae(x), dead-latent remedy, loss check, zero_grad, backward, "
    "parallel-gradient projection, "
    "clip_grad_norm_(1.0), the trainer's Adam (torch's fused kernel: every parameter is contiguous), decoder "
    "renormalisation, parameter check, fire counts, tracker and logging window; only drawing the batch from a source "
    "is left out. The cross-check row "
    "times sparsekit.train() itself (TensorSource, b_dec from the mean, no held-out split).",
    "- ReLU+L1: b_enc shifted by one constant so that on the first 1024 rows of x exactly k of n pre-activations per "
    "row are positive on average (a trained SAE's L0 on a fresh dictionary); l1_coeff = 1e-3.",
    "- AuxK / ghost: a fixed random set of latents (10% and 50% of them by default: --dead-fraction, "
    "--dead-fraction-high) is reported dead by the trainer's DeadLatentTracker before each step (AuxK: k_aux = d/2, "
    "coefficient 1/32, the trainer's defaults).",
    "- plain torch and sparsify-style: bench/step_table.py's steps: encode, decode, MSE, backward, "
    "torch.optim.Adam(fused=True), no decoder constraint. The sparsify-style step is written here from the "
    "algorithm sparsify's documentation describes (fused encoder + F.embedding_bag decode), not sparsify's code.",
    "- EleutherAI sparsify: eai-sparsify's own SparseCoder, SignSGD (and schedulefree's wrapper) imported unchanged "
    "and stepped as its Trainer steps them (see the module docstring); the bench replicates only the trainer's "
    "order of calls, not its activation hooks or data loading.",
    "- SAELens: TopKTrainingSAE(TopKTrainingSAEConfig(d_in, d_sae, k)) with every other setting at its default "
    "(rescale_acts_by_decoder_norm, dense TopK activations, aux_loss_coefficient 1), stepped by "
    "SAETrainer.step (lr 3e-4, constant schedule; its Adam, clip to 1.0, dead-neuron bookkeeping); AuxK is active "
    "when latents are marked dead through n_forward_passes_since_fired.",
]


# --- scaling -----------------------------------------------------------------------------------

def scaling_points(base: Shapes) -> list[tuple[str, Shapes]]:
    """The base point, then one axis varied at a time: n /4 and x4, B /4 and x4, k /2 and x4."""
    points = [("base", base)]
    for n in (base.n // 4, base.n * 4):
        points.append(("n", dataclasses.replace(base, n=max(n, base.k))))
    for batch in (base.batch // 4, base.batch * 4):
        points.append(("B", dataclasses.replace(base, batch=max(batch, 1))))
    for k in (base.k // 2, base.k * 4):
        points.append(("k", dataclasses.replace(base, k=min(max(k, 1), base.n))))
    return points


def measure_scaling(base: Shapes, rounds: int) -> list[dict]:
    """For each point: medians of the sparsekit TopK step and torch's encoder GEMM, timed in
    interleaved rounds point by point (one point's tensors live at a time)."""
    results = []
    for axis, shapes in scaling_points(base):
        print(f"scaling: {shapes} ...", file=sys.stderr)
        fns = {"gemm": make_gemms(shapes)["gemm_torch"], "step": TrainerStep("topk", shapes)}
        times = time_round_robin(fns, rounds)
        results.append({"axis": axis, "shapes": shapes, "step": statistics.median(times["step"]),
                        "gemm": statistics.median(times["gemm"]),
                        "library": topk_encoder_gemm(shapes)})
        del fns
    return results


def fitted_exponent(values: list[float], seconds: list[float]) -> float:
    """Least-squares slope of log(seconds) against log(values)."""
    xs, ys = [math.log(v) for v in values], [math.log(s) for s in seconds]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)


def scaling_lines(results: list[dict], base: Shapes, rounds: int) -> list[str]:
    lines = ["", "## Scaling (sparsekit TopK step, one axis varied at a time around the base point)", "",
             f"Base point {base}; n x1/4 and x4, B x1/4 and x4, k x1/2 and x4 (not the full cross product); "
             f"medians of {rounds} interleaved rounds of the step and torch's encoder GEMM at each point.", "",
             "| varied | B | n | k | step s | torch GEMM s | step x torch GEMM | sparsekit encoder GEMM |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in results:
        s = r["shapes"]
        lines.append(f"| {r['axis']} | {s.batch} | {s.n} | {s.k} | {r['step']:.3f} | {r['gemm']:.3f} | "
                     f"{r['step'] / r['gemm']:.2f} | {r['library']} |")
    lines += ["", "Exponents of a log-log least-squares fit, time ~ value^e over the base point and the axis' two "
              f"points (the cost model: linear in n and B; 'linear' = within 1 +- {LINEAR_TOLERANCE}):", ""]
    base_row = results[0]
    for axis, attr in (("n", "n"), ("B", "batch"), ("k", "k")):
        rows = [base_row] + [r for r in results if r["axis"] == axis]
        values = [getattr(r["shapes"], attr) for r in rows]
        if len(set(values)) < 2:
            continue
        e_step = fitted_exponent(values, [r["step"] for r in rows])
        e_gemm = fitted_exponent(values, [r["gemm"] for r in rows])
        if axis == "k":
            lines.append(f"- k: step ~ k^{e_step:.2f} (torch GEMM ~ k^{e_gemm:.2f}, independent of k); the k-dependent "
                         f"work is O(B*k*d), small beside the GEMM's B*d*n")
        else:
            shape = ("linear" if abs(e_step - 1) <= LINEAR_TOLERANCE else
                     "sub-linear" if e_step < 1 else "super-linear")
            lines.append(f"- {axis}: step ~ {axis}^{e_step:.2f} -> {shape} (torch GEMM ~ {axis}^{e_gemm:.2f})")
    return lines


# --- main --------------------------------------------------------------------------------------

def main() -> None:
    args = parse_args()
    shapes = shapes_from(args)
    pin_threads(args.threads)
    if args.peak_rss_of:
        peak_rss_child(args.peak_rss_of, shapes, args.dead_fraction, args.dead_fraction_high)
        return

    now = datetime.datetime.now().astimezone()
    load_before = os.getloadavg()[0]
    version = saelens_version()
    sparsify = sparsify_version()
    args.sparsify_version = sparsify
    variants = [v for v in STEP_VARIANTS if (version is not None or v not in SAELENS_VARIANTS)
                and (sparsify is not None or v not in SPARSIFY_VARIANTS)]
    if args.only is not None:
        variants = [v for v in ROW_LABELS if v in ALWAYS_TIMED + tuple(args.only) and not v.startswith("gemm")
                    and v != "sparsekit_train" and (version is not None or v not in SAELENS_VARIANTS)
                    and (sparsify is not None or v not in SPARSIFY_VARIANTS)]
    skip_lines = []
    if version is None:
        skip_lines.append(f"SKIPPED: the SAELens rows ({', '.join(SAELENS_VARIANTS)}): sae_lens is not importable "
                          f"({SAELENS_IMPORT_ERROR}); install the bench extra: pip install -e '.[bench]'")
    if sparsify is None:
        skip_lines.append(f"SKIPPED: the EleutherAI sparsify rows ({', '.join(SPARSIFY_VARIANTS)}): eai-sparsify is "
                          f"not importable ({SPARSIFY_IMPORT_ERROR}); pip install 'eai-sparsify>=1.3,<1.4' "
                          f"(pinned in requirements/lock.txt)")
    time_bf16 = args.bf16_gemm == "on" or (args.bf16_gemm == "auto" and cpu_has_native_bf16())
    if not time_bf16 and args.only is None:
        skip_lines.append("SKIPPED: the bfloat16 encoder GEMM row: " + (
            "--bf16-gemm off" if args.bf16_gemm == "off" else "this CPU has no native bf16 (neither avx512_bf16 "
            "nor amx_bf16), so oneDNN emulates it (205 s a call on an AVX2-only EPYC) and sparsekit's bf16 screen "
            "stays off; --bf16-gemm on times it anyway"))
    for line in skip_lines:
        print(line, file=sys.stderr)

    rss_variants = {"all": ["baseline"] + (["baseline_saelens"] if version else []) + variants,
                    "topk": ["baseline", "sparsekit_topk"], "none": []}[args.rss]
    print(f"measuring peak RSS ({len(rss_variants)} variants), one subprocess each ...", file=sys.stderr)
    peaks = peak_rss_in_subprocesses(Path(__file__).resolve(), rss_variants, child_args(args, shapes))

    print("building the variants ...", file=sys.stderr)
    fns = make_gemms(shapes)
    if not time_bf16:
        del fns["gemm_torch_bf16"]
    if args.only is not None:
        fns = {name: fn for name, fn in fns.items() if name in ALWAYS_TIMED + tuple(args.only)}
    steps = {variant: build_step(variant, shapes, args.dead_fraction, args.dead_fraction_high) for variant in variants}
    fns.update(steps)
    if not args.no_trainer_check:
        fns["train2"] = make_train_run(shapes, 2)
        fns["train6"] = make_train_run(shapes, 6)
    print(f"timing {len(fns)} rows x {args.rounds} rounds ...", file=sys.stderr)
    times, others_share = time_with_cpu_share(fns, args.rounds)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    if not args.no_trainer_check:
        medians["sparsekit_train"] = (medians.pop("train6") - medians.pop("train2")) / 4
        del times["train2"], times["train6"]

    gflop = 2 * shapes.batch * shapes.d * shapes.n / 1e9
    lines = header_lines(args, shapes, now, load_before, others_share, version) + [""]
    for line in skip_lines:
        lines += [f"**{line}**", ""]
    lines += table_lines(medians, times, peaks, args, version, steps, gflop)
    lines += target_lines(medians, peaks, shapes, args) + NOTES
    del fns, steps
    if not args.no_passes:
        print("timing the TopK step's passes ...", file=sys.stderr)
        lines += section_lines(measure_passes(shapes, args.rounds), medians["sparsekit_topk"])
    if args.scaling:
        lines += scaling_lines(measure_scaling(shapes, args.scaling_rounds), shapes, args.scaling_rounds)
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.output:
        path = output_path(args.output, now, suffix="-peers")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"\nwrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
