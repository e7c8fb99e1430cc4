"""Training throughput per architecture, and the cost of dead-latent remedies, measured in one run.

    .venv/bin/python bench/train_step_table.py                 # d=512, n=16384, k=32, B=4096, fp32
    .venv/bin/python bench/train_step_table.py --quick         # small shapes
    .venv/bin/python bench/train_step_table.py --output auto   # also bench/results/<date>-<cpu>-train.md

Rows:
- steps/s of ``sparsekit.train`` for each architecture: the whole loop (batching from a
  TensorSource, normalisation, forward, loss, backward, decoder constraint, clipping, Adam,
  dead-latent counting). Per-step time = (time of a 6-step run - time of a 2-step run) / 4, so
  set-up (b_dec's geometric median, the held-out split) does not count.
- a ReLU+L1 step with ghost grads and a TopK step with AuxK, with 1% / 10% / 50% of the latents
  dead, relative to the same step without the remedy (interleaved rounds, medians).
Ratios to torch's encoder GEMM of the same run are given for scale.
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import output_path  # noqa: E402
from step_table import cpu_model, pin_threads, time_round_robin  # noqa: E402

import sparsekit  # noqa: E402
from sparsekit.activations import TensorSource  # noqa: E402
from sparsekit.training.dead_latents import auxk_loss, ghost_loss  # noqa: E402


def make_sae(architecture: str, d: int, n: int, k: int):
    return {"topk": lambda: sparsekit.TopKSAE(d, n, k), "batchtopk": lambda: sparsekit.BatchTopKSAE(d, n, k),
            "relu": lambda: sparsekit.ReLUSAE(d, n, l1_coeff=1e-3),
            "jumprelu": lambda: sparsekit.JumpReLUSAE(d, n, l0_coeff=1e-3)}[architecture]()


def train_seconds(architecture: str, x: torch.Tensor, steps: int, batch: int, k: int) -> float:
    sae = make_sae(architecture, x.shape[1], args.n, k)
    cfg = sparsekit.TrainConfig(batch_size=batch, total_tokens=batch * steps, eval_tokens=0, log_every=10**9,
                                progress=False, b_dec_init="mean")
    start = time.perf_counter()
    sparsekit.train(sae, TensorSource(x, batch_size=batch, shuffle=False), cfg)
    return time.perf_counter() - start


def remedy_step(sae, optimizer, x, dead, remedy):
    """One training step as the trainer takes it, with a fixed set of dead latents."""
    out = sae(x)
    loss = sum(out.losses.values())
    if remedy == "ghost":
        loss = loss + ghost_loss(sae, x, x - out.x_hat, dead, out.losses["mse"])
    elif remedy == "auxk":
        loss = loss + auxk_loss(sae, x, x - out.x_hat, dead, x.shape[1] // 2) / 32
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    sae.remove_parallel_decoder_grad()
    optimizer.step()
    sae.normalize_decoder()


def main() -> None:
    global args
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="B=512, d=128, n=4096, k=16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", metavar="FILE", help="also write Markdown; 'auto' = bench/results/<date>-<cpu>-train.md")
    args = parser.parse_args()
    args.batch, args.d, args.n, args.k = (512, 128, 4096, 16) if args.quick else (4096, 512, 16384, 32)
    pin_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch * 6, args.d)
    W = torch.randn(args.d, args.n)
    gemm_out = torch.empty(args.batch, args.n)

    fns = {"gemm": lambda: torch.matmul(x[: args.batch], W, out=gemm_out)}
    architectures = ("topk", "batchtopk", "relu", "jumprelu")
    for arch in architectures:
        fns[f"train2_{arch}"] = lambda a=arch: train_seconds(a, x, 2, args.batch, args.k)
        fns[f"train6_{arch}"] = lambda a=arch: train_seconds(a, x, 6, args.batch, args.k)
    xb = x[: args.batch]
    for remedy, arch in (("ghost", "relu"), ("auxk", "topk")):
        for fraction in (0.0, 0.01, 0.10, 0.50):
            sae = make_sae(arch, args.d, args.n, args.k)
            optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4)
            dead = torch.randperm(args.n)[: int(fraction * args.n)]
            fns[f"{remedy}_{fraction}"] = (lambda s=sae, o=optimizer, dd=dead, r=remedy if fraction else None:
                                          remedy_step(s, o, xb, dd, r))
    print(f"timing {len(fns)} rows x {args.rounds} rounds ...", file=sys.stderr)
    times = time_round_robin(fns, args.rounds)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    gemm = med["gemm"]

    now = datetime.datetime.now(datetime.timezone.utc)
    lines = [f"# sparsekit training throughput ({now:%Y-%m-%d %H:%M %Z})", "",
             f"- shapes: B={args.batch}, d={args.d}, n={args.n}, k={args.k}, float32; {cpu_model()}, "
             f"{args.threads} threads; torch {torch.__version__}; backends {sparsekit.backends()}",
             f"- medians of {args.rounds} interleaved rounds; torch encoder GEMM alone: {gemm:.3f} s", "",
             "| architecture | s/step | steps/s | tokens/s | x torch GEMM |", "| --- | ---: | ---: | ---: | ---: |"]
    for arch in architectures:
        per_step = (med[f"train6_{arch}"] - med[f"train2_{arch}"]) / 4
        lines.append(f"| {arch} | {per_step:.3f} | {1 / per_step:.2f} | {args.batch / per_step:,.0f} | "
                     f"{per_step / gemm:.2f} |")
    lines += ["", "| remedy | dead latents | s/step | x the same step without it |", "| --- | ---: | ---: | ---: |"]
    for remedy, arch in (("ghost", "relu"), ("auxk", "topk")):
        plain = med[f"{remedy}_0.0"]
        lines.append(f"| {arch} step, no remedy | 0% | {plain:.3f} | 1.00 |")
        for fraction in (0.01, 0.10, 0.50):
            t = med[f"{remedy}_{fraction}"]
            lines.append(f"| {arch} + {remedy} | {fraction:.0%} | {t:.3f} | {t / plain:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        path = output_path(args.output, now, suffix="-train")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
