"""Data under your feet (issue 21, class 8), the shard side: shard files truncated, grown, rewritten,
replaced or deleted while a ShardSource reads them (in a child process under the memory cap: a
memory-mapped reader dies there by SIGBUS, which the control case shows); `.npy` headers that claim
what the file does not hold, refused before anything is allocated, through every entry that reads
one (shards, `load_activation_file` = `--data`, `--targets`, the MNIST cache, the CLI); hostile
manifests; non-finite rows named by shard file and row; one path for 16-bit shards through the
Python API and the CLI."""
from __future__ import annotations

import json
import random
import signal
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import hostile

import sparsekit
from sparsekit.activations import ShardSource, load_activation_file, write_shards
from sparsekit.activations.mnist import load_mnist
from sparsekit.activations.npy import read_npy
from sparsekit.activations.shards import NonFiniteActivations, bf16_data_offset, read_manifest

WORKER = Path(__file__).resolve().parents[1] / "helpers" / "shard_change_worker.py"

# --- shards changed while a source reads them ----------------------------------------------------

SIGBUS_CONTROL = """
import os, sys, numpy as np
np.save(sys.argv[1], np.ones((4096, 64), np.float32))
mapped = np.load(sys.argv[1], mmap_mode="r")
os.truncate(sys.argv[1], 128)
print(float(mapped[-1].sum()))
"""


def test_a_memory_mapped_shard_cut_short_kills_its_reader_with_sigbus(tmp_path):
    """The control: what ShardSource did before (np.load(mmap_mode="r")) dies by SIGBUS, uncatchable."""
    done = hostile.run_capped(["-c", SIGBUS_CONTROL, str(tmp_path / "x.npy")], timeout=60)
    assert done.returncode == -signal.SIGBUS, (done.returncode, done.stderr[-500:])


CHANGES = {  # scenario -> what the one-line error must say about the shard
    **{f"{dtype}:{how}": said for dtype in ("float32", "float16", "bfloat16") for how, said in (
        ("to-zero", "shrank from"), ("to-header", "shrank from"), ("to-half", "shrank from"),
        ("one-byte-short", "shrank from"), ("race", "ended at byte"))},
    "float32:grown": "grew from", "float32:rewritten": "was rewritten", "float32:replaced": "was replaced by another file",
    "float32:deleted": "disappeared", "float32:to-half:y": "shrank from", "bfloat16:one-byte-short:y": "shrank from",
    "train": "shrank from",
}


@pytest.fixture(scope="module")
def changed_shards() -> dict:
    """Every scenario of CHANGES run in one capped child process (tests/helpers/shard_change_worker.py)."""
    seed = hostile.fresh_seed()
    done = hostile.run_capped([str(WORKER), str(seed), *CHANGES], timeout=180)
    assert done.returncode == 0, (seed, done.returncode, done.stderr[-2000:])
    results = {r["scenario"]: r for r in map(json.loads, done.stdout.splitlines())}
    return {"seed": seed, **results}


@pytest.mark.parametrize("scenario", list(CHANGES))
def test_a_shard_changed_under_a_running_source_is_one_named_error_not_sigbus(changed_shards, scenario):
    result = changed_shards[scenario]
    assert result["error"] is not None, (changed_shards["seed"], result)
    kind, message = result["error"]
    assert kind == "ShardChanged", (changed_shards["seed"], result)
    assert message.startswith(f"shard {result['victim']} {CHANGES[scenario]}"), (changed_shards["seed"], message)
    assert message.endswith("resume from the last checkpoint") and "\n" not in message


# --- .npy headers that lie -----------------------------------------------------------------------

ROWS, WIDTH = 8, 8


def npy_bytes(header: str, data: bytes, version: tuple = (1, 0)) -> bytes:
    """A .npy file: magic, version, the header text (padded to 64 bytes as numpy does) and data."""
    prefix = 10 if version == (1, 0) else 12
    text = header + " " * ((-(prefix + len(header) + 1)) % 64) + "\n"
    length = struct.pack("<H", len(text)) if version == (1, 0) else struct.pack("<I", len(text))
    return b"\x93NUMPY" + bytes(version) + length + text.encode("latin1") + data


def header(shape, descr="<f4", fortran=False) -> str:
    return f"{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': {shape}, }}"


DATA = np.ones((ROWS, WIDTH), np.float32).tobytes()
FORGED = {  # what the header claims -> the file's bytes
    "a trillion rows": npy_bytes(header((10**12, WIDTH)), DATA),
    "a shape beyond int64": npy_bytes(header((2**40, 2**40)), DATA),
    "negative rows": npy_bytes(header((-1, WIDTH)), DATA),
    "fewer rows than it holds": npy_bytes(header((2, WIDTH)), DATA),
    "object dtype": npy_bytes(header((ROWS, WIDTH), descr="|O"), DATA),
    "a 2 GiB header": b"\x93NUMPY\x02\x00" + struct.pack("<I", 2**31) + b"{" + DATA,
    "shape not a tuple": npy_bytes(header(ROWS * WIDTH), DATA),
    "not a dict": npy_bytes("[1, 2, 3]", DATA),
    "version 9.9": npy_bytes(header((ROWS, WIDTH)), DATA, version=(9, 9)),
    "rows a float": npy_bytes(header((8.0, WIDTH)), DATA),
}


def refused_without_allocating(call, path) -> str:
    """call() must raise one ValueError naming `path`, with under 1 MiB allocated on the way."""
    tracemalloc.start()
    try:
        with pytest.raises(ValueError) as caught:
            call()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(caught.value)
    assert str(path) in message and "\n" not in message, message
    assert peak < 1 << 20, (peak, message)
    return message


@pytest.mark.parametrize("forgery", list(FORGED))
@pytest.mark.parametrize("entry", ["shard", "load_activation_file", "read_npy"])
def test_a_npy_header_that_lies_is_refused_before_allocation(tmp_path, entry, forgery):
    if entry == "shard":
        write_shards(tmp_path, [torch.randn(ROWS, WIDTH)])
        path = tmp_path / "x-00000.npy"
        path.write_bytes(FORGED[forgery])
        refused_without_allocating(lambda: ShardSource(tmp_path), path)
    else:
        path = tmp_path / "forged.npy"
        path.write_bytes(FORGED[forgery])
        call = (lambda: load_activation_file(path)) if entry == "load_activation_file" else (
            lambda: read_npy(path, "--targets"))
        refused_without_allocating(call, path)


def test_a_fortran_order_shard_is_refused_by_name(tmp_path):
    write_shards(tmp_path, [torch.randn(ROWS, WIDTH)])
    np.save(tmp_path / "x-00000.npy", np.asfortranarray(np.random.default_rng().standard_normal((ROWS, WIDTH),
                                                                                               np.float32)))
    with pytest.raises(ValueError, match=r"x-00000\.npy is stored in Fortran order"):
        ShardSource(tmp_path)


def test_a_forged_mnist_cache_is_refused_naming_it(tmp_path):
    cached = tmp_path / "mnist" / "mnist_test.npy"
    cached.parent.mkdir()
    cached.write_bytes(npy_bytes(header((10**9, 785), descr="|u1"), b"\0" * 785))
    message = refused_without_allocating(lambda: load_mnist("test", cache_dir=tmp_path, root=tmp_path), cached)
    assert "unreadable MNIST cache" in message


@pytest.mark.parametrize("flag", ["--data", "--targets"])
def test_the_cli_refuses_a_forged_npy_in_one_line(tmp_path, flag):
    x = tmp_path / "x.npy"
    np.save(x, np.random.default_rng().standard_normal((64, WIDTH), np.float32))
    forged = tmp_path / "forged.npy"
    forged.write_bytes(FORGED["a trillion rows"])
    args = ["--data", forged] if flag == "--data" else ["--data", x, "--targets", forged]
    done = hostile.run_capped(["-m", "sparsekit", "train", *map(str, args), "--n-latents", "16", "--k", "2",
                               "--out", str(tmp_path / "out")], timeout=120)
    assert done.returncode == 2, done.stderr[-1000:]
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert str(forged) in done.stderr and "is truncated: its header claims 1000000000000 x 8 float32" in done.stderr


# --- hostile manifests ---------------------------------------------------------------------------

def test_a_deeply_nested_manifest_is_refused_in_one_line(tmp_path):
    depth = random.randrange(1_000, 200_000)
    (tmp_path / "manifest.json").write_text("[" * depth + "]" * depth)
    with pytest.raises(ValueError, match=f"manifest.json: JSON nested {depth} levels deep"):
        read_manifest(tmp_path)


def test_a_giant_manifest_is_refused_unread(tmp_path):
    path = tmp_path / "manifest.json"
    with open(path, "wb") as f:
        f.truncate(random.randrange(257 << 20, 1 << 40))  # sparse: no disk used
    refused_without_allocating(lambda: read_manifest(tmp_path), path)


# --- non-finite rows named by shard file and row -------------------------------------------------

def plant(path: Path, dtype: str, row: int, column: int, width: int, rows: int, value: float) -> None:
    """Write `value` at [row, column] of shard file `path` in place (as a damaged disk or a buggy writer would)."""
    if dtype == "bfloat16":
        key = path.name[0]
        offset = bf16_data_offset(path, key, rows, width) + (row * width + column) * 2
        bits = torch.tensor([value], dtype=torch.bfloat16).view(torch.int16).item() & 0xFFFF
        data = bytearray(path.read_bytes())
        data[offset:offset + 2] = struct.pack("<H", bits)
        path.write_bytes(bytes(data))
    else:
        array = np.load(path, mmap_mode="r+")
        array[row, column] = value
        array.flush()
        del array


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("key", ["x", "y"])
def test_a_non_finite_row_in_a_shard_is_named_by_file_and_row(tmp_path, dtype, key):
    rng = random.Random(hostile.fresh_seed())
    shard_rows, rows = rng.randrange(5, 40), rng.randrange(60, 200)
    x, y = torch.randn(rows, 6), torch.randn(rows, 3)
    write_shards(tmp_path, [(x, y)], dtype=dtype, shard_rows=shard_rows)
    manifest = read_manifest(tmp_path)
    shard = rng.randrange(len(manifest["shards"]))
    entry = manifest["shards"][shard]
    row, width = rng.randrange(entry["rows"]), 6 if key == "x" else 3
    bad = rng.choice([float("nan"), float("inf"), -float("inf")])
    path = tmp_path / entry[key]
    plant(path, dtype, row, rng.randrange(width), width, entry["rows"], bad)
    source = ShardSource(tmp_path, batch_size=rng.randrange(1, 50), shuffle=rng.random() < 0.5, seed=rng.randrange(99))
    with pytest.raises(NonFiniteActivations) as caught:
        for _ in source:
            pass
    assert (caught.value.path, caught.value.row) == (path, row)
    assert str(caught.value).startswith(f"shard {path} row {row} holds {bad}")


def test_training_on_a_shard_with_a_nan_names_the_file_and_row(tmp_path):
    write_shards(tmp_path, [torch.randn(128, 8)], shard_rows=32)
    row = random.randrange(32)
    plant(tmp_path / "x-00002.npy", "float32", row, 3, 8, 32, float("nan"))
    config = sparsekit.TrainConfig(batch_size=32, total_tokens=32 * 8, eval_tokens=32, progress=False)
    with pytest.raises(NonFiniteActivations, match=f"x-00002.npy row {row} holds nan"):
        sparsekit.train(sparsekit.TopKSAE(8, 16, k=2), ShardSource(tmp_path, batch_size=32), config)


# --- 16-bit shards: one path through the Python API and the CLI ----------------------------------

def trained(source, dtype=torch.float32) -> dict:
    sae = sparsekit.TopKSAE(8, 32, k=3, seed=3, dtype=dtype)
    config = sparsekit.TrainConfig(batch_size=32, total_tokens=32 * 12, eval_tokens=32, progress=False, seed=4)
    sparsekit.train(sae, source, config)
    return sae.state_dict()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_16_bit_shard_folder_trains_as_if_its_batches_were_widened_first(tmp_path, dtype):
    """The CLI used to wrap a 16-bit ShardSource in a float32 converter (AsFloat32), and sparsekit.train
    refused the same folder (float16 batches into a float32 dictionary). Now the trainer widens them
    (the API and the CLI pass the source as it is), bit-identically to widening each batch first."""
    seed = hostile.fresh_seed()
    write_shards(tmp_path, [torch.randn(256, 8, generator=torch.Generator().manual_seed(seed))], dtype=dtype,
                 shard_rows=64)
    as_is = trained(ShardSource(tmp_path, batch_size=32, seed=seed % 100))
    widened = trained(lambda: (batch.float() for batch in ShardSource(tmp_path, batch_size=32, seed=seed % 100)))
    assert as_is.keys() == widened.keys() and all(torch.equal(as_is[k], widened[k]) for k in as_is), seed


def test_16_bit_shards_widen_to_a_float64_dictionary(tmp_path):
    write_shards(tmp_path, [torch.randn(256, 8)], dtype="float16", shard_rows=64)
    state = trained(ShardSource(tmp_path, batch_size=32), dtype=torch.float64)
    assert all(t.dtype == torch.float64 and bool(torch.isfinite(t).all()) for t in state.values())


def test_wider_batches_are_not_narrowed_silently():
    with pytest.raises(ValueError, match="expected torch.float64 like x"):
        trained([torch.randn(32, 8, dtype=torch.float64) for _ in range(14)])
