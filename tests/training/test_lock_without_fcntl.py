"""Where fcntl does not exist (Windows), `import sparsekit` works and the checkpoint folder's lock
goes through filelock with the same semantics: a second holder gets CheckpointDirBusy naming the
first, a released lock can be taken again, and a lock left by a killed process never blocks.

Simulated on Linux by ``sys.modules['fcntl'] = None`` before sparsekit is imported, in subprocesses."""
import subprocess
import sys
import textwrap

NO_FCNTL = "import sys\nsys.modules['fcntl'] = None\n"


def python(code: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", NO_FCNTL + textwrap.dedent(code)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def holder(directory, **kwargs) -> subprocess.Popen:
    """A process holding the lock on directory until a line arrives on its stdin (or it is killed)."""
    process = python(f"""
        from sparsekit.training.guards import checkpoint_dir_lock
        with checkpoint_dir_lock({str(directory)!r}):
            print("locked", flush=True)
            sys.stdin.readline()
        print("released", flush=True)
        sys.stdin.readline()
        """, stdin=subprocess.PIPE, **kwargs)
    assert process.stdout.readline().strip() == "locked", process.stderr.read()
    return process


def try_lock(directory) -> str:
    """From a fresh process without fcntl: "acquired" or the CheckpointDirBusy message."""
    result = subprocess.run([sys.executable, "-c", NO_FCNTL + textwrap.dedent(f"""
        from sparsekit.errors import CheckpointDirBusy
        from sparsekit.training.guards import checkpoint_dir_lock
        try:
            with checkpoint_dir_lock({str(directory)!r}):
                print("acquired")
        except CheckpointDirBusy as e:
            print("busy:", e)
        """)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_import_sparsekit_and_the_reference_path_work_without_fcntl():
    result = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", NO_FCNTL + textwrap.dedent("""
        import torch
        import sparsekit
        from sparsekit import reference, reliability
        assert reliability.fcntl is None
        sae = sparsekit.TopKSAE(8, 32, k=3)
        values, indices = reference.topk_encode(torch.randn(5, 8), sae.W_enc, sae.b_enc, 3)
        assert values.shape == indices.shape == (5, 3)
        print("ok")
        """)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_without_fcntl_a_second_holder_is_refused_by_name_and_a_released_lock_is_taken_again(tmp_path):
    first = holder(tmp_path)
    try:
        assert try_lock(tmp_path) == (f"busy: checkpoint_dir {tmp_path} is in use by another run (pid {first.pid} on "
                                      f"{__import__('socket').gethostname()}); wait for it to finish or stop it, or "
                                      f"choose another checkpoint_dir")
        first.stdin.write("\n")
        first.stdin.flush()
        assert first.stdout.readline().strip() == "released"
        assert try_lock(tmp_path) == "acquired"  # the first process is still alive, its lock released
    finally:
        first.kill()
        first.wait()


def test_without_fcntl_a_lock_left_by_a_killed_process_does_not_block(tmp_path):
    first = holder(tmp_path)
    first.kill()
    first.wait()
    assert f"pid {first.pid}" in (tmp_path / ".lock").read_text()  # its name is still written
    assert try_lock(tmp_path) == "acquired"


def test_without_fcntl_training_holds_the_lock(tmp_path):
    first = holder(tmp_path)
    try:
        result = subprocess.run([sys.executable, "-c", NO_FCNTL + textwrap.dedent(f"""
            import torch, sparsekit
            from sparsekit.errors import CheckpointDirBusy
            cfg = sparsekit.TrainConfig(batch_size=16, total_tokens=64, eval_tokens=16, progress=False,
                                        checkpoint_dir={str(tmp_path)!r})
            try:
                sparsekit.train(sparsekit.TopKSAE(8, 32, k=3), torch.randn(256, 8), cfg)
            except CheckpointDirBusy as e:
                print("busy", e)
            """)], capture_output=True, text=True, timeout=300)
        assert result.stdout.startswith(f"busy checkpoint_dir {tmp_path} is in use by another run (pid {first.pid} "), \
            result.stderr
    finally:
        first.kill()
        first.wait()
