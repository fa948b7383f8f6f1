"""The layering of DESIGN.md, checked on the source, imports inside functions included.

From the bottom up: the shared vocabulary (``plan``, ``placement``, ``latent``) imports nothing of
the package; ``runtime`` and ``kernels`` import only it (and each other); ``passes`` add
``runtime``; the ``compiler`` adds ``passes``; ``analysis`` adds the compiler; the public API
(``api``, ``pipeline``, the package's ``__init__``) adds analysis; then the worker ``jobs``,
``testing``, the ``serve`` front end and at the top the ``cli``. ``models`` (the zoo) imports
nothing of the package. No module imports one above its layer, and the import graph has no
cycle. Every subpackage says in its docstring what it holds and what it may import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: Repository folder -> the package it installs as (pyproject's package-dir).
FOLDERS = {
    "xdit_compile": "xdit_compile",
    "passes": "xdit_compile.passes",
    "runtime": "xdit_compile.runtime",
    "kernels": "xdit_compile.kernels",
    "models": "xdit_compile.models",
}


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


MODULES = _modules()


def _imports(name: str) -> set[str]:
    """The package's modules ``name`` imports, at any level (a ``from package import name`` of a
    submodule counts as importing the submodule)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in MODULES else base)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m in MODULES and m != name}


#: Layer of each module by prefix (the longest prefix wins); a module may import its own layer
#: and those below it.
LAYERS: list[tuple[str, int]] = [
    ("xdit_compile.plan", 0),
    ("xdit_compile.placement", 0),
    ("xdit_compile.latent", 0),
    ("xdit_compile._shadow", 0),
    ("xdit_compile.models", 0),
    ("xdit_compile.runtime", 1),
    ("xdit_compile.kernels", 1),
    ("xdit_compile.passes", 2),
    ("xdit_compile.compiler", 3),
    ("xdit_compile.analysis", 4),
    ("xdit_compile.api", 5),
    ("xdit_compile.pipeline", 5),
    ("xdit_compile", 5),
    ("xdit_compile.jobs", 6),
    ("xdit_compile.testing", 6),
    ("xdit_compile.serve", 7),
    ("xdit_compile.cli", 8),
]


def _layer(name: str) -> int:
    best = max((p for p, _ in LAYERS if name == p or name.startswith(p + ".")), key=len)
    return dict(LAYERS)[best]


def test_every_module_has_a_layer() -> None:
    assert len(MODULES) > 80
    for name in MODULES:
        _layer(name)


@pytest.mark.parametrize("name", sorted(MODULES), ids=lambda n: n.removeprefix("xdit_compile."))
def test_no_module_imports_a_layer_above_its_own(name: str) -> None:
    mine = _layer(name)
    up = sorted(m for m in _imports(name) if _layer(m) > mine)
    assert not up, f"{name} (layer {mine}) imports {[(m, _layer(m)) for m in up]}"


@pytest.mark.parametrize("name", ["plan", "placement", "latent"])
def test_shared_vocabulary_imports_nothing_of_the_package(name: str) -> None:
    assert not _imports(f"xdit_compile.{name}")


def test_zoo_imports_nothing_of_the_package_outside_the_zoo() -> None:
    for name in MODULES:
        if name.startswith("xdit_compile.models"):
            assert all(m.startswith("xdit_compile.models") for m in _imports(name)), name


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph = {m: _imports(m) for m in MODULES}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for m in graph:
        if m not in index:
            visit(m)
    return out


def test_the_import_graph_has_no_cycle() -> None:
    assert _cycles() == []


def test_the_cycle_check_finds_a_cycle(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check itself: a planted import from the driver back up to the api is a cycle."""
    real = _imports

    def planted(name: str) -> set[str]:
        got = real(name)
        return got | {"xdit_compile.api"} if name == "xdit_compile.compiler.driver" else got

    monkeypatch.setitem(globals(), "_imports", planted)
    assert any("xdit_compile.api" in c and "xdit_compile.compiler.driver" in c for c in _cycles())


@pytest.mark.parametrize(
    "name",
    sorted(n for n, p in MODULES.items() if p.name == "__init__.py"),
    ids=lambda n: n.removeprefix("xdit_compile."),
)
def test_every_package_says_what_it_holds(name: str) -> None:
    doc = ast.get_docstring(ast.parse(MODULES[name].read_text()))
    assert doc and len(doc) > 40, f"{name} has no docstring saying what it holds"
