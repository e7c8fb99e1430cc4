"""How fast ShardSource reads: rows per second over one 100,000 x 512 float32 shard (200 MB, in the
page cache after a warm-up epoch), batches of 4,096, shuffled and in order. Prints the best wall-clock
rate of `--epochs` epochs and the rate per CPU second (steadier on a shared machine).

    python bench/shard_read.py [--folder /tmp/shard-bench] [--epochs 5] [--label after]

Run it against another tree (PYTHONPATH=that/tree) for a before/after comparison.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from sparsekit.activations import ShardSource, write_shards

ROWS, WIDTH, BATCH = 100_000, 512, 4096


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default="/tmp/shard-bench")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    folder = Path(args.folder)
    if not (folder / "manifest.json").exists():
        gen = torch.Generator().manual_seed(0)
        write_shards(folder, (torch.randn(ROWS // 10, WIDTH, generator=gen) for _ in range(10)), shard_rows=ROWS)
    for shuffle in (True, False):
        best_wall, best_cpu = 0.0, 0.0
        for epoch in range(args.epochs + 1):
            source = ShardSource(folder, batch_size=BATCH, shuffle=shuffle, seed=epoch, epochs=1)
            wall, cpu = time.perf_counter(), time.process_time()
            rows = sum(batch.shape[0] for batch in source)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            if epoch:  # epoch 0 warms the page cache
                best_wall, best_cpu = max(best_wall, rows / wall), max(best_cpu, rows / cpu)
        print(f"{args.label} {'shuffled' if shuffle else 'in order'}: {best_wall / 1e6:.2f} M rows/s wall (best of "
              f"{args.epochs}), {best_cpu / 1e6:.2f} M rows per CPU second")


if __name__ == "__main__":
    main()
