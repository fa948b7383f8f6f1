"""Predicted vs measured latency of every plan this machine can run (2 gloo processes x 1 thread).

1. For mid-size PixArt-Sigma, SD3 and Flux configs (hidden 512, a CFG batch of 2 where the
   pipeline uses CFG) every plan of 2 ranks is run for real (``compare_zoo_model``: median of
   ``--iters`` forwards after a warmup, serial timed alone on rank 0).
2. Right after each row's timing, the same two processes calibrate the machine
   (``xdit_compile.analysis.cost.measure_group``: matmul, attention, memory, op dispatch alone and
   with both ranks at once, the gloo all-to-all), and the cost model predicts the row from the
   planner's accounting of the same model and inputs under that profile.
3. Writes ``results/cost_vs_measured_cpu.{json,md}`` and ``cost_vs_measured_cpu.png`` (measured
   and predicted per plan, the serial time as a line).

    python benchmarks/cost_vs_measured_cpu.py [--iters 5] [--models pixart-sigma sd3 flux-dev]

PipeFusion and DistriFusion forwards are steady-state steps (after the warmup step); the
prediction is the cost model's per-step time for them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).parent / "results"

#: Mid-size configs (hidden 512) and inputs (latent pixels); ``cfg``: the pipeline's batch holds
#: both CFG branches.
MODELS: dict[str, dict[str, Any]] = {
    "pixart-sigma": {
        "config": {
            "num_attention_heads": 8,
            "attention_head_dim": 64,
            "num_layers": 4,
            "cross_attention_dim": 512,
        },
        "inputs": {"height": 64, "width": 64, "text_len": 120},
        "cfg": True,
        "desc": "1024 image tokens, 4 blocks, cross-attention to 120 text tokens",
    },
    "sd3": {
        "config": {
            "num_attention_heads": 8,
            "attention_head_dim": 64,
            "num_layers": 4,
            "caption_projection_dim": 512,
            "pos_embed_max_size": 96,
        },
        "inputs": {"height": 64, "width": 64, "text_len": 77},
        "cfg": True,
        "desc": "1024 image tokens + 77+77 text tokens, joint attention, 4 blocks",
    },
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
        "cfg": False,
        "desc": "1024 image tokens + 256 text tokens, joint attention, 2+2 blocks",
    },
}
PLANS: list[dict[str, Any]] = [
    {"ulysses": 2},
    {"ring": 2},
    {"cfg": 2},
    {"pipefusion": 2},
    {"pipefusion": 2, "patches": 4},
    {"distrifusion": 2},
]


def _job(name: str, plan_kw: dict[str, Any], spec: dict[str, Any], iters: int) -> Any:
    from xdit_compile.analysis import cost
    from xdit_compile.jobs.compare import compare_zoo_model
    from xdit_compile.plan import Plan

    inputs = {**spec["inputs"], "batch": 2 if spec["cfg"] else 1}
    out = compare_zoo_model(
        name,
        Plan(**plan_kw),
        size="full",
        iters=iters,
        warmup=1,
        config=spec["config"],
        inputs=inputs,
    ).as_dict()
    # Calibrate right here, right after the timing, in the same two processes: this shared
    # machine's speed drifts by tens of percent within minutes, so a profile measured once at
    # the start of a long run describes none of its rows.
    out["profile"] = cost.measure_group(threads=1).as_dict()
    return out


def _workload(name: str, spec: dict[str, Any]) -> Any:
    from xdit_compile.analysis import planner
    from xdit_compile.models import build_model, example_inputs

    model = build_model(name, "full", **spec["config"])
    inputs = example_inputs(
        name, model, size="full", batch=2 if spec["cfg"] else 1, **spec["inputs"]
    )
    return planner.workload(model, inputs, cfg_in_batch=spec["cfg"])


def _predict_row(row: dict[str, Any], load: Any, hw: Any) -> None:
    """Fill ``row``'s predictions (its plan and serial) from ``load`` under profile ``hw``."""
    from xdit_compile.analysis import cost
    from xdit_compile.plan import Plan

    for key, plan in (("predicted", _plan_of(row["plan"])), ("serial_predicted", Plan())):
        w = load.work(plan)
        p = None if isinstance(w, str) else cost.predict(plan, w, hw, steps=1)
        row[f"{key}_ms"] = p.step * 1e3 if p else None
        if key == "predicted":
            row["predicted_bytes"] = p.comm_bytes if p else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument(
        "--profile",
        default=None,
        help="predict every row with this calibrated profile instead of the one measured with it",
    )
    ap.add_argument(
        "--predict-only",
        action="store_true",
        help=(
            "keep the measurements and profiles of results/cost_vs_measured_cpu.json, redo the "
            "predictions"
        ),
    )
    a = ap.parse_args()
    if a.predict_only:
        return _repredict(a.profile)
    os.environ.setdefault("XDIT_WORKER_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    from xdit_compile.analysis import cost
    from xdit_compile.plan import Plan
    from xdit_compile.testing.launcher import WorkerPool

    OUT.mkdir(exist_ok=True)
    fixed = cost.get_hardware(a.profile) if a.profile else None
    pool = WorkerPool(2)
    rows: list[dict[str, Any]] = []
    try:
        for name in a.models:
            spec = MODELS[name]
            load = _workload(name, spec)
            for kw in PLANS:
                if kw.get("cfg") and not spec["cfg"]:
                    continue
                res = pool.run(_job, name, kw, spec, a.iters, timeout=1800)
                hw = fixed or cost.Hardware.from_dict(res[0]["profile"])
                row = {
                    "model": name,
                    "plan": str(Plan(**kw)),
                    "measured_ms": max(r["parallel_ms"] for r in res),
                    "serial_ms": res[0]["serial_ms"],
                    "rel_error": max(r["rel_error"] for r in res),
                    "bytes": res[0]["bytes_per_forward"],
                    "profile": hw.as_dict(),
                }
                _predict_row(row, load, hw)
                rows.append(row)
                err = (
                    (row["predicted_ms"] / row["measured_ms"] - 1) * 100
                    if row["predicted_ms"]
                    else float("nan")
                )
                print(
                    f"{name:<13} {row['plan']:<55} measured {row['measured_ms']:8.1f} ms  "
                    f"predicted {row['predicted_ms']:8.1f} ms ({err:+.0f}%)  serial "
                    f"{row['serial_ms']:8.1f} / {row['serial_predicted_ms']:8.1f} ms  "
                    f"[{_rates(hw)}]",
                    flush=True,
                )
    finally:
        pool.close()
    res_all = {
        "models": {k: MODELS[k]["desc"] for k in a.models},
        "iters": a.iters,
        "fixed_profile": a.profile,
        "rows": rows,
    }
    _write(res_all)
    return 0


def _rates(hw: Any) -> str:
    sh = hw.shared or {}
    return (
        f"mm {hw.matmul / 1e9:.0f}/{sh.get('matmul', 0) / 1e9:.0f} GFLOP/s, attn "
        f"{hw.attention / 1e9:.0f}/{sh.get('attention', 0) / 1e9:.0f}, mem "
        f"{hw.memory / 1e9:.0f}/{sh.get('memory', 0) / 1e9:.0f} GB/s, op "
        f"{hw.op_overhead * 1e6:.1f} us, link {hw.levels[0][1].bandwidth / 1e9:.2f} GB/s + "
        f"{hw.levels[0][1].latency * 1e6:.0f} us"
    )


def _write(res: dict[str, Any]) -> None:
    (OUT / "cost_vs_measured_cpu.json").write_text(json.dumps(res, indent=1, default=str))
    (OUT / "cost_vs_measured_cpu.md").write_text(_markdown(res))
    _plot(res, OUT / "cost_vs_measured_cpu.png")
    print(_markdown(res))


def _repredict(profile: str | None) -> int:
    """The predictions again (after a change to the accounting or the cost model) for the
    measured rows of the last run, each with the profile measured with it (or ``profile``)."""
    from xdit_compile.analysis import cost

    res = json.loads((OUT / "cost_vs_measured_cpu.json").read_text())
    fixed = cost.get_hardware(profile) if profile else None
    for name in res["models"]:
        load = _workload(name, MODELS[name])
        for r in res["rows"]:
            if r["model"] == name:
                hw = fixed or cost.Hardware.from_dict(r["profile"])
                r["profile"] = hw.as_dict()
                _predict_row(r, load, hw)
    res["fixed_profile"] = profile
    _write(res)
    return 0


def _plan_of(plan_str: str) -> Any:
    from xdit_compile.plan import Plan

    for kw in [{}] + PLANS:
        if str(Plan(**kw)) == plan_str:
            return Plan(**kw)
    raise ValueError(f"no plan of this benchmark prints as {plan_str}")


def _markdown(res: dict[str, Any]) -> str:
    rows = res["rows"]

    def span(get: Any, scale: float) -> str:
        v = [get(r["profile"]) / scale for r in rows]
        return f"{min(v):.1f}-{max(v):.1f}" if v else "-"

    out = [
        "# Cost model vs measured latency on this CPU (2 gloo processes x 1 thread)",
        "",
        f"Script: `benchmarks/cost_vs_measured_cpu.py` (median of {res.get('iters', '?')} forwards "
        "after a warmup; serial timed alone on rank 0). "
        + (
            f"Every row predicted with the fixed profile `{res['fixed_profile']}`."
            if res.get("fixed_profile")
            else "Each row is predicted with a profile measured by "
            "`xdit_compile.analysis.cost.measure_group()` in the same two processes right after "
            "that row's timing (this shared machine's speed drifts by tens of percent within "
            "minutes; medians of micro-benchmarks, never the model's own forwards). Across the "
            f"rows: matmul {span(lambda h: h['matmul'], 1e9)} GFLOP/s alone and "
            f"{span(lambda h: h['shared']['matmul'], 1e9)} per rank with both ranks computing, "
            f"attention {span(lambda h: h['attention'], 1e9)} / "
            f"{span(lambda h: h['shared']['attention'], 1e9)} GFLOP/s, memory "
            f"{span(lambda h: h['memory'], 1e9)} / {span(lambda h: h['shared']['memory'], 1e9)} "
            f"GB/s, {span(lambda h: h['op_overhead'], 1e-6)} us per op, gloo all-to-all "
            f"{span(lambda h: h['levels'][0][1]['bandwidth'], 1e9)} GB/s + "
            f"{span(lambda h: h['levels'][0][1]['latency'], 1e-6)} us per call."
        ),
        "",
    ]
    for k, d in res["models"].items():
        out.append(f"- **{k}**: {d}")
    out += [
        "",
        "| model | plan | measured ms | predicted ms | error | serial measured / predicted ms | "
        "bytes/rank measured / predicted | max rel. diff vs serial |",
        "|---|---|---|---|---|---|---|---|",
    ]
    errs, serr = [], {}
    for r in res["rows"]:
        e = r["predicted_ms"] / r["measured_ms"] - 1 if r["predicted_ms"] else None
        if e is not None:
            errs.append(abs(e))
        serr[r["model"]] = r["serial_predicted_ms"] / r["serial_ms"] - 1
        out.append(
            f"| {r['model']} | {r['plan'].replace('Plan(', '').replace(', compile=None)', '')} | "
            f"{r['measured_ms']:.1f} | {r['predicted_ms']:.1f} | {e * 100:+.0f}% | "
            f"{r['serial_ms']:.1f} / {r['serial_predicted_ms']:.1f} | {r['bytes']:,} / "
            f"{int(r['predicted_bytes'] or 0):,} | {r['rel_error']:.1e} |"
        )
    out += [
        "",
        f"Mean absolute error over {len(errs)} parallel plans: "
        f"**{100 * sum(errs) / max(len(errs), 1):.0f}%** (max {100 * max(errs, default=0):.0f}%); "
        "serial: " + ", ".join(f"{k} {v * 100:+.0f}%" for k, v in serr.items()) + ".",
        "",
    ]
    return "\n".join(out)


def _plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(res["models"])
    fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 4), squeeze=False)
    for ax, m in zip(axes[0], models, strict=True):
        rows = [r for r in res["rows"] if r["model"] == m]
        labels = [
            r["plan"]
            .replace("Plan(", "")
            .replace(", compile=None)", "")
            .replace(", warmup_steps=1", "")
            for r in rows
        ]
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], [r["measured_ms"] for r in rows], 0.4, label="measured")
        ax.bar([i + 0.2 for i in x], [r["predicted_ms"] or 0 for r in rows], 0.4, label="predicted")
        if rows:
            ax.axhline(rows[0]["serial_ms"], color="k", ls="--", lw=0.8, label="serial (measured)")
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, rotation=40, ha="right", fontsize=7)
        ax.set_title(m)
        ax.set_ylabel("ms per forward")
        ax.legend(fontsize=7)
    fig.suptitle("2 gloo processes x 1 thread: measured vs cost model")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
