"""Degree 1: what ``parallelize(model, Plan())`` costs against the plain diffusers model.

One process (a one-rank group), the same weights and inputs for three ways to run a forward:

* eager: the diffusers model itself;
* xdit_compile: ``parallelize(model, Plan())`` (the captured, rewritten graph run as an FX
  GraphModule);
* xdit_compile + inductor: ``parallelize(model, Plan(compile="inductor"))``.

For each: the first call (capture + passes, + inductor's compile), the median of ``--iters``
forwards after ``--warmup`` (the three take turns, one forward each per round, so drift hits
all alike), the peak memory of one forward (CUDA: ``max_memory_allocated``), and the largest
difference from the eager output. ``--capture-times`` also captures every zoo model at its
published size on the ``meta`` device (no weights, full block count) and times the export and
the passes of a ``ulysses=2`` plan (what a first call costs before any kernel runs).

    python benchmarks/degree1.py                       # CPU: mid-size Flux and PixArt-Sigma
    python benchmarks/degree1.py --capture-times       # + every zoo model at full size (meta)
    python benchmarks/degree1.py --device cuda --size full --dtype bfloat16 --out gpu_degree1
                                                       # benchmarks/gpu/run.sh

Writes ``results/<out>.json`` and ``.md`` (``--out``, default ``degree1_cpu``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

OUT = Path(__file__).parent / "results"

#: Mid-size configs for CPU runs (hidden 512 = 4 heads x 128, 2 blocks per stack, 1024 image
#: tokens): the shapes of ``bench_vs_diffusers_cp.py``.
MID: dict[str, dict[str, Any]] = {
    "flux-dev": {
        "config": {
            "num_attention_heads": 4,
            "attention_head_dim": 128,
            "axes_dims_rope": (16, 56, 56),
            "num_layers": 2,
            "num_single_layers": 2,
            "joint_attention_dim": 512,
            "pooled_projection_dim": 256,
        },
        "inputs": {"height": 64, "width": 64, "text_len": 256},
    },
    "pixart-sigma": {
        "config": {
            "num_attention_heads": 4,
            "attention_head_dim": 128,
            "num_layers": 4,
            "cross_attention_dim": 512,
            "caption_channels": 512,
            "sample_size": 64,
        },
        "inputs": {"height": 64, "width": 64, "text_len": 256},
    },
}
#: 1024 px (latent 128 x 128) at the published sizes.
FULL_INPUTS: dict[str, dict[str, Any]] = {
    "flux-dev": {"height": 128, "width": 128},
    "pixart-sigma": {"height": 128, "width": 128},
}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _first(out: Any) -> torch.Tensor:
    while not isinstance(out, torch.Tensor):
        out = out[0] if isinstance(out, tuple | list) else out.sample
    return out


def _build(
    name: str, size: str, dtype: torch.dtype, device: str
) -> tuple[torch.nn.Module, dict[str, Any]]:
    from xdit_compile.models import build_model, example_inputs

    if size == "mid":
        spec = MID[name]
        model = build_model(name, "full", dtype=dtype, **spec["config"])
        inputs_kw = spec["inputs"]
    else:
        # Full size: the random init runs on the device (a 12B model in fp32 on a CPU is slow).
        with torch.device(device):
            model = build_model(name, size, dtype=dtype)
        inputs_kw = FULL_INPUTS.get(name, {}) if size == "full" else {}
    model = model.to(device)
    inputs = example_inputs(name, model, size="full" if size != "tiny" else "tiny", **inputs_kw)
    return model, inputs


def bench_model(
    name: str, size: str, dtype: torch.dtype, device: str, iters: int, warmup: int
) -> dict[str, Any]:
    import xdit_compile as xc

    model, inputs = _build(name, size, dtype, device)
    params = sum(p.numel() for p in model.parameters())
    runs: dict[str, Any] = {"eager": model}
    firsts: dict[str, float] = {}
    peaks: dict[str, float | None] = {}
    outs: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for label, plan in (
            ("xdit_compile", xc.Plan()),
            ("xdit_compile + inductor", xc.Plan(compile="inductor")),
        ):
            runs[label] = xc.parallelize(model, plan)
        for label, fn in runs.items():  # first calls: capture, passes, inductor's compile
            _sync(device)
            t = time.perf_counter()
            outs[label] = _first(fn(**inputs)).float()
            _sync(device)
            firsts[label] = time.perf_counter() - t
        for _ in range(warmup):
            for fn in runs.values():
                fn(**inputs)
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(iters):
            for label, fn in runs.items():
                _sync(device)
                t = time.perf_counter()
                fn(**inputs)
                _sync(device)
                times[label].append(time.perf_counter() - t)
        for label, fn in runs.items():
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
                fn(**inputs)
                _sync(device)
                peaks[label] = torch.cuda.max_memory_allocated() / 2**30
            else:
                peaks[label] = None
    ref = outs["eager"]
    eager_ms = 1e3 * statistics.median(times["eager"])
    rows = []
    for label in runs:
        ms = 1e3 * statistics.median(times[label])
        rows.append(
            {
                "run": label,
                "median_ms": ms,
                "vs_eager": ms / eager_ms,
                "first_call_s": firsts[label],
                "peak_gib": peaks[label],
                "times_ms": [1e3 * t for t in times[label]],
                "max_rel_diff": float(
                    (outs[label] - ref).abs().max() / ref.abs().max().clamp_min(1e-30)
                ),
            }
        )
    del runs, model
    return {
        "model": name,
        "params": params,
        "tokens_in": {k: list(v.shape) for k, v in inputs.items() if isinstance(v, torch.Tensor)},
        "rows": rows,
    }


def capture_times(models: list[str]) -> list[dict[str, Any]]:
    """Export + passes (ulysses=2, rank 0, no process group) of every zoo model at full size on
    the meta device."""
    from xdit_compile.analysis.planner import _capture_for_accounting
    from xdit_compile.compiler.driver import run_passes
    from xdit_compile.compiler.pass_list import build_passes
    from xdit_compile.models import build_model, list_models
    from xdit_compile.models.inputs import InputSpec
    from xdit_compile.models.zoo import get_entry
    from xdit_compile.passes.context import PassContext
    from xdit_compile.plan import Plan
    from xdit_compile.runtime.mesh import MeshInfo

    out = []
    for name in models or list_models():
        try:
            with torch.device("meta"):
                model = build_model(name, "full", dtype=torch.bfloat16)
            blocks = sum(
                int(v)
                for k, v in dict(getattr(model, "config", {}) or {}).items()
                if k.startswith("num_") and k.endswith("layers") and isinstance(v, int)
            )
            # Real CPU inputs (the capture gets meta copies; Mochi's valid text length is probed
            # on the real mask).
            entry = get_entry(name)
            geo = entry.latent_size("full")
            frames = (
                int(dict(model.config).get("video_length", geo.frames or 1))
                if entry.video
                else None
            )
            spec = InputSpec(
                batch=1,
                height=geo.height,
                width=geo.width,
                frames=frames,
                text_len=geo.text_len,
                dtype=torch.bfloat16,
                device=torch.device("cpu"),
            )
            inputs = entry.input_builder(model, spec, torch.Generator().manual_seed(0))
            t = time.perf_counter()
            gm = _capture_for_accounting(model, inputs)
            t_capture = time.perf_counter() - t
            nodes = len(gm.graph.nodes)
            plan = Plan(ulysses=2)
            ctx = PassContext(plan=plan, mesh=MeshInfo.of(plan, 0, key="degree1"))
            t = time.perf_counter()
            run_passes(gm, build_passes(plan), ctx, verify=False)
            t_passes = time.perf_counter() - t
            out.append(
                {
                    "model": name,
                    "blocks": blocks,
                    "nodes": nodes,
                    "capture_s": t_capture,
                    "passes_s": t_passes,
                }
            )
        except Exception as e:  # noqa: BLE001 - recorded per model
            out.append(
                {"model": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
            )
        print(out[-1], flush=True)
    return out


def _markdown(res: dict[str, Any]) -> str:
    a = res["args"]
    lines = [
        f"# Degree 1: xdit_compile vs the eager diffusers model ({a['device']}, {a['size']}, "
        f"{a['dtype']})",
        "",
        f"`python benchmarks/degree1.py {' '.join(res['argv'])}`; {res['machine']}; torch "
        f"{res['torch']}.",
        f"Median of {a['iters']} forwards after {a['warmup']} warmup rounds, the runs taking "
        "turns.",
        "",
        "| model | run | median ms | vs eager | first call s | peak GiB | max rel diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in res["models"]:
        for r in m["rows"]:
            peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
            lines.append(
                f"| {m['model']} | {r['run']} | {r['median_ms']:.1f} | {r['vs_eager']:.3f} | "
                f"{r['first_call_s']:.1f} | {peak} | {r['max_rel_diff']:.1e} |"
            )
    if res.get("capture"):
        lines += [
            "",
            "## Capture and passes at the published size (meta device, no weights)",
            "",
            "Export of the whole model and the passes of `Plan(ulysses=2)` for rank 0.",
            "",
            "| model | blocks | graph nodes | capture s | passes s |",
            "|---|---|---|---|---|",
        ]
        for c in res["capture"]:
            if "error" in c:
                lines.append(f"| {c['model']} | | | {c['error']} | |")
            else:
                lines.append(
                    f"| {c['model']} | {c['blocks']} | {c['nodes']} | {c['capture_s']:.1f} | "
                    f"{c['passes_s']:.1f} |"
                )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=["flux-dev", "pixart-sigma"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", choices=["tiny", "mid", "full"], default="mid")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    p.add_argument(
        "--capture-times", action="store_true", help="also time capture + passes of every zoo model"
    )
    p.add_argument(
        "--capture-models", nargs="*", default=[], help="with --capture-times: these only"
    )
    p.add_argument(
        "--out", default=None, help="results/<out>.json and .md (default degree1_<device>)"
    )
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    os.environ.setdefault("MASTER_PORT", "29533")
    import xdit_compile as xc

    xc.init_distributed()
    res: dict[str, Any] = {
        "argv": sys.argv[1:] if argv is None else argv,
        "args": vars(a),
        "machine": f"{platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads"
        + (f", {torch.cuda.get_device_name()}" if a.device == "cuda" else ""),
        "torch": torch.__version__,
        "models": [],
    }
    for name in a.models:
        res["models"].append(
            bench_model(name, a.size, _DTYPES[a.dtype], a.device, a.iters, a.warmup)
        )
        for r in res["models"][-1]["rows"]:
            print(
                f"{name:14s} {r['run']:24s} {r['median_ms']:9.1f} ms  x{r['vs_eager']:.3f}  "
                f"first {r['first_call_s']:.1f} s  diff {r['max_rel_diff']:.1e}",
                flush=True,
            )
    if a.capture_times:
        res["capture"] = capture_times(a.capture_models)
    out = a.out or f"degree1_{a.device}"
    OUT.mkdir(exist_ok=True)
    (OUT / f"{out}.json").write_text(json.dumps(res, indent=1))
    (OUT / f"{out}.md").write_text(_markdown(res))
    print(_markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
