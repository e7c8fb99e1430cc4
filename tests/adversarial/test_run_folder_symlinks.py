"""Issue 21, class 5: symbolic links planted in a checkpoint or output folder. A run refuses a
folder holding one (SymlinkRefused naming the link) and never writes through it: the link's target
keeps its bytes. Files are created with O_NOFOLLOW where the platform has it and checked with lstat
where it does not (both paths tested). The run folder itself may be a link.

In-process: these are file-system checks, which a child process would not change."""
import os
import random
import shutil

import pytest
from helpers import hostile

import sparsekit
from sparsekit._util import atomic
from sparsekit._util.atomic import SymlinkRefused
from sparsekit.training import checkpoint as ckpt

SEED = hostile.fresh_seed()


@pytest.fixture
def victim(tmp_path):
    """A file and a folder outside the run, with random contents, that no run may change."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.bin").write_bytes(os.urandom(random.randrange(1, 4096)))
    (outside / "folder").mkdir()
    (outside / "folder" / "inside.bin").write_bytes(os.urandom(64))
    return outside


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def plant(link, victim, kind):
    target = {"file": victim / "precious.bin", "folder": victim / "folder", "dangling": victim / "nowhere"}[kind]
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, link)
    return link


KINDS = ("file", "folder", "dangling")
CHECKPOINT_NAMES = ("step_000000004", f".step_000000002.tmp-{os.getpid()}", "metrics.jsonl", "notes.txt",
                    ".step_000000002.trash-1")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", CHECKPOINT_NAMES)
def test_a_link_in_the_checkpoint_folder_stops_a_fresh_run_before_it_writes(tmp_path, victim, name, kind):
    run = tmp_path / "run"
    link = plant(run / name, victim, kind)
    before = snapshot(victim)
    with pytest.raises(SymlinkRefused) as raised:
        hostile.train(run, SEED)
    assert str(raised.value).startswith(f"{link} is a symbolic link (to {os.readlink(link)}) inside the run folder {run}")
    assert "remove the link, or choose another folder" in str(raised.value)
    assert snapshot(victim) == before and os.path.islink(link)
    assert hostile.steps_in(run) in ([], [4])  # nothing written


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ("metrics.jsonl", "feature_density.png", "wandb"))
def test_a_link_in_the_output_folder_stops_the_run_before_it_writes(tmp_path, victim, name, kind):
    link = plant(tmp_path / "out" / name, victim, kind)
    before = snapshot(victim)
    with pytest.raises(SymlinkRefused, match=f"^{link} is a symbolic link"):
        hostile.train(tmp_path / "run", SEED, output_dir=str(tmp_path / "out"))
    assert snapshot(victim) == before and hostile.steps_in(tmp_path / "run") == []


@pytest.mark.parametrize("inner", ("state.json", "state.safetensors"))
def test_a_link_inside_a_checkpoint_is_refused_on_resume_not_followed(tmp_path, victim, inner):
    run = tmp_path / "run"
    hostile.train(run, SEED)
    real = victim / "real"
    shutil.copytree(run / "step_000000010", real)  # a valid state, reachable only through the link
    (run / "step_000000010" / inner).unlink()
    os.symlink(real / inner, run / "step_000000010" / inner)
    with pytest.raises(SymlinkRefused, match=f"step_000000010/{inner} is a symbolic link"):
        hostile.train(run, SEED, resume=True)
    with pytest.raises(SymlinkRefused):
        ckpt.latest(run)


def test_a_link_planted_mid_run_at_the_next_temporary_name_is_refused_not_written_through(tmp_path, victim):
    run = tmp_path / "run"
    hostile.train(run, SEED)
    tensors, state = ckpt.read(run / "step_000000010")
    link = plant(run / f".step_000000012.tmp-{os.getpid()}", victim, "folder")
    before = snapshot(victim)
    state = {k: v for k, v in state.items() if k not in ("step", "tensors_sha256", "format", "state_sha256")}
    with pytest.raises(SymlinkRefused, match=f"^{link} is a symbolic link"):
        ckpt.write(run, 12, tensors, {**state, "tokens": 12 * hostile.B})
    assert snapshot(victim) == before and hostile.steps_in(run) == [8, 10] and os.path.islink(link)


@pytest.fixture(params=["O_NOFOLLOW", "lstat only"])
def follow_check(request, monkeypatch):
    """Both ways of refusing a link: the platform's O_NOFOLLOW, and the lstat check used without it."""
    if request.param == "lstat only":
        monkeypatch.setattr(atomic, "O_NOFOLLOW", 0)
    return request.param


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ("sae.safetensors", "cfg.json", f".sae.safetensors.{os.getpid()}.tmp",
                                  f".cfg.json.{os.getpid()}.tmp"))
def test_saving_a_dictionary_never_writes_through_a_planted_link(tmp_path, victim, follow_check, name, kind):
    out = tmp_path / "final"
    link = plant(out / name, victim, kind)
    before = snapshot(victim)
    with pytest.raises(SymlinkRefused, match=f"^{link} is a symbolic link"):
        sparsekit.TopKSAE(hostile.D, hostile.N, k=hostile.K).save(out)
    assert snapshot(victim) == before and os.path.islink(link)


@pytest.mark.parametrize("kind", KINDS)
def test_reading_a_state_file_refuses_a_link_with_or_without_o_nofollow(tmp_path, victim, follow_check, kind):
    link = plant(tmp_path / "state.json", victim, kind)
    with pytest.raises(SymlinkRefused, match=f"^{link} is a symbolic link"):
        atomic.read_file_nofollow(link, 1 << 20)


def test_a_leftover_temporary_file_of_a_dead_process_is_replaced_not_refused(tmp_path, follow_check):
    out = tmp_path / "final"
    out.mkdir()
    (out / f".cfg.json.{os.getpid()}.tmp").write_bytes(b"half")
    sparsekit.TopKSAE(hostile.D, hostile.N, k=hostile.K).save(out)
    assert sparsekit.load(out).n_latents == hostile.N
    assert not list(out.glob(".*.tmp"))


def test_a_run_folder_that_is_itself_a_link_is_allowed_and_resumes_exactly(tmp_path):
    """The user's choice (runs kept on another disk): only links inside run folders are refused."""
    real = tmp_path / "scratch" / "run"
    real.mkdir(parents=True)
    os.symlink(real, tmp_path / "run")
    reference = hostile.train(tmp_path / "reference", SEED)
    hostile.train(tmp_path / "run", SEED)
    shutil.rmtree(real / "step_000000010")  # as if killed after step 8's checkpoint
    resumed = hostile.train(tmp_path / "run", SEED, resume=True)
    assert hostile.same_parameters(resumed.sae, reference.sae) and hostile.steps_in(real) == [8, 10]


def test_a_lock_file_planted_as_a_link_never_has_its_target_overwritten(tmp_path, victim):
    run = tmp_path / "run"
    plant(run / ".lock", victim, "file")
    before = snapshot(victim)
    with pytest.raises(SymlinkRefused):
        hostile.train(run, SEED)
    assert snapshot(victim) == before
