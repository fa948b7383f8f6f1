"""Unseen models: every diffusers transformer test config, at ulysses=2 and ring=2, against serial.

The project's zoo is tuned; this measures what a user with a model nobody tuned for gets. diffusers
keeps, for each transformer class, a tiny config and dummy inputs in its own test files
(``tests/models/transformers/test_models_*.py``: a ``*TesterConfig`` class with ``model_class``,
``get_init_dict()`` and ``get_dummy_inputs()``). This script imports those files from a diffusers
source checkout at run time (nothing of them is copied here), builds each model with the first
config of its file, and compares the parallel output on 2 gloo processes with the single-process
output of the same weights and inputs.

Columns: relative error (exact below 1e-4 in fp32), this rank's share of the forward's FLOPs
(estimated from the rewritten graph; "parallel" means at most 0.85), sharding breaks by op, and
how the model was captured. A refusal (a plan the model cannot take, with its message) is not a
wrong result; a result above the tolerance is.

    python benchmarks/unseen.py --diffusers-src PATH [--files a,b] [--out benchmarks/results/unseen]

PATH is a diffusers checkout (its ``tests/`` folder is imported); the diffusers *installed* is
the one measured.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from xdit_compile.testing.launcher import WorkerError, WorkerPool

PLANS = [("ulysses=2", {"ulysses": 2}), ("ring=2", {"ring": 2})]
EXACT, PARALLEL = 1e-4, 0.85
FOLDER = "tests.models.transformers"


def _config(stem: str) -> Any:
    """The first tester config of a diffusers test file (an instance), or raise."""
    mod = importlib.import_module(f"{FOLDER}.{stem}")
    for obj in vars(mod).values():
        if (
            isinstance(obj, type)
            and obj.__module__ == mod.__name__
            and "get_init_dict" in vars(obj)
            and "get_dummy_inputs" in vars(obj)
        ):
            return obj()
    raise LookupError(f"{stem}: no class with get_init_dict and get_dummy_inputs")


def _leaves(out: Any) -> list[Any]:
    import torch.utils._pytree as pytree

    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return [t for t in pytree.tree_leaves(out) if hasattr(t, "shape")]


def _one(stem: str, plan_kw: dict[str, int]) -> dict[str, Any]:
    import torch

    from xdit_compile import Plan, parallelize
    from xdit_compile.jobs.compare import _breaks, _flops_share, rel_error

    cfg = _config(stem)
    torch.manual_seed(0)
    model = cfg.model_class(**cfg.get_init_dict()).eval()
    torch.manual_seed(0)
    inputs = cfg.get_dummy_inputs()
    pm = parallelize(model, Plan(**plan_kw), broadcast_weights=True)  # torch.empty parameters
    with torch.no_grad():
        ref = _leaves(model(**inputs))
        out = _leaves(pm(**inputs))
    entry = pm.last
    return {
        "class": type(model).__name__,
        "rel_error": rel_error(tuple(out), tuple(ref)),
        "share": _flops_share(pm),
        "breaks": [str(b) for b in _breaks(pm, entry)],
        "regions": len(pm.all_regions()) if pm.regions is not None else 0,
        "region_error": pm.region_error,
        "seed": {
            k: v for k, v in (entry.seed.as_dict() if entry.seed else {}).items() if k != "shape"
        }
        if entry is not None
        else {},
    }


def _short(b: str) -> str:
    op = b.split(" at ", 1)[0]
    reason = b.rsplit(": ", 1)[-1]
    return f"{op} ({reason})"


def _row(
    stem: str, label: str, res: list[dict[str, Any]] | None, error: str = ""
) -> dict[str, Any]:
    row: dict[str, Any] = {"file": stem, "plan": label}
    if res is None:
        refused = "ValueError" in error or "NotImplementedError" in error
        row.update(
            cls="?",
            rel_error=None,
            share=None,
            breaks=[],
            n_breaks=0,
            outcome="refused" if refused else "failed",
            capture=error,
        )
    else:
        r0 = res[0]
        row.update(
            cls=r0["class"],
            rel_error=max(r["rel_error"] for r in res),
            share=max(r["share"] for r in res),
            breaks=sorted({_short(b) for b in r0["breaks"]}),
            n_breaks=len(r0["breaks"]),
            capture=f"{r0['regions']} regions ({r0['region_error'][:120]})"
            if r0["regions"]
            else "whole graph",
        )
        exact = row["rel_error"] < EXACT
        row["outcome"] = (
            ("parallel" if exact and row["share"] <= PARALLEL else "exact") if exact else "WRONG"
        )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--diffusers-src", required=True, help="a diffusers checkout (holds tests/)")
    ap.add_argument("--files", default="", help="test file stems, comma-separated (default: all)")
    ap.add_argument("--out", default="benchmarks/results/unseen")
    ap.add_argument(
        "--merge", action="store_true", help="replace these files' rows in an existing result"
    )
    a = ap.parse_args()
    src = Path(a.diffusers_src).resolve()
    sys.path.insert(0, str(src))  # before the pools start: workers copy sys.path
    folder = src / Path(*FOLDER.split("."))
    stems = a.files.split(",") if a.files else sorted(p.stem for p in folder.glob("test_*.py"))
    pool = WorkerPool(2)
    rows: list[dict[str, Any]] = []
    t0 = time.time()
    for stem in stems:
        for label, kw in PLANS:
            try:
                row = _row(stem, label, pool.run(_one, stem, kw, timeout=600))
            except WorkerError as e:
                pool.close(force=True)
                pool = WorkerPool(2)
                lines = [ln for ln in str(e).splitlines() if ln.strip()]
                first = next((ln for ln in lines if "Error" in ln), lines[0] if lines else "")
                row = _row(stem, label, None, first.strip()[:300])
            rows.append(row)
            err = "-" if row["rel_error"] is None else f"{row['rel_error']:.1e}"
            print(
                f"{stem:52s} {label:10s} {row['outcome']:8s} err {err:>8s} breaks "
                f"{row['n_breaks']} {row['capture'][:90]}",
                flush=True,
            )
    pool.close()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if a.merge and out.with_suffix(".json").exists():
        old = json.loads(out.with_suffix(".json").read_text())
        new = {(r["file"], r["plan"]): r for r in rows}
        rows = [new.pop((r["file"], r["plan"]), r) for r in old] + list(new.values())
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    out.with_suffix(".md").write_text(_markdown(rows, time.time() - t0))
    print(f"wrote {out}.md / .json")


def _markdown(rows: list[dict[str, Any]], seconds: float) -> str:
    import diffusers
    import torch

    lines = [
        "# Unseen models: diffusers' own test configs at ulysses=2 and ring=2",
        "",
        f"`python benchmarks/unseen.py --diffusers-src PATH` (diffusers {diffusers.__version__}, "
        f"torch {torch.__version__}, gloo on CPU, 2 processes, fp32, {seconds:.0f} s for the last "
        "run). Each row is the first tester config of one `tests/models/transformers` file of "
        f"diffusers. Exact: relative error < {EXACT}. Parallel: exact and this rank's FLOPs share "
        f"<= {PARALLEL}. Refused: the plan was rejected with a message. WRONG: a result above the "
        "tolerance.",
        "",
    ]
    for label, _ in PLANS:
        sub = [r for r in rows if r["plan"] == label]
        c = Counter(r["outcome"] for r in sub)
        lines.append(
            f"- **{label}**: {c['parallel'] + c['exact']}/{len(sub)} exact, "
            f"{c['parallel']}/{len(sub)} exact and parallel, {c['refused']} refused, {c['failed']} "
            f"failed, **{c['WRONG']} wrong**"
        )
    lines += [
        "",
        "| file | class | plan | outcome | rel. error | share | breaks | capture / message |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        err = "-" if r["rel_error"] is None else f"{r['rel_error']:.1e}"
        share = "-" if r["share"] is None else f"{r['share']:.2f}"
        brk = "; ".join(r["breaks"]) if r["breaks"] else "0"
        lines.append(
            f"| {r['file'].removeprefix('test_models_')} | {r['cls']} | {r['plan']} | "
            f"{r['outcome']} | {err} | {share} | {brk} | {r['capture']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
