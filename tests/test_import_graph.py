"""The package's imports form layers: no import cycle, and no module imports one from a higher layer.

Every ``import`` statement counts, at module level or inside a function (an import hidden in a function to dodge
a cycle is still a dependency). Optional third-party packages may be imported lazily; this test only reads
imports of ``jetspec_compile`` itself.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "jetspec_compile"

#: lowest first; a module may import its own layer's and lower layers' modules only. Longest prefix wins.
LAYERS = [
    ("errors", "config", "tree", "interface", "io", "paths", "counters", "prompts", "compat", "warp"),
    ("capture", "kv_cache", "kernels"),
    ("passes",),
    ("compiler",),
    ("drafter",),
    ("backends",),
    ("runtime",),
    ("models", "targets", "peers", "training"),  # peers: clients of other engines, used by bench and training
    ("", "bench"),  # "": the package's own __init__ (the public API)
    ("cli",),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports (``from a import b`` counts ``a.b`` where that is a module,
    else ``a``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            submodules = [f"{module}.{alias.name}" for alias in node.names if f"{module}.{alias.name}" in modules]
            # ``from pkg import submodule`` depends on the submodule; ``from pkg import name`` on pkg itself
            targets = submodules if len(submodules) == len(node.names) else [module, *submodules]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    return found


def _layer(name: str) -> int:
    rel = name.removeprefix("jetspec_compile").removeprefix(".")
    best, rank = -1, None
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (rel == prefix or rel.startswith(prefix + ".") or (prefix == "" and rel == "")) and len(prefix) > best:
                best, rank = len(prefix), i
    if rank is None:
        raise AssertionError(f"module {name} is in no layer: add it to LAYERS in {__file__}")
    return rank


GRAPH = {name: _imports(name, path, _modules()) for name, path in _modules().items()}


def test_every_module_has_a_layer():
    for name in GRAPH:
        _layer(name)


def _upward(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} (layer {_layer(a)}) -> {b} (layer {_layer(b)})"
                  for a, deps in graph.items() for b in deps if _layer(b) > _layer(a))


def test_the_graph_is_read():
    assert "jetspec_compile.compiler" in GRAPH["jetspec_compile.runtime.verifier"]
    assert sum(map(len, GRAPH.values())) > 100


def test_no_module_imports_a_higher_layer():
    upward = _upward(GRAPH)
    assert not upward, "imports that run upward:\n" + "\n".join(upward)


def test_no_import_cycles():
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
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

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_check_catches_an_upward_import():
    """The layer check itself can fail: a pass importing the runtime is reported."""
    graph = {**GRAPH, "jetspec_compile.passes.manager": {"jetspec_compile.runtime.verifier"}}
    assert _upward(graph) == ["jetspec_compile.passes.manager (layer 2) -> jetspec_compile.runtime.verifier (layer 6)"]
