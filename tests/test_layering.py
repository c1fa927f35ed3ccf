"""The package's layers only point down, and no module imports itself back (function-level imports
included): models <- data <- train / decode / eval <- api <- cli / demo / configs."""

import ast
import collections
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "speechverse_jax")

# Layer of each top-level part of the package; an import may only go to the same layer or below.
LAYERS = {
    "(package)": 0, "fs": 0, "tree": 0, "rules": 0, "errors": 0,
    "models": 1,
    "checkpoints": 2, "convert": 2,
    "data": 3,
    "train": 4, "decode": 4, "eval": 4,
    "api": 5, "infer": 5,
    "configs": 6, "cli": 6, "demo": 6, "hf_tiny": 6,
}


def _modules():
    mods = {}
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
                mods[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return mods


def import_graph():
    """module -> {(imported module, line)} for every `speechverse_jax` import, at any depth."""
    mods = _modules()
    edges = collections.defaultdict(set)
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("speechverse_jax"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    edges[mod].add((sub if sub in mods else node.module, node.lineno))
            elif isinstance(node, ast.Import):
                edges[mod].update((a.name, node.lineno) for a in node.names if a.name.startswith("speechverse_jax"))
    return mods, edges


def part(module: str) -> str:
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else "(package)"


def test_every_part_has_a_layer():
    mods, _ = import_graph()
    assert {part(m) for m in mods} <= set(LAYERS), {part(m) for m in mods} - set(LAYERS)


def test_imports_point_down():
    mods, edges = import_graph()
    upward = [f"{m} (line {line}) -> {t}" for m, targets in edges.items() for t, line in targets
              if LAYERS[part(t)] > LAYERS[part(m)]]
    assert not upward, "imports that point up a layer:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    mods, edges = import_graph()
    graph = {m: {t for t, _ in edges.get(m, ()) if t in mods and t != m} for m in mods}
    # Tarjan's strongly connected components: any component of two or more modules is a cycle.
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
    assert not cycles, f"import cycles: {cycles}"


def test_the_checks_catch_a_cycle_and_an_upward_import(monkeypatch):
    """The checks themselves can fail: a fake upward edge and a fake cycle are found."""
    mods, edges = import_graph()
    edges["speechverse_jax.models.t5"].add(("speechverse_jax.api", 1))
    upward = [t for t, _ in edges["speechverse_jax.models.t5"] if LAYERS[part(t)] > LAYERS["models"]]
    assert upward == ["speechverse_jax.api"]
    monkeypatch.setattr(__import__(__name__), "import_graph", lambda: (mods, edges))
    with pytest.raises(AssertionError, match="cycles"):
        test_no_import_cycles()
