"""PipeFusion and DistriFusion vs serial and Ulysses: step latency, bytes, parameters, accuracy.

Mid-size PixArt-Sigma (hidden 512 = 8 heads x 64, 8 blocks, 32x32 = 1024 image tokens, 120 T5
tokens of cross-attention) and Flux (hidden 512 = 4 heads x 128, 2 double + 4 single blocks,
1024 image tokens + 128 joint text tokens), random weights, fp32, in one world of 2 gloo
processes x 1 torch thread. For each model:

* a denoising trajectory of ``--steps`` steps is computed once with the plain model (Euler steps
  along its own prediction, timesteps 999 -> 0), so every method sees the same inputs;
* serial (rank 0 alone, rank 1 waits), ``ulysses=2``, ``pipefusion=2`` with M = 2, 4, 8 patches
  and ``distrifusion=2`` each run the trajectory as ``--requests`` + 1 requests: the first
  compiles, the others are timed; ms per step = median over their steps after the warmup steps
  (the slower rank);
  bytes per rank per step from the runtime counter over the same steps;
* parameter bytes each rank holds (measured: distinct storages after other stages were freed);
* accuracy: the oracle (:mod:`xdit_compile.testing.oracle`, one process) runs the trajectory with
  the same method, and the parallel outputs are compared with it and with serial, per warmup count.

PipeFusion's best speedup over one rank is N*M/(M+N-1) (the pipeline fills and drains in every
call); efficiency = measured speedup / that bound. Writes ``benchmarks/results/displaced.json``
and ``.md``.

    python benchmarks/bench_displaced.py [--steps 5] [--models pixart-sigma flux-dev] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

OUT = Path(__file__).parent / "results"
MODELS: dict[str, dict[str, Any]] = {
    "pixart-sigma": {
        "config": {
            "num_attention_heads": 8,
            "attention_head_dim": 64,
            "cross_attention_dim": 512,
            "num_layers": 8,
            "sample_size": 64,
            "caption_channels": 512,
        },
        "inputs": {"height": 64, "width": 64, "text_len": 120},
        "text": (0, True),
        "patch": 2,
        "desc": (
            "hidden 512 (8x64), 8 blocks, 1024 image tokens (32x32), 120 text tokens "
            "(cross-attention)"
        ),
    },
    "flux-dev": {
        "config": {
            "num_attention_heads": 4,
            "attention_head_dim": 128,
            "axes_dims_rope": (16, 56, 56),
            "num_layers": 2,
            "num_single_layers": 4,
            "joint_attention_dim": 512,
            "pooled_projection_dim": 256,
        },
        "inputs": {"height": 64, "width": 64, "text_len": 128},
        "text": (128, True),
        "patch": 1,
        "desc": (
            "hidden 512 (4x128), 2 double + 4 single blocks, 1024 image + 128 text tokens (joint)"
        ),
    },
}
QUICK: dict[str, dict[str, Any]] = {
    "pixart-sigma": {
        "config": {"num_layers": 4},
        "inputs": {},
        "text": (0, True),
        "patch": 2,
        "desc": "tiny",
    },
    "flux-dev": {
        "config": {},
        "inputs": {"text_len": 12},
        "text": (12, True),
        "patch": 1,
        "desc": "tiny",
    },
}
METHODS: list[tuple[str, dict[str, Any]]] = [
    ("serial", {}),
    ("serial, both ranks at once", {}),
    ("ulysses=2", {"ulysses": 2}),
    ("pipefusion=2, M=2", {"pipefusion": 2, "patches": 2}),
    ("pipefusion=2, M=4", {"pipefusion": 2, "patches": 4}),
    ("pipefusion=2, M=8", {"pipefusion": 2, "patches": 8}),
    ("distrifusion=2", {"distrifusion": 2}),
]


def _model(name: str, spec: dict[str, Any]) -> Any:
    from xdit_compile.models import build_model

    return build_model(name, "tiny", **spec["config"])


def _trajectory(name: str, spec: dict[str, Any], steps: int) -> list[dict[str, Any]]:
    """The inputs of every step: Euler steps of the plain model along its own prediction."""
    from xdit_compile.models import example_inputs

    model = _model(name, spec)
    kw = example_inputs(name, model, **spec["inputs"])
    x, out = kw["hidden_states"], []
    ts = torch.linspace(999, 0, steps + 1)
    for i in range(steps):
        t = ts[i]
        step = dict(kw, hidden_states=x.clone())
        if name == "flux-dev":
            step["timestep"] = torch.full_like(kw["timestep"], float(t) / 1000)
        else:
            step["timestep"] = torch.full_like(kw["timestep"], int(t))
        out.append(step)
        with torch.no_grad():
            pred = model(**step)[0][:, : x.shape[1]]
        x = x - (ts[i] - ts[i + 1]) / 1000 * pred
    return out


def _run(
    name: str,
    spec: dict[str, Any],
    plan: dict[str, Any],
    steps: list[dict[str, Any]],
    warmup: int,
    requests: int,
) -> dict[str, Any]:
    import xdit_compile as xc
    from xdit_compile.compiler.pipefusion import parameter_bytes
    from xdit_compile.runtime.collectives import comm_stats

    model = _model(name, spec)
    pm = xc.parallelize(model, xc.Plan(**plan, warmup_steps=warmup)) if plan else None
    fn = pm if pm is not None else model
    outs: list[Any] = []
    timed: list[float] = []
    sent: dict[str, int] = {}
    for request in range(1 + requests):  # the first request compiles
        if pm is not None:
            pm.reset()
            dist.barrier()
        outs = []
        for i, kw in enumerate(steps):
            comm_stats().reset()
            t0 = time.perf_counter()
            with torch.no_grad():
                outs.append(fn(**kw)[0])
            if request >= 1 and i >= warmup:  # timed: the steps after the warmup steps
                timed.append(time.perf_counter() - t0)
                for k, v in comm_stats().as_dict().items():
                    sent[k] = sent.get(k, 0) + v["bytes"]
    held = parameter_bytes(pm.pipeline_modules()) if pm is not None else parameter_bytes([model])
    per = len(timed)
    comm = {k: v // per for k, v in sent.items()}
    return {
        "step_ms": 1e3 * statistics.median(timed),
        "bytes_per_step": sum(comm.values()),
        "params": held,
        "outs": outs,
        "comm": comm,
    }


def _oracle(
    name: str, spec: dict[str, Any], method: str, n: int, steps: list[dict[str, Any]], warmup: int
) -> list[Any]:
    from xdit_compile.testing.oracle import DisplacedOracle, grid_layout

    text, first = spec["text"]
    oracle = DisplacedOracle(
        _model(name, spec),
        method,
        grid_layout(spec["patch"], n),
        text=text,
        text_first=first,
        warmup_steps=warmup,
    )
    return [oracle(**kw)[0] for kw in steps]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


def job(name: str, quick: bool, n_steps: int, requests: int) -> list[dict[str, Any]]:
    spec = (QUICK if quick else MODELS)[name]
    rank = dist.get_rank()
    steps = _trajectory(name, spec, n_steps)
    rows: list[dict[str, Any]] = []
    serial_outs: list[Any] = []
    for label, plan in METHODS:
        if (
            not plan
        ):  # serial: rank 0 alone; then on both ranks at once (what this machine can overlap)
            both = label != "serial"
            dist.barrier()
            res = _run(name, spec, plan, steps, 1, requests) if rank == 0 or both else None
            dist.barrier()
            if rank == 0:
                assert res is not None
                serial_outs = serial_outs or res["outs"]
            if res is not None:
                rows.append(
                    {
                        "model": name,
                        "method": label,
                        "rank": rank,
                        "warmup": 1,
                        "step_ms": res["step_ms"],
                        "bytes_per_step": 0,
                        "params": res["params"],
                    }
                )
            continue
        for warmup in (1, 2):
            if warmup == 2 and "fusion" not in label:
                continue
            res = _run(name, spec, plan, steps, warmup, requests)
            row = {
                "model": name,
                "method": label,
                "rank": rank,
                "warmup": warmup,
                "step_ms": res["step_ms"],
                "bytes_per_step": res["bytes_per_step"],
                "comm": res["comm"],
                "params": res["params"],
            }
            if rank == 0:
                if "fusion" in label:
                    method = "pipefusion" if "pipefusion" in plan else "distrifusion"
                    n = plan.get("patches", 2)
                    ref = _oracle(name, spec, method, n, steps, warmup)
                    row["oracle_err"] = max(
                        _rel(o, r) for o, r in zip(res["outs"], ref, strict=True)
                    )
                row["serial_diff"] = [
                    _rel(o, s) for o, s in zip(res["outs"], serial_outs, strict=True)
                ]
            dist.barrier()
            rows.append(row)
    return rows


def _markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    from xdit_compile.runtime.schedule import speedup_bound

    lines = ["# PipeFusion and DistriFusion vs serial and Ulysses (2 processes)", ""]
    for name in meta["models"]:
        spec = meta["specs"][name]
        mine = [r for r in rows if r["model"] == name]
        serial = next(r for r in mine if r["method"] == "serial")
        lines += [
            f"## {name}: {spec['desc']}",
            "",
            "| method | warmup steps | ms per step | speedup | bound N*M/(M+N-1) | efficiency | "
            "bytes/step rank 0 | bytes/step rank 1 | parameter bytes rank 0 / rank 1 | "
            "error vs oracle | difference from serial, per step |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for label, plan in METHODS:
            for warmup in (1, 2):
                rs = [r for r in mine if r["method"] == label and r["warmup"] == warmup]
                if not rs:
                    continue
                ms = max(r["step_ms"] for r in rs)
                speed = serial["step_ms"] / ms if "both" not in label else serial["step_ms"] / ms
                bound = speedup_bound(2, plan["patches"]) if "patches" in plan else None
                eff = f"{speed / bound:.2f}" if bound else "-"
                by = {r["rank"]: r for r in rs}
                b0, b1 = by[0]["bytes_per_step"], by.get(1, {}).get("bytes_per_step", "-")
                params = " / ".join(f"{by[k]['params']:,}" for k in sorted(by))
                r0 = by[0]
                err = f"{r0['oracle_err']:.1e}" if "oracle_err" in r0 else "-"
                diff = ", ".join(f"{d:.1e}" for d in r0.get("serial_diff", [])) or "-"
                lines.append(
                    f"| {label} | {warmup if 'fusion' in label else '-'} | {ms:.1f} | {speed:.2f}x "
                    f"| {f'{bound:.2f}' if bound else '-'} | {eff} | {b0:,} | "
                    f"{b1 if isinstance(b1, str) else f'{b1:,}'} | {params} | {err} | {diff} |"
                )
        lines.append("")
    lines += [
        "PipeFusion's efficiency is its speedup over serial divided by the bound N*M/(M+N-1). The "
        "bound assumes two ranks compute as fast together as one alone; the row 'serial, both "
        "ranks at once' measures what this machine gives: each rank's serial step when both run "
        "at the same time. The more patches overlap on the two ranks (larger M), the more of that "
        "slowdown PipeFusion pays, while its fill and drain shrink.",
        "",
        "## Method",
        "",
        f"fp32, CPU ({meta['cpu']}, {meta['cores']} cores), torch {meta['torch']}; 2 gloo "
        f"processes x 1 thread. The inputs of the {meta['steps']} steps come from one Euler "
        "trajectory of the plain model, the same for every method. Each method runs the "
        f"trajectory as {meta['requests'] + 1} requests; all but the first (which compiles) are "
        "timed: median ms over their steps after the warmup steps, the slower rank. Bytes: sent "
        "by each rank per step (runtime counter). Parameter bytes: distinct storages each rank "
        "holds after compiling (PipeFusion frees the other stage's parameters). Error vs oracle: "
        "max relative difference over all steps from the single-process displaced-K/V reference; "
        "difference from serial: per step (warmup steps are exact). Serial and Ulysses are exact.",
        "",
        f"This 2-core machine is shared: the load average was {meta['load_average'][0]:.0f} at the "
        "end of this run, so single timings move by 10-20%; compare rows of one table, not runs.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument(
        "--requests", type=int, default=3, help="timed requests (after one that compiles)"
    )
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--quick", action="store_true", help="tiny shapes (checks the script)")
    args = ap.parse_args()
    os.environ["XDIT_WORKER_THREADS"] = "1"
    from xdit_compile.testing.launcher import WorkerPool

    pool = WorkerPool(2)
    rows: list[dict[str, Any]] = []
    t0 = time.time()
    try:
        for name in args.models:
            for per_rank in pool.run(
                job, name, args.quick, args.steps, args.requests, timeout=3600
            ):
                for row in per_rank:
                    print(json.dumps({k: v for k, v in row.items() if k != "comm"}), flush=True)
                    rows.append(row)
    finally:
        pool.close()
    specs = QUICK if args.quick else MODELS
    meta = {
        "load_average": os.getloadavg(),
        "steps": args.steps,
        "requests": args.requests,
        "models": args.models,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "total_s": round(time.time() - t0, 1),
        "specs": {n: specs[n] for n in args.models},
    }
    OUT.mkdir(exist_ok=True)
    suffix = "_quick" if args.quick else ""
    (OUT / f"displaced{suffix}.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=2, default=str)
    )
    (OUT / f"displaced{suffix}.md").write_text(_markdown(rows, meta))
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
