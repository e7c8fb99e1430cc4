"""No pickle anywhere in the package: files a user is handed (dictionaries, checkpoints, activation
shards, configs) are read as safetensors, JSON, .npy without objects, or YAML's safe subset, never
by code that can execute what the file says.

The scan reads the syntax tree of every module in sparsekit/ and kernels/, so a docstring that
mentions pickle does not count and an aliased import does.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("sparsekit", "kernels")
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _keyword(call: ast.Call, name: str):
    for keyword in call.keywords:
        if keyword.arg == name:
            return keyword.value
    return None


def _is_constant(node, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def _dotted(node) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _aliases(tree) -> dict:
    """Local name -> dotted module path, from `import a.b as c` and `from a import b as c`."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    return aliases


def unsafe_loads(source: str, filename: str = "<source>") -> list[str]:
    """Every line of `source` that could unpickle: an import of a pickle-like module, torch.load
    without weights_only=True, np.load with allow_pickle other than False, yaml.load and kin,
    torch.jit.load."""
    tree = ast.parse(source, filename)
    aliases = _aliases(tree)
    found = []
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(f"{where}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            written = _dotted(node.func)
            head, _, rest = written.partition(".")
            name = ".".join(filter(None, [aliases.get(head, head), rest]))
            root = name.split(".")[0]
            if name == "torch.load":
                if not _is_constant(_keyword(node, "weights_only"), True):
                    found.append(f"{where}: {written} without weights_only=True")
            elif name == "numpy.load" or name == "np.load":
                allow = _keyword(node, "allow_pickle")
                if allow is not None and not _is_constant(allow, False):
                    found.append(f"{where}: {written} with allow_pickle={ast.unparse(allow)}")
            elif name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all", "yaml.unsafe_load_all"):
                found.append(f"{where}: {written} (use yaml.safe_load)")
            elif name == "torch.jit.load" or root in UNSAFE_MODULES:
                found.append(f"{where}: {written}")
    return found


def package_files() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def test_the_package_never_unpickles():
    files = package_files()
    assert len(files) > 20 and any(p.name == "persistence.py" for p in files)
    found = [line for path in files for line in unsafe_loads(path.read_text(), str(path.relative_to(ROOT)))]
    assert found == [], "\n".join(found)


@pytest.mark.parametrize("snippet", [
    "import pickle", "import pickle as p", "from pickle import loads", "import dill",
    "torch.load(path)", "torch.load(path, weights_only=False)", "import torch as t\nt.load(path)",
    "np.load(path, allow_pickle=True)", "numpy.load(path, allow_pickle=flag)", "yaml.load(text)",
    "torch.jit.load(path)", "marshal.loads(data)",
])
def test_the_scan_catches_each_unsafe_form(snippet):
    assert unsafe_loads(snippet), snippet


@pytest.mark.parametrize("snippet", [
    "torch.load(path, weights_only=True)", "np.load(path)", "np.load(path, allow_pickle=False, mmap_mode='r')",
    "yaml.safe_load(text)", "safetensors.torch.load_file(path)", "json.load(handle)",
    '"""Never pickle."""',
])
def test_the_scan_allows_each_safe_form(snippet):
    assert unsafe_loads(snippet) == [], snippet
