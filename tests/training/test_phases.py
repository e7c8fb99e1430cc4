"""The trainer's phases one at a time (sparsekit.training.loop): ``start`` (fresh, or from a
checkpoint), ``take_step``, ``after_step`` and ``finish``, the run state a checkpoint holds, and
the TrainConfig field help. Chained, the phases are ``sparsekit.train`` bit for bit."""
import json

import pytest
import torch

import sparsekit
from sparsekit.activations import TensorSource
from sparsekit.errors import SourceExhausted
from sparsekit.training import checkpoint as ckpt
from sparsekit.training import loop
from sparsekit.training.batches import Batches
from sparsekit.training.config import TrainConfig, field_help
from sparsekit.training.metrics import DENSITY_PLOT, METRICS_FILE
from sparsekit.training.state import write_checkpoint
from sparsekit.training.tracking import WandbTracker

D, N, K, B = 8, 32, 3, 64


def rows(n=2048, seed=0):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def config(tmp_path=None, **overrides):
    base = dict(batch_size=B, lr=1e-2, total_tokens=B * 10, eval_tokens=256, log_every=4, progress=False)
    if tmp_path is not None:
        base.update(checkpoint_dir=str(tmp_path), checkpoint_every_tokens=B * 4)
    base.update(overrides)
    return TrainConfig(**base)


def source():
    """Chunks of 100 rows: batches of B leave rows carried between them."""
    return TensorSource(rows(), batch_size=100, shuffle=True, seed=1)


def fresh_run(tmp_path=None, **overrides):
    sae = sparsekit.TopKSAE(D, N, k=K)
    return loop.start(sae, source(), config(tmp_path, **overrides))


def test_a_fresh_start_holds_out_the_split_scales_the_inputs_and_starts_the_metrics_file(tmp_path):
    run = fresh_run(tmp_path)
    state = run.state
    assert (state.step, state.tokens, run.total_steps, run.history) == (0, 0, 10, [])
    assert state.eval_x.shape == (256, D) and state.eval_y is None
    assert state.sae.training and state.sae.input_scale != 1.0
    assert not state.optimizer.state  # no update yet
    assert (tmp_path / METRICS_FILE).read_text() == ""


def test_one_step_moves_the_parameters_and_the_optimizer_state():
    run = fresh_run()
    before = [p.detach().clone() for p in run.params]
    step = loop.take_step(run)
    state = run.state
    assert (state.step, state.tokens) == (1, B)
    assert step.x.shape == (B, D) and step.residual.shape == (B, D) and not step.residual.requires_grad
    moments = [state.optimizer.state[p]["exp_avg"] for p in run.params]
    assert all(m.abs().sum() > 0 for m in moments[:3])  # W_enc, b_enc, W_dec all got gradients
    assert all(float(state.optimizer.state[p]["step"]) == 1 for p in run.params)
    assert any(not torch.equal(p, q) for p, q in zip(run.params, before))
    assert state.window.steps == 1 and state.window.rows == B and int(state.window_counts.sum()) > 0


def test_after_step_logs_a_line_and_writes_a_checkpoint_when_due(tmp_path):
    run = fresh_run(tmp_path)
    for _ in range(3):
        loop.after_step(run, loop.take_step(run))
    assert run.history == [] and ckpt.complete_checkpoints(tmp_path) == []
    loop.after_step(run, loop.take_step(run))  # step 4: log_every and checkpoint_every_tokens both reached
    assert [r["step"] for r in run.history] == [4]
    assert [json.loads(line)["step"] for line in (tmp_path / METRICS_FILE).read_text().splitlines()] == [4]
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step_000000004"]
    assert run.state.window.steps == 0 and int(run.state.window_counts.sum()) == 0  # a new window


def test_a_resumed_start_restores_the_whole_state(tmp_path):
    run = fresh_run(tmp_path)
    for _ in range(3):
        loop.take_step(run)
    write_checkpoint(run.state)
    again = loop.start(sparsekit.TopKSAE(D, N, k=K, seed=7), source(), config(tmp_path), resume=True)
    a, b = run.state, again.state
    assert (b.step, b.tokens) == (3, 3 * B) and again.progress.n == 3
    for name, t in a.sae.state_dict().items():
        assert torch.equal(t, b.sae.state_dict()[name]), name
    for p, q in zip(run.params, again.params):
        for key, value in a.optimizer.state[p].items():
            assert torch.equal(value, b.optimizer.state[q][key]), key
    assert vars(a.window) == vars(b.window)
    assert torch.equal(a.tracker.tokens_since_fired, b.tracker.tokens_since_fired)
    assert torch.equal(a.eval_x, b.eval_x) and torch.equal(a.batches.carry_x, b.batches.carry_x)
    assert a.source.state_dict() == b.source.state_dict()


def test_finish_reports_held_out_metrics_plots_and_hands_the_final_metrics_to_the_tracker(tmp_path):
    run = fresh_run(tmp_path)
    summary, logged = {}, []

    class FakeWandbRun:
        def __init__(self):
            self.summary = summary

        def log(self, record, step):
            logged.append((sorted(record), step))

        def finish(self):
            logged.append("finished")

    class FakeWandb:
        Image = staticmethod(lambda path: path)

    tracker = WandbTracker.__new__(WandbTracker)  # no wandb.init: the run object is a fake
    tracker.run, tracker._wandb = FakeWandbRun(), FakeWandb()
    run.tracking = tracker
    while run.state.step < run.total_steps:
        loop.take_step(run)
    result = loop.finish(run)
    assert set(result.metrics) == {"step", "tokens", "dead_frac", "mse", "fvu", "explained_variance", "l0", "dense_frac",
                                   "never_fired_frac"}
    assert result.metrics["step"] == 10 and result.output_dir == tmp_path and result.sae is run.state.sae
    assert (tmp_path / DENSITY_PLOT).is_file()
    assert summary == {f"final/{key}": value for key, value in result.metrics.items()}
    assert logged == [(["feature_density"], 10), "finished"]


def test_the_phases_chained_are_train_exactly(tmp_path):
    cfg = dict(dead_strategy="auxk+resample", dead_window_tokens=B, resample_at_tokens=(B * 3,))
    by_train = sparsekit.TopKSAE(D, 256, k=1)  # 64 of 256 latents fire per step at most: some die
    result = sparsekit.train(by_train, source(), config(tmp_path / "train", **cfg))
    run = loop.start(sparsekit.TopKSAE(D, 256, k=1), source(), config(tmp_path / "phases", **cfg))
    while run.state.step < run.total_steps:
        loop.after_step(run, loop.take_step(run))
    by_phases = loop.finish(run)
    for name, t in by_train.state_dict().items():
        assert torch.equal(t, by_phases.sae.state_dict()[name]), name
    assert by_phases.history == result.history and by_phases.metrics == result.metrics
    assert any("resampled" in record for record in result.history)


def test_batches_put_back_rows_ahead_of_the_carried_ones():
    batches = Batches([torch.arange(10.).reshape(5, 2)], batch_size=2, d_in=2, d_out=None, needs_target=False)
    first, _ = batches.take(2)
    batches.put_back(first, None)
    assert torch.equal(batches.take(5)[0], torch.arange(10.).reshape(5, 2))
    with pytest.raises(SourceExhausted, match="ran out after 1 batches"):
        batches.take(1)


def test_every_train_config_field_has_help_and_unknown_names_are_refused():
    import dataclasses

    from sparsekit.cli.train import build_parser

    cli_help = " ".join(build_parser().format_help().split())
    for field in dataclasses.fields(TrainConfig):
        assert field_help(field.name).strip(), field.name
        assert " ".join(field_help(field.name).split()) in cli_help, f"--{field.name} does not show its help"
    assert "None: d_in // 2" in field_help("aux_k")
    with pytest.raises(ValueError, match="no field 'batchsize'.*batch_size"):
        field_help("batchsize")
