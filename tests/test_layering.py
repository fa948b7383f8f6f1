"""The layering of DESIGN.md, checked on the source: ``plan`` and the shared vocabulary
(``placement``, ``latent``) import nothing of the package; ``runtime`` and ``kernels`` never import
``passes`` or the API; ``passes`` never import the API modules above them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.startswith("xdit_compile")}


def _files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


API = ("xdit_compile.api", "xdit_compile.cli.main", "xdit_compile.pipeline", "xdit_compile.jobs.generate",
       "xdit_compile.jobs.compare", "xdit_compile.analysis.report", "xdit_compile.compiler.pipefusion", "xdit_compile.testing.oracle")


@pytest.mark.parametrize("path", _files("runtime") + _files("kernels"), ids=lambda p: p.name)
def test_runtime_and_kernels_never_import_passes_or_the_api(path: Path) -> None:
    bad = {m for m in _imports(path) if m.startswith(("xdit_compile.passes", "xdit_compile.compiler.driver", *API))}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


@pytest.mark.parametrize("path", _files("passes"), ids=lambda p: p.name)
def test_passes_never_import_the_api(path: Path) -> None:
    bad = {m for m in _imports(path) if m.startswith(API)}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


@pytest.mark.parametrize("name", ["plan", "placement", "latent"])
def test_shared_vocabulary_imports_nothing_of_the_package(name: str) -> None:
    assert not _imports(ROOT / "xdit_compile" / f"{name}.py")
