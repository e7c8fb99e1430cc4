"""Build sparsekit: setuptools drives CMake, which builds the C++ extension modules.

One module per instruction-set level (CMakeLists.txt): sparsekit._C_avx512, _C_avx2 and
_C_baseline on x86-64, _C_baseline elsewhere; sparsekit/ops/cpu/isa.py loads the best the CPU runs.

SPARSEKIT_NO_EXTENSION=1 skips the extension (the package then runs on its PyTorch reference path);
SPARSEKIT_NATIVE=1 adds -march=native to the best level's module (for a build that never leaves
the machine that made it).
"""
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
X86_64 = platform.machine().lower() in ("x86_64", "amd64")
ISA_LEVELS = ("avx512", "avx2", "baseline") if X86_64 else ("baseline",)


def cmake_executable() -> str:
    """The cmake of the `cmake` build requirement when installed, else the one on PATH."""
    try:
        import cmake  # the PyPI package ships its own binary
        return str(Path(cmake.CMAKE_BIN_DIR) / "cmake")
    except (ImportError, AttributeError):
        found = shutil.which("cmake")
        if found is None:
            raise RuntimeError("building sparsekit's C++ extension needs CMake: pip install cmake "
                               "(or set SPARSEKIT_NO_EXTENSION=1 for the pure-PyTorch package)") from None
        return found


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configures and builds every level's module with one CMake run (the first extension asked
    for); the others are then already in place."""

    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        if getattr(self, "_cmake_built_into", None) == out_dir:
            return
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cmake = cmake_executable()
        configure = [
            cmake, str(ROOT),
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DSPARSEKIT_LEVELS={';'.join(ISA_LEVELS)}",
            f"-DSPARSEKIT_NATIVE={'ON' if os.environ.get('SPARSEKIT_NATIVE') == '1' else 'OFF'}",
        ]
        subprocess.run(configure, cwd=build_dir, check=True)
        subprocess.run([cmake, "--build", ".", "-j", str(os.cpu_count() or 1)], cwd=build_dir, check=True)
        self._cmake_built_into = out_dir


extensions = ([] if os.environ.get("SPARSEKIT_NO_EXTENSION") == "1"
              else [CMakeExtension(f"sparsekit._C_{level}") for level in ISA_LEVELS])
setup(ext_modules=extensions, cmdclass={"build_ext": CMakeBuild})
