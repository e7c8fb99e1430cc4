"""Distributed training throughput on this machine (1 vs 2 gloo ranks on the CPU, one thread each)
and the communication per step by formula, for reasoning about many GPUs.

    python bench/distributed.py                 # measured table, then the formula table
    python bench/distributed.py --steps 20 --d-in 256 --n-latents 8192

Each configuration runs in fresh processes launched as torchrun would (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT). Timed: optimizer steps after one warm-up step, on rank 0.
- data-parallel TopK / BatchTopK: ``sparsekit.train`` with the global batch split over the ranks
  (the same global batch for 1 and 2 ranks: ideal speed-up is 2x);
- latent-sharded TopK: ``LatentShardedTopK``, each rank holding n/W latents and the whole batch.
On a 2-core machine two ranks compete with everything else running: read the speed-ups as a
check that the communication is not the bottleneck, not as a GPU forecast.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

MODES = ("dp-topk", "dp-batchtopk", "sharded-topk")


def rank_main(mode: str, d_in: int, n_latents: int, k: int, batch: int, steps: int) -> None:
    import torch

    import sparsekit
    from sparsekit.training.parallel.data import init_distributed

    torch.set_num_threads(1)
    info = init_distributed(backend="gloo", timeout_s=300)
    gen = torch.Generator().manual_seed(0)
    rows = batch * (steps + 1)
    x = torch.randn(rows, d_in, generator=gen)

    if mode.startswith("dp-"):
        cls = sparsekit.TopKSAE if mode == "dp-topk" else sparsekit.BatchTopKSAE

        def run(n_steps):
            sae = cls(d_in, n_latents, k=k)
            cfg = sparsekit.TrainConfig(batch_size=batch, total_tokens=batch * n_steps, eval_tokens=0,
                                        progress=False, log_every=10 ** 9, b_dec_init="zeros")
            torch.distributed.barrier()
            start = time.perf_counter()
            sparsekit.train(sae, x[:batch * n_steps], cfg)
            return time.perf_counter() - start

        run(1)  # warm-up: the first call imports and allocates
        elapsed = run(steps + 1) - run(1)  # both include the same set-up; the difference is `steps` steps
    else:
        from sparsekit.training.parallel.sharded import LatentShardedTopK

        shard = LatentShardedTopK(d_in, n_latents, k)
        optimizer = torch.optim.Adam(shard.parameters(), lr=1e-4, foreach=True)

        def step(i):
            out = shard(x[i * batch:(i + 1) * batch])
            optimizer.zero_grad()
            out.losses["mse"].backward()
            shard.remove_parallel_decoder_grad()
            shard.clip_grad_norm_(1.0)
            optimizer.step()
            shard.normalize_decoder()

        step(0)
        torch.distributed.barrier()
        start = time.perf_counter()
        for i in range(1, steps + 1):
            step(i)
        elapsed = time.perf_counter() - start
    if info.rank == 0:
        print("RESULT " + json.dumps({"mode": mode, "world": info.world_size, "seconds": elapsed,
                                      "tokens_per_s": batch * steps / elapsed}), flush=True)
    torch.distributed.destroy_process_group()


def launch(world: int, args) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    processes = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        command = [sys.executable, __file__, "--rank-mode", args.mode_now, "--d-in", str(args.d_in),
                   "--n-latents", str(args.n_latents), "--k", str(args.k), "--batch", str(args.batch),
                   "--steps", str(args.steps)]
        processes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True))
    outputs = [p.communicate(timeout=900)[0] for p in processes]
    for p, out in zip(processes, outputs):
        if p.returncode:
            raise SystemExit(f"a rank failed:\n{out}")
    line = next(l for l in outputs[0].splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def formula_table() -> None:
    """Communication per step and rank for 1M latents, by formula (fp32 values)."""
    from sparsekit.training.parallel.data import step_communication_bytes

    d, n, k, B = 4096, 2 ** 20, 32, 4096
    print(f"\ncommunication per step and rank (by formula): d_in={d}, n={n:,} latents, k={k}, "
          f"{B} tokens per rank and step, fp32")
    print(f"{'layout':38s} {'GPUs':>5s} {'bytes sent per rank':>20s}   what")
    for W in (8, 64):
        dp = step_communication_bytes(d, n, batch_size=B * W, k=k, world_size=W)
        print(f"{'data parallel, TopK':38s} {W:5d} {dp['total'] / 1e9:17.2f} GB   gradient all-reduce of all "
              f"{2 * d * n / 1e9:.1f} G parameters")
        dpb = step_communication_bytes(d, n, batch_size=B * W, k=k, world_size=W, architecture="batchtopk")
        print(f"{'data parallel, BatchTopK':38s} {W:5d} {dpb['total'] / 1e9:17.2f} GB   + all-gather of B*k "
              f"candidates ({dpb['batchtopk_allgather'] / 1e9:.2f} GB)")
        # latent sharded over all W ranks, each seeing the whole global batch B*W
        batch = B * W
        ring = 2 * (W - 1) / W
        sharded = (W - 1) * batch * k * 4 + ring * batch * d * 4
        print(f"{'latent sharded (all W), whole batch':38s} {W:5d} {sharded / 1e9:17.2f} GB   all-gather B*k "
              f"values + all-reduce of B x d partial reconstructions")
        if W > 8:  # 2-D mesh: 8 latent shards per node (NVLink), W/8 data-parallel replicas (across nodes)
            S, D = 8, W // 8
            rows = B * W // D                                  # each latent group's share of the global batch
            inside = (S - 1) * rows * k * 4 + 2 * (S - 1) / S * rows * d * 4
            across = 2 * (D - 1) / D * (2 * d * n // S + n // S + d) * 4
            print(f"{'2-D mesh, 8 shards x ' + str(D) + ' replicas':38s} {W:5d} {(inside + across) / 1e9:17.2f} GB   "
                  f"{inside / 1e9:.2f} GB in the node (B*k, B x d) + {across / 1e9:.2f} GB across nodes "
                  f"(all-reduce of the 1/8 gradient shard)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank-mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--d-in", type=int, default=256)
    parser.add_argument("--n-latents", type=int, default=8192)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2048, help="global batch (tokens per step)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--modes", default=",".join(MODES))
    args = parser.parse_args(argv)
    if args.rank_mode:
        rank_main(args.rank_mode, args.d_in, args.n_latents, args.k, args.batch, args.steps)
        return
    print(f"CPU, gloo, 1 thread per rank: d_in={args.d_in}, n_latents={args.n_latents}, k={args.k}, "
          f"global batch {args.batch}, {args.steps} timed steps (fp32)")
    print(f"{'mode':14s} {'1 rank tok/s':>13s} {'2 ranks tok/s':>14s} {'speed-up':>9s}")
    for mode in args.modes.split(","):
        args.mode_now = mode
        one, two = launch(1, args), launch(2, args)
        print(f"{mode:14s} {one['tokens_per_s']:13,.0f} {two['tokens_per_s']:14,.0f} "
              f"{two['tokens_per_s'] / one['tokens_per_s']:8.2f}x", flush=True)
    formula_table()


if __name__ == "__main__":
    main()
