"""The README, docs/ and benchmarks/README.md: links that resolve, a short README, and a support
table that cannot go stale (it must equal what ``xdit_compile.models.support`` generates)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from xdit_compile.models.support import readme_region, support_table

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
MAX_README_LINES = 220
MAX_CELL = 300  # characters of one line of prose, or of one table cell

# [text](target) and <img src="target">; code spans and fenced blocks are removed first.
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|<img[^>]*\bsrc=\"([^\"]+)\"")
_FENCE = re.compile(r"^```.*?^```", re.S | re.M)
_CODE = re.compile(r"`[^`\n]*`")


def _prose(text: str) -> str:
    return _CODE.sub("", _FENCE.sub("", text))


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = _FENCE.sub("", page.read_text())
    return {_slug(m) for m in re.findall(r"^#+\s+(.*)$", text, re.M)}


def _links(page: Path) -> list[str]:
    return [a or b for a, b in _LINK.findall(_prose(page.read_text()))]


def test_pages_exist() -> None:
    assert all(p.is_file() for p in PAGES), PAGES
    assert len(PAGES) > 3


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    bad = []
    for link in _links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", link):  # http:, https:, mailto:
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            bad.append(f"{link}: no such file")
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            bad.append(f"{link}: no heading with anchor #{anchor}")
    assert not bad, f"{page.relative_to(ROOT)}: {bad}"


def test_link_finder_sees_links() -> None:
    """The checker itself: it finds the README's picture and its links into docs/."""
    links = _links(README)
    assert "models/demo/fox.png" in links
    assert any(link.startswith("docs/") for link in links)
    assert _slug("Choosing a plan: the cost model") == "choosing-a-plan-the-cost-model"
    assert _slug("Whole pipelines (`bench_pipeline.py`)") == "whole-pipelines-bench_pipelinepy"


def test_readme_is_short() -> None:
    n = len(README.read_text().splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines; move detail to docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_long_lines_or_cells(page: Path) -> None:
    long = []
    for i, line in enumerate(_FENCE.sub("", page.read_text()).splitlines(), 1):
        cells = line.strip().strip("|").split("|") if line.lstrip().startswith("|") else [line]
        long += [f"line {i}: {len(c)} characters" for c in cells if len(c.strip()) > MAX_CELL]
    assert not long, f"{page.relative_to(ROOT)}: {long}"


def test_readme_keeps_the_two_commands() -> None:
    text = README.read_text()
    assert "pip install -q torch==2.13.0 && .venv/bin/pip install -q -e '.[test,dev]'" in text
    assert "\n.venv/bin/python -m pytest -q\n" in text
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest -q" in ci


def test_support_table_is_generated() -> None:
    """Regenerate with ``python -m xdit_compile.models.support --write``."""
    assert readme_region(README.read_text()) == support_table()


def test_support_table_rows_are_the_zoo_classes() -> None:
    from xdit_compile.models import get_entry, list_models

    classes = {get_entry(n).cls_name for n in list_models(coverage=True)}
    rows = [line for line in support_table().splitlines() if line.startswith("| `")]
    assert len(rows) == len(classes)
    assert all(any(f"`{c}`" in r for r in rows) for c in classes)
