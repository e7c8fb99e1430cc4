"""A case run in a forked child under a memory cap and a timeout, for the bomb and CLI-edge tests
(tests/adversarial/test_bombs_every_reader.py, test_cli_edges.py). A fork shares the parent's imports, so a case
costs milliseconds rather than a fresh interpreter's seconds; the cap is the parent's address space
plus HEADROOM, so a bomb that expands (a billion-laughs document, a file read whole) dies with
MemoryError in the child instead of taking the machine with it.

Never train in a forked child once OpenMP has run in the parent (the child can deadlock in the
parent's thread pool): a case that trains runs in a fresh interpreter (``hostile.run_capped``)."""
from __future__ import annotations

import contextlib
import io
import multiprocessing
import resource
import traceback
from dataclasses import dataclass

HEADROOM = 512 << 20  # bytes of address space a case may add to what the parent maps
TIMEOUT = 60          # seconds; every case here ends in well under one


@dataclass
class Outcome:
    status: str          # "returned", "raised", "exit", "killed" (a signal or the timeout)
    value: str = ""      # repr of the return value, the exception's message, or the exit code
    kind: str = ""       # the exception's type name
    stderr: str = ""
    stdout: str = ""
    traceback: str = ""

    def __str__(self) -> str:
        return f"{self.status} {self.kind} {self.value!r}; stderr {self.stderr!r}{self.traceback}"


def _address_space() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _child(connection, function, args):
    cap = _address_space() + HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                value = function(*args)
                result = Outcome("returned", repr(value)[:2000])
            except SystemExit as exit_:
                result = Outcome("exit", str(exit_.code if exit_.code is not None else 0))
                if isinstance(exit_.code, str):  # SystemExit("message"): Python prints it and exits 1
                    err.write(exit_.code + "\n")
                    result.value = "1"
            except BaseException as error:  # noqa: BLE001 - the outcome names it
                result = Outcome("raised", str(error)[:2000], type(error).__name__,
                                 traceback=traceback.format_exc()[-3000:])
        result.stderr, result.stdout = err.getvalue()[-5000:], out.getvalue()[-5000:]
    except BaseException as error:  # noqa: BLE001 - even MemoryError while reporting
        result = Outcome("raised", str(error)[:200], type(error).__name__)
    connection.send(result)
    connection.close()


def run(function, *args, timeout: float = TIMEOUT) -> Outcome:
    """function(*args) in a forked child under the memory cap and `timeout`; its Outcome."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(send, function, args), daemon=True)
    child.start()
    send.close()
    result = receive.recv() if receive.poll(timeout) else None
    child.join(5 if result is not None else 0)
    if child.is_alive():
        child.kill()
        child.join()
    if result is None:
        return Outcome("killed", f"exit code {child.exitcode} (timeout {timeout} s or a signal)")
    return result


def cli(*argv: str, timeout: float = TIMEOUT) -> Outcome:
    """`python -m sparsekit *argv` as sparsekit.cli.main runs it, in a forked child."""
    from sparsekit import cli as sparsekit_cli
    return run(sparsekit_cli.main, [str(a) for a in argv], timeout=timeout)


def one_line(outcome: Outcome, *words: str, code: str = "2", seed: int | None = None, max_len: int = 1500) -> str:
    """The single stderr line of a CLI run that exited with ``code`` and printed no traceback, holding
    every one of ``words``; ``seed`` (the test module's fresh seed) is named when it is not."""
    where = f"seed {seed}: " if seed is not None else ""
    assert outcome.status == "exit" and outcome.value == code, f"{where}{outcome}"
    err = outcome.stderr
    assert err.count("\n") == 1 and "Traceback" not in err and len(err) < max_len, f"{where}{err!r}"
    for word in words:
        assert word in err, f"{where}{word!r} not in {err!r}"
    return err
