"""On-disk activation shards: write_shards, read_manifest, ShardSource, load_activation_file."""
import itertools
import json

import numpy as np
import pytest
import torch
from helpers.seeds import fresh_seed

from sparsekit.activations import ActivationSource, ShardSource, load_activation_file, read_manifest, write_shards
from sparsekit.activations.shards import MANIFEST


def fresh_generator() -> torch.Generator:
    return torch.Generator().manual_seed(fresh_seed())


def ragged_batches(gen, rows=(5, 17, 1, 30, 9), d=6, d_out=None):
    """Batches of varying sizes: x [r, d] or (x [r, d], y [r, d_out])."""
    out = []
    for r in rows:
        x = torch.randn(r, d, generator=gen)
        out.append(x if d_out is None else (x, torch.randn(r, d_out, generator=gen)))
    return out


def take(source, n):
    return list(itertools.islice(iter(source), n))


def key_of(rows: torch.Tensor) -> list:
    return sorted(map(tuple, rows.tolist()))


def test_shard_round_trip_preserves_rows_and_targets(tmp_path):
    batches = ragged_batches(fresh_generator(), d_out=3)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    manifest = write_shards(tmp_path, batches, shard_rows=8)
    assert [s["rows"] for s in manifest["shards"]] == [8] * 7 + [6]  # 62 rows
    in_order = list(ShardSource(tmp_path, batch_size=10, shuffle=False, epochs=1))
    assert torch.equal(torch.cat([b[0] for b in in_order]), x)
    assert torch.equal(torch.cat([b[1] for b in in_order]), y)
    shuffled = list(ShardSource(tmp_path, batch_size=10, shuffle=True, epochs=1, buffer_shards=3))
    xs, ys = torch.cat([b[0] for b in shuffled]), torch.cat([b[1] for b in shuffled])
    assert not torch.equal(xs, x)
    assert key_of(torch.cat([xs, ys], 1)) == key_of(torch.cat([x, y], 1))  # every (x, y) pair exactly once


def test_shard_manifest_records_metadata(tmp_path):
    batches = ragged_batches(fresh_generator(), rows=(4, 4), d=5, d_out=2)
    manifest = write_shards(tmp_path, batches, model="gpt2", hook="blocks.3.hook_resid_post", dtype="float16",
                            shard_rows=3, scale=2.5)
    on_disk = json.loads((tmp_path / MANIFEST).read_text())
    assert on_disk == manifest == read_manifest(tmp_path)
    assert {k: manifest[k] for k in ("format_version", "model", "hook", "dtype", "d", "d_out", "tokens", "scale")} == {
        "format_version": 1, "model": "gpt2", "hook": "blocks.3.hook_resid_post", "dtype": "float16", "d": 5,
        "d_out": 2, "tokens": 8, "scale": 2.5}
    assert manifest["shards"][0] == {"x": "x-00000.npy", "y": "y-00000.npy", "rows": 3}
    assert np.load(tmp_path / "y-00002.npy").dtype == np.float16
    source = ShardSource(tmp_path)
    assert (source.d, source.d_out, source.tokens, source.scale) == (5, 2, 8, 2.5)
    batch = next(iter(source))
    assert batch[0].dtype == torch.float16
    assert "d_out" not in write_shards(tmp_path / "plain", [torch.randn(3, 5)])


def test_shard_source_reads_rows_through_file_reads_never_a_memory_map(tmp_path, monkeypatch):
    write_shards(tmp_path, ragged_batches(fresh_generator(), rows=(64,) * 4), shard_rows=32)
    source = ShardSource(tmp_path, batch_size=5, buffer_shards=2)

    def no_map(*args, **kwargs):
        raise AssertionError("a shard was memory-mapped: a truncated file would SIGBUS")

    monkeypatch.setattr(np, "memmap", no_map)
    monkeypatch.setattr(np, "load", no_map)
    batches = take(source, 3)
    assert [tuple(b.shape) for b in batches] == [(5, 6)] * 3
    assert 1 <= len(source._open_files) <= 3  # only a few shards open at once, never the whole folder


def test_shard_source_resumes_exactly_from_state_dict(tmp_path):
    write_shards(tmp_path, ragged_batches(fresh_generator(), d_out=2), shard_rows=7)  # 62 rows, 9 shards
    settings = dict(batch_size=6, seed=5, buffer_shards=2)
    uninterrupted = take(ShardSource(tmp_path, **settings), 30)  # about three epochs
    for stop in (1, 10, 11, 17):
        first = ShardSource(tmp_path, **settings)
        take(first, stop)
        state = json.loads(json.dumps(first.state_dict()))
        resumed = ShardSource(tmp_path, **settings)
        resumed.load_state_dict(state)
        rest = take(resumed, 30 - stop)
        assert len(rest) == 30 - stop
        for got, expected in zip(rest, uninterrupted[stop:]):
            assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    with pytest.raises(ValueError, match="'seed' is 5 but this ShardSource has 6"):
        ShardSource(tmp_path, **{**settings, "seed": 6}).load_state_dict(state)


def test_shard_source_mixes_rows_across_shards_and_changes_order_each_epoch(tmp_path):
    rows = torch.arange(64, dtype=torch.float32)[:, None].repeat(1, 2)
    write_shards(tmp_path, [rows], shard_rows=8)
    source = ShardSource(tmp_path, batch_size=64, seed=1, buffer_shards=4)
    epoch0, epoch1 = (b[:, 0].long() for b in take(source, 2))
    assert sorted(epoch0.tolist()) == list(range(64)) and sorted(epoch1.tolist()) == list(range(64))
    assert not torch.equal(epoch0, epoch1)
    first_window = epoch0[:32] // 8  # 4 shards mixed in the first half of the epoch
    assert len(set(first_window.tolist())) == 4
    assert torch.equal(take(ShardSource(tmp_path, batch_size=64, seed=1, buffer_shards=4), 1)[0][:, 0].long(), epoch0)
    first_windows = [set((b[:32, 0].long() // 8).tolist()) for b in take(source, 4)]
    assert any(w != first_windows[0] for w in first_windows)  # the shard order changes with the epoch


def test_shard_source_reshuffles_rows_within_a_shard_each_epoch(tmp_path):
    write_shards(tmp_path, [torch.arange(40, dtype=torch.float32)[:, None]])
    epochs = [b[:, 0].tolist() for b in take(ShardSource(tmp_path, batch_size=40, seed=fresh_seed() % 1000), 3)]
    assert epochs[0] != epochs[1] != epochs[2] and sorted(epochs[2]) == list(range(40))


def test_shard_source_satisfies_the_protocol_and_stops_after_epochs(tmp_path):
    write_shards(tmp_path, [torch.randn(9, 3)], shard_rows=4)
    source = ShardSource(tmp_path, batch_size=4, epochs=2)
    assert isinstance(source, ActivationSource)
    assert [b.shape[0] for b in source] == [4, 4, 1, 4, 4, 1]


# --- errors --------------------------------------------------------------------------------------

@pytest.fixture
def shard_dir(tmp_path):
    write_shards(tmp_path, [(torch.randn(10, 4), torch.randn(10, 2))], shard_rows=6)
    return tmp_path


def edit_manifest(directory, **changes):
    manifest = json.loads((directory / MANIFEST).read_text())
    manifest.update(changes)
    (directory / MANIFEST).write_text(json.dumps(manifest))


def test_corrupt_manifest_gives_clear_error(shard_dir):
    (shard_dir / MANIFEST).write_text('{"format_version": 1, "d": ')
    with pytest.raises(ValueError, match=r"manifest.json is not valid JSON"):
        ShardSource(shard_dir)


def test_missing_manifest_gives_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no manifest.json in {tmp_path}"):
        ShardSource(tmp_path)


@pytest.mark.parametrize("changes, message", [
    (dict(format_version=2), "unknown format_version 2; this sparsekit reads version 1"),
    (dict(d="4"), "field 'd' must be a positive int, got '4'"),
    (dict(dtype="int8"), "field 'dtype' must be one of"),
    (dict(tokens=11), "field 'tokens' is 11 but the shards' rows sum to 10"),
    (dict(scale=-1.0), "field 'scale' must be a positive number or null"),
    (dict(shards=[]), "field 'shards' must be a non-empty list"),
    (dict(shards=[{"x": "../x-00000.npy", "y": "y-00000.npy", "rows": 10}]), r"shards\[0\].x must be a file name"),
    (dict(shards=[{"x": "x-00000.npy", "rows": 10}]), r"shards\[0\].y must be a file name"),
])
def test_invalid_manifest_fields_are_named(shard_dir, changes, message):
    edit_manifest(shard_dir, **changes)
    with pytest.raises(ValueError, match=message):
        ShardSource(shard_dir)


def test_missing_field_is_named(shard_dir):
    manifest = json.loads((shard_dir / MANIFEST).read_text())
    del manifest["tokens"]
    (shard_dir / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="field 'tokens' is missing"):
        ShardSource(shard_dir)


def test_missing_shard_gives_clear_error(shard_dir):
    (shard_dir / "y-00001.npy").unlink()
    with pytest.raises(FileNotFoundError, match="shard .*y-00001.npy listed in manifest.json is missing"):
        ShardSource(shard_dir)


@pytest.mark.parametrize("replacement, message", [
    (np.zeros((4, 5), np.float32), "x-00001.npy has 5 columns but the manifest's 'd' is 4"),
    (np.zeros((4, 4), np.float64), "x-00001.npy holds float64 but the manifest's 'dtype' is float32"),
    (np.zeros((3, 4), np.float32), "x-00001.npy has 3 rows but the manifest's 'rows' says 4"),
    (np.zeros(16, np.float32), "x-00001.npy has shape"),
])
def test_shard_with_wrong_width_dtype_or_rows_gives_clear_error(shard_dir, replacement, message):
    np.save(shard_dir / "x-00001.npy", replacement)
    with pytest.raises(ValueError, match=message):
        ShardSource(shard_dir)


def test_truncated_shard_gives_clear_error(shard_dir):
    path = shard_dir / "x-00000.npy"
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(ValueError, match="x-00000.npy is truncated"):
        ShardSource(shard_dir)
    path.write_bytes(b"not an npy file")
    with pytest.raises(ValueError, match="x-00000.npy is not a readable .npy file"):
        ShardSource(shard_dir)


# --- writing ------------------------------------------------------------------------------------

def test_write_shards_refuses_to_overwrite_unless_asked_and_removes_stale_shards(shard_dir):
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_shards(shard_dir, [torch.randn(3, 4)])
    x = torch.randn(5, 4)
    manifest = write_shards(shard_dir, [x], overwrite=True)
    assert "d_out" not in manifest
    assert sorted(p.name for p in shard_dir.iterdir()) == ["manifest.json", "x-00000.npy"]
    assert torch.equal(next(iter(ShardSource(shard_dir, shuffle=False))), x)


def test_write_shards_leaves_no_temporary_files_and_writes_the_manifest_last(tmp_path, monkeypatch):
    import os
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (replaced.append(str(dst)), real_replace(src, dst)))
    write_shards(tmp_path, ragged_batches(fresh_generator(), d_out=2), shard_rows=20)
    assert replaced[-1].endswith(MANIFEST) and len(replaced) == 1 + 2 * 4
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_write_shards_failure_leaves_no_partial_folder(tmp_path):
    def batches():
        yield torch.randn(10, 4)
        yield torch.randn(10, 5)

    with pytest.raises(ValueError, match="batch 1: x has 5 features but earlier batches had 4"):
        write_shards(tmp_path, batches(), shard_rows=4)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("batches, message", [
    ([], "batches yielded no rows"),
    ([torch.randn(0, 3)], "batches yielded no rows"),
    ([torch.randn(3, 2), (torch.randn(3, 2), torch.randn(3, 1))], "batch 1: targets y are present but earlier"),
    ([(torch.randn(3, 2), torch.randn(2, 1))], "batch 0: y has 2 rows but x has 3"),
    ([torch.ones(3, 2, dtype=torch.int32)], "batch 0: x must be floating-point"),
    ([torch.randn(6)], "batch 0: x must be 2-D"),
    ([[1.0, 2.0]], "batch 0: x must be a Tensor or numpy array, got float"),
])
def test_write_shards_rejects_bad_batches_naming_them(tmp_path, batches, message):
    with pytest.raises(ValueError, match=message):
        write_shards(tmp_path, batches)


@pytest.mark.parametrize("kwargs, message", [
    (dict(shard_rows=0), "shard_rows must be a positive int, got 0"),
    (dict(dtype="bf16"), "dtype must be one of float16, float32, float64, bfloat16, got .bf16."),
    (dict(scale=float("nan")), "scale must be a positive finite number or None"),
])
def test_write_shards_rejects_bad_arguments_naming_them(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        write_shards(tmp_path, [torch.randn(2, 2)], **kwargs)


# --- single files -------------------------------------------------------------------------------

def test_load_activation_file_reads_npy_and_safetensors(tmp_path):
    from safetensors.torch import save_file
    gen = fresh_generator()
    x, y = torch.randn(6, 4, generator=gen), torch.randn(6, 2, generator=gen)
    np.save(tmp_path / "acts.npy", x.numpy())
    assert torch.equal(load_activation_file(tmp_path / "acts.npy"), x)
    save_file({"x": x, "y": y}, tmp_path / "pair.safetensors")
    got_x, got_y = load_activation_file(tmp_path / "pair.safetensors")
    assert torch.equal(got_x, x) and torch.equal(got_y, y)
    save_file({"x": x}, tmp_path / "single.safetensors")
    assert torch.equal(load_activation_file(str(tmp_path / "single.safetensors")), x)


def test_load_activation_file_errors_name_the_file_and_what_is_wrong(tmp_path):
    from safetensors.torch import save_file
    save_file({"acts": torch.randn(3, 2)}, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="a.safetensors has no tensor named 'x' \\(found: acts\\)"):
        load_activation_file(tmp_path / "a.safetensors")
    save_file({"x": torch.randn(3, 2), "y": torch.randn(4, 2)}, tmp_path / "b.safetensors")
    with pytest.raises(ValueError, match="'y' has 4 rows but 'x' has 3"):
        load_activation_file(tmp_path / "b.safetensors")
    np.save(tmp_path / "c.npy", np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="c.npy: 'x' must be a non-empty 2-D"):
        load_activation_file(tmp_path / "c.npy")
    (tmp_path / "d.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="unknown activation file type '.pt'"):
        load_activation_file(tmp_path / "d.pt")
    with pytest.raises(FileNotFoundError, match="missing.npy does not exist"):
        load_activation_file(tmp_path / "missing.npy")
    write_shards(tmp_path / "shards", [torch.randn(2, 2)])
    with pytest.raises(ValueError, match="use ShardSource"):
        load_activation_file(tmp_path / "shards")


# --- bfloat16 shards ------------------------------------------------------------------------------

def test_bfloat16_shards_take_half_the_disk_and_hold_the_rounded_values(tmp_path):
    x, y = torch.randn(900, 24) * 3, torch.randn(900, 8)
    batches = [(x[i:i + 100], y[i:i + 100]) for i in range(0, 900, 100)]
    write_shards(tmp_path / "f32", batches, shard_rows=400)
    write_shards(tmp_path / "bf16", batches, dtype="bfloat16", shard_rows=400)

    def size(folder):
        return sum(p.stat().st_size for p in folder.iterdir() if p.name != "manifest.json")

    assert {p.suffix for p in (tmp_path / "bf16").iterdir()} == {".json", ".safetensors"}
    assert size(tmp_path / "bf16") < 0.52 * size(tmp_path / "f32")
    source = ShardSource(tmp_path / "bf16", batch_size=900, shuffle=False, epochs=1)
    got_x, got_y = next(iter(source))
    assert got_x.dtype == torch.bfloat16 and source.dtype == "bfloat16"
    assert torch.equal(got_x, x.to(torch.bfloat16)) and torch.equal(got_y, y.to(torch.bfloat16))
    assert not torch.equal(got_x.float(), x)  # rounded, not stored exactly


def test_bfloat16_shards_shuffle_and_resume_like_npy_shards(tmp_path):
    x = torch.randn(1000, 6)
    write_shards(tmp_path, [x], dtype="bfloat16", shard_rows=128)
    whole = torch.cat(list(ShardSource(tmp_path, batch_size=64, seed=3, epochs=1)))
    assert sorted(map(tuple, whole.float().tolist())) == sorted(map(tuple, x.to(torch.bfloat16).float().tolist()))
    first = ShardSource(tmp_path, batch_size=64, seed=3, epochs=1)
    stream = iter(first)
    for _ in range(5):
        next(stream)
    resumed = ShardSource(tmp_path, batch_size=64, seed=3, epochs=1)
    resumed.load_state_dict(first.state_dict())
    assert torch.equal(torch.cat(list(resumed)), whole[5 * 64:])


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:20], "is not a readable bfloat16 .safetensors file|truncated"),
    (lambda b: (10 ** 12).to_bytes(8, "little") + b[8:], "header length 1000000000000 is impossible"),
    (lambda b: b.replace(b'"BF16"', b'"F32 "'), "holds 'F32 ' but the manifest's 'dtype' is bfloat16"),
    (lambda b: b[:-2], "is truncated"),
])
def test_damaged_bfloat16_shard_gives_a_clear_error_before_reading(tmp_path, damage, message):
    write_shards(tmp_path, [torch.randn(40, 4)], dtype="bfloat16")
    shard = tmp_path / "x-00000.safetensors"
    shard.write_bytes(damage(shard.read_bytes()))
    with pytest.raises(ValueError, match=message):
        ShardSource(tmp_path)
