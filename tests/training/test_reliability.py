"""Crash-safe training: a diverged run stops at the step that diverged and keeps its last good
checkpoint; a full disk loses nothing already written; one run per checkpoint folder; a run that
cannot fit in memory is refused before it allocates."""
import errno
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import sparsekit
from sparsekit.errors import CheckpointDirBusy, CheckpointWriteFailed, InsufficientMemory, TrainingDiverged
from sparsekit.training import checkpoint as ckpt
from sparsekit.training import guards as reliability
from sparsekit.training import memory

D, N, B = 8, 32, 64


def batches(count=12, seed=0, huge_at=None):
    """`count` batches [B, D] of sparse data; batch `huge_at` (0-based) is scaled by 1e30 (finite,
    but its squared error overflows float32)."""
    gen = torch.Generator().manual_seed(seed)
    features = torch.nn.functional.normalize(torch.randn(40, D, generator=gen), dim=-1)
    out = []
    for i in range(count):
        x = ((torch.rand(B, 40, generator=gen) < 0.1).float() * torch.rand(B, 40, generator=gen)) @ features
        out.append(x * 1e30 if i == huge_at else x)
    return out


def config(directory=None, steps=10, **overrides):
    every = dict(checkpoint_dir=str(directory), checkpoint_every_tokens=2 * B) if directory is not None else {}
    return sparsekit.TrainConfig(batch_size=B, total_tokens=steps * B, eval_tokens=B, lr=3e-3, log_every=2,
                                 progress=False, **every, **overrides)


def steps_written(directory):
    return [int(p.name[5:]) for p in ckpt.complete_checkpoints(directory)]


def test_a_loss_that_overflows_stops_the_run_naming_the_step_and_the_checkpoint_to_resume(tmp_path):
    # Batch 0 is the held-out split; training step s reads batch s + 1, so step 7 (0-based 6) meets the spike.
    with pytest.raises(TrainingDiverged) as raised:
        sparsekit.train(sparsekit.TopKSAE(D, N, k=3), batches(huge_at=7), config(tmp_path))
    message = str(raised.value)
    assert raised.value.step == 7 and message.startswith("training diverged at step 7: the loss is inf")
    assert f"last good checkpoint, {tmp_path / 'step_000000006'}" in message
    assert "resume=True" in message and "lower TrainConfig.lr (now 0.003; try 0.0003)" in message
    assert steps_written(tmp_path) == [4, 6]  # nothing from the diverged step on
    tensors, state = ckpt.read(tmp_path / "step_000000006")
    assert state["step"] == 6 and all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())


def test_a_parameter_that_turns_nan_stops_the_run_and_names_it(tmp_path, monkeypatch):
    sae = sparsekit.TopKSAE(D, N, k=3)
    calls = []
    original = type(sae).normalize_decoder

    def poison_on_the_fifth_update(self):
        original(self)
        calls.append(1)
        if len(calls) == 5:
            with torch.no_grad():
                self.W_dec[3, 1] = float("nan")

    monkeypatch.setattr(type(sae), "normalize_decoder", poison_on_the_fifth_update)
    with pytest.raises(TrainingDiverged, match=r"at step 5: the update left NaN or Inf in W_dec; .*step_000000004"):
        sparsekit.train(sae, batches(), config(tmp_path))
    assert steps_written(tmp_path) == [2, 4]


def test_a_run_without_checkpoints_says_so_when_it_diverges():
    with pytest.raises(TrainingDiverged, match="no checkpoint_dir was set: start again with a lower TrainConfig.lr"):
        sparsekit.train(sparsekit.TopKSAE(D, N, k=3), batches(huge_at=3), config())


def test_a_checkpoint_with_non_finite_state_is_never_written(tmp_path):
    bad = {"sae.W_enc": torch.ones(2, 2), "opt.0.exp_avg_sq": torch.tensor([1.0, float("inf")])}
    with pytest.raises(TrainingDiverged, match=r"refusing to write a checkpoint holding NaN or Inf \(in opt.0.exp_avg_sq"):
        ckpt.write(tmp_path, 3, bad, {})
    assert list(tmp_path.iterdir()) == []


def full_disk_after(calls: int, original):
    """Wraps a writer so that its call number `calls` (1-based) fails with ENOSPC."""
    count = [0]

    def write(*args, **kwargs):
        count[0] += 1
        if count[0] == calls:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(*args, **kwargs)

    return write


@pytest.mark.parametrize("where", ["save_file", "fsync_path"])
def test_a_full_disk_while_checkpointing_stops_cleanly_and_loses_nothing(tmp_path, monkeypatch, where):
    reference = sparsekit.train(sparsekit.TopKSAE(D, N, k=3), batches(), config(tmp_path / "reference"))
    run = tmp_path / "run"
    # The third checkpoint (step 6) fails: save_file is called once per checkpoint, fsync_path four times.
    monkeypatch.setattr(ckpt, where, full_disk_after(3 if where == "save_file" else 9, getattr(ckpt, where)))
    with pytest.raises(CheckpointWriteFailed) as raised:
        sparsekit.train(sparsekit.TopKSAE(D, N, k=3), batches(), config(run))
    assert raised.value.errno == errno.ENOSPC
    assert "could not write checkpoint step_000000006" in str(raised.value)
    assert "nothing already written was touched (newest checkpoint: step_000000004)" in str(raised.value)
    assert steps_written(run) == [2, 4]
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".step_")) == []  # no half-written folder
    for step in (2, 4):
        ckpt.read(run / f"step_{step:09d}")  # checksums still match
    monkeypatch.undo()
    resumed = sparsekit.train(sparsekit.TopKSAE(D, N, k=3), batches(), config(run), resume=True)
    for name, tensor in reference.sae.state_dict().items():
        assert torch.equal(tensor, resumed.sae.state_dict()[name]), name


def test_a_second_run_on_the_same_checkpoint_dir_is_refused(tmp_path):
    with reliability.checkpoint_dir_lock(tmp_path):
        with pytest.raises(CheckpointDirBusy, match=f"checkpoint_dir {tmp_path} is in use by another run "
                                                    f"\\(pid {os.getpid()} on "):
            sparsekit.train(sparsekit.TopKSAE(D, N, k=3), batches(), config(tmp_path))
    sparsekit.train(sparsekit.TopKSAE(D, N, k=3), batches(), config(tmp_path))  # released on exit


def test_the_lock_is_held_across_processes_and_released_when_its_holder_is_killed(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from sparsekit.training.guards import checkpoint_dir_lock
        with checkpoint_dir_lock({str(tmp_path)!r}):
            print("locked", flush=True)
            time.sleep(120)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CheckpointDirBusy, match=f"pid {holder.pid} "):
            with reliability.checkpoint_dir_lock(tmp_path):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The dead holder's pid is still written in the lock file, but the kernel dropped its flock.
    assert f"pid {holder.pid}" in (tmp_path / reliability.LOCK_FILE).read_text()
    with reliability.checkpoint_dir_lock(tmp_path):
        assert f"pid {os.getpid()}" in (tmp_path / reliability.LOCK_FILE).read_text()


def test_a_dead_runs_half_written_checkpoint_is_removed_by_the_next_run(tmp_path):
    sparsekit.train(sparsekit.TopKSAE(D, N, k=3), batches(), config(tmp_path, steps=4))
    leftover = tmp_path / ".step_000000006.tmp-99999"
    leftover.mkdir()
    (leftover / "state.safetensors").write_bytes(b"half")
    sparsekit.train(sparsekit.TopKSAE(D, N, k=3), batches(), config(tmp_path, steps=8), resume=True)
    assert not leftover.exists() and steps_written(tmp_path) == [6, 8]


# --- memory ----------------------------------------------------------------------------------------

def test_memory_estimate_counts_parameters_exactly_and_adam_twice():
    sae = sparsekit.Transcoder(12, 48, 10, k=4)
    cfg = sparsekit.TrainConfig(batch_size=256, eval_tokens=512)
    estimate = memory.estimate_for(sae, cfg)
    params = sum(p.numel() * p.element_size() for p in sae.parameters())
    assert estimate.parts["parameters"] == params
    assert estimate.parts["adam_moments"] == 2 * params and estimate.parts["gradients"] == params
    assert estimate.parts["update_scratch"] == int(1.35 * params)  # a TopK step on the CPU: measured, no [B, n] buffer
    assert estimate.parts["held_out_split"] == 512 * (12 + 10) * 4
    assert estimate.total == sum(estimate.parts.values())
    wide = memory.estimate_training_memory(12, 48, 256, architecture="relu", dtype=torch.float64)
    assert wide.parts["parameters"] == (12 * 48 * 2 + 48 + 12) * 8 and wide.parts["batch_by_latent_buffers"] == 3 * 256 * 48 * 8


def test_a_configuration_that_cannot_fit_is_refused_with_its_figure_without_allocating():
    # 2**38 latents of width 4096: the parameters alone are 8 PiB; nothing is allocated to find out.
    estimate = memory.estimate_training_memory(4096, 2 ** 38, 4096, k=32)
    assert estimate.parts["parameters"] > 2 ** 53
    with pytest.raises(InsufficientMemory) as raised:
        memory.check_fits(estimate, "cpu")
    message = str(raised.value)
    assert message.startswith("this configuration needs about ") and "parameters 8.39e+06 GiB" in message
    assert "but cpu has " in message and "lower n_latents or batch_size" in message
    assert raised.value.available == memory.available_memory("cpu") or raised.value.available > 0


def test_available_memory_is_a_plausible_figure():
    available = memory.available_memory("cpu")
    assert available is not None and 2 ** 26 < available < 2 ** 50


def test_train_refuses_a_run_whose_optimizer_and_buffers_cannot_fit(monkeypatch):
    monkeypatch.setattr(memory, "available_memory", lambda device: 1000)
    sae = sparsekit.TopKSAE(D, N, k=3)
    before = {n: t.clone() for n, t in sae.state_dict().items()}
    with pytest.raises(InsufficientMemory, match=r"training this topk dictionary \(n_latents=32, batch_size=64\) "
                                                 r"needs about .* already allocated, but cpu has 0.000954 MiB"):
        sparsekit.train(sae, batches(), config())
    assert all(torch.equal(before[n], t) for n, t in sae.state_dict().items())
