"""Build sparsekit: setuptools drives CMake, which builds the C++ extension sparsekit._C.

SPARSEKIT_NO_EXTENSION=1 skips the extension (the package then runs on its PyTorch reference path);
SPARSEKIT_NATIVE=0 builds a portable binary instead of one tuned for this CPU.
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        native = "OFF" if os.environ.get("SPARSEKIT_NATIVE", "1") == "0" else "ON"
        configure = [
            "cmake", str(ROOT),
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DSPARSEKIT_NATIVE={native}",
        ]
        subprocess.run(configure, cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "-j", str(os.cpu_count() or 1)], cwd=build_dir, check=True)


extensions = [] if os.environ.get("SPARSEKIT_NO_EXTENSION") == "1" else [CMakeExtension("sparsekit._C")]
setup(ext_modules=extensions, cmdclass={"build_ext": CMakeBuild})
