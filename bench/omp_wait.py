"""OpenMP wait policy, measured: the TopK training step under each OMP_WAIT_POLICY, on an idle
machine and with one core taken by a busy process (as on a shared or loaded machine).

    .venv/bin/python bench/omp_wait.py [--rounds 3] [--quick]

libgomp's policies: unset (spin ~300k iterations, then sleep), "active" (spin much longer),
"passive" (sleep at once). Each (policy, load) runs in its own child processes, alternating; the
step is bench/peers.py's TrainerStep (B=4096, d=512, n=16384, k=32 unless --quick). One table.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import cpu_model  # noqa: E402
from portable import ROOT, run_child  # noqa: E402

POLICIES = ("unset", "passive", "active")


@contextlib.contextmanager
def busy_core(on: bool):
    """A process spinning on one core for the duration (when ``on``)."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if on else None
    try:
        yield
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    times = {(policy, load): [] for load in (False, True) for policy in POLICIES}
    saved = os.environ.pop("OMP_WAIT_POLICY", None)
    try:
        for r in range(args.rounds):
            for load in (False, True):
                with busy_core(load):
                    for policy in POLICIES if r % 2 == 0 else reversed(POLICIES):
                        if policy == "unset":
                            os.environ.pop("OMP_WAIT_POLICY", None)
                        else:
                            os.environ["OMP_WAIT_POLICY"] = policy
                        times[policy, load] += run_child(ROOT, args, ROOT)["times"]
    finally:
        os.environ.pop("OMP_WAIT_POLICY", None)
        if saved is not None:
            os.environ["OMP_WAIT_POLICY"] = saved
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores, {args.threads} threads; TopK training step, "
          f"{'--quick shapes' if args.quick else 'B=4096, d=512, n=16384, k=32'}; "
          f"{args.rounds} rounds x {args.steps} steps per cell\n")
    print("| OMP_WAIT_POLICY | idle: median s | one core busy: median s |")
    print("| --- | ---: | ---: |")
    for policy in POLICIES:
        idle, loaded = (statistics.median(times[policy, load]) for load in (False, True))
        print(f"| {policy} | {idle:.3f} | {loaded:.3f} |")


if __name__ == "__main__":
    main()
