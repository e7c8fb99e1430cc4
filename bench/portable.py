"""The portable wheel's TopK training step beside a build tuned for this CPU (-march=native).

    make bench-portable            # builds dist/ first (make wheel)
    .venv/bin/python bench/portable.py --wheel dist/sparsekit-*.whl [--rounds 5] [--quick]

The wheel's modules are compiled per instruction-set level (x86-64-v4 / -v3 / baseline; none with
-march=native) and chosen at import. This measures what that costs: the trainer's TopK step
(bench/peers.py's TrainerStep, B=4096, d=512, n=16384, k=32 unless --quick) timed in alternating
child processes, one importing sparsekit from the unpacked wheel, the other from a copy of this
tree whose best level was rebuilt with -march=native. Target: portable within 10% of native.
Prints one table (machine, levels, medians, ratio); nothing is written.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from _timing import cpu_model  # noqa: E402  (imports neither torch nor numpy)

TARGET_RATIO = 1.10


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheel", help="the portable wheel (default: the newest dist/sparsekit-*.whl)")
    parser.add_argument("--rounds", type=int, default=5, help="child processes per variant, alternating")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per child, after one warm-up step")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def child(args: argparse.Namespace) -> None:
    """In the variant's process: time TrainerStep("topk") and print the seconds as JSON."""
    sys.argv = [str(BENCH / "peers.py"), "--threads", str(args.threads)] + (["--quick"] if args.quick else [])
    import time

    import peers  # noqa: E402  (pins threads from sys.argv at import)

    import sparsekit
    from sparsekit.ops.backend import _C
    shapes = peers.shapes_from(peers.parse_args())
    step = peers.TrainerStep("topk", shapes)
    step()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    print(json.dumps({"file": sparsekit.__file__, "module": _C.__file__, "isa": sparsekit.backends()["cpu_isa"],
                      "times": times}))


def native_tree(work: Path) -> Path:
    """A copy of this tree's sparsekit/ with its modules rebuilt, the best level with -march=native."""
    import pybind11
    build, tree = work / "native-build", work / "native"
    shutil.copytree(ROOT / "sparsekit", tree / "sparsekit", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    cmake = shutil.which("cmake", path=str(Path(sys.executable).parent)) or shutil.which("cmake")
    subprocess.run([cmake, "-S", str(ROOT), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DSPARSEKIT_NATIVE=ON",
                    f"-DPython_EXECUTABLE={sys.executable}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
                    f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={tree / 'sparsekit'}"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run([cmake, "--build", str(build), "-j", str(os.cpu_count() or 1)], check=True,
                   stdout=subprocess.DEVNULL)
    return tree


def wheel_tree(wheel: Path, work: Path) -> Path:
    tree = work / "portable"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tree)
    for path in tree.rglob("*.so*"):  # zip drops the mode bits
        path.chmod(0o755)
    return tree


def run_child(tree: Path, args: argparse.Namespace, work: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("SPARSEKIT_ISA", "SPARSEKIT_BACKEND")}
    env.update(PYTHONPATH=str(tree), PYTHONSAFEPATH="1")
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "--threads", str(args.threads),
               "--steps", str(args.steps)] + (["--quick"] if args.quick else [])
    result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        sys.exit(f"child for {tree} failed:\n{result.stderr[-3000:]}")
    found = json.loads(result.stdout.strip().splitlines()[-1])
    if not found["file"].startswith(str(tree)):
        sys.exit(f"the child imported sparsekit from {found['file']}, not from {tree}")
    return found


def main() -> None:
    args = parse_args()
    if args.child:
        return child(args)
    wheels = [Path(args.wheel)] if args.wheel else sorted(map(Path, glob.glob(str(ROOT / "dist" / "sparsekit-*.whl"))),
                                                          key=lambda p: p.stat().st_mtime)
    if not wheels or not wheels[-1].is_file():
        sys.exit("no portable wheel: run `make wheel` (or pass --wheel PATH)")
    with tempfile.TemporaryDirectory(prefix="sparsekit-portable-") as scratch:
        work = Path(scratch)
        trees = {"portable wheel": wheel_tree(wheels[-1], work), "native build (-march=native)": native_tree(work)}
        times = {name: [] for name in trees}
        isa = {}
        for r in range(args.rounds):
            order = list(trees) if r % 2 == 0 else list(reversed(trees))
            for name in order:
                found = run_child(trees[name], args, work)
                times[name] += found["times"]
                isa[name] = f"{found['isa']} ({Path(found['module']).name})"
    medians = {name: statistics.median(values) for name, values in times.items()}
    portable, native = medians["portable wheel"], medians["native build (-march=native)"]
    ratio = portable / native
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores, {args.threads} threads; wheel {wheels[-1].name}")
    shape = "B=512, d=128, n=4096, k=16 (--quick)" if args.quick else "B=4096, d=512, n=16384, k=32"
    print(f"TopK training step, {shape}; {args.rounds} alternating child processes x {args.steps} steps each\n")
    print("| build | module loaded | median s | min s |")
    print("| --- | --- | ---: | ---: |")
    for name in trees:
        print(f"| {name} | {isa[name]} | {medians[name]:.3f} | {min(times[name]):.3f} |")
    verdict = "met" if ratio <= TARGET_RATIO else "NOT met"
    print(f"\nportable / native = {ratio:.3f} (target <= {TARGET_RATIO:.2f}: {verdict})")


if __name__ == "__main__":
    main()
