"""A resumed run takes the CPU paths its checkpoint recorded, not the tuning cache of the moment:
killed, re-tuned and resumed, it ends bit-identical to a run that never stopped."""
import hashlib
import json

import pytest
import torch

import sparsekit
from sparsekit import TrainConfig, train
from sparsekit.ops.cpu import gemm, screen, tuning
from sparsekit.training import checkpoint as ckpt
from sparsekit.training import loop

D, N, K, BATCH, STEPS, KILL_AT = 64, 512, 8, 256, 12, 4
# Every path switched from its default at these sizes: OpenBLAS row tiles instead of torch's GEMM,
# and on CPUs with native bf16 the bf16 screen (which then runs instead of either GEMM).
OTHER_PATHS = {"parallel_min_flop": 0, "pooled_mm_min_flop": 0, "screen_min_flop": 0, "screen_min_n_over_k": 1, "screen_rows": 64,
               "select_threshold_min_share": 1}


class Killed(Exception):
    """Stands for SIGKILL right after a checkpoint was written."""


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty tuning cache of this test's own; nothing pinned before or after."""
    for variable in ("SPARSEKIT_BACKEND", "SPARSEKIT_CPU_GEMM", "SPARSEKIT_BF16_SCREEN"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv(tuning.CACHE_ENV, str(tmp_path / "cache"))
    tuning.unpin()
    tuning.reload()
    yield tmp_path / "cache"
    tuning.unpin()
    tuning.reload()


def write_cache(values: dict) -> None:
    tuning.save({"format": tuning.FORMAT, "key": tuning.cache_key(), "values": values})


def fingerprint(sae) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(sae.state_dict().items()):
        digest.update(name.encode() + tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def run(x, checkpoint_dir=None, resume=False) -> str:
    sae = sparsekit.TopKSAE(D, N, k=K, seed=5)
    checkpoints = {"checkpoint_dir": str(checkpoint_dir), "checkpoint_every_tokens": BATCH * KILL_AT} \
        if checkpoint_dir else {}
    train(sae, x, TrainConfig(batch_size=BATCH, total_tokens=BATCH * STEPS, eval_tokens=BATCH, progress=False,
                              dead_strategy="auxk", dead_window_tokens=BATCH * 2, seed=5, **checkpoints),
          resume=resume)
    return fingerprint(sae)


def killed_after_first_checkpoint(x, checkpoint_dir, monkeypatch) -> None:
    write = loop.write_checkpoint

    def write_then_die(state, context):
        write(state, context)
        raise Killed(state.step)

    with monkeypatch.context() as patch:
        patch.setattr(loop, "write_checkpoint", write_then_die)
        with pytest.raises(Killed):
            run(x, checkpoint_dir)
    assert [ckpt.step_of(p) for p in ckpt.checkpoint_folders(checkpoint_dir)] == [KILL_AT]


def test_a_run_resumed_after_the_cache_changed_is_bit_identical_to_one_never_stopped(cache, tmp_path, monkeypatch):
    if not gemm.openblas_available() and not screen.cpu_has_native_bf16():
        pytest.skip("no second CPU path on this machine (no controllable OpenBLAS, no native bf16)")
    x = torch.randn(BATCH * (STEPS + 2), D, generator=torch.Generator().manual_seed(int(torch.randint(999, ()))))
    uninterrupted = run(x)
    killed_after_first_checkpoint(x, tmp_path / "run", monkeypatch)
    write_cache(OTHER_PATHS)  # `sparsekit tune` ran while the run was down
    assert tuning.in_effect() == OTHER_PATHS
    resumed = run(x, tmp_path / "run", resume=True)
    assert resumed == uninterrupted
    # The cache did change the sums: a run that starts under it ends elsewhere.
    tuning.unpin()
    assert run(x) != uninterrupted


def test_checkpoints_record_the_paths_in_effect_and_a_resume_pins_them(cache, tmp_path, monkeypatch):
    x = torch.randn(BATCH * (STEPS + 2), D)
    write_cache(OTHER_PATHS)
    killed_after_first_checkpoint(x, tmp_path / "run", monkeypatch)
    state = ckpt.verify(ckpt.checkpoint_folders(tmp_path / "run")[0])
    assert state["cpu_paths"]["values"] == OTHER_PATHS and state["cpu_paths"]["source"].startswith("tuned")
    tuning.reset()  # the cache gone: the defaults would apply...
    assert tuning.in_effect()["parallel_min_flop"] == gemm.PARALLEL_MIN_FLOP
    ckpt.latest(tmp_path / "run")  # ...but the resume keeps what the run chose
    assert tuning.in_effect() == OTHER_PATHS and tuning.source() == f"recorded in checkpoint step_{KILL_AT:09d}"


def test_a_checkpoint_without_recorded_paths_resumes_on_the_defaults(cache, tmp_path, monkeypatch):
    x = torch.randn(BATCH * (STEPS + 2), D)
    killed_after_first_checkpoint(x, tmp_path / "run", monkeypatch)
    folder = ckpt.checkpoint_folders(tmp_path / "run")[0]
    state = ckpt.verify(folder)
    del state["cpu_paths"]  # as sparsekit wrote them before the tuning cache
    state["state_sha256"] = ckpt.state_digest(state)
    (folder / ckpt.STATE_JSON).write_text(json.dumps(state))
    write_cache(OTHER_PATHS)
    ckpt.latest(tmp_path / "run")
    assert tuning.in_effect() == {name: tuning.default(name) for name in tuning.KNOBS}


@pytest.mark.parametrize("knob, bad", [("parallel_min_flop", "fast"), ("screen_rows", 0), ("screen_rows", 2**40)])
def test_recorded_paths_of_the_wrong_type_or_range_make_the_checkpoint_invalid(cache, tmp_path, monkeypatch, knob, bad):
    x = torch.randn(BATCH * (STEPS + 2), D)
    killed_after_first_checkpoint(x, tmp_path / "run", monkeypatch)
    folder = ckpt.checkpoint_folders(tmp_path / "run")[0]
    state = ckpt.verify(folder)
    state["cpu_paths"]["values"][knob] = bad
    state["state_sha256"] = ckpt.state_digest(state)
    (folder / ckpt.STATE_JSON).write_text(json.dumps(state))
    with pytest.raises(ValueError, match="field 'cpu_paths' must be an object with values"):
        ckpt.verify(folder)


def test_a_resume_under_another_forced_path_is_warned_about(cache, tmp_path, monkeypatch, capsys):
    x = torch.randn(BATCH * (STEPS + 2), D)
    killed_after_first_checkpoint(x, tmp_path / "run", monkeypatch)
    monkeypatch.setenv("SPARSEKIT_CPU_GEMM", "torch")
    capsys.readouterr()
    ckpt.latest(tmp_path / "run")
    warning = capsys.readouterr().err
    assert "was written with no SPARSEKIT_CPU_GEMM or SPARSEKIT_BF16_SCREEN, this process has " \
           "SPARSEKIT_CPU_GEMM=torch" in warning
