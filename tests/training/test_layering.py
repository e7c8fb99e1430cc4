"""The training layer's imports, read from the source (imports inside functions count too): no
module of sparsekit.training is part of an import cycle, none reaches up into the layers above
it (analysis, studies, cli, toys), and none takes a private name from another module."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "sparsekit"
TRAINING = "sparsekit.training"
ABOVE = ("sparsekit.analysis", "sparsekit.studies", "sparsekit.cli", "sparsekit.toys")
# Private members of another layer's classes still borrowed: BatchTopKSAE's threshold update (in
# sparsekit/sae, outside the training layer) is shared by the latent-sharded BatchTopK.
BORROWED = {"sparsekit.training.parallel.sharded": {"BatchTopKSAE._update_threshold"}}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(name: str) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import statement in module `name`."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.append((base, [alias.name for alias in node.names], node.lineno))
    return found


def edges(name: str) -> set[str]:
    """The sparsekit modules that module `name` imports (a name taken from a package that is one
    of its submodules counts as that submodule)."""
    targets = set()
    for base, names, _ in imports(name):
        submodules = [f"{base}.{n}" for n in names if f"{base}.{n}" in MODULES]
        targets.update(submodules)
        if len(submodules) < len(names) or not names:
            targets.add(base)
    return {t for t in targets if t in MODULES and t != name}


def cycles_through(start: str, graph: dict) -> list[list[str]]:
    """Import paths from `start` back to itself (one per first step that leads back)."""
    found = []
    for first in sorted(graph[start]):
        path, seen, stack = {first: [start, first]}, {first}, [first]
        while stack:
            node = stack.pop()
            if start in graph[node]:
                found.append(path[node] + [start])
                break
            for nxt in sorted(graph[node] - seen):
                seen.add(nxt)
                path[nxt] = path[node] + [nxt]
                stack.append(nxt)
    return found


def test_no_training_module_is_part_of_an_import_cycle():
    graph = {name: edges(name) for name in MODULES}
    cycles = [" -> ".join(c) for name in MODULES if name.startswith(TRAINING) for c in cycles_through(name, graph)]
    assert cycles == []


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.startswith(TRAINING)))
def test_training_imports_nothing_from_the_layers_above(name):
    upward = [f"line {line}: {base}" for base, _, line in imports(name) if base.startswith(ABOVE)]
    assert upward == []


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.startswith(TRAINING)))
def test_training_takes_no_private_name_from_another_module(name):
    private = [f"line {line}: from {base} import {n}" for base, names, line in imports(name) for n in names
               if n.startswith("_") and base != name]
    tree = ast.parse(MODULES[name].read_text())
    aliases = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
               for alias in node.names if alias.name != "*"}
    private += [f"line {node.lineno}: {node.value.id}.{node.attr}" for node in ast.walk(tree)
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in aliases and node.attr.startswith("_") and not node.attr.startswith("__")
                and f"{node.value.id}.{node.attr}" not in BORROWED.get(name, ())]
    assert private == []


def test_the_checks_see_imports_inside_functions():
    """The checker reads function bodies: a planted import inside a function is found."""
    lines = {line for base, _, line in imports("sparsekit.training.state") if base == "sparsekit.activations"}
    assert lines, "state.py imports as_source inside RunState.initial"
