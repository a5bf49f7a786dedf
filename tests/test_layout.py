"""The package's shape: imports point one way, and the layers stay apart.

Every ``import`` of a fastxent module by another (module level or inside a
function, where the lazy imports are) is an edge; the graph must have no circle,
nothing may import the command line or an adapter, and the backends may import
only the few core modules the backend contract allows.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fastxent"

#: Top-level modules that only the outside world imports.
LEAVES = ("fastxent.cli", "fastxent.torch", "fastxent.jax", "fastxent.keras", "fastxent.dask", "fastxent.__main__")

#: What a backend may import from the core.
BACKEND_MAY_IMPORT = {"fastxent._config", "fastxent._dtypes", "fastxent._score", "fastxent.backends"}


def _module_name(path):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path):
    """The fastxent modules ``path`` imports (absolute names; ``from . import x`` resolved)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("fastxent"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if not module.startswith("fastxent"):
                continue
            for alias in node.names:
                candidate = f"{module}.{alias.name}"
                found.add(candidate if _exists(candidate) else module)
    found.discard(name)
    return found


def _exists(module):
    path = ROOT.joinpath(*module.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _graph():
    return {_module_name(path): _imports(path) for path in PACKAGE.rglob("*.py")}


def _within(name, prefix):
    return name == prefix or name.startswith(prefix + ".")


def test_imports_draw_no_circle():
    graph = _graph()
    state = {}

    def visit(node, trail):
        if state.get(node) == "done":
            return
        if state.get(node) == "open":
            cycle = trail[trail.index(node):] + [node]
            pytest.fail("import circle: " + " -> ".join(cycle))
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            # a package imports its own submodules; that is not a circle back to it
            visit(target, trail + [node])
        state[node] = "done"

    for module in sorted(graph):
        visit(module, [])


def test_nothing_imports_the_command_line_or_an_adapter():
    for module, targets in _graph().items():
        if any(_within(module, leaf) for leaf in LEAVES):
            continue
        for leaf in LEAVES:
            offending = [t for t in targets if _within(t, leaf)]
            assert not offending, f"{module} imports {offending}: only the outside world imports {leaf}"


def test_backends_import_only_the_contract_modules():
    for module, targets in _graph().items():
        if not _within(module, "fastxent.backends"):
            continue
        core = {t for t in targets if not _within(t, "fastxent.backends")}
        assert core <= BACKEND_MAY_IMPORT, f"{module} imports {core - BACKEND_MAY_IMPORT}"


@pytest.mark.parametrize("module", ["fastxent.backends.numba", "fastxent.backends.cuda", "fastxent.reference"])
def test_every_backend_implements_the_contract(module):
    import importlib

    from fastxent.backends import FUNCTIONS

    implementation = importlib.import_module(module)
    missing = [name for name in FUNCTIONS if not callable(getattr(implementation, name, None))]
    assert not missing, f"{module} lacks {missing}"
