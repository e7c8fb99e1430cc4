"""Import paths from before the layered layout (docs/design.md, "Layout"), kept for one release.

``import sparsekit.distributed`` (and every other path in ``MOVED``) still works: it warns with a
DeprecationWarning naming the new path and hands back the module that now lives there, the same
object, so patching either name patches both. ``sparsekit.reference`` is a public name, not a
deprecated one: it resolves to ``sparsekit.ops.reference`` without a warning.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {  # old import path -> where the module lives now
    "sparsekit.atomic": "sparsekit._util.atomic",
    "sparsekit.extras": "sparsekit._util.extras",
    "sparsekit.checks": "sparsekit.ops.checks",
    "sparsekit.backend": "sparsekit.ops.backend",
    "sparsekit.cpu_isa": "sparsekit.ops.cpu.isa",
    "sparsekit.autograd_formulas": "sparsekit.ops.autograd",
    "sparsekit.cpu_ops": "sparsekit.ops.cpu",  # split into cpu.encode/decode/ghost/sparse; names read through
    "sparsekit.cpu_screen": "sparsekit.ops.cpu.screen",
    "sparsekit.cpu_gemm": "sparsekit.ops.cpu.gemm",
    "sparsekit.activations.lm_metrics": "sparsekit.analysis.lm_metrics",
    "sparsekit.checkpoint": "sparsekit.training.checkpoint",
    "sparsekit.reliability": "sparsekit.training.guards",
    "sparsekit.memory": "sparsekit.training.memory",
    "sparsekit.dead_latents": "sparsekit.training.dead_latents",
    "sparsekit.tracking": "sparsekit.training.tracking",
    "sparsekit.distributed": "sparsekit.training.parallel.data",
    "sparsekit.distributed_sharded": "sparsekit.training.parallel.sharded",
    "sparsekit.train_cli": "sparsekit.cli.train",
    "sparsekit.toys_cli": "sparsekit.cli.toys",
    "sparsekit.demo": "sparsekit.studies.synthetic",
    "sparsekit.mnist_scan": "sparsekit.studies.mnist_scan",
    "sparsekit.mnist_study": "sparsekit.studies.mnist_study",
    "sparsekit.lm_demo": "sparsekit.studies.lm_demo",
}
PUBLIC_ALIASES = {"sparsekit.reference": "sparsekit.ops.reference"}


def new_path(old: str) -> str | None:
    """Where the module once imported as `old` lives now (None if it did not move)."""
    return MOVED.get(old) or PUBLIC_ALIASES.get(old)


def resolve(old: str):
    """The module now at `old`'s new path, warning when `old` is deprecated."""
    new = new_path(old)
    if old in MOVED:
        warnings.warn(f"{old} moved to {new}; the old path works until the next release",
                      DeprecationWarning, stacklevel=3)
    return importlib.import_module(new)


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, old: str):
        self.old = old

    def create_module(self, spec):
        module = resolve(self.old)
        self.spec = module.__spec__
        return module

    def exec_module(self, module) -> None:
        module.__spec__ = self.spec  # the import system stamped the alias's spec on the shared module


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Finds the old import paths and loads each as its new module."""

    def find_spec(self, fullname, path=None, target=None):
        if new_path(fullname) is None:
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader(fullname))


def install() -> None:
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())


def attribute(name: str):
    """``sparsekit.<name>`` for a moved top-level module (the package's __getattr__)."""
    old = f"sparsekit.{name}"
    if new_path(old) is None:
        raise AttributeError(f"module 'sparsekit' has no attribute {name!r}")
    return resolve(old)
