"""Optional dependencies, each behind a pip extra: ``require`` imports one or says, in one line,
which extra to install.

    webdriver = require("selenium.webdriver", "screenshot", what="sparsekit dashboard --screenshot")
    # MissingExtra: sparsekit dashboard --screenshot needs selenium: pip install 'sparsekit[screenshot]'

The ``sparsekit`` command prints that line to stderr and exits 2 (no traceback).
"""
from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message (one line) names the extra that brings it.
    ``.name``: the module that could not be imported; ``.package``: its pip name; ``.extra``."""

    def __init__(self, message: str, *, name: str, package: str, extra: str):
        super().__init__(message, name=name)
        self.package, self.extra = package, extra


def _is_missing(error: ImportError, module_name: str) -> bool:
    """Whether ``error`` says module_name itself (or a package above it) is absent, rather than
    something it imports in turn (a broken installation: that error is the one worth seeing)."""
    missing = error.name
    return missing is None or module_name == missing or module_name.startswith(missing + ".")


def require(module_name: str, extra: str, what: str | None = None, package: str | None = None) -> ModuleType:
    """``importlib.import_module(module_name)``, or MissingExtra with the one-line message
    "<what> needs <package>: pip install 'sparsekit[<extra>]'".

    what: the feature that needs it (default "sparsekit"); package: its pip name (default the
    top-level module name with "_" as "-", e.g. transformer_lens -> transformer-lens)."""
    try:
        return importlib.import_module(module_name)
    except ImportError as error:
        if not _is_missing(error, module_name):
            raise
        package = package or module_name.split(".")[0].replace("_", "-")
        message = f"{what or 'sparsekit'} needs {package}: pip install 'sparsekit[{extra}]'"
        raise MissingExtra(" ".join(message.split()), name=module_name, package=package, extra=extra) from None
