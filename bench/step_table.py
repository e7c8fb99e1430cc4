"""One table, measured in one run: the encoder GEMM floor, full TopK training steps, and sparse vs
dense decode, on the CPU.

    .venv/bin/python bench/step_table.py                  # d=512, n=16384, k=32, B=4096, float32
    .venv/bin/python bench/step_table.py --quick          # small shapes, for iteration
    .venv/bin/python bench/step_table.py --output auto    # also bench/results/<date>-<cpu>.md

Rows:
- the encoder GEMM alone (x @ W_enc into a preallocated output) through torch and through numpy's
  OpenBLAS: the floor a fused step cannot go below; the faster one is "fastest GEMM";
- one full TopK SAE training step (encode, decode, MSE loss, backward, Adam step, zero_grad) for
  (a) a dense decode in plain torch, (b) a torch.topk encoder with an ``F.embedding_bag`` decode
  ("sparsify-style", an algorithm written here from its description, no sparsify code), and
  (c) sparsekit's ``topk_encode`` + ``sparse_decode``. All three compute the same function
  (pre = x @ W_enc + b_enc, keep the k largest per row, ReLU them, decode, add b_dec);
- sparsekit's topk_encode forward alone, to split a step's time between the encoder and the rest;
- sparse decode forward+backward (gradients to values and W_dec) against a dense [B, n] codes
  matrix times W_dec.

Every row is timed once per round, round-robin (the starting row rotates each round) so machine
noise hits all alike, after one warm-up call each; the table gives the median and the range, and
ratios to torch's GEMM and to the fastest GEMM of the same run (docs/design.md, "Benchmarks"). Peak
RSS is a high-water mark, so each step variant runs in a subprocess of its own
(``--peak-rss-of VARIANT``: build the tensors, run two steps, print ru_maxrss).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import (  # noqa: E402,F401
    BUSY_SHARE,
    RESULTS_DIR,
    SETTLE_SECONDS,
    THREAD_ENV_VARS,
    busy_cpu_seconds,
    cpu_model,
    output_path,
    peak_rss_gib,
    peak_rss_in_subprocesses,
    pin_thread_env,
    time_round_robin,
    time_with_cpu_share,
)

STEP_VARIANTS = ("dense", "sparsify", "sparsekit")
RSS_VARIANTS = ("baseline",) + STEP_VARIANTS  # baseline: imports and tensors, no step

# The targets for the fused CPU step.
TARGET_STEP_OVER_TORCH_GEMM = 1.5
TARGET_PEAK_RSS_GIB = 1.2


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes (B=512, d=128, n=4096, k=16)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5, or 3 with --quick)")
    parser.add_argument("--threads", type=int, default=2,
                        help="threads for torch, OpenBLAS and sparsekit._C (default 2)")
    parser.add_argument("--output", metavar="FILE",
                        help="also write the table as Markdown; 'auto' = bench/results/<date>-<cpu>.md")
    parser.add_argument("--peak-rss-of", choices=RSS_VARIANTS, metavar="VARIANT",
                        help=f"internal: run one of {', '.join(RSS_VARIANTS)} and print its peak RSS")
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 3 if args.quick else 5
    if args.rounds < 1 or args.threads < 1:
        parser.error("--rounds and --threads must be >= 1")
    return args


if __name__ == "__main__":
    # BLAS and OpenMP runtimes read their thread counts when they load: pin them before the
    # imports below (torch, numpy's OpenBLAS and sparsekit._C all compete for the same cores).
    pin_thread_env(parse_args().threads)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import sparsekit  # noqa: E402
from sparsekit.ops.backend import _C  # noqa: E402  (None when the extension is not built)
from sparsekit.ops.cpu import gemm as cpu_gemm  # noqa: E402


@dataclass(frozen=True)
class Shapes:
    batch: int
    d: int
    n: int
    k: int

    def __str__(self) -> str:
        return f"B={self.batch}, d={self.d}, n={self.n}, k={self.k}, float32"


FULL = Shapes(batch=4096, d=512, n=16384, k=32)
QUICK = Shapes(batch=512, d=128, n=4096, k=16)


def shapes_from(args: argparse.Namespace) -> Shapes:
    """The shapes of --quick (or the full ones), each overridden by --batch, --d-in, --n-latents and
    --k where given (bench/peers.py's and bench/cpu_passes.py's options); exits when k > n."""
    base = QUICK if args.quick else FULL
    shapes = Shapes(batch=args.batch or base.batch, d=args.d_in or base.d, n=args.n_latents or base.n,
                    k=args.k or base.k)
    if shapes.k > shapes.n:
        sys.exit(f"--k={shapes.k} exceeds --n-latents={shapes.n}")
    return shapes


def pin_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    if _C is not None:
        _C.set_num_threads(threads)


# --- inputs ------------------------------------------------------------------------------------

@dataclass
class Params:
    """A TopK SAE's parameters: W_enc [d, n], b_enc [n], W_dec [n, d], b_dec [d]."""
    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor

    def as_list(self) -> list[torch.Tensor]:
        return [self.W_enc, self.b_enc, self.W_dec, self.b_dec]


def make_inputs(shapes: Shapes, seed: int = 0) -> tuple[torch.Tensor, Params]:
    """x [B, d] (no grad) and freshly initialised parameters (tied init, unit-norm decoder rows)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shapes.batch, shapes.d, generator=gen)
    W_dec = torch.randn(shapes.n, shapes.d, generator=gen)
    W_dec /= W_dec.norm(dim=-1, keepdim=True)
    params = Params(W_enc=W_dec.t().contiguous(), b_enc=torch.zeros(shapes.n),
                    W_dec=W_dec, b_dec=torch.zeros(shapes.d))
    for p in params.as_list():
        p.requires_grad_(True)
    return x, params


# --- the three TopK forward passes (x -> x_hat) -----------------------------------------------

def forward_dense(p: Params, x: torch.Tensor, k: int) -> torch.Tensor:
    """(a) Plain torch: top-k of the pre-activations scattered into dense [B, n] codes, then a GEMM."""
    pre = x @ p.W_enc + p.b_enc
    values, indices = pre.topk(k, dim=-1)
    codes = torch.zeros_like(pre).scatter_(-1, indices, values.relu())
    return codes @ p.W_dec + p.b_dec


def forward_sparsify(p: Params, x: torch.Tensor, k: int) -> torch.Tensor:
    """(b) torch.topk encoder, decode as an embedding_bag: sum_j values[b, j] * W_dec[indices[b, j]]."""
    pre = x @ p.W_enc + p.b_enc
    values, indices = pre.topk(k, dim=-1)
    return F.embedding_bag(indices, p.W_dec, per_sample_weights=values.relu(), mode="sum") + p.b_dec


def forward_sparsekit(p: Params, x: torch.Tensor, k: int) -> torch.Tensor:
    """(c) sparsekit's fused encoder and sparse decoder."""
    codes = sparsekit.ops.topk_encode(x, p.W_enc, p.b_enc, k)
    return sparsekit.ops.sparse_decode(codes.values, codes.indices, p.W_dec, p.b_dec)


FORWARDS = {"dense": forward_dense, "sparsify": forward_sparsify, "sparsekit": forward_sparsekit}


def make_step(variant: str, shapes: Shapes):
    """A closure running one full training step of ``variant`` on its own parameters and Adam."""
    x, params = make_inputs(shapes)
    forward = FORWARDS[variant]
    optimizer = torch.optim.Adam(params.as_list(), lr=1e-4, fused=True)

    def step() -> None:
        x_hat = forward(params, x, shapes.k)
        loss = ((x_hat - x) ** 2).sum(-1).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


# --- GEMM floor and decode-only rows -----------------------------------------------------------

def topk_encoder_gemm(shapes: Shapes) -> str:
    """What runs sparsekit's float32 TopK encoder GEMM at these shapes on the CPU: the bf16 screen
    (sparsekit.ops.cpu.screen) or a float32 GEMM library (numpy's OpenBLAS or torch)."""
    from sparsekit.ops.cpu import screen as cpu_screen
    x, W = torch.empty(shapes.batch, shapes.d, device="meta"), torch.empty(shapes.d, shapes.n, device="meta")
    if cpu_screen.use_screen(x, W, shapes.k):
        return "bf16 screen + float32 recompute"
    return "float32 " + cpu_gemm.gemm_library(2.0 * shapes.batch * shapes.d * shapes.n)


def make_gemms(shapes: Shapes) -> dict:
    """x @ W_enc into a preallocated [B, n] output, through torch and through numpy's OpenBLAS; and
    for reference the same product in bfloat16 (torch/oneDNN), the GEMM sparsekit.ops.cpu.screen runs."""
    x, params = make_inputs(shapes)
    W_enc = params.W_enc.detach()
    out = torch.empty(shapes.batch, shapes.n)
    x_np, W_np, out_np = x.numpy(), W_enc.numpy(), out.numpy()  # zero-copy views
    x_bf16, W_bf16 = x.bfloat16(), W_enc.bfloat16()
    out_bf16 = torch.empty(shapes.batch, shapes.n, dtype=torch.bfloat16)
    return {
        "gemm_torch": lambda: torch.matmul(x, W_enc, out=out),
        "gemm_numpy": lambda: np.matmul(x_np, W_np, out=out_np),
        "gemm_torch_bf16": lambda: torch.matmul(x_bf16, W_bf16, out=out_bf16),
    }


def make_encode_forward(shapes: Shapes):
    """sparsekit.ops.topk_encode's forward alone: the GEMM plus fused top-k, what a step cannot avoid."""
    x, params = make_inputs(shapes)
    W_enc, b_enc = params.W_enc.detach(), params.b_enc.detach()
    return lambda: sparsekit.ops.topk_encode(x, W_enc, b_enc, shapes.k)


def make_decodes(shapes: Shapes) -> dict:
    """Decode forward+backward with gradients to the codes and W_dec: sparse (sparsekit) vs dense."""
    x, params = make_inputs(shapes)
    with torch.no_grad():
        codes = sparsekit.ops.topk_encode(x, params.W_enc, params.b_enc, shapes.k)
    grad_y = torch.randn(shapes.batch, shapes.d, generator=torch.Generator().manual_seed(1))
    b_dec = params.b_dec.detach()
    W_sparse = params.W_dec.detach().clone().requires_grad_(True)
    W_dense = params.W_dec.detach().clone().requires_grad_(True)
    values = codes.values.clone().requires_grad_(True)
    dense_codes = torch.zeros(shapes.batch, shapes.n).scatter_(-1, codes.indices, codes.values)
    dense_codes.requires_grad_(True)

    def sparse() -> None:
        values.grad = W_sparse.grad = None
        sparsekit.ops.sparse_decode(values, codes.indices, W_sparse, b_dec).backward(grad_y)

    def dense() -> None:
        dense_codes.grad = W_dense.grad = None
        (dense_codes @ W_dense + b_dec).backward(grad_y)

    return {"decode_sparse": sparse, "decode_dense": dense}


ROW_LABELS = {
    "gemm_torch": "encoder GEMM: torch.matmul(x, W_enc, out=)",
    "gemm_numpy": "encoder GEMM: numpy.matmul (OpenBLAS), out=",
    "gemm_torch_bf16": "encoder GEMM in bfloat16: torch.matmul (oneDNN), out= (not a target's yardstick)",
    "encode_sparsekit": "sparsekit topk_encode forward only (GEMM + fused top-k)",
    "step_dense": "TopK step (a): plain torch, dense codes @ W_dec",
    "step_sparsify": "TopK step (b): sparsify-style: torch topk + embedding_bag",
    "step_sparsekit": "TopK step (c): sparsekit topk_encode + sparse_decode",
    "decode_sparse": "decode fwd+bwd: sparsekit sparse_decode",
    "decode_dense": "decode fwd+bwd: dense [B, n] codes @ W_dec",
}


# --- measuring ---------------------------------------------------------------------------------

def peak_rss_child(variant: str, shapes: Shapes) -> None:
    """Runs in its own process: build the inputs, run two steps, print the peak RSS as JSON."""
    if variant == "baseline":
        make_inputs(shapes)
    else:
        step = make_step(variant, shapes)
        step()
        step()
    print(json.dumps({"variant": variant, "peak_rss_gib": peak_rss_gib()}))


def measure_peak_rss(args: argparse.Namespace) -> dict[str, float]:
    """Peak RSS in GiB of each of RSS_VARIANTS, each measured in a fresh subprocess."""
    return peak_rss_in_subprocesses(Path(__file__).resolve(), RSS_VARIANTS,
                                    ["--threads", str(args.threads)] + (["--quick"] if args.quick else []))


# --- reporting ---------------------------------------------------------------------------------

def numpy_blas() -> str:
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{blas['name']} {blas['version']}"
    except Exception:  # the config layout is not a stable API
        return "unknown BLAS"


def cpu_paths_line() -> str:
    """The CPU crossovers in effect (sparsekit.ops.cpu.tuning) and where they come from: `sparsekit tune`'s
    cache for this machine, or the defaults."""
    from sparsekit.ops.backend import CPP_ISA
    from sparsekit.ops.cpu import gemm, screen, tuning
    values = ", ".join(f"{name} = {value:,}" for name, value in tuning.in_effect().items())
    kind = (f"{CPP_ISA} kernels, {'native' if screen.cpu_has_native_bf16() else 'no native'} bf16, NumPy's OpenBLAS "
            f"{'controllable' if gemm.openblas_available() else 'not found'}")
    return f"- machine kind: {kind}; CPU paths chosen ({tuning.source()}): {values}"


def environment_lines(shapes: Shapes, threads: int, rounds: int, load_before: float, others_share: float,
                      versions_suffix: str = "") -> list[str]:
    """The machine, thread, version, backend and load lines every CPU bench table starts with
    (bench/step_table.py and bench/peers.py)."""
    cores = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    c_threads = _C.get_num_threads() if _C is not None else "n/a (extension not built)"
    checks = "off" if os.environ.get("SPARSEKIT_CHECKS", "1").strip() == "0" else "on"
    return [
        f"- CPU: {cpu_model()}, {cores} cores ({usable} usable); threads pinned to {threads} "
        f"(torch.get_num_threads() = {torch.get_num_threads()}, sparsekit._C.get_num_threads() = {c_threads}, "
        f"{'/'.join(THREAD_ENV_VARS)} = {os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}, "
        f"OMP_WAIT_POLICY = {os.environ.get('OMP_WAIT_POLICY', 'unset')})",
        f"- torch {torch.__version__}, numpy {np.__version__} ({numpy_blas()}), python {platform.python_version()}, "
        f"sparsekit {sparsekit.__version__}{versions_suffix}",
        f"- sparsekit.backends() = {sparsekit.backends()}; sparsekit TopK encoder GEMM: "
        f"{topk_encoder_gemm(shapes)}; finite checks {checks}",
        cpu_paths_line(),
        f"- {rounds} rounds, round-robin, one warm-up call each; times are medians (min-max alongside)",
        f"- other processes used {others_share:.0%} of the CPU while the rows were timed"
        f" (load average before the run: {load_before:.2f})"
        + (" -- WARNING: the machine was not quiet; the numbers are suspect" if others_share > BUSY_SHARE else ""),
    ]


def header_lines(args: argparse.Namespace, shapes: Shapes, now: datetime.datetime,
                 load_before: float, others_share: float) -> list[str]:
    gflop = 2 * shapes.batch * shapes.d * shapes.n / 1e9
    return [
        f"# sparsekit CPU step table ({now:%Y-%m-%d %H:%M %Z})",
        "",
        f"- shapes: {shapes}; encoder GEMM = 2*B*d*n = {gflop:.1f} GFLOP",
        *environment_lines(shapes, args.threads, args.rounds, load_before, others_share),
        "- note: every step uses torch.optim.Adam(fused=True); loss = ((x_hat - x)**2).sum(-1).mean(); "
        "each step variant has its own parameters (same init); peak RSS from a subprocess per variant "
        "(build tensors + 2 steps)",
    ]


def table_lines(times: dict[str, list[float]], peaks: dict[str, float], gflop: float) -> list[str]:
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    torch_gemm = medians["gemm_torch"]
    fastest_name = min(("gemm_torch", "gemm_numpy"), key=medians.__getitem__)
    fastest = medians[fastest_name]
    lines = [
        "| measurement | median s | min-max s | x torch GEMM | x fastest GEMM | GFLOP/s | peak RSS GiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, label in ROW_LABELS.items():
        med = medians[name]
        rate = f"{gflop / med:.0f}" if name.startswith("gemm") else ""
        peak = peaks.get(name.removeprefix("step_")) if name.startswith("step_") else None
        lines.append(f"| {label}{' (fastest GEMM)' if name == fastest_name else ''} | {med:.3f} | "
                     f"{min(times[name]):.3f}-{max(times[name]):.3f} | {med / torch_gemm:.2f} | "
                     f"{med / fastest:.2f} | {rate} | {'' if peak is None else f'{peak:.2f}'} |")
    lines += ["", f"Peak RSS of the process with imports and tensors but no step (baseline): "
                  f"{peaks['baseline']:.2f} GiB."]
    return lines


def target_lines(times: dict[str, list[float]], peaks: dict[str, float], shapes: Shapes) -> list[str]:
    step = statistics.median(times["step_sparsekit"])
    torch_gemm = statistics.median(times["gemm_torch"])
    ratio, peak = step / torch_gemm, peaks["sparsekit"]
    verdict = {True: "MET", False: "NOT MET"}
    lines = ["", "Targets (foundation issue, sparsekit full step):",
             f"- step <= {TARGET_STEP_OVER_TORCH_GEMM}x torch encoder GEMM: {ratio:.2f}x -> "
             f"{verdict[ratio <= TARGET_STEP_OVER_TORCH_GEMM]}",
             f"- peak RSS <= {TARGET_PEAK_RSS_GIB} GiB: {peak:.2f} GiB -> {verdict[peak <= TARGET_PEAK_RSS_GIB]}"]
    if shapes != FULL:
        lines.append("- (--quick shapes: the targets are stated for the full shapes)")
    return lines


def main() -> None:
    args = parse_args()
    shapes = QUICK if args.quick else FULL
    pin_threads(args.threads)
    if args.peak_rss_of:
        peak_rss_child(args.peak_rss_of, shapes)
        return

    now = datetime.datetime.now().astimezone()
    load_before = os.getloadavg()[0]
    print(f"measuring peak RSS ({', '.join(RSS_VARIANTS)}), one subprocess each ...", file=sys.stderr)
    peaks = measure_peak_rss(args)
    fns = make_gemms(shapes)
    fns["encode_sparsekit"] = make_encode_forward(shapes)
    fns.update({f"step_{variant}": make_step(variant, shapes) for variant in STEP_VARIANTS})
    fns.update(make_decodes(shapes))
    print(f"timing {len(fns)} rows x {args.rounds} rounds ...", file=sys.stderr)
    times, others_share = time_with_cpu_share(fns, args.rounds)

    gflop = 2 * shapes.batch * shapes.d * shapes.n / 1e9
    lines = (header_lines(args, shapes, now, load_before, others_share) + [""] + table_lines(times, peaks, gflop)
             + target_lines(times, peaks, shapes))
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.output:
        path = output_path(args.output, now)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"\nwrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
