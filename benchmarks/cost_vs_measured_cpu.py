"""Predicted vs measured latency of every plan this machine can run (2 gloo processes x 1 thread).

1. ``xdit_compile.cost.calibrate()`` measures this machine (matmul, attention, memory, op
   dispatch, and the gloo all-to-all between two local processes): ``results/cpu_profile.json``.
2. For mid-size PixArt-Sigma, SD3 and Flux configs (hidden 512, a CFG batch of 2 where the
   pipeline uses CFG) every plan of 2 ranks is run for real (``compare_zoo_model``: median of
   ``--iters`` forwards after a warmup, serial timed alone on rank 0) and predicted by the cost
   model from the planner's accounting of the same model and inputs.
3. Writes ``results/cost_vs_measured_cpu.{json,md}`` and ``cost_vs_measured_cpu.png`` (measured
   and predicted per plan, the serial time as a line).

    python benchmarks/cost_vs_measured_cpu.py [--iters 3] [--models pixart-sigma sd3 flux-dev]

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
    "pixart-sigma": {"config": {"num_attention_heads": 8, "attention_head_dim": 64, "num_layers": 4,
                                "cross_attention_dim": 512},
                     "inputs": {"height": 64, "width": 64, "text_len": 120}, "cfg": True,
                     "desc": "1024 image tokens, 4 blocks, cross-attention to 120 text tokens"},
    "sd3": {"config": {"num_attention_heads": 8, "attention_head_dim": 64, "num_layers": 4,
                       "caption_projection_dim": 512, "pos_embed_max_size": 96},
            "inputs": {"height": 64, "width": 64, "text_len": 77}, "cfg": True,
            "desc": "1024 image tokens + 77+77 text tokens, joint attention, 4 blocks"},
    "flux-dev": {"config": {"num_attention_heads": 4, "attention_head_dim": 128, "axes_dims_rope": (16, 56, 56),
                            "num_layers": 2, "num_single_layers": 2, "joint_attention_dim": 512,
                            "pooled_projection_dim": 256},
                 "inputs": {"height": 64, "width": 64, "text_len": 256}, "cfg": False,
                 "desc": "1024 image tokens + 256 text tokens, joint attention, 2+2 blocks"},
}
PLANS: list[dict[str, Any]] = [
    {"ulysses": 2}, {"ring": 2}, {"cfg": 2}, {"pipefusion": 2}, {"pipefusion": 2, "patches": 4},
    {"distrifusion": 2},
]


def _job(name: str, plan_kw: dict[str, Any], spec: dict[str, Any], iters: int) -> Any:
    from xdit_compile.plan import Plan
    from xdit_compile.runner import compare_zoo_model

    inputs = {**spec["inputs"], "batch": 2 if spec["cfg"] else 1}
    return compare_zoo_model(name, Plan(**plan_kw), size="full", iters=iters, warmup=1, config=spec["config"],
                             inputs=inputs).as_dict()


def _predict(name: str, spec: dict[str, Any], plans: list[dict[str, Any]], hw: Any) -> dict[str, Any]:
    from xdit_compile import cost, planner
    from xdit_compile.models import build_model, example_inputs
    from xdit_compile.plan import Plan

    model = build_model(name, "full", **spec["config"])
    inputs = example_inputs(name, model, size="full", batch=2 if spec["cfg"] else 1, **spec["inputs"])
    load = planner.workload(model, inputs, cfg_in_batch=spec["cfg"])
    out: dict[str, Any] = {}
    for kw in [{}] + plans:
        plan = Plan(**kw)
        w = load.work(plan)
        out[str(plan)] = None if isinstance(w, str) else cost.predict(plan, w, hw, steps=1).as_dict()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--profile", default=None, help="use this calibrated profile instead of measuring")
    ap.add_argument("--predict-only", action="store_true",
                    help="keep the measurements and profile of results/cost_vs_measured_cpu.json, redo the predictions")
    a = ap.parse_args()
    if a.predict_only:
        return _repredict()
    os.environ.setdefault("XDIT_WORKER_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    from xdit_compile import cost
    from xdit_compile.testing import WorkerPool

    OUT.mkdir(exist_ok=True)
    if a.profile:
        hw = cost.get_hardware(a.profile)
    else:
        hw = cost.calibrate(threads=1)
        (OUT / "cpu_profile.json").write_text(json.dumps(hw.as_dict(), indent=1))
    print(f"profile: matmul {hw.matmul / 1e9:.1f} GFLOP/s, attention {hw.attention / 1e9:.1f} GFLOP/s, memory "
          f"{hw.memory / 1e9:.1f} GB/s, op {hw.op_overhead * 1e6:.1f} us, link {hw.levels[0][1].bandwidth / 1e9:.2f} "
          f"GB/s + {hw.levels[0][1].latency * 1e6:.0f} us", flush=True)
    pool = WorkerPool(2)
    rows: list[dict[str, Any]] = []
    try:
        for name in a.models:
            spec = MODELS[name]
            pred = _predict(name, spec, PLANS, hw)
            serial_pred = pred["Plan(serial, compile=None)"]
            for kw in PLANS:
                if kw.get("cfg") and not spec["cfg"]:
                    continue
                res = pool.run(_job, name, kw, spec, a.iters, timeout=1800)
                plan_s = next(k for k in pred if k != "Plan(serial, compile=None)" and _same(k, kw))
                p = pred[plan_s]
                measured = max(r["parallel_ms"] for r in res)
                serial = res[0]["serial_ms"]
                row = {"model": name, "plan": plan_s, "measured_ms": measured, "serial_ms": serial,
                       "predicted_ms": p["step_s"] * 1e3 if p else None,
                       "serial_predicted_ms": serial_pred["step_s"] * 1e3,
                       "rel_error": max(r["rel_error"] for r in res), "bytes": res[0]["bytes_per_forward"],
                       "predicted_bytes": p["comm_bytes"] if p else None}
                rows.append(row)
                err = (row["predicted_ms"] / measured - 1) * 100 if row["predicted_ms"] else float("nan")
                print(f"{name:<13} {plan_s:<55} measured {measured:8.1f} ms  predicted {row['predicted_ms']:8.1f} ms "
                      f"({err:+.0f}%)  serial {serial:8.1f} / {row['serial_predicted_ms']:8.1f} ms", flush=True)
    finally:
        pool.close()
    res_all = {"profile": hw.as_dict(), "models": {k: MODELS[k]["desc"] for k in a.models}, "rows": rows}
    (OUT / "cost_vs_measured_cpu.json").write_text(json.dumps(res_all, indent=1, default=str))
    (OUT / "cost_vs_measured_cpu.md").write_text(_markdown(res_all))
    _plot(res_all, OUT / "cost_vs_measured_cpu.png")
    print(_markdown(res_all))
    return 0


def _repredict() -> int:
    """The predictions again (after a change to the accounting or the cost model) for the
    measured rows of the last run, with its calibrated profile."""
    from xdit_compile import cost

    res = json.loads((OUT / "cost_vs_measured_cpu.json").read_text())
    hw = cost.Hardware.from_dict(res["profile"])
    if not hw.shared:  # a profile from before calibrate() measured the ranks running together
        hw = cost.calibrate(threads=1)
        res["profile"] = hw.as_dict()
        (OUT / "cpu_profile.json").write_text(json.dumps(hw.as_dict(), indent=1))
    for name in res["models"]:
        spec = MODELS[name]
        pred = _predict(name, spec, PLANS, hw)
        for r in res["rows"]:
            if r["model"] == name:
                p = pred[r["plan"]]
                r["predicted_ms"] = p["step_s"] * 1e3 if p else None
                r["predicted_bytes"] = p["comm_bytes"] if p else None
                r["serial_predicted_ms"] = pred["Plan(serial, compile=None)"]["step_s"] * 1e3
    (OUT / "cost_vs_measured_cpu.json").write_text(json.dumps(res, indent=1, default=str))
    (OUT / "cost_vs_measured_cpu.md").write_text(_markdown(res))
    _plot(res, OUT / "cost_vs_measured_cpu.png")
    print(_markdown(res))
    return 0


def _same(plan_str: str, kw: dict[str, Any]) -> bool:
    from xdit_compile.plan import Plan

    return plan_str == str(Plan(**kw))


def _markdown(res: dict[str, Any]) -> str:
    hw = res["profile"]
    link = hw["levels"][0][1]
    out = ["# Cost model vs measured latency on this CPU (2 gloo processes x 1 thread)", "",
           "Script: `benchmarks/cost_vs_measured_cpu.py`. Profile from `xdit_compile.cost.calibrate()`: "
           f"matmul {hw['matmul'] / 1e9:.1f} GFLOP/s, attention {hw['attention'] / 1e9:.1f} GFLOP/s, memory "
           f"{hw['memory'] / 1e9:.1f} GB/s, {hw['op_overhead'] * 1e6:.1f} us per op, gloo link "
           f"{link['bandwidth'] / 1e9:.2f} GB/s + {link['latency'] * 1e6:.0f} us per call"
           + (f"; with {hw['shared_ranks']} ranks computing at once, per rank: matmul "
              f"{hw['shared']['matmul'] / 1e9:.1f} GFLOP/s, attention {hw['shared']['attention'] / 1e9:.1f} GFLOP/s, "
              f"memory {hw['shared']['memory'] / 1e9:.1f} GB/s (what parallel plans are predicted with)"
              if hw.get("shared") else "") + ".", ""]
    for k, d in res["models"].items():
        out.append(f"- **{k}**: {d}")
    out += ["", "| model | plan | measured ms | predicted ms | error | serial measured / predicted ms | "
                "bytes/rank measured / predicted | max rel. diff vs serial |",
            "|---|---|---|---|---|---|---|---|"]
    errs, serr = [], {}
    for r in res["rows"]:
        e = r["predicted_ms"] / r["measured_ms"] - 1 if r["predicted_ms"] else None
        if e is not None:
            errs.append(abs(e))
        serr[r["model"]] = r["serial_predicted_ms"] / r["serial_ms"] - 1
        out.append(f"| {r['model']} | {r['plan'].replace('Plan(', '').replace(', compile=None)', '')} | "
                   f"{r['measured_ms']:.1f} | {r['predicted_ms']:.1f} | {e * 100:+.0f}% | "
                   f"{r['serial_ms']:.1f} / {r['serial_predicted_ms']:.1f} | {r['bytes']:,} / "
                   f"{int(r['predicted_bytes'] or 0):,} | {r['rel_error']:.1e} |")
    out += ["", f"Mean absolute error over {len(errs)} parallel plans: **{100 * sum(errs) / max(len(errs), 1):.0f}%** "
                f"(max {100 * max(errs, default=0):.0f}%); serial: "
                + ", ".join(f"{k} {v * 100:+.0f}%" for k, v in serr.items()) + ".", ""]
    return "\n".join(out)


def _plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(res["models"])
    fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 4), squeeze=False)
    for ax, m in zip(axes[0], models, strict=True):
        rows = [r for r in res["rows"] if r["model"] == m]
        labels = [r["plan"].replace("Plan(", "").replace(", compile=None)", "").replace(", warmup_steps=1", "")
                  for r in rows]
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
