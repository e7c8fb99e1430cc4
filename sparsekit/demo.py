"""The `make demo` job until the MNIST study lands: a TopK dictionary learns a known sparse code.

Synthetic data: n_true unit-norm ground-truth directions in d dimensions; each sample is a sum of
about `active` of them with random positive magnitudes, plus a little noise. A TopK sparse
autoencoder trained with sparsekit's ops should recover the directions: the report prints the
fraction of variance unexplained (FVU), L0, dead latents, and how many true directions some decoder
row matches (cosine > 0.9).
"""
from __future__ import annotations

import argparse
import time

import torch

from . import ops
from .backend import backends


def synthetic_batch(directions: torch.Tensor, batch: int, active: float, gen: torch.Generator) -> torch.Tensor:
    """[batch, d]: sums of ~`active` of the rows of directions [n_true, d], magnitudes in (0, 2)."""
    n_true = directions.shape[0]
    on = torch.rand(batch, n_true, generator=gen) < active / n_true
    magnitudes = torch.rand(batch, n_true, generator=gen) * 2 * on
    noise = 0.01 * torch.randn(batch, directions.shape[1], generator=gen)
    return magnitudes @ directions + noise


def run(d: int = 64, n_true: int = 256, n_latents: int = 512, k: int = 8, active: float = 5.0,
        batch: int = 1024, lr: float = 2e-3, seconds: float = 60.0, max_steps: int | None = None,
        seed: int = 0, log_every: int = 100) -> dict:
    """Train for `seconds` (or `max_steps`) and return the final metrics."""
    gen = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(n_true, d, generator=gen), dim=-1)
    W_dec = torch.nn.functional.normalize(torch.randn(n_latents, d, generator=gen), dim=-1)
    W_enc = W_dec.t().clone().requires_grad_()     # encoder initialised as the decoder's transpose
    W_dec.requires_grad_()
    b_enc = torch.zeros(n_latents, requires_grad=True)
    b_dec = synthetic_batch(directions, 4096, active, gen).mean(0).requires_grad_()
    params = [W_enc, b_enc, W_dec, b_dec]
    optimizer = torch.optim.Adam(params, lr=lr)
    steps_since_fired = torch.zeros(n_latents, dtype=torch.long)

    print(f"sparsekit demo: TopK SAE d={d} n_latents={n_latents} k={k} on {n_true} hidden directions "
          f"(~{active:g} active per sample); backends {backends()}")
    start, step, metrics = time.perf_counter(), 0, {}
    while True:
        x = synthetic_batch(directions, batch, active, gen)
        codes = ops.topk_encode(x, W_enc, b_enc, k)
        x_hat = ops.sparse_decode(codes.values, codes.indices, W_dec, b_dec)
        mse = (x_hat - x).pow(2).sum(-1).mean()
        optimizer.zero_grad(set_to_none=True)
        mse.backward()
        optimizer.step()
        with torch.no_grad():  # unit-norm decoder rows keep the scale in the codes
            W_dec.div_(W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))
        fired = torch.zeros(n_latents, dtype=torch.bool)
        fired[codes.indices[codes.values > 0]] = True
        steps_since_fired = torch.where(fired, 0, steps_since_fired + 1)
        step += 1
        elapsed = time.perf_counter() - start
        done = (max_steps is not None and step >= max_steps) or (max_steps is None and elapsed >= seconds)
        if step % log_every == 0 or done or step == 1:
            with torch.no_grad():
                fvu = float(mse.detach() / (x - x.mean(0)).pow(2).sum(-1).mean())
                l0 = float((codes.values > 0).sum(-1).float().mean())
                dead = float((steps_since_fired >= 50).float().mean())
                cos = torch.nn.functional.normalize(W_dec, dim=-1) @ directions.t()
                recovered = int((cos.max(0).values > 0.9).sum())
            metrics = {"step": step, "tokens": step * batch, "mse": float(mse.detach()), "fvu": fvu, "l0": l0,
                       "dead_frac": dead, "recovered": recovered, "seconds": elapsed}
            print(f"step {step:5d}  {elapsed:5.1f}s  fvu {fvu:.4f}  l0 {l0:.2f}  dead {dead:.3f}  "
                  f"directions recovered {recovered}/{n_true}", flush=True)
        if done:
            return metrics


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="sparsekit demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="training time (default 60)")
    parser.add_argument("--steps", type=int, default=None, help="train exactly this many steps instead")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.seconds <= 0:
        parser.error(f"--seconds must be positive, got {args.seconds}")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    metrics = run(seconds=args.seconds, max_steps=args.steps, seed=args.seed)
    print(f"final: fvu {metrics['fvu']:.4f}, l0 {metrics['l0']:.2f}, dead {metrics['dead_frac']:.3f}, "
          f"{metrics['recovered']} hidden directions recovered after {metrics['step']} steps")
