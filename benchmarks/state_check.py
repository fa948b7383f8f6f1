"""Cost of the per-call model-state check at full size, against the forward it guards.

Every call of a parallel module first checks that the model's Python-side state (LoRA adapters,
processors, hooks, parameter objects, train/eval: :mod:`xdit_compile.compiler.state`) is the one its
graphs were compiled for. This measures that per-call check (:meth:`StateWatch.quick`: the mutation
counter of :mod:`xdit_compile.compiler.watch`, the processors' settings, the global state), the full
snapshot comparison that backs it where the counter moved and at every new request
(:meth:`StateWatch.matches`), and the fingerprint taken when the state did change, on full-size
configs built on the meta device (the module tree and parameter objects of the real model, no
weights), plain and with two PEFT LoRA adapters (rank 16) on every attention projection, and
compares it with the forward: the cost model's predicted H200 forward (bf16, the fastest exact plan
at 1 and at 8 GPUs) at the model's published resolution.

    python benchmarks/state_check.py [--models flux-dev,...] [--calls 2000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

MODELS = {
    "flux-dev": dict(height=1024, width=1024),
    "sd3.5": dict(height=1024, width=1024),
    "qwen-image": dict(height=1024, width=1024),
    "wan2.1": dict(height=480, width=832, frames=81),
    "hunyuan-video": dict(height=720, width=1280, frames=129),
}
TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
]


def _model(name: str, lora: bool) -> torch.nn.Module:
    import diffusers

    from xdit_compile.models import get_entry

    entry = get_entry(name)
    with torch.device("meta"):
        model = getattr(diffusers, entry.cls_name)(**entry.config("full")).eval()
    if lora:
        from peft import LoraConfig

        present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()} | {
            n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1]
            for n, _ in model.named_modules()
            if n.count(".") >= 1
        }
        targets = [t for t in TARGETS if t in present]
        for adapter in ("a", "b"):
            model.add_adapter(
                LoraConfig(r=16, lora_alpha=16, target_modules=targets), adapter_name=adapter
            )
        model.set_adapters(["a", "b"], [1.0, 0.5])
    return model


def _median_us(fn: Any, calls: int) -> float:
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(times)


def _check_us(model: torch.nn.Module, calls: int) -> dict[str, Any]:
    from xdit_compile.compiler.state import StateWatch, fingerprint

    watch = StateWatch.of(model)
    assert watch.quick() and watch.matches()
    t0 = time.perf_counter()
    fingerprint(model)
    fp_ms = (time.perf_counter() - t0) * 1e3
    return {
        "modules": len(watch.snapshot.dicts),
        "tensors": len(watch.snapshot.tensors),
        "objects": len(watch.snapshot.objects),
        "check_us": _median_us(watch.quick, calls),
        "full_us": _median_us(watch.matches, max(1, calls // 20)),
        "fingerprint_ms": fp_ms,
    }


def _forward_ms(name: str, geo: dict[str, int]) -> dict[str, float]:
    from xdit_compile.analysis.planner import rank_plans, zoo_workload

    load = zoo_workload(name, **geo)
    out = {}
    for world in (1, 8):
        best = next(
            c
            for c in rank_plans(load, world, "h200-sxm", steps=1, approximate=False)
            if c.prediction is not None
        )
        p = best.prediction
        out[f"forward_ms_{world}gpu"] = (p.compute + sum(p.comm.values())) * 1e3
        out[f"plan_{world}gpu"] = str(best.plan)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--out", default="benchmarks/results/state_check")
    a = ap.parse_args()
    rows = []
    for name in a.models.split(","):
        fwd = _forward_ms(name, MODELS[name])
        for lora in (False, True):
            row = {"model": name, "lora": lora, **_check_us(_model(name, lora), a.calls), **fwd}
            for world in (1, 8):
                row[f"share_{world}gpu"] = row["check_us"] / 1e3 / row[f"forward_ms_{world}gpu"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    out.with_suffix(".md").write_text(_markdown(rows))
    print(f"wrote {out}.md / .json")


def _markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "# The per-call model-state check at full size",
        "",
        f"`python benchmarks/state_check.py` (torch {torch.__version__}, this machine's CPU, one "
        "thread of Python). Per call: median of 5 runs of `StateWatch.quick()`, the check every "
        "call makes. Full: `StateWatch.matches()`, the whole snapshot compared with the live tree "
        "(only where the mutation counter moved, and at each new request). Fingerprint: the "
        "hashable state taken when it did change. Forward: the cost model's H200 prediction for "
        "one transformer call (bf16, fastest exact plan) at the published resolution. LoRA: two "
        "PEFT adapters (r=16) on every attention projection, both active.",
        "",
        "| model | LoRA | modules | per call (µs) | share of forward, 1 GPU | share, 8 GPUs | "
        "full (ms) | fingerprint (ms) | forward 1 / 8 GPUs (ms) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {'2 adapters' if r['lora'] else '-'} | {r['modules']:,} | "
            f"{r['check_us']:.1f} | {r['share_1gpu']:.4%} | {r['share_8gpu']:.3%} | "
            f"{r['full_us'] / 1e3:.1f} | {r['fingerprint_ms']:.0f} | {r['forward_ms_1gpu']:.0f} / "
            f"{r['forward_ms_8gpu']:.1f} ({r['plan_8gpu'].removeprefix('Plan(').split(',')[0]}) |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
