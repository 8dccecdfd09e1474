"""The package's shape: layers import downward only, and no module imports itself back.

Every import that can run counts, a lazy one inside a function too (the cycle between
the manager and the sharded checkpoint code was two lazy imports); imports under
``if TYPE_CHECKING:`` never run and do not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

import trainguard

SRC = Path(trainguard.__file__).resolve().parent.parent
#: cli -> launch -> run -> checkpoint -> store: a module imports its own layer or lower.
LAYERS = ["store", "checkpoint", "run", "launch", "cli"]


def _modules() -> dict[str, Path]:
    mods = {}
    for path in (SRC / "trainguard").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(path: Path) -> set[str]:
    """The trainguard modules ``path`` imports at run time (lazily too)."""
    tree = ast.parse(path.read_text())
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    names = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                names.append(full if full in MODULES else node.module)
    return {t for t in map(_resolve, names) if t and t.startswith("trainguard")}


GRAPH = {module: _imports(path) - {module} for module, path in MODULES.items()}


def _kind(module: str) -> str:
    """Its layer, "testing" (test doubles), "root" (the package) or "base" (errors,
    units, dataset manifests, preflight checks: importable from every layer)."""
    if module in ("trainguard", "trainguard.__main__"):
        return "root"
    top = module.split(".")[1]
    if top in LAYERS or top == "testing":
        return top
    return "base"


def test_layers_import_downward_only():
    upward = []
    for module, targets in GRAPH.items():
        kind = _kind(module)
        if kind in ("root", "testing"):  # the package's lazy exports, and test doubles
            continue
        for target in targets:
            other = _kind(target)
            if other in ("base", "root"):
                continue
            if other == "testing" or kind == "base" or LAYERS.index(other) > LAYERS.index(kind):
                upward.append(f"{module} -> {target}")
    assert not upward, "imports against the layers (cli -> launch -> run -> checkpoint -> " \
                       "store; errors and other base modules import no layer; nothing " \
                       "imports the test doubles): " + ", ".join(sorted(upward))


def test_no_import_cycles():
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in GRAPH[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(GRAPH):
        if module not in index:
            visit(module)
    assert not cycles, f"modules that import each other (lazily counts): {cycles}"


def test_every_writer_commits_through_the_commit_module():
    """The manifest is written in one place: no other module names it as a write."""
    writers = []
    for module, path in MODULES.items():
        if module in ("trainguard.checkpoint.commit", "trainguard.checkpoint.format"):
            continue
        source = path.read_text()
        for line in source.splitlines():
            if "MANIFEST" in line and any(op in line for op in (".write(", ".create(",
                                                                   ".delete(")):
                writers.append(f"{module}: {line.strip()}")
    assert not writers, writers
