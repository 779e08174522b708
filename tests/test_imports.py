"""No import circles in the package, not even type-only ones.

Every module's imports are read from its source (no import runs): at module
level, under ``if TYPE_CHECKING:``, and inside functions (an import put off
until a call is still a dependency).  ``sys.modules.get(name)`` looks are
not imports and are not counted."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "syncdeco"


def modules() -> dict[str, Path]:
    """Every module of the package, by dotted name."""
    found = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that module ``name`` imports, anywhere in it."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from pkg import mod`` imports the module pkg.mod; ``from mod
            # import name`` imports mod.
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            # ``import a.b.c`` depends on a.b.c (the packages above it run
            # first, but a package's __init__ is not its modules' importer).
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imports(name, path, known) for name, path in found.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: one shortest circle through each module that is
    on one (Tarjan's strongly connected components, then a breadth-first
    walk back to the start inside each)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges[node]):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.add(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(edges):
        if node not in index:
            connect(node)
    circles: dict[tuple[str, ...], list[str]] = {}
    for component in components:
        for start in sorted(component):
            circle = _shortest_back(start, edges, component)
            key = tuple(sorted(set(circle)))
            circles.setdefault(key, circle)
    return list(circles.values())


def _shortest_back(start: str, edges: dict[str, set[str]], within: set[str]) -> list[str]:
    came: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(edges[node] & within):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(came[path[-1]])
                    return [*reversed(path), start]
                if nxt not in came:
                    came[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"{start} is on no circle in {sorted(within)}")


def test_the_reader_sees_every_kind_of_import(tmp_path: Path) -> None:
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import x\n")
    (pkg / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .sub import b\n"
    )
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import x\n    import syncdeco.c\n")
    (pkg / "c.py").write_text("import os\nfrom . import sub\n")
    known = {"syncdeco", "syncdeco.a", "syncdeco.sub", "syncdeco.sub.b", "syncdeco.c"}
    got = {
        name: imports(name, pkg.parent / path, known)
        for name, path in {
            "syncdeco": "syncdeco/__init__.py",
            "syncdeco.a": "syncdeco/a.py",
            "syncdeco.sub.b": "syncdeco/sub/b.py",
            "syncdeco.c": "syncdeco/c.py",
        }.items()
    }
    assert got == {
        "syncdeco": {"syncdeco.a"},
        "syncdeco.a": {"syncdeco.sub.b"},
        "syncdeco.sub.b": {"syncdeco.a", "syncdeco.c"},
        "syncdeco.c": {"syncdeco.sub"},
    }
    edges = {**got, "syncdeco.sub": set()}
    assert cycles(edges) == [["syncdeco.a", "syncdeco.sub.b", "syncdeco.a"]]


def test_no_import_circles() -> None:
    found = cycles(graph())
    assert not found, "import circles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_the_plane_is_layered_as_its_docstring_says() -> None:
    # syncdeco/_plane/__init__.py lists its modules so that each imports
    # only those listed before it.
    import re

    import syncdeco._plane

    plane = "syncdeco._plane"
    edges = graph()
    inside = {name.rpartition(".")[2] for name in edges if name.startswith(plane + ".")}
    doc = syncdeco._plane.__doc__ or ""
    doc = doc[doc.index("\n* ") :]  # the list
    listed = list(dict.fromkeys(n for n in re.findall(r"``(\w+)``", doc) if n in inside))
    assert sorted(listed) == sorted(inside), "the docstring lists every module of the plane"
    wrong = [
        f"{module} imports {used}"
        for at, module in enumerate(listed)
        for used in sorted(edges[f"{plane}.{module}"])
        if used.startswith(plane + ".") and used.rpartition(".")[2] not in listed[:at]
    ]
    assert not wrong, "listed after the module that imports it:\n" + "\n".join(wrong)


def test_no_global_statement_in_the_plane() -> None:
    # The plane's state lives in objects (group.SESSIONS, a Session each),
    # not in module globals rebound from functions.
    found = sorted(
        f"{name} line {node.lineno}: global {', '.join(node.names)}"
        for name, path in modules().items()
        if name.startswith("syncdeco._plane.")
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.Global)
    )
    assert not found, "\n".join(found)


def test_no_module_reaches_a_thousand_lines() -> None:
    # One module a concern: a module that grows to 1,000 lines holds more
    # than one, and is split before it lands.
    long = {
        name: n
        for name, path in modules().items()
        if (n := len(path.read_text().splitlines())) >= 1000
    }
    assert not long, long
