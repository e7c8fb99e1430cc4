"""Run as a child process (tests/adversarial/test_shards_under_feet.py): shard folders changed on disk
while a ShardSource reads them. For each scenario named on the command line: write a fresh folder,
read two batches, change one shard file, read on; print one JSON line per scenario with what
happened ("error": the exception's type and message, or null when every batch was read). A shard
read through a memory map would kill this process with SIGBUS instead.

    python shard_change_worker.py SEED SCENARIO...    SCENARIO = DTYPE:CHANGE[:KEY]
"""
from __future__ import annotations

import json
import os
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import sparsekit
from sparsekit.activations import shards as shard_module
from sparsekit.activations.shards import ShardSource, write_shards

ROWS, D, D_OUT, SHARD_ROWS = 96, 16, 4, 32


def change(path: Path, how: str, rng: random.Random) -> None:
    size = path.stat().st_size
    if how == "to-zero":
        os.truncate(path, 0)
    elif how == "to-header":
        os.truncate(path, 128 if path.suffix == ".npy" else 100)
    elif how == "to-half":
        os.truncate(path, size // 2)
    elif how == "one-byte-short":
        os.truncate(path, size - 1)
    elif how == "grown":
        with open(path, "ab") as f:
            f.write(b"\0" * rng.randrange(1, 4096))
    elif how == "rewritten":  # same size, other bytes, written in place (and a later mtime)
        data = bytearray(path.read_bytes())
        data[-8:] = os.urandom(8)
        stat = path.stat()
        path.write_bytes(bytes(data))
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    elif how == "replaced":  # another file renamed over it: the atomic way to swap a file
        other = path.with_name(".other" + path.suffix)
        other.write_bytes(path.read_bytes())
        os.replace(other, path)
    elif how == "deleted":
        path.unlink()
    else:
        raise ValueError(how)


def scenario(seed: int, name: str) -> dict:
    dtype, how, key = (name.split(":") + ["x"])[:3]
    rng = random.Random(f"{seed}:{name}")
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    folder = Path(tempfile.mkdtemp(prefix="feet-"))
    x = torch.randn(ROWS, D, generator=gen)
    batches = [(x, torch.randn(ROWS, D_OUT, generator=gen))] if key == "y" else [x]
    write_shards(folder, batches, dtype=dtype, shard_rows=SHARD_ROWS)
    source = ShardSource(folder, batch_size=8, shuffle=rng.random() < 0.5, seed=rng.randrange(1000), epochs=3)
    victim = folder / source.shards[rng.randrange(len(source.shards))][key]
    read = 0
    try:
        for batch in source:
            read += 1
            if read == 2:
                if how == "race":  # as if the file shrank after every check, just before the reads
                    shard_module._ShardFile.changed = lambda self, now, when: None
                    os.truncate(victim, victim.stat().st_size // 2)
                else:
                    change(victim, how, rng)
        return {"scenario": name, "victim": str(victim), "read": read, "error": None}
    except Exception as error:  # noqa: BLE001 (reported to the parent, which judges it)
        return {"scenario": name, "victim": str(victim), "read": read, "error": [type(error).__name__, str(error)]}


def through_training(seed: int) -> dict:
    """sparsekit.train on a ShardSource whose shard is cut short after the 3rd batch."""
    folder = Path(tempfile.mkdtemp(prefix="feet-train-"))
    write_shards(folder, [torch.randn(ROWS, D, generator=torch.Generator().manual_seed(seed))], shard_rows=SHARD_ROWS)
    source = ShardSource(folder, batch_size=16, seed=seed % 1000)
    victim = folder / source.shards[seed % len(source.shards)]["x"]

    class Cutting:
        def __init__(self):
            self.count = 0

        def __iter__(self):
            for batch in source:
                self.count += 1
                if self.count == 3:
                    os.truncate(victim, victim.stat().st_size // 3)
                yield batch

        def state_dict(self):
            return source.state_dict()

        def load_state_dict(self, state):
            source.load_state_dict(state)

    sae = sparsekit.TopKSAE(D, 32, k=4)
    config = sparsekit.TrainConfig(batch_size=16, total_tokens=16 * 40, eval_tokens=16, progress=False)
    try:
        sparsekit.train(sae, Cutting(), config)
        return {"scenario": "train", "victim": str(victim), "error": None}
    except Exception as error:  # noqa: BLE001
        return {"scenario": "train", "victim": str(victim), "error": [type(error).__name__, str(error)]}


if __name__ == "__main__":
    seed = int(sys.argv[1])
    np.seterr(all="ignore")
    changed = shard_module._ShardFile.changed
    with tempfile.TemporaryDirectory(prefix="feet-") as root:
        tempfile.tempdir = root  # every scenario's folder goes, whatever happens
        for name in sys.argv[2:]:
            try:
                result = through_training(seed) if name == "train" else scenario(seed, name)
            finally:
                shard_module._ShardFile.changed = changed  # "race" switches the checks off for its scenario only
            print(json.dumps(result), flush=True)
