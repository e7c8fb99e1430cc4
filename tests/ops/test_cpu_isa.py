"""The C++ kernels' instruction-set level is chosen at run time, by the CPU found (sparsekit.ops.cpu.isa).

Pinned: the level loaded is the best this CPU runs (checked against /proc/cpuinfo, not against the
loader's own answer); SPARSEKIT_ISA forces each lower level and the C++ parity tests pass there;
a level the CPU lacks, or a bad name, is refused with one clear error (never an illegal
instruction); the lower levels' modules hold no wider instructions than their level allows.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sparsekit.ops import backend
from sparsekit.ops.cpu.isa import ISA_LEVELS

ROOT = Path(__file__).resolve().parents[2]
X86_64 = os.uname().machine == "x86_64"
V4_FLAGS = {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
V3_FLAGS = {"avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "movbe"}
PARITY_TESTS = ["tests/ops/test_ops_parity.py", "tests/ops/test_cpu_screen.py", "tests/ops/test_cpu_fast_paths.py"]


def cpuinfo_flags() -> set:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _python(code: str, **env) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("SPARSEKIT_ISA", "SPARSEKIT_BACKEND")}
    environment.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment,
                          timeout=300)


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="the cross-check reads Linux's /proc/cpuinfo")
def test_the_level_loaded_is_the_best_this_cpu_runs():
    flags = cpuinfo_flags()
    if not X86_64:
        expected = "baseline"
    elif V3_FLAGS <= flags and V4_FLAGS <= flags:
        expected = "avx512"
    elif V3_FLAGS <= flags:
        expected = "avx2"
    else:
        expected = "baseline"
    assert backend.CPP_ISA == expected
    assert backend.CPU_ISA_LEVELS[0] == expected and backend.CPU_ISA_LEVELS[-1] == "baseline"
    assert backend._C.isa == expected  # the module's own record of the level it was compiled for


@pytest.mark.parametrize("level", ISA_LEVELS)
def test_forcing_each_level_this_cpu_runs_loads_that_module(level):
    if level not in backend.CPU_ISA_LEVELS:
        pytest.skip(f"this CPU does not run {level}")  # the refusal is pinned below
    result = _python("import sparsekit; from sparsekit.ops.backend import _C; "
                     "print(sparsekit.backends()['cpu_isa'], _C.isa, _C.__name__)", SPARSEKIT_ISA=level)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [level, level, f"sparsekit._C_{level}"]


def test_the_cpp_parity_tests_pass_at_every_lower_level():
    """The best level runs the whole suite; each lower one this CPU runs reruns the C++ parity tests."""
    lower = backend.CPU_ISA_LEVELS[1:]
    for level in lower:
        env = {k: v for k, v in os.environ.items() if k != "SPARSEKIT_BACKEND"}
        env["SPARSEKIT_ISA"] = level
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *PARITY_TESTS],
                                cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
        assert result.returncode == 0, f"SPARSEKIT_ISA={level}:\n{result.stdout[-3000:]}{result.stderr[-2000:]}"
        assert re.search(r"\d+ passed", result.stdout)


def test_a_level_the_cpu_lacks_is_refused_on_first_use_not_run():
    # A CPU that runs only the baseline, as the loader sees it: _C_baseline answers for the CPU, so
    # it is loaded (and patched) before the sparsekit package is first imported.
    path = next(Path(backend._C.__file__).parent.glob("_C_baseline*.so"))
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('sparsekit._C_baseline', {str(path)!r})\n"
            "b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b)\n"
            "b.cpu_isa_levels = lambda: ['baseline']; sys.modules['sparsekit._C_baseline'] = b\n"
            "import torch, sparsekit\n"
            "from sparsekit.errors import BackendUnavailable\n"
            "try:\n"
            "    sparsekit.topk_encode(torch.randn(2, 3), torch.randn(3, 4), torch.randn(4), 1)\n"
            "except BackendUnavailable as error:\n"
            "    print(error)\n")
    result = _python(code, SPARSEKIT_ISA="avx2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ("SPARSEKIT_ISA=avx2: this CPU does not run it (it runs baseline); "
                                     "choose one of those, or unset SPARSEKIT_ISA")


def test_a_bad_level_name_is_one_line_from_the_command_line():
    env = {k: v for k, v in os.environ.items() if k != "SPARSEKIT_BACKEND"}
    env["SPARSEKIT_ISA"] = "avx9000"
    result = subprocess.run([sys.executable, "-m", "sparsekit", "demo", "--synthetic"], capture_output=True,
                            text=True, env=env, timeout=300, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.strip() == ("sparsekit: SPARSEKIT_ISA='avx9000' is not one of avx512, avx2, baseline, none")
    version = subprocess.run([sys.executable, "-m", "sparsekit", "--version"], capture_output=True, text=True,
                             env=env, timeout=300, cwd=ROOT)
    assert version.returncode == 0 and "C++ kernels: refused: SPARSEKIT_ISA='avx9000'" in version.stdout


def test_isa_none_runs_the_reference_path():
    result = _python("import sparsekit; print(sparsekit.backends())", SPARSEKIT_ISA="none")
    assert result.returncode == 0, result.stderr
    assert "'cpu': 'torch'" in result.stdout and "'cpu_isa': None" in result.stdout


def _disassembly(level: str) -> str:
    path = next(Path(backend._C.__file__).parent.glob(f"_C_{level}*.so"))
    result = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(path)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.skipif(not X86_64 or shutil.which("objdump") is None, reason="x86-64 modules, read with objdump")
def test_lower_level_modules_hold_no_wider_instructions():
    """The portable build: no -march=native leaks into a module another CPU may load."""
    avx2, baseline, avx512 = _disassembly("avx2"), _disassembly("baseline"), _disassembly("avx512")
    assert "%zmm" not in avx2 and "%ymm" in avx2  # AVX2 uses 256-bit registers, never 512-bit ones
    assert "%zmm" not in baseline and "%ymm" not in baseline
    assert "%zmm" in avx512
