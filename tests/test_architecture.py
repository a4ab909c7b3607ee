"""The architecture as tests: no import cycle between modules, every module imports on its own, the subpackages
depend on each other in one direction only, and no module grows past a size a reader can hold in mind."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).parents[1] / "src"
PACKAGE = SRC / "thanora"
MAX_LINES = 400

# Which top-level parts of thanora each part may import (besides itself). Leaves first; `thanora` is the
# package's public API (``__init__``), which only the tool around the library may use.
ALLOWED: dict[str, set[str]] = {
    "artifacts": set(),
    "assets": set(),
    "core": {"artifacts"},
    "data": {"assets"},
    "adapters": {"core", "artifacts", "methods.base"},
    "methods": {"core", "adapters", "artifacts"},
    "evaluation": {"data"},
    "training": {"artifacts", "adapters", "methods.base"},
    "experiment": {"artifacts", "assets", "core", "data", "adapters", "methods", "evaluation", "training", "thanora"},
    "cli": {"experiment", "artifacts", "assets", "methods", "training"},
    "thanora": {"core", "adapters", "methods"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node except those under ``if TYPE_CHECKING:`` (never executed)."""
    out: list[ast.AST] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for child in node.orelse:
                visit(child)
            return
        out.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def imports_of(name: str) -> set[str]:
    """The thanora modules ``name`` imports at run time, at module level or inside functions."""
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(MODULES[name].read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "thanora")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "thanora":
            for alias in node.names:  # `from thanora.x import y` names module thanora.x.y when that exists
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: imports_of(name) for name in MODULES}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module (a cycle), or a module importing itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def part_of(module: str) -> str:
    """``thanora.methods.base`` → ``methods.base`` when that is named in `ALLOWED` values, else the top-level part."""
    parts = module.split(".")[1:]
    if not parts:
        return "thanora"
    return "methods.base" if parts[:2] == ["methods", "base"] else parts[0]


def test_the_import_graph_has_no_cycle() -> None:
    assert strongly_connected(GRAPH) == []


def test_the_cycle_check_sees_a_cycle() -> None:
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_the_import_graph_sees_function_level_imports() -> None:
    # cli imports everything lazily inside its subcommand functions.
    assert "thanora.experiment.pipeline" in GRAPH["thanora.cli"]
    assert "thanora.methods.registry" in GRAPH["thanora.experiment.config"]


def test_parts_depend_on_each_other_in_one_direction() -> None:
    violations = []
    for module, imported in GRAPH.items():
        home = part_of(module).split(".")[0]
        for other in imported:
            theirs = part_of(other)
            if theirs.split(".")[0] != home and not {theirs, theirs.split(".")[0]} & ALLOWED[home]:
                violations.append(f"{module} imports {other}")
    assert violations == []


def test_only_the_registry_imports_every_method() -> None:
    methods = {m for m in MODULES if m.startswith("thanora.methods.") and m.split(".")[-1] not in
               ("base", "registry", "dare_merge", "align_lora_mmd")}
    importers = [name for name, imported in GRAPH.items() if methods <= imported]
    assert importers == ["thanora.methods.registry"]


def test_subpackage_inits_import_nothing() -> None:
    """Importing one module never drags in its siblings (the cause of the old methods/__init__ cycle)."""
    for name, path in MODULES.items():
        if path.name == "__init__.py" and name != "thanora":
            assert GRAPH[name] == set(), name


def test_every_module_imports_first_in_a_fresh_interpreter() -> None:
    """Each module imported before any other thanora module (thanora's modules dropped from ``sys.modules`` between
    imports; torch and transformers stay loaded), so an import-order cycle cannot hide behind an earlier import."""
    script = (
        "import importlib, sys\n"
        f"names = {sorted(MODULES)!r}\n"
        "bad = []\n"
        "for name in names:\n"
        "    for loaded in [m for m in sys.modules if m == 'thanora' or m.startswith('thanora.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as err:\n"
        "        bad.append(f'{name}: {type(err).__name__}: {err}')\n"
        "print('\\n'.join(bad))\n"
        "sys.exit(1 if bad else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def test_no_module_is_over_the_size_limit() -> None:
    sizes = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in MODULES.items()}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}
