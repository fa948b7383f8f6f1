"""Sharding breaks and communication of every zoo model, statically, for several plans.

Runs the compile path in one process with a fake process group of the plan's world size (no
workers), for tiny configs and full-size shapes (num_layers=2), on the default and the uneven
input. Writes ``benchmarks/results/sharding_breaks.md`` and ``.json``.

    python benchmarks/sharding_breaks.py [--sizes tiny full]
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

import xdit_compile as xc
from xdit_compile.models import build_model, example_inputs, layer_overrides, list_models

OUT = Path(__file__).parent / "results"
PLANS = {
    "tiny": [xc.Plan(ulysses=2), xc.Plan(ring=2), xc.Plan(ulysses=2, ring=2), xc.Plan(ulysses=4)],
    "full": [xc.Plan(ulysses=2, ring=2), xc.Plan(ulysses=4)],
}


def _one(name: str, size: str, uneven: bool, plan: xc.Plan) -> dict:
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=plan.world_size)
    try:
        cfg = layer_overrides(name, size, 2) if size == "full" else {}
        model = build_model(name, size, uneven=uneven, **cfg)
        kwargs = example_inputs(name, model, size=size, uneven=uneven)
        pm = xc.parallelize(model, plan)
        try:
            pm.prepare(**kwargs)
        except ValueError as e:  # e.g. heads not divisible by ulysses: the plan is refused
            return {
                "model": name,
                "size": size,
                "uneven": uneven,
                "plan": str(plan),
                "refused": str(e),
            }
        except RuntimeError as e:  # e.g. a model that cannot be captured as one graph
            return {
                "model": name,
                "size": size,
                "uneven": uneven,
                "plan": str(plan),
                "refused": f"not compiled: {str(e).splitlines()[0]}",
            }
        rep = xc.explain(pm)
        return {
            "model": name,
            "size": size,
            "uneven": uneven,
            "plan": str(plan),
            "split": list(rep.seed["split"]),
            "breaks": [f"{b.op}: {b.reason} at {b.source}" for b in rep.breaks],
            "bytes_rank0": rep.bytes_per_forward,
            "comm": {f"{op}@{axis}": calls for (op, axis), (calls, _) in rep.comm_totals().items()},
        }
    finally:
        dist.destroy_process_group()


def main() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["tiny", "full"])
    args = ap.parse_args()
    rows = []
    for size in args.sizes:
        for name in list_models():
            for uneven in (False, True):
                for plan in PLANS[size]:
                    rows.append(_one(name, size, uneven, plan))
                    print(json.dumps(rows[-1])[:300], flush=True)
    OUT.mkdir(exist_ok=True)
    (OUT / "sharding_breaks.json").write_text(json.dumps(rows, indent=1))
    lines = [
        "# Sharding breaks per zoo model (static, rank 0's view)",
        "",
        "Full size = published config with every block stack cut to 2 layers, and full-size "
        "inputs.",
        "",
        "| model | size | input | plan | split (seed dim) | breaks | collectives per forward | "
        "bytes/rank |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        inp = "uneven" if r["uneven"] else "default"
        if "refused" in r:
            lines.append(
                f"| {r['model']} | {r['size']} | {inp} | {r['plan']} | - | refused: "
                f"{r['refused'][-120:]} | - | - |"
            )
            continue
        comm = ", ".join(f"{k} x{v}" for k, v in r["comm"].items())
        brk = len(r["breaks"]) if not r["breaks"] else "<br>".join(r["breaks"])
        lines.append(
            f"| {r['model']} | {r['size']} | {inp} | {r['plan']} | {r['split']} | {brk} | {comm} | "
            f"{r['bytes_rank0']:,} |"
        )
    (OUT / "sharding_breaks.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
