"""Sequence parallelism on PixArt-Sigma full-size shapes: 2 blocks, 1024px (4096 tokens).

Compares 2 processes x 1 thread (ulysses=2, ring=2, and ulysses=2 through inductor) with 1
process x 1 thread (eager diffusers) on the same
weights and inputs, and records latency (median of --iters after --warmup), bytes sent per
rank per forward, the relative error and the sharding breaks. Writes
``benchmarks/results/sp_pixart_sigma.json`` and ``.md``.

    python benchmarks/bench_sp_pixart_sigma.py [--iters 3] [--warmup 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from xdit_compile import Plan
from xdit_compile.jobs.compare import compare_zoo_model
from xdit_compile.testing.launcher import WorkerPool

OUT = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--no-inductor", action="store_true", help="skip the torch.compile row")
    args = ap.parse_args()
    os.environ["XDIT_WORKER_THREADS"] = "1"
    rows = []
    pool = WorkerPool(2)
    try:
        plans = [Plan(ulysses=2), Plan(ring=2)]
        if not args.no_inductor:
            plans.append(Plan(ulysses=2, compile="inductor"))
        for plan in plans:
            t0 = time.time()
            res = pool.run(
                compare_zoo_model,
                "pixart-sigma",
                plan,
                size="full",
                iters=args.iters,
                warmup=args.warmup,
                config={"num_layers": args.layers},
                timeout=3600,
            )
            r0 = res[0]
            par = max(r.parallel_ms for r in res)
            rows.append(
                {
                    "plan": str(plan),
                    "serial_ms": round(r0.serial_ms, 1),
                    "parallel_ms": round(par, 1),
                    "latency_ratio": round(par / r0.serial_ms, 3),
                    "bytes_per_rank_per_forward": [r.bytes_per_forward for r in res],
                    "comm_rank0": r0.comm,
                    "rel_error": max(r.rel_error for r in res),
                    "sharding_breaks": r0.breaks,
                    "seed": {k: list(v) if isinstance(v, tuple) else v for k, v in r0.seed.items()},
                    "wall_s": round(time.time() - t0, 1),
                }
            )
            print(json.dumps(rows[-1]))
    finally:
        pool.close()
    meta = {
        "model": f"pixart-sigma full config (hidden 1152, 16 heads x 72), num_layers={args.layers}",
        "input": "latent [1, 4, 128, 128] (1024px) -> 4096 tokens; T5 300 tokens",
        "setup": "2 gloo processes x 1 thread vs 1 process x 1 thread, CPU, fp32",
        "iters": args.iters,
        "warmup": args.warmup,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
    }
    OUT.mkdir(exist_ok=True)
    (OUT / "sp_pixart_sigma.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        f"# {meta['model']}",
        "",
        f"{meta['input']}; {meta['setup']}; median of {args.iters}.",
        "",
        "| plan | serial ms | parallel ms | ratio | bytes/rank/forward | rel error | breaks |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['plan']} | {r['serial_ms']} | {r['parallel_ms']} | {r['latency_ratio']} | "
            f"{r['bytes_per_rank_per_forward'][0]:,} | {r['rel_error']:.2e} | "
            f"{len(r['sharding_breaks'])} |"
        )
    (OUT / "sp_pixart_sigma.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
