"""The op layer's import rules, read from the source (imports inside functions count):
sparsekit.ops imports no private name from another module (but the C++ extension ``_C`` from
sparsekit.ops.backend); the Triton plug-in, sparsekit.kernels, imports from sparsekit only
sparsekit.ops.autograd and sparsekit.ops.backend; and no import cycle runs through sparsekit.ops."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OPS = ROOT / "sparsekit" / "ops"
KERNELS = ROOT / "kernels" / "sparsekit_kernels"


def _module(path: Path) -> str:
    if path.is_relative_to(KERNELS):
        parts = ["sparsekit", "kernels", *path.relative_to(KERNELS).with_suffix("").parts]
    else:
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, str, int]]:
    """(module imported from, name, line) for every import in the file; plain imports as (module, "", line)."""
    module, found = _module(path), []
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, "", node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level:
                source = ".".join(package[:len(package) - node.level + 1] + ([source] if source else []))
            found += [(source, alias.name, node.lineno) for alias in node.names]
    return found


OPS_FILES = sorted(OPS.rglob("*.py"))
KERNEL_FILES = sorted(KERNELS.glob("*.py"))
KNOWN = {_module(path) for path in OPS_FILES + KERNEL_FILES}


def _target(source: str, name: str) -> str:
    """The module an import reaches: ``from package import submodule`` reaches the submodule."""
    return f"{source}.{name}" if f"{source}.{name}" in KNOWN else source


def test_no_private_name_crosses_an_ops_module():
    crossing = [f"{path.relative_to(ROOT)}:{line}: {name} from {source}"
                for path in OPS_FILES + [ROOT / "sparsekit" / "numpy.py"]
                for source, name, line in _imports(path)
                if name.startswith("_") and not name.startswith("__") and (source, name) != ("sparsekit.ops.backend", "_C")]
    assert crossing == []


def test_kernels_import_only_autograd_and_backend_from_sparsekit():
    allowed = {"sparsekit.ops.autograd", "sparsekit.ops.backend"}
    outside = [f"{path.relative_to(ROOT)}:{line}: {_target(source, name)}"
               for path in KERNEL_FILES for source, name, line in _imports(path)
               if source.split(".")[0] == "sparsekit" and not source.startswith("sparsekit.kernels")
               and _target(source, name) not in allowed]
    assert outside == []


def test_no_import_cycle_inside_ops():
    edges = {_module(path): {_target(source, name) for source, name, _ in _imports(path)
                             if _target(source, name).startswith("sparsekit.ops")} for path in OPS_FILES}
    cycles, done = [], set()

    def visit(module: str, stack: list[str]) -> None:
        for target in sorted(edges.get(module, ())):
            if target in stack:
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in done:
                visit(target, stack + [target])
        done.add(module)

    for module in sorted(edges):
        visit(module, [module])
    assert cycles == []
