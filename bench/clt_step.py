"""Training throughput of a cross-layer transcoder's step against per-layer transcoders with the same
total latents, measured in one run.

    .venv/bin/python bench/clt_step.py                               # L = 3 and 6, n = 2048, d = 576, B = 1024, k = 16
    .venv/bin/python bench/clt_step.py --layers 3 --rounds 5         # one L, fewer rounds
    .venv/bin/python bench/clt_step.py --output auto                 # also bench/results/<date>-<cpu>-clt-step.md

One training step, on one batch of B rows of L layers (x, y [B, L, d], random, as
``CrossLayerTranscoder.scale_batch`` would leave them): forward, loss, backward, the decoder's
parallel-gradient removal, Adam, the decoder's renormalisation (``sparsekit.training.clt.train_clt``'s
step, AuxK off). Rows, each with L x n latents in all:

- ``clt``: a CLT, n latents and TopK k per layer, each layer's features writing to every later layer
  (sum over l of (L - l) decoders of n x d: L(L+1)/2 of them);
- ``plt``: the same module with ``reach=1`` (per-layer transcoders: L decoders), the PLT case;
- ``transcoders``: L separate TopK transcoders (``sparsekit.Transcoder``, n latents, k), one step each
  with its own Adam, the L steps timed as one.

The three take turns (round-robin, each round starting one later, one warm-up call each); times are
medians over the rounds, tokens/s = B / median, ratios against ``clt`` from the same rounds. The CPU
model, threads, backend, load average and the share of the CPU other processes took are printed
with the table: on a shared machine read the ratios, not the absolute rates.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import BUSY_SHARE, cpu_model, output_path, pin_thread_env, time_with_cpu_share  # noqa: E402


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[3, 6], help="L values, one table row group each")
    p.add_argument("--n", type=int, default=2048, help="latents per layer")
    p.add_argument("--d", type=int, default=576, help="model width (SmolLM2-135M: 576)")
    p.add_argument("--batch", type=int, default=1024, help="rows per step B")
    p.add_argument("--k", type=int, default=16, help="TopK k per layer")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds (medians over them)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch and sparsekit threads")
    p.add_argument("--output", default=None, help="also write the table here ('auto': bench/results/)")
    args = p.parse_args(argv)
    for name in ("n", "d", "batch", "k", "rounds", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if any(L < 1 for L in args.layers):
        p.error(f"--layers must be >= 1, got {args.layers}")
    if args.k > args.n:
        p.error(f"--k {args.k} must not exceed --n {args.n}")
    return args


def step_fn(models, batches):
    """One training step of each (model, its Adam) on its (x, y), as train_clt takes it -> a callable."""
    import torch
    optimizers = [torch.optim.Adam(model.parameters(), lr=1e-4) for model in models]

    def step():
        for model, optimizer, (x, y) in zip(models, optimizers, batches):
            out = model(x, y)
            sum(out.losses.values()).backward()
            model.remove_parallel_decoder_grad()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            model.normalize_decoder()
    return step


def variants(L: int, n: int, d: int, batch: int, k: int, seed: int = 0) -> dict:
    """{name: step callable} for the CLT, the PLTs and L plain transcoders on one random batch."""
    import torch

    import sparsekit
    from sparsekit.sae import CrossLayerTranscoder
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, L, d, generator=gen)
    y = torch.randn(batch, L, d, generator=gen)
    clt = CrossLayerTranscoder(d, L * n, d, n_layers=L, k_per_layer=k, seed=seed)
    plt = CrossLayerTranscoder(d, L * n, d, n_layers=L, k_per_layer=k, reach=1, seed=seed)
    singles = [sparsekit.Transcoder(d, n, d, k=k, seed=seed + layer) for layer in range(L)]
    layer_batches = [(x[:, layer].contiguous(), y[:, layer].contiguous()) for layer in range(L)]
    return {"clt": step_fn([clt], [(x, y)]), "plt": step_fn([plt], [(x, y)]),
            "transcoders": step_fn(singles, layer_batches)}


def decoder_count(name: str, L: int) -> int:
    return L * (L + 1) // 2 if name == "clt" else L


def main(argv=None) -> None:
    args = parse(argv)
    pin_thread_env(args.threads)
    import torch

    import sparsekit
    from sparsekit.ops.backend import CPP_ISA
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    now = datetime.datetime.now(datetime.timezone.utc)
    rows, shares = [], []
    for L in args.layers:
        times, others = time_with_cpu_share(variants(L, args.n, args.d, args.batch, args.k), args.rounds)
        shares.append(others)
        medians = {name: statistics.median(t) for name, t in times.items()}
        for name, t in times.items():
            rows.append(f"| {L} | {name} | {L * args.n:,} | {decoder_count(name, L)} | {1e3 * medians[name]:.0f} "
                        f"({1e3 * min(t):.0f}-{1e3 * max(t):.0f}) | {args.batch / medians[name]:,.0f} | "
                        f"{medians['clt'] / medians[name]:.2f} |")
    load_after = os.getloadavg()
    lines = [
        f"# CLT training step against per-layer transcoders ({now:%Y-%m-%d %H:%M %Z})",
        "",
        f"- shapes: n = {args.n:,} latents and k = {args.k} per layer, d = {args.d}, B = {args.batch:,} rows of "
        f"L layers; float32; {args.rounds} rounds, round-robin, one warm-up call each; medians (min-max)",
        f"- CPU: {cpu_model()}, {os.cpu_count()} cores; threads {args.threads} (torch.get_num_threads() = "
        f"{torch.get_num_threads()}); sparsekit {sparsekit.__version__}, backends {sparsekit.backends()}, "
        f"C++ ISA {CPP_ISA}; torch {torch.__version__}",
        f"- load average before {load_before[0]:.2f}, after {load_after[0]:.2f}; other processes took "
        + ", ".join(f"{share:.0%}" for share in shares) + " of the CPU while each L was timed"
        + (" -- WARNING: the machine was not quiet: read the ratios, not the rates"
           if max(shares) > BUSY_SHARE else ""),
        "",
        "| L | step | latents in all | decoders (n x d) | ms/step | tokens/s | tokens/s vs clt |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *rows,
    ]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.output:
        path = output_path(args.output, now, "-clt-step")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
