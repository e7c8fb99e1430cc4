"""W&B tracking in wandb's offline mode (no network): the trainer's metric lines, final metrics, plot
and config land in the offline run's files, and metrics.jsonl is still written."""
import json
import sys

import numpy as np
import pytest
import torch

import sparsekit
from sparsekit.cli import train as train_cli
from sparsekit.training.tracking import RUN_ID_FILE

wandb_pb2 = pytest.importorskip("wandb.proto.wandb_internal_pb2")

BLOCK = 32768  # the .wandb file is a LevelDB-style log: 32 KiB blocks of checksummed chunks


def read_run(run_dir) -> dict:
    """The history rows, summary, config and run id recorded in an offline run's .wandb file."""
    import wandb
    wandb.teardown()  # run.finish() returns before wandb's service has written everything out
    (path,) = run_dir.glob("run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, pos = [], b"", 7  # header: ':W&B', magic (2 bytes), version (1 byte)
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a chunk header is padding
            pos += BLOCK - pos % BLOCK
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a whole record
            record = wandb_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    run = {"history": [], "summary": {}, "config": {}, "id": None}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "history":
            run["history"].append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                   for item in record.history.item})
        elif kind == "summary":
            run["summary"].update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                   for item in record.summary.update})
        elif kind == "config":
            run["config"].update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "run":
            run["id"] = record.run.run_id
            run["config"].update({item.key: json.loads(item.value_json) for item in record.run.config.update})
    return run


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    wandb = pytest.importorskip("wandb")
    wandb.teardown()  # wandb keeps its settings (WANDB_DIR) in a process-wide singleton
    yield tmp_path / "wandb"
    wandb.teardown()


def activations(rows=2048, d=16, seed=0):
    return torch.randn(rows, d, generator=torch.Generator().manual_seed(seed))


def test_metrics_final_metrics_plot_and_config_reach_the_offline_run(tmp_path, offline_wandb):
    sae = sparsekit.TopKSAE(16, 64, k=4)
    cfg = sparsekit.TrainConfig(batch_size=128, lr=1e-3, total_tokens=1280, eval_tokens=256, log_every=3,
                                progress=False, output_dir=str(tmp_path / "run"), wandb_project="sparsekit-tests",
                                wandb_run_name="topk-offline")
    result = sparsekit.train(sae, activations(), cfg)

    (run_dir,) = offline_wandb.glob("offline-run-*")
    run = read_run(run_dir)
    lines = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert lines == result.history and [r["step"] for r in lines] == [3, 6, 9, 10]
    logged = [row for row in run["history"] if "mse" in row]
    assert [row["_step"] for row in logged] == [3, 6, 9, 10]
    for row, line in zip(logged, lines):
        for key in ("mse", "fvu", "l0", "dead_frac", "dense_frac", "aux_loss", "tokens", "lr"):
            assert row[key] == pytest.approx(line[key], rel=1e-12), key
    assert run["summary"]["final/fvu"] == pytest.approx(result.metrics["fvu"], rel=1e-12)
    assert run["summary"]["final/tokens"] == 1280
    assert run["summary"]["feature_density/_type"] == "image-file"
    assert list((run_dir / "files/media/images").glob("feature_density_*.png"))
    assert run["config"]["train"]["total_tokens"] == 1280
    assert run["config"]["dictionary"]["architecture"] == "topk"
    assert (tmp_path / "run" / RUN_ID_FILE).read_text().strip() == run["id"]


def test_resume_continues_the_same_run(tmp_path, offline_wandb):
    cfg = sparsekit.TrainConfig(batch_size=128, lr=1e-3, total_tokens=1024, eval_tokens=128, progress=False,
                                checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every_tokens=512,
                                wandb_project="sparsekit-tests")
    sparsekit.train(sparsekit.TopKSAE(16, 64, k=4), activations(seed=1), cfg)
    sparsekit.train(sparsekit.TopKSAE(16, 64, k=4), activations(seed=1), cfg, resume=True)
    ids = [read_run(run_dir)["id"] for run_dir in sorted(offline_wandb.glob("offline-run-*"))]
    assert len(ids) == 2 and ids[0] == ids[1]


def test_no_project_means_no_wandb_run(tmp_path, offline_wandb):
    cfg = sparsekit.TrainConfig(batch_size=128, lr=1e-3, total_tokens=512, eval_tokens=0, progress=False,
                                output_dir=str(tmp_path / "run"))
    sparsekit.train(sparsekit.TopKSAE(16, 64, k=4), activations(), cfg)
    assert not offline_wandb.exists() and not (tmp_path / "run" / RUN_ID_FILE).exists()
    assert (tmp_path / "run/metrics.jsonl").stat().st_size > 0


def test_train_cli_flags_set_the_project_and_run_name(tmp_path, offline_wandb):
    np.save(tmp_path / "acts.npy", activations(rows=1024).numpy())
    result, _ = train_cli.run(["--data", str(tmp_path / "acts.npy"), "--n-latents", "32", "--k", "4",
                               "--batch-size", "128", "--total-tokens", "512", "--eval-tokens", "128",
                               "--no-progress", "--out", str(tmp_path / "out"),
                               "--wandb-project", "sparsekit-cli", "--wandb-run-name", "from-cli"])
    (run_dir,) = offline_wandb.glob("offline-run-*")
    run = read_run(run_dir)
    assert run["config"]["train"]["wandb_project"] == "sparsekit-cli"
    assert run["config"]["train"]["wandb_run_name"] == "from-cli"
    assert [row["_step"] for row in run["history"] if "mse" in row] == [r["step"] for r in result.history]


def test_missing_wandb_gives_an_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    cfg = sparsekit.TrainConfig(batch_size=128, total_tokens=256, eval_tokens=0, progress=False,
                                wandb_project="p")
    with pytest.raises(ImportError, match=r"pip install 'sparsekit\[wandb\]'"):
        sparsekit.train(sparsekit.TopKSAE(16, 64, k=4), activations(rows=256), cfg)
