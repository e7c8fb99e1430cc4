"""The package's folders are its layers, and imports point one way: down.

    cli -> studies -> analysis -> toys | training -> sae | activations -> ops -> _util | errors

A module may import modules of its own package (siblings) and of any lower layer; peers on one
rung (toys and training; sae and activations) do not import each other. ``sparsekit.kernels``, the
Triton plug-in, sits under the op door: it imports only ``sparsekit.ops.autograd`` and
``sparsekit.ops.backend``, and only the door (``sparsekit.ops``) loads it. The public face
(``sparsekit/__init__.py``, ``__main__``, ``_moved``, ``numpy``) may import anything.

The scan reads the syntax tree of every module, so an import inside a function counts as much as
one at the top: a cycle hidden in a function body is still a cycle. A name that starts with an
underscore is private to its module: importing it from another module fails the test (the C++
extension ``_C`` is the one exception).
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RANKS = {"_util": 0, "errors": 0, "ops": 1, "kernels": 1.5, "sae": 2, "activations": 2, "training": 3,
         "toys": 3, "analysis": 4, "studies": 5, "cli": 6}
FACE = {"sparsekit", "sparsekit.__main__", "sparsekit._moved", "sparsekit.numpy"}
KERNELS_MAY_IMPORT = {"sparsekit.ops.autograd", "sparsekit.ops.backend"}
PRIVATE_ALLOWED = {"_C"}


def module_files() -> dict:
    """Module name -> (path, is_package) for sparsekit/ and kernels/sparsekit_kernels (sparsekit.kernels)."""
    found = {}
    for base, prefix in ((ROOT / "sparsekit", ["sparsekit"]), (ROOT / "kernels" / "sparsekit_kernels", ["sparsekit", "kernels"])):
        for path in base.rglob("*.py"):
            parts = prefix + list(path.relative_to(base).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


MODULES = module_files()


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    package = package[: len(package) - (node.level - 1)]
    return ".".join(package + ([node.module] if node.module else []))


def _owner(name: str) -> str | None:
    """The module a dotted import target names: the longest prefix that is one of ours."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in MODULES:
            return candidate
    return None


def imports(module: str) -> list[tuple[str, str, int]]:
    """(imported module, imported name or "", line) for every sparsekit import in `module`."""
    path, is_package = MODULES[module]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(owner, "", node.lineno) for a in node.names if (owner := _owner(a.name))]
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(node, module, is_package)
            if not source.startswith("sparsekit"):
                continue
            for alias in node.names:
                target = _owner(f"{source}.{alias.name}")
                if target == f"{source}.{alias.name}":
                    found.append((target, "", node.lineno))  # a submodule by name
                elif target:
                    found.append((target, alias.name, node.lineno))
    return found


def graph() -> dict:
    return {module: {target for target, _, _ in imports(module) if target != module} for module in MODULES}


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and module not in FACE else None


def _package(module: str) -> str:
    return module if MODULES[module][1] else module.rsplit(".", 1)[0]


def upward_imports() -> list[str]:
    """Every import that points up the order, across peers, or out of the Triton plug-in."""
    bad = []
    for module in MODULES:
        here = layer(module)
        if here is None:
            continue
        for target, _, line in imports(module):
            there = layer(target)
            if target == module or there is None and target in FACE and target != "sparsekit":
                if target != module:
                    bad.append(f"{module}:{line} imports the public face {target}")
                continue
            if target == "sparsekit":
                bad.append(f"{module}:{line} imports the package root (import from the layer itself)")
            elif here == "kernels":
                if there != "kernels" and target not in KERNELS_MAY_IMPORT:
                    bad.append(f"{module}:{line} (the Triton plug-in) imports {target}")
            elif there == "kernels":
                if not module.startswith("sparsekit.ops"):
                    bad.append(f"{module}:{line} imports the Triton plug-in {target} (only the op door may)")
            elif here != there and RANKS[there] >= RANKS[here]:
                bad.append(f"{module}:{line} ({here}) imports {target} ({there})")
    return bad


def private_imports() -> list[str]:
    bad = []
    for module in MODULES:
        for target, name, line in imports(module):
            if name.startswith("_") and not name.startswith("__") and name not in PRIVATE_ALLOWED and target != module:
                bad.append(f"{module}:{line} imports {target}.{name}")
    return bad


def cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    edges, index, low, stack, on_stack, found = graph(), {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_every_module_sits_in_a_known_layer():
    unknown = sorted(m for m in MODULES if m not in FACE and layer(m) not in RANKS)
    assert not unknown, f"modules outside the layers (add them to a layer folder): {unknown}"


def test_no_import_cycles_even_inside_functions():
    found = cycles()
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_imports_point_down_the_layers():
    bad = upward_imports()
    assert not bad, f"{len(bad)} imports point up or across:\n" + "\n".join(bad)


def test_no_private_name_is_imported_from_another_module():
    bad = private_imports()
    assert not bad, f"{len(bad)} private names imported across modules:\n" + "\n".join(bad)


@pytest.mark.parametrize("source, expected", [
    ("from sparsekit.cli import main\n", ["sparsekit.sae.fake:1 (sae) imports sparsekit.cli (cli)"]),
    ("from sparsekit.activations.source import as_source\n",
     ["sparsekit.sae.fake:1 (sae) imports sparsekit.activations.source (activations)"]),
    ("def f():\n    from sparsekit.training.loop import train\n",
     ["sparsekit.sae.fake:2 (sae) imports sparsekit.training.loop (training)"]),
    ("from sparsekit.ops import topk_encode\nfrom .base import SparseDictionary\n", []),
])
def test_the_scan_catches_an_upward_import(monkeypatch, tmp_path, source, expected):
    fake = tmp_path / "fake.py"
    fake.write_text(source)
    monkeypatch.setitem(MODULES, "sparsekit.sae.fake", (fake, False))
    assert [b for b in upward_imports() if b.startswith("sparsekit.sae.fake")] == expected


def test_the_scan_catches_a_cycle_hidden_in_a_function(monkeypatch, tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from . import cycle_b\n")
    b.write_text("def f():\n    from .cycle_a import g\n")
    monkeypatch.setitem(MODULES, "sparsekit.toys.cycle_a", (a, False))
    monkeypatch.setitem(MODULES, "sparsekit.toys.cycle_b", (b, False))
    assert ["sparsekit.toys.cycle_a", "sparsekit.toys.cycle_b"] in cycles()


def test_the_scan_catches_a_private_import(monkeypatch, tmp_path):
    fake = tmp_path / "fake.py"
    fake.write_text("from sparsekit.ops.backend import _C\nfrom sparsekit.ops.checks import _hidden\n")
    monkeypatch.setitem(MODULES, "sparsekit.ops.fake", (fake, False))
    assert [b for b in private_imports() if b.startswith("sparsekit.ops.fake")] == [
        "sparsekit.ops.fake:2 imports sparsekit.ops.checks._hidden"]


if __name__ == "__main__":
    print(f"{len(MODULES)} modules; cycles: {cycles()}")
    print("\n".join(upward_imports()))
    print("\n".join(private_imports()))
