"""Dependencies go one way: packets ← agent ← nodetools ← topologies ← experiments.

Read from the source with :mod:`ast` (nothing is imported, so no root and no Mininet): every
``import`` in every module — at the top or inside a function, since a lazy import is a
dependency all the same — and every string that names a module of a higher layer (a
``python -m experiments.holder`` launched from below is a dependency too). A lower layer
never uses a higher one, and there are no import cycles: neither between the packages nor
between the modules of topologies, experiments and nodetools. Cycles inside ``agent`` (being
restructured separately) are reported as an expected failure, not hidden.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
#: Lowest first: a module may use its own layer and those before it.
LAYERS = ["packets", "agent", "nodetools", "topologies", "experiments"]
RANK = {name: i for i, name in enumerate(LAYERS)}


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the layered packages."""
    found: dict[str, Path] = {}
    for package in LAYERS:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = module_files()


def _resolve(name: str) -> str | None:
    """The longest known module that ``name`` (a module or a module's attribute) lies in."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _docstrings(tree: ast.Module) -> set[int]:
    """ids of the docstring nodes: prose may mention any module."""
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def imports_of(module: str) -> Iterator[tuple[str, int, str]]:
    """(target module, line, how) for every dependency of ``module`` on a layered module."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    skip = _docstrings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if (target := _resolve(alias.name)) is not None:
                    yield target, node.lineno, f"import {alias.name}"
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                target = _resolve(f"{base}.{alias.name}") or _resolve(base)
                if target is not None:
                    yield target, node.lineno, f"from {base} import {alias.name}"
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip
              and node.value in MODULES and "." in node.value):
            yield node.value, node.lineno, f"names module {node.value!r}"


def graph() -> dict[str, set[str]]:
    return {m: {t for t, _, _ in imports_of(m) if t != m} for m in MODULES}


def layer(module: str) -> str:
    return module.split(".")[0]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return found


def _within(edges: dict[str, set[str]], packages: Iterable[str]) -> dict[str, set[str]]:
    keep = set(packages)
    return {m: {t for t in ts if layer(t) in keep} for m, ts in edges.items() if layer(m) in keep}


def test_the_layers_exist_and_are_read() -> None:
    assert {layer(m) for m in MODULES} == set(LAYERS)
    assert "nodetools.probes" in MODULES and "topologies.client" in MODULES


def test_no_layer_uses_a_higher_one() -> None:
    wrong = [f"{m}:{line} {how} ({layer(m)} may not use {layer(t)})"
             for m in MODULES for t, line, how in imports_of(m) if RANK[layer(t)] > RANK[layer(m)]]
    assert wrong == []


def test_packets_imports_nothing_else_from_moat() -> None:
    assert [(m, t) for m, ts in graph().items() if layer(m) == "packets"
            for t in ts if layer(t) != "packets"] == []


def test_the_packages_form_no_cycle() -> None:
    edges: dict[str, set[str]] = {p: set() for p in LAYERS}
    for m, ts in graph().items():
        edges[layer(m)] |= {layer(t) for t in ts if layer(t) != layer(m)}
    assert cycles(edges) == []


@pytest.mark.parametrize("package", ["nodetools", "topologies", "experiments"])
def test_no_import_cycle_among_a_packages_modules(package: str) -> None:
    assert cycles(_within(graph(), [package])) == []


def test_the_topology_files_do_not_import_each_other() -> None:
    edges = graph()
    assert "topologies.scale" not in edges["topologies.patent"]
    assert "topologies.patent" not in edges["topologies.scale"]


def test_agent_has_no_import_cycles() -> None:
    """Inside agent/ too: core imports no role, roles import core and each other downwards."""
    assert cycles(_within(graph(), ["agent"])) == []


def test_agent_core_imports_no_role() -> None:
    """agent.core is the bottom of agent/: the daemon is given its roles (agent.roles)."""
    edges = graph()
    upward = {(a, b) for a, targets in edges.items() if a.startswith("agent.core")
              for b in targets if b.startswith("agent.") and not b.startswith("agent.core")}
    assert upward == set()
