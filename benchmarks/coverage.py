"""Coverage: how the compiler does on every zoo and coverage model (``list_models(coverage=True)``).

For each model (tiny config, default input) and each plan (ulysses=2 and ring=2 on 2 gloo
processes, ulysses=2 x ring=2 on 4), the parallel output is compared with the single-process
output (relative error, exact below 1e-4 in fp32), and reported with this rank's share of the
forward's FLOPs (estimated from the rewritten graph's placements: 1.0 means every rank computes
everything, 1/N is perfectly parallel), the sharding breaks with their ops, and how the model was
captured (one whole graph, or the capture error). "Parallel" means a FLOPs share of at most 0.85.

    python benchmarks/coverage.py [--models a,b] [--out benchmarks/results/coverage]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from xdit_compile.models import get_entry, list_models
from xdit_compile.testing.launcher import WorkerError, WorkerPool

PLANS = [
    ("ulysses=2", {"ulysses": 2}, 2),
    ("ring=2", {"ring": 2}, 2),
    ("ulysses=2 x ring=2", {"ulysses": 2, "ring": 2}, 4),
]
EXACT, PARALLEL = 1e-4, 0.85


def _one(name: str, plan_kw: dict[str, int]) -> dict[str, Any]:
    from xdit_compile import Plan
    from xdit_compile.jobs.compare import compare_zoo_model

    r = compare_zoo_model(name, Plan(**plan_kw))
    return {
        "rel_error": r.rel_error,
        "share": r.flops_share,
        "breaks": r.breaks,
        "seed": r.seed,
        "regions": r.regions,
        "region_error": r.region_error,
    }


def _short(b: str) -> str:
    op = b.split(" at ", 1)[0]
    reason = b.rsplit(": ", 1)[-1]
    return f"{op} ({reason})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="")
    ap.add_argument("--out", default="benchmarks/results/coverage")
    ap.add_argument(
        "--merge", action="store_true", help="replace these models' rows in an existing result"
    )
    a = ap.parse_args()
    names = a.models.split(",") if a.models else list_models(coverage=True)
    pools: dict[int, WorkerPool] = {}
    rows: list[dict[str, Any]] = []
    t0 = time.time()
    for name in names:
        for label, kw, world in PLANS:
            if world not in pools:
                pools[world] = WorkerPool(world)
            row: dict[str, Any] = {
                "model": name,
                "class": get_entry(name).cls_name,
                "group": get_entry(name).group,
                "plan": label,
            }
            try:
                res = pools[world].run(_one, name, kw, timeout=600)
                r0 = res[0]
                row.update(
                    rel_error=max(r["rel_error"] for r in res),
                    share=max(r["share"] for r in res),
                    breaks=sorted({_short(b) for b in r0["breaks"]}),
                    n_breaks=len(r0["breaks"]),
                    seed_dim=r0["seed"].get("dim"),
                    capture=f"{r0['regions']} regions ({r0['region_error'][:120]})"
                    if r0["regions"]
                    else "whole graph",
                )
            except WorkerError as e:
                pools.pop(world).close()
                msg = str(e).split("\n")[0][:300]
                row.update(rel_error=None, share=None, breaks=[], n_breaks=0, capture=msg)
            row["exact"] = row["rel_error"] is not None and row["rel_error"] < EXACT
            row["parallel"] = row["exact"] and row["share"] is not None and row["share"] <= PARALLEL
            rows.append(row)
            print(
                f"{name:16s} {label:20s} err {row['rel_error']!s:>24s} share {row['share']!s:>20s} "
                f"breaks {row['n_breaks']} {row['capture'][:80]}",
                flush=True,
            )
    for p in pools.values():
        p.close()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if a.merge and out.with_suffix(".json").exists():
        old = json.loads(out.with_suffix(".json").read_text())
        new = {(r["model"], r["plan"]): r for r in rows}
        rows = [new.pop((r["model"], r["plan"]), r) for r in old] + list(new.values())
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    out.with_suffix(".md").write_text(_markdown(rows, time.time() - t0))
    print(f"wrote {out}.md / .json")


def _markdown(rows: list[dict[str, Any]], seconds: float) -> str:
    import torch

    lines = [
        "# Coverage: every zoo and coverage model at ulysses=2, ring=2, ulysses=2 x ring=2",
        "",
        f"`python benchmarks/coverage.py` (torch {torch.__version__}, gloo on CPU, tiny configs, "
        f"fp32, {seconds:.0f} s for the last run; `--merge` reruns some models). Exact: relative "
        f"error < {EXACT}. Share: this rank's estimated share of the forward's FLOPs (1/N is "
        f"perfectly parallel). Parallel: exact and share <= {PARALLEL}. Breaks: sharding breaks "
        "(inputs gathered, exact, slower) by op. Coverage entries (`models/zoo_more.py`) are "
        "classes the project was not tuned on.",
        "",
    ]
    plans = [p[0] for p in PLANS]
    for label in plans:
        sub = [r for r in rows if r["plan"] == label]
        lines.append(
            f"- **{label}**: {sum(r['exact'] for r in sub)}/{len(sub)} exact, "
            f"{sum(r['parallel'] for r in sub)}/{len(sub)} exact and parallel; wrong results: "
            f"{sum(1 for r in sub if r['rel_error'] is not None and not r['exact'])}"
        )
    lines += [
        "",
        "| model | class | group | plan | rel. error | share | breaks | capture |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        err = "-" if r["rel_error"] is None else f"{r['rel_error']:.1e}"
        share = "-" if r["share"] is None else f"{r['share']:.2f}"
        brk = "; ".join(r["breaks"]) if r["breaks"] else "0"
        lines.append(
            f"| {r['model']} | {r['class']} | {r['group']} | {r['plan']} | {err} | {share} | "
            f"{brk} | {r['capture']} |"
        )
    ops = Counter(b for r in rows for b in r["breaks"])
    if ops:
        lines += ["", "## Breaks by op", ""] + [f"- {n} x {op}" for op, n in ops.most_common()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
