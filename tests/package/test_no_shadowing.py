"""No name of ours shadows a PyPI package when Python runs from the repository root.

`python -m pytest`, `python -m sparsekit ...` and `make demo-lm` put the repository root first on
sys.path, so anything importable there wins over site-packages. The repository's own `kernels/`
once had an `__init__.py` and hid Hugging Face's `kernels` (which transformers >= 5 imports):
collection died with "cannot import name 'CUDAProperties' from 'kernels'". These tests run from the
root, with Hugging Face's `kernels` installed (transformers requires it), and fail on any shadowing.
"""
import importlib.metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUR_TOP_LEVEL = {"sparsekit"}  # the one package we ship
ROOT_SCRIPTS = {"setup"}  # setup.py: importable from the root, but no package's name (checked below)


def _run_from_root(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def importable_names_at_root() -> set:
    """Top-level names a Python started in the repository root can import from it: regular
    packages (folders with __init__.py), modules and extension modules."""
    names = set()
    for entry in ROOT.iterdir():
        if entry.name.startswith("."):
            continue
        if entry.is_dir() and (entry / "__init__.py").exists():
            names.add(entry.name)
        elif entry.is_file() and entry.suffix in (".py", ".so", ".pyd"):
            names.add(entry.name.split(".")[0])
    return names


def test_the_root_holds_no_importable_name_but_ours():
    assert importable_names_at_root() == OUR_TOP_LEVEL | ROOT_SCRIPTS
    assert not (ROOT / "kernels" / "__init__.py").exists(), "kernels/ must stay a plain folder (see kernels/README.md)"


def test_no_installed_distribution_provides_a_name_importable_at_the_root():
    provided = importlib.metadata.packages_distributions()
    clashes = {name: provided[name] for name in importable_names_at_root()
               if name in provided and set(provided[name]) != {"sparsekit"}}
    assert clashes == {}


def test_hugging_face_kernels_is_installed_and_wins_from_the_root():
    # The case that broke us: this test is only meaningful with the PyPI package present.
    assert importlib.metadata.version("kernels"), "Hugging Face's kernels should come with transformers"
    result = _run_from_root("-c", "import kernels, transformers.activations, sae_lens; print(kernels.__file__)")
    assert result.returncode == 0, result.stderr
    assert "site-packages" in result.stdout and str(ROOT / "kernels") not in result.stdout


def test_the_command_line_starts_from_the_root():
    result = _run_from_root("-m", "sparsekit", "--help")
    assert result.returncode == 0, result.stderr
    assert "commands:" in result.stdout
    version = _run_from_root("-m", "sparsekit", "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.startswith("sparsekit ") and "C++ kernels:" in version.stdout


IMPORT_EVERY_MODULE = r"""
import importlib, pkgutil, sys, traceback
import sparsekit
from sparsekit._util.extras import MissingExtra
import sparsekit.kernels  # installed from kernels/sparsekit_kernels/: not under sparsekit.__path__
failures = []
modules = ["sparsekit"] + [m.name for m in pkgutil.walk_packages(sparsekit.__path__, "sparsekit.")
           if not m.name.endswith("__main__")]  # __main__ would run the command line
modules += [m.name for m in pkgutil.walk_packages(sparsekit.kernels.__path__, "sparsekit.kernels.")]
# The C++ extension is built once per instruction-set level; a level this CPU lacks is never
# imported by sparsekit (sparsekit.ops.cpu.isa) and would die of SIGILL if imported by hand (the
# AVX2 EPYC importing sparsekit._C_avx512). Only the levels the CPU runs are imported here.
from sparsekit.ops.cpu.isa import ISA_LEVELS, load_extension
runnable = set(load_extension().cpu_levels)
modules = [name for name in modules
           if not any(name == f"sparsekit._C_{level}" and level not in runnable for level in ISA_LEVELS)]
for name in modules:
    try:
        importlib.import_module(name)
    except MissingExtra as error:
        if "\n" in str(error) or "pip install" not in str(error):
            failures.append(f"{name}: MissingExtra must be one line naming the extra: {error!r}")
    except Exception:
        failures.append(f"{name}: {traceback.format_exc()}")
print(len(modules), "modules")
print("\n".join(failures))
sys.exit(1 if failures else 0)
"""


def test_every_sparsekit_module_imports_from_the_root():
    """Each module imports, or fails only with the one-line MissingExtra naming the extra."""
    result = _run_from_root("-c", IMPORT_EVERY_MODULE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert int(result.stdout.split()[0]) > 40
