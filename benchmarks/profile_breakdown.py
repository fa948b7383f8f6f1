"""Where the time of a parallel forward goes: torch profiler breakdown, Flux mid-size at ulysses=2.

2 gloo processes x 1 thread, the mid-size Flux of ``bench_vs_diffusers_cp.py`` (hidden 512,
2+2 blocks, 1024 image + 256 text tokens). Each rank profiles ``--iters`` forwards (after two
warmup forwards) with ``torch.profiler`` and sorts every op's *self* CPU time into:

- matmul (``aten::mm/addmm/bmm/...``), attention (SDPA and the attention kernels),
- communication (gloo all-to-all / all-gather / send / recv and the waits on them: transfer
  and waiting for the peer together, gloo runs them synchronously on the calling thread),
- other ops (elementwise, norms, copies, cat/split of the all-to-all packing),
- framework and Python overhead: wall time minus every op's self time.

Variants in one run, each twice: xdit_compile's Ulysses (and once "before", ``FUSE_QKV = False``:
Q, K and V in three all-to-alls, the path before that change), diffusers' own Ulysses context
parallelism on the same model, and xdit_compile's Ring. Writes
``results/profile_flux_ulysses2.{json,md}``.

    python benchmarks/profile_breakdown.py [--iters 5]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

OUT = Path(__file__).parent / "results"
CONFIG = {
    "num_attention_heads": 4,
    "attention_head_dim": 128,
    "axes_dims_rope": (16, 56, 56),
    "num_layers": 2,
    "num_single_layers": 2,
    "joint_attention_dim": 512,
    "pooled_projection_dim": 256,
}
INPUTS = {"height": 64, "width": 64, "text_len": 256}

_MATMUL = (
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::baddbmm",
    "aten::matmul",
    "aten::linear",
    "aten::_weight_int8pack_mm",
    "aten::mkldnn_linear",
)
_ATTN = ("scaled_dot_product", "flash_attention", "_efficient_attention", "math_attention")
_COMM = (
    "c10d",
    "gloo",
    "all_to_all",
    "alltoall",
    "all_gather",
    "allgather",
    "send",
    "recv",
    "wait_tensor",
    "barrier",
    "broadcast",
)


def _category(name: str) -> str:
    low = name.lower()
    if any(k in low for k in _COMM):
        return "communication"
    if any(k in low for k in _ATTN):
        return "attention"
    if name in _MATMUL:
        return "matmul"
    return "other ops"


def _job(variant: str, iters: int) -> dict[str, Any]:
    """``variant``: "before" (xdit_compile Ulysses, Q/K/V in three all-to-alls), "ulysses"
    (xdit_compile), "ring" (xdit_compile), "diffusers" (diffusers' own Ulysses context
    parallelism on the same model, as in ``bench_vs_diffusers_cp.py``)."""
    import torch
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    import xdit_compile as xc
    from xdit_compile.models import build_model, example_inputs
    from xdit_compile.runtime import attention
    from xdit_compile.runtime.collectives import comm_stats

    attention.FUSE_QKV = variant != "before"
    model = build_model("flux-dev", "full", **CONFIG)
    inputs = example_inputs("flux-dev", model, size="full", **INPUTS)
    if variant == "diffusers":
        sys.path.insert(0, str(Path(__file__).parent))
        from bench_vs_diffusers_cp import CommCounter, _enable_diffusers_cp

        _enable_diffusers_cp(model, "ulysses")
        counter = CommCounter()
        pm = model
    else:
        counter = None
        pm = xc.parallelize(model, xc.Plan(ring=2) if variant == "ring" else xc.Plan(ulysses=2))
    with torch.no_grad():
        for _ in range(2):
            pm(**inputs)
        comm_stats().reset()
        dist.barrier()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(iters):
                dist.barrier()
                if counter is not None:
                    with counter.installed():
                        pm(**inputs)
                else:
                    pm(**inputs)
            wall = (time.perf_counter() - t0) / iters
    cats: dict[str, float] = {}
    for ev in prof.key_averages():
        if ev.key.startswith("ProfilerStep") or ev.key in ("[memory]",):
            continue
        c = _category(ev.key) if "barrier" not in ev.key.lower() else "barrier"
        cats[c] = cats.get(c, 0.0) + ev.self_cpu_time_total / 1e3 / iters  # ms per forward
    barrier = cats.pop("barrier", 0.0)
    wall_ms = wall * 1e3 - barrier
    cats["framework + Python"] = max(wall_ms - sum(cats.values()), 0.0)
    calls = (
        {"all_to_all@ulysses": {"calls": counter.calls.get("funcol.all_to_all_single", 0)}}
        if counter is not None
        else comm_stats().as_dict()
    )
    return {
        "rank": dist.get_rank(),
        "variant": variant,
        "wall_ms": wall_ms,
        "categories": cats,
        "calls": calls,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=5)
    a = ap.parse_args()
    os.environ.setdefault("XDIT_WORKER_THREADS", "1")
    from xdit_compile.testing.launcher import WorkerPool

    pool = WorkerPool(2)
    res: dict[str, Any] = {}
    try:
        for label, variant in (
            ("xdit_compile ulysses=2, Q/K/V in 3 all-to-alls (before)", "before"),
            ("xdit_compile ulysses=2", "ulysses"),
            ("diffusers CP ulysses=2", "diffusers"),
            ("xdit_compile ring=2", "ring"),
            ("xdit_compile ulysses=2, again", "ulysses"),
            ("diffusers CP ulysses=2, again", "diffusers"),
            ("xdit_compile ring=2, again", "ring"),
        ):
            res[label] = pool.run(_job, variant, a.iters, timeout=1800)
            print(label, [round(r["wall_ms"], 1) for r in res[label]], flush=True)
    finally:
        pool.close()
    OUT.mkdir(exist_ok=True)
    (OUT / "profile_flux_ulysses2.json").write_text(json.dumps(res, indent=1))
    md = _markdown(res, a.iters)
    (OUT / "profile_flux_ulysses2.md").write_text(md)
    print(md)
    return 0


def _markdown(res: dict[str, Any], iters: int) -> str:
    cats = ["matmul", "attention", "other ops", "communication", "framework + Python"]
    out = [
        "# Where the time goes: Flux mid-size, ulysses=2, 2 gloo processes x 1 thread",
        "",
        "`benchmarks/profile_breakdown.py`: torch profiler, self CPU time per op category, ms per "
        f"forward (mean of {iters} forwards after 2 warmup forwards; barriers excluded). "
        "Communication is gloo's transfer and the wait for the peer together. diffusers' "
        "attention wrappers (Python) count as other ops; Ring's send/recv run while its local "
        "block attends.",
        "",
        "| variant | rank | wall ms | " + " | ".join(cats) + " | all-to-all calls |",
        "|---|---|---|" + "---|" * len(cats) + "---|",
    ]
    for label, ranks in res.items():
        for r in ranks:
            calls = r["calls"].get("all_to_all@ulysses", {}).get("calls", 0) // max(iters, 1)
            out.append(
                f"| {label} | {r['rank']} | {r['wall_ms']:.1f} | "
                + " | ".join(f"{r['categories'].get(c, 0.0):.1f}" for c in cats)
                + f" | {calls} |"
            )
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
