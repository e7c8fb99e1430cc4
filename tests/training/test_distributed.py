"""Data-parallel training on two gloo ranks (CPU, one thread each) equals training in one process."""
import functools
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import distributed_worker as worker  # noqa: E402
from safetensors.torch import load_file

import sparsekit
from sparsekit.training.parallel import data as distributed

WORKER = Path(__file__).parents[1] / "helpers" / "distributed_worker.py"
WORLD = 2
# How far a 2-rank run may end from one process, relative to each tensor's largest entry: the ranks
# sum the same numbers in another order (each rank's block, then the all-reduce). Measured on the
# PARITY_CASES (docs/reliability.md, class 10): at most 8.5e-16 in float64 and 3.7e-7 in float32
# after 300 steps; the bounds leave room for another machine's rounding.
FLOAT64_BOUND = 1e-12
FLOAT32_BOUND = 2e-6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(scenario: str, out: Path, world: int = WORLD, timeout: float = 120, timeout_s: float = 60,
           command: list[str] | None = None):
    """Start `world` worker processes (or `python *command`) as torchrun would; return
    [(returncode, stdout+stderr)] per rank and the seconds after which each rank ended (None: killed
    at `timeout`)."""
    port = free_port()
    processes = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "SPARSEKIT_DIST_TIMEOUT_S": str(timeout_s)}
        processes.append(subprocess.Popen([sys.executable, *(command or [str(WORKER), scenario, str(out)])], env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    start = time.monotonic()
    ended = [None] * world
    try:
        while None in ended and time.monotonic() - start < timeout:
            for rank, process in enumerate(processes):
                if ended[rank] is None and process.poll() is not None:
                    ended[rank] = time.monotonic() - start
            time.sleep(0.05)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    results = [(process.wait(), process.stdout.read()) for process in processes]
    return results, ended


@functools.lru_cache(maxsize=None)
def single_process(name: str):
    """The reference: the same case trained by one process (no process group)."""
    sae, source, cfg = worker.make_case(name)
    return sae, sparsekit.train(sae, source, cfg)


def assert_parameters_match(reference: dict, other: dict, rtol: float = 1e-6):
    assert reference.keys() == other.keys()
    for name, expected in reference.items():
        scale = float(expected.abs().max()) or 1.0
        torch.testing.assert_close(other[name], expected, rtol=rtol, atol=rtol * scale, msg=name)


@pytest.fixture(scope="module")
def parity_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("parity")
    results, _ = launch("parity", out)
    for rank, (code, output) in enumerate(results):
        assert code == 0, output
        (out / f"rank{rank}.log").write_text(output)
    return out


@pytest.mark.parametrize("name", worker.PARITY_CASES)
def test_two_ranks_match_one_process(parity_run, name):
    # with AuxK and ghost grads too: their normalisers are the global batch's, not each rank's
    sae, result = single_process(name)
    reference = {k: v.detach() for k, v in sae.state_dict().items()}
    for rank in range(WORLD):
        assert_parameters_match(reference, load_file(str(parity_run / f"{name}_rank{rank}.safetensors")),
                                rtol=FLOAT64_BOUND)
    moved = (reference["W_enc"] - worker.make_case(name)[0].W_enc.detach()).abs().max()
    assert moved > 1e-4, "training must have changed the parameters for the comparison to mean anything"
    if "-" in name:
        aux = [record["aux_loss"] for record in result.history]
        assert aux[:2] == [0.0, 0.0] and all(value > 0 for value in aux[2:]), aux
        logged = json.loads((parity_run / f"{name}_rank0.json").read_text())["history"]
        assert [r["aux_loss"] for r in logged] == pytest.approx(aux, rel=1e-6)


@pytest.mark.parametrize("dtype", sorted(worker.PRECISION_DTYPES))
@pytest.mark.parametrize("name", worker.PARITY_CASES)
def test_longer_runs_end_as_one_process_up_to_summation_order_in_float64_and_float32(parity_run, name, dtype):
    bound = {"float64": FLOAT64_BOUND, "float32": FLOAT32_BOUND}[dtype]
    sae, source, cfg = worker.make_case(name, dtype=worker.PRECISION_DTYPES[dtype], steps=worker.PRECISION_STEPS)
    result = sparsekit.train(sae, source, cfg)
    reference = {k: v.detach() for k, v in sae.state_dict().items()}
    for rank in range(WORLD):
        got = load_file(str(parity_run / f"precision_{dtype}_{name}_rank{rank}.safetensors"))
        assert all(t.dtype == worker.PRECISION_DTYPES[dtype] for t in got.values())
        assert_parameters_match(reference, got, rtol=bound)
    logged = json.loads((parity_run / f"precision_{dtype}_{name}_rank0.json").read_text())
    assert len(logged["history"]) == worker.PRECISION_STEPS
    for key in ("mse", "fvu", "l0"):
        assert logged["metrics"][key] == pytest.approx(result.metrics[key], rel=bound, abs=1e-30), key


def test_only_rank_0_speaks_and_it_reports_what_ran(parity_run):
    # every train call of the parity launch: data parallel, latent sharded, with remedies, resumed
    rank0, rank1 = ((parity_run / f"rank{rank}.log").read_text() for rank in range(WORLD))
    assert rank1.splitlines() == ["rank 1 done"], "rank 1 said something of its own (only the worker's last line)"
    reports = [line for line in rank0.splitlines() if "world size" in line]
    runs = len(worker.PARITY_CASES) * (1 + len(worker.PRECISION_DTYPES)) + len(worker.REMEDY_CASES)
    data_parallel = [line for line in reports if line.startswith("sparsekit: data parallel, world size 2 (gloo, cpu)")]
    assert len(data_parallel) >= runs, reports
    assert all(f"global batch {worker.BATCH} rows a step, per-rank batch {worker.BATCH // WORLD};" in line
               and "every rank reads the whole stream" in line for line in data_parallel)
    sharded = [line for line in reports if line.startswith("sparsekit: latent sharded, world size 2 (gloo, cpu)")]
    assert len(sharded) >= len(worker.SHARDED_TRAIN_CASES), reports
    assert all(f"each rank holds {worker.N_LATENTS // WORLD} of the {worker.N_LATENTS} latents" in line
               and f"per-rank batch {worker.BATCH} " in line for line in sharded)
    assert rank0.count("resumed from") == 2, "the two resumed runs say so once each, on rank 0"


@pytest.mark.parametrize("name", ["topk", "batchtopk"])
def test_dead_counters_and_metrics_are_reduced_across_ranks(parity_run, name):
    _, result = single_process(name)
    logged = json.loads((parity_run / f"{name}_rank0.json").read_text())
    assert len(logged["history"]) == len(result.history) == worker.STEPS
    assert result.history[-1]["dead_frac"] >= 6 / worker.N_LATENTS  # the planted dead latents count
    for mine, expected in zip(logged["history"], result.history):
        for key in ("mse", "fvu", "l0", "dead_frac", "dense_frac"):
            assert mine[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-12), (key, mine, expected)
    for key in ("mse", "fvu", "l0", "dead_frac"):
        assert logged["metrics"][key] == pytest.approx(result.metrics[key], rel=1e-6, abs=1e-12), key


@pytest.mark.parametrize("name", ["topk", "batchtopk"])
def test_latent_sharded_dictionary_matches_one_process(parity_run, name):
    reference = worker.sharded_case(name)
    first_x_hat = worker.adam_steps(reference)
    expected = {k: v.detach() for k, v in reference.state_dict().items()}
    for rank in range(WORLD):
        got = load_file(str(parity_run / f"sharded_{name}_rank{rank}.safetensors"))
        torch.testing.assert_close(got.pop("first_x_hat"), first_x_hat, rtol=1e-6, atol=1e-9)
        shard = got.pop("shard_W_enc")
        assert shard.shape == (worker.D_IN, worker.N_LATENTS // WORLD), "each rank holds 1/W of the latents"
        assert torch.equal(shard, got["W_enc"][:, rank * shard.shape[1]:(rank + 1) * shard.shape[1]])
        assert_parameters_match(expected, got)
    assert (expected["b_dec"] - worker.sharded_case(name).b_dec).abs().max() > 1e-4, "b_dec must have trained"


@pytest.mark.parametrize("name", worker.REMEDY_CASES)
def test_every_rank_ends_identical_with_remedies_penalties_and_transcoders(parity_run, name):
    # Resampling draws from rank 0's rows (not exact across world sizes; AuxK and ghost grads are, see
    # above), but the averaged gradients and rank 0's broadcast resample keep every rank identical.
    ranks = [load_file(str(parity_run / f"{name}_rank{rank}.safetensors")) for rank in range(WORLD)]
    initial = worker.remedy_case(name)[0].state_dict()
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    assert any(not torch.equal(ranks[0][key], initial[key]) for key in ranks[0])
    logged = json.loads((parity_run / f"{name}_rank0.json").read_text())["history"]
    assert [r["step"] for r in logged] == [4, 8] and logged[-1]["fvu"] < logged[0]["fvu"] * 1.5
    if name == "relu-resample-ghost":
        assert logged[0].get("resampled", 0) > 0, "the planted dead latents were resampled"


@pytest.mark.parametrize("case", sorted(worker.AUX_DEAD))
def test_latent_sharded_auxk_matches_one_process(parity_run, case):
    expected = worker.auxk_gradients(worker.sharded_case(), worker.AUX_DEAD[case])
    assert float(expected["aux"]) > 0
    for rank in range(WORLD):
        got = load_file(str(parity_run / f"auxk_{case.replace(' ', '_')}_rank{rank}.safetensors"))
        assert_parameters_match(expected, got)


def assert_run_matches_one_process(run: Path, prefix: str, name: str, world: int, tmp_path: Path) -> None:
    """Every rank's run `prefix`_`name` (gathered parameters, rank 0's metric lines and final metrics,
    rank 0's checkpoints) equals the same case trained by one process with checkpoints in tmp_path."""
    from sparsekit.training import checkpoint as ckpt

    sae, source, cfg = worker.make_case(name, str(tmp_path), resume_every=2 * worker.BATCH)
    result = sparsekit.train(sae, source, cfg)
    reference = {k: v.detach() for k, v in sae.state_dict().items()}
    for rank in range(world):
        assert_parameters_match(reference, load_file(str(run / f"{prefix}_{name}_rank{rank}.safetensors")))
    logged = json.loads((run / f"{prefix}_{name}_rank0.json").read_text())
    assert len(logged["history"]) == worker.STEPS
    for mine, expected in zip(logged["history"], result.history):
        for key in ("mse", "fvu", "l0", "dead_frac", "dense_frac", "aux_loss"):
            assert mine[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-12), (key, mine, expected)
    for key in ("mse", "fvu", "l0", "dead_frac", "dense_frac"):
        assert logged["metrics"][key] == pytest.approx(result.metrics[key], rel=1e-6, abs=1e-12), key
    if "-" in name:  # AuxK / ghost grads acted (planted dead latents on both shards)
        assert result.history[-1]["aux_loss"] > 0
    # rank 0 gathered the shards: the checkpoints are the one-process run's, entry for entry
    mine, expected = ckpt.latest(str(run / f"{prefix}_{name}")), ckpt.latest(str(tmp_path))
    assert mine[0].name == expected[0].name == "step_000000005"
    assert_parameters_match(expected[1], mine[1])
    assert mine[2]["sae_config"] == expected[2]["sae_config"]


@pytest.mark.parametrize("name", worker.SHARDED_TRAIN_CASES)
def test_train_on_latent_shards_matches_one_process_and_writes_its_checkpoints(parity_run, name, tmp_path):
    assert_run_matches_one_process(parity_run, "sharded_train", name, WORLD, tmp_path)


@pytest.fixture(scope="module")
def mesh_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mesh")
    results, _ = launch("mesh", out, world=4)
    for code, output in results:
        assert code == 0, output
    return out


@pytest.mark.parametrize("name", worker.MESH_CASES)
def test_train_on_a_two_by_two_mesh_matches_one_process(mesh_run, name, tmp_path):
    # 4 ranks: 2 data-parallel replicas of a dictionary split into 2 latent shards
    assert_run_matches_one_process(mesh_run, "mesh", name, 4, tmp_path)


def test_two_rank_run_stopped_and_resumed_matches_an_uninterrupted_one(parity_run):
    tmp_path = parity_run  # the parity launch ran the resume scenario's runs too
    assert "resumed from" in (tmp_path / "rank0.log").read_text(), "rank 0 says the run resumed"
    assert sorted(p.name for p in (tmp_path / "stopped").glob("step_*")) == ["step_000000004", "step_000000005"]
    whole = load_file(str(tmp_path / "whole_rank0.safetensors"))
    for rank in range(WORLD):
        resumed = load_file(str(tmp_path / f"resumed_rank{rank}.safetensors"))
        for name in whole:
            assert torch.equal(resumed[name], whole[name]), name
    assert not list(tmp_path.glob("*/.step_*")), "no half-written checkpoint may remain"
    for rank in range(WORLD):  # the latent-sharded run, stopped and resumed from its gathered checkpoint
        assert_parameters_match(whole, load_file(str(tmp_path / f"sharded_resumed_rank{rank}.safetensors")))


def stops(output: str) -> dict:
    """{part: (monotonic time, message)} from a worker's "rank r stopped (part) at t: message" lines."""
    found = {}
    for line in output.splitlines():
        match = re.match(r"rank \d+ stopped \((\w+)\) at ([\d.]+): (.*)", line)
        if match:
            found[match[1]] = (float(match[2]), match[3])
    return found


def test_an_error_or_a_divergence_on_one_rank_stops_every_rank_with_it(tmp_path):
    results, ended = launch("failures", tmp_path, timeout=90, timeout_s=60)
    assert None not in ended, f"a rank hung: {results}"
    assert [code for code, _ in results] == [3, 3], results
    rank0, rank1 = stops(results[0][1]), stops(results[1][1])
    # rank 1 alone sees a batch of 1e200: its loss overflows; the collective check stops both ranks
    assert rank1["diverge"][1].startswith("TrainingDiverged: rank 1 of 2: training diverged at step 2: the loss is inf")
    assert rank0["diverge"][1].startswith(
        "TrainingDiverged: rank 0 of 2: training diverged at step 2: the loss is inf on rank 1"), rank0
    assert abs(rank0["diverge"][0] - rank1["diverge"][0]) < 5
    # rank 1 alone reads a NaN batch and raises; rank 0 stops with its message, not at the 60 s timeout
    message = rank1["nan"][1]
    assert message.startswith("ValueError: source batch 6: x row 0 (and ") and message.endswith(
        " more rows) contains NaN or Inf"), message
    assert rank0["nan"][1] == f"PeerRankFailed: stopped because rank 1 failed: {message}", rank0
    assert abs(rank0["nan"][0] - rank1["nan"][0]) < 8, "rank 0 waited"


def test_single_process_context_without_a_process_group():
    context = distributed.data_parallel(256)
    assert isinstance(context, distributed.SingleProcess) and context.is_writer and context.world_size == 1
    x = torch.randn(8, 3)
    assert context.local_rows(x) is x


def test_init_distributed_names_the_missing_environment(monkeypatch):
    for name in distributed.REQUIRED_ENV:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="missing RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT"):
        distributed.init_distributed()


def test_communication_volume_formula():
    topk = distributed.step_communication_bytes(d_in=1024, n_latents=2 ** 20, world_size=8)
    params = 2 * 1024 * 2 ** 20 + 2 ** 20 + 1024
    assert topk["gradient_allreduce"] == pytest.approx(2 * 7 / 8 * params * 4)
    batch = distributed.step_communication_bytes(d_in=1024, n_latents=2 ** 20, world_size=8, architecture="batchtopk")
    assert batch["batchtopk_allgather"] == 7 * 4096 * 32 * 4
    assert batch["total"] > topk["total"]


def assert_said_once_by_rank_0(output: str, out: Path, mode: str, per_rank_batch: str) -> None:
    """Rank 0's output of a 2-rank `sparsekit train`: one line each for the start, what ran, the save and the final metrics."""
    lines = output.replace("\r", "\n").splitlines()
    saved = [line for line in lines if "saved to" in line]
    assert len(saved) == 1 and saved[0].startswith(f"sparsekit train: dictionary saved to {out};"), lines
    assert (out / "sae.safetensors").is_file() and (out / "cfg.json").is_file(), "the line claims a save rank 0 made"
    assert sum("final held-out fvu" in line for line in lines) == 1, lines
    assert sum(" steps of 64 on cpu" in line for line in lines) == 1, lines
    report = [line for line in lines if "world size" in line]
    assert len(report) == 1 and report[0].startswith(f"sparsekit: {mode}, world size 2 (gloo, cpu)"), lines
    assert "global batch 64 rows a step" in report[0] and per_rank_batch in report[0], report
    assert "every rank reads the whole stream" in report[0], report


def test_torchrun_launches_the_train_command_on_two_ranks_data_parallel_or_latent_sharded(tmp_path):
    import numpy as np

    from sparsekit.cli import main as sparsekit_main

    np.save(tmp_path / "x.npy", worker.planted_rows(3000).float().numpy())
    flags = ["--data", str(tmp_path / "x.npy"), "--n-latents", "48", "--k", "3", "--batch-size", "64",
             "--total-tokens", "640", "--eval-tokens", "256", "--device", "cpu", "--no-progress", "--log-every", "2"]
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SPARSEKIT_DIST_TIMEOUT_S": "60"}
    # with the progress bar, each rank's stdout and stderr in its own file (--redirects 3)
    launched = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "--log-dir",
                               str(tmp_path / "logs"), "--redirects", "3", "-m", "sparsekit", "train",
                               *[flag for flag in flags if flag != "--no-progress"], "--out", str(tmp_path / "two")],
                              env=env, capture_output=True, text=True, timeout=180)
    assert launched.returncode == 0, launched.stdout + launched.stderr
    said = {(rank, stream): "".join(p.read_text() for p in (tmp_path / "logs").glob(f"*/attempt_0/{rank}/{stream}.log"))
            for rank in range(WORLD) for stream in ("stdout", "stderr")}
    assert said[1, "stdout"] == said[1, "stderr"] == "", f"rank 1 spoke: {said}"
    assert_said_once_by_rank_0(said[0, "stdout"] + said[0, "stderr"], tmp_path / "two", "data parallel",
                               f"per-rank batch {64 // WORLD};")
    assert "sparsekit train: 100%" in said[0, "stderr"], "rank 0 shows the progress bar"
    # the same command latent-sharded, started as torchrun starts its workers (without the agent)
    results, _ = launch("", tmp_path, command=["-m", "sparsekit", "train", *flags, "--latent-parallel", "2",
                                                "--out", str(tmp_path / "sharded")])
    for code, output in results:
        assert code == 0, output
    assert results[1][1] == "", f"rank 1 spoke: {results[1][1]}"
    assert_said_once_by_rank_0(results[0][1], tmp_path / "sharded", "latent sharded", "per-rank batch 64 ")
    sparsekit_main(["train", *flags, "--out", str(tmp_path / "one")])
    one = load_file(str(tmp_path / "one" / "sae.safetensors"))
    for run in ("two", "sharded"):  # data parallel, latent sharded
        assert_parameters_match(one, load_file(str(tmp_path / run / "sae.safetensors")), rtol=FLOAT32_BOUND)
    lines = {run: [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
             for run in ("one", "two", "sharded")}
    for run in ("two", "sharded"):
        assert [r["step"] for r in lines[run]] == [2, 4, 6, 8, 10]
        for a, b in zip(lines["one"], lines[run]):
            assert b["fvu"] == pytest.approx(a["fvu"], rel=1e-5) and b["l0"] == a["l0"]


def test_latent_parallel_without_torchrun_is_a_usage_error(tmp_path, monkeypatch, capsys):
    import numpy as np

    from sparsekit.cli import main as sparsekit_main

    for name in distributed.REQUIRED_ENV:
        monkeypatch.delenv(name, raising=False)
    np.save(tmp_path / "x.npy", worker.planted_rows(600).float().numpy())
    with pytest.raises(SystemExit) as stopped:
        sparsekit_main(["train", "--data", str(tmp_path / "x.npy"), "--n-latents", "48", "--k", "3",
                        "--batch-size", "64", "--total-tokens", "128", "--eval-tokens", "0", "--no-progress",
                        "--latent-parallel", "2", "--out", str(tmp_path / "out")])
    assert stopped.value.code == 2
    assert "missing RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT" in capsys.readouterr().err


def test_other_ranks_log_only_errors_each_naming_its_rank(monkeypatch, capsys):
    from sparsekit._util.log import logger
    from sparsekit.training.parallel import ranks

    ranks.quiet_other_ranks()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    logger.info("resumed from somewhere")
    logger.warning("skipping invalid checkpoint")  # the shared run's: rank 0 says it
    logger.error("failed here")
    assert capsys.readouterr().err.splitlines() == ["sparsekit: rank 1 of 2: failed here"]
    monkeypatch.setenv("RANK", "0")
    logger.info("resumed from somewhere")
    assert capsys.readouterr().err == "sparsekit: resumed from somewhere\n"
    monkeypatch.setenv("WORLD_SIZE", "not a number")
    assert ranks.rank_and_world() == (0, 1) and ranks.speaks() and ranks.rank_prefix() == ""


def test_a_failing_rank_names_itself_in_the_cli_line_and_only_rank_0_says_the_rest(monkeypatch, capsys):
    from sparsekit.cli.train_common import failure_line, say

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    say("sparsekit train: dictionary saved to nowhere")
    assert capsys.readouterr().out == ""
    assert failure_line(ValueError("--data x.npy: no such file")) == "sparsekit train: rank 1 of 2: --data x.npy: no such file"
    already = "rank 1 of 2: training diverged at step 2"  # TrainingDiverged names the rank itself
    assert failure_line(RuntimeError(already)) == f"sparsekit train: {already}"
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    say("sparsekit train: dictionary saved to out")
    assert capsys.readouterr().out == "sparsekit train: dictionary saved to out\n"
    assert failure_line(ValueError("bad")) == "sparsekit train: bad"
