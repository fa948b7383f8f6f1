"""The README's method x model support table, built from the zoo and its committed results.

Rows are the diffusers classes of the zoo (``list_models(coverage=True)``, registry order; zoo
names of one class share a row), with what each entry records itself (its names, image or
video, its group: ``"zoo"`` entries are verified by the test suite, ``"coverage"`` entries
measured by ``benchmarks/coverage.py``). The sequence-parallel columns come from
``benchmarks/results/coverage.json`` (written by ``benchmarks/coverage.py``): one column per plan
it ran, a cell per class saying whether every name of the class matched serial and was really
parallel. The PipeFusion column is the entries' own record (``ZooEntry.pipefusion_refused``,
which ``tests/test_displaced_zoo.py`` checks). Nothing here names a model.

    python -m xdit_compile.models.support            # print the table
    python -m xdit_compile.models.support --write    # rewrite the README's table region
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .zoo import get_entry, list_models

__all__ = [
    "COVERAGE_JSON",
    "END",
    "README",
    "START",
    "readme_region",
    "replace_region",
    "support_table",
    "write_readme",
]

_ROOT = Path(__file__).resolve().parents[1]
#: The committed coverage results (a checkout's file: an installed wheel has no benchmarks/).
COVERAGE_JSON = _ROOT / "benchmarks" / "results" / "coverage.json"
README = _ROOT / "README.md"
START, END = "<!-- support-table:start -->", "<!-- support-table:end -->"

#: What each parallel degree is called in the table's header.
_METHOD = {
    "ulysses": "Ulysses",
    "ring": "Ring",
    "cfg": "CFG",
    "dp": "data parallel",
    "pipefusion": "PipeFusion",
    "distrifusion": "DistriFusion",
}
_GROUP = {"zoo": "tests + coverage.py", "coverage": "coverage.py"}


def _header(plan: str) -> str:
    """``"ulysses=2 x ring=2"`` -> ``"USP `ulysses=2 x ring=2`"``; one degree -> its name."""
    axes = [part.split("=")[0].strip() for part in plan.split(" x ")]
    name = (
        "USP" if set(axes) == {"ulysses", "ring"} else " x ".join(_METHOD.get(a, a) for a in axes)
    )
    return f"{name} `{plan}`"


def _cell(rows: list[dict[str, Any]]) -> str:
    """One class at one plan: every one of its names' results folded into a few characters."""
    if not rows:
        return "not run"
    if any(r.get("rel_error") is None for r in rows):
        return "fails"
    if not all(r["exact"] for r in rows):
        return "**wrong**"
    text = "✓" if all(r["parallel"] for r in rows) else "exact, not parallel"
    breaks = max(int(r.get("n_breaks") or 0) for r in rows)
    return f"{text} ({breaks} breaks)" if breaks else text


def _capture(rows: Iterable[dict[str, Any]]) -> str:
    """How the class was captured: one whole graph, or the most regions any run needed."""
    regions = [
        int(r["capture"].split()[0])
        for r in rows
        if re.match(r"\d+ regions", str(r.get("capture", "")))
    ]
    return f"{max(regions)} regions" if regions else "whole graph"


def _pipefusion(entries: list[Any]) -> str:
    """What the zoo records of PipeFusion on the class (the test suite checks ``"zoo"`` entries)."""
    if any(e.group != "zoo" for e in entries):
        return "not checked"
    refused = [e.pipefusion_refused for e in entries if e.pipefusion_refused]
    return f"refused ({refused[0]})" if refused else "compiles, 0 breaks"


def support_table(coverage: Path | str = COVERAGE_JSON) -> str:
    """The markdown table of diffusers class x method, and a line saying how to read it."""
    results: list[dict[str, Any]] = json.loads(Path(coverage).read_text())
    plans = list(dict.fromkeys(r["plan"] for r in results))
    classes: dict[str, list[str]] = {}
    for name in list_models(coverage=True):
        classes.setdefault(get_entry(name).cls_name, []).append(name)
    head = [
        "diffusers class",
        "zoo names",
        "input",
        *map(_header, plans),
        "PipeFusion `pipefusion=2`",
        "capture",
        "checked by",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cls, names in classes.items():
        entries = [get_entry(n) for n in names]
        mine = [r for r in results if r["model"] in names]
        cells = [_cell([r for r in mine if r["plan"] == p]) for p in plans]
        groups = " / ".join(dict.fromkeys(_GROUP.get(e.group, e.group) for e in entries))
        video = "video" if any(e.video for e in entries) else "image"
        row = [
            f"`{cls}`",
            ", ".join(f"`{n}`" for n in names),
            video,
            *cells,
            _pipefusion(entries),
            _capture(mine),
            groups,
        ]
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "✓: the parallel output matches serial (relative error below 1e-4 in fp32) and no rank",
        "computes more than 0.85 of the forward's FLOPs, tiny config; breaks: "
        "ops whose inputs were",
        "gathered (exact, slower); regions: captured in pieces. From",
        "[`benchmarks/results/coverage.json`](benchmarks/results/coverage.json)",
        "(`python benchmarks/coverage.py`); regenerate this table with",
        "`python -m xdit_compile.models.support --write`. PipeFusion (approximate: displaced K/V):",
        "what the zoo records and `tests/test_displaced_zoo.py` checks (refused: the op that mixes",
        "patches); numerics against the displaced-K/V oracle in `tests/test_displaced.py`.",
    ]
    return "\n".join(lines)


def replace_region(text: str, table: str) -> str:
    """``text`` with the region between :data:`START` and :data:`END` replaced by ``table``."""
    i, j = text.find(START), text.find(END)
    if i < 0 or j < i:
        raise ValueError(f"the README has no {START} ... {END} region")
    return f"{text[: i + len(START)]}\n{table}\n{text[j:]}"


def readme_region(text: str) -> str:
    """What sits between the README's markers (without the newlines next to them)."""
    i, j = text.find(START), text.find(END)
    if i < 0 or j < i:
        raise ValueError(f"the README has no {START} ... {END} region")
    return text[i + len(START) : j].strip("\n")


def write_readme(readme: Path | str = README, coverage: Path | str = COVERAGE_JSON) -> bool:
    """Rewrite the README's table region; whether anything changed."""
    path = Path(readme)
    old = path.read_text()
    new = replace_region(old, support_table(coverage))
    if new != old:
        path.write_text(new)
    return new != old


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help=f"rewrite the table region of {README}")
    a = ap.parse_args(argv)
    if a.write:
        changed = write_readme()
        print(f"{README}: {'table rewritten' if changed else 'table already up to date'}")
    else:
        print(support_table())


if __name__ == "__main__":
    main()
