"""Command line: ``xdit-compile explain``, ``run``, ``generate`` and ``plan``.

``explain`` rewrites a zoo model for a plan in one process, with a fake process group of the
plan's world size (no workers, no GPUs), and prints the report and rewritten graph.
``run`` launches its own gloo/nccl workers on this node (or runs inside torchrun), runs the model
serially and in parallel on the zoo's inputs, and prints latency, bytes per rank and the error.
``generate`` runs a whole pipeline (saved directory or tiny name) in parallel and writes the
image or video (see :mod:`xdit_compile.jobs.generate`).
``plan`` ranks every valid plan of a zoo model on N GPUs of a hardware profile by the cost model
(see :mod:`xdit_compile.analysis.planner`), with no GPUs and no weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

__all__ = ["main"]


def _plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="zoo model name (see --list)")
    p.add_argument("--ulysses", type=int, default=1)
    p.add_argument("--ring", type=int, default=1)
    p.add_argument("--cfg", type=int, default=1)
    p.add_argument("--dp", type=int, default=1)
    _displaced_args(p)
    p.add_argument("--compile", choices=["eager", "inductor"], default=None)
    p.add_argument("--size", choices=["tiny", "full"], default="tiny")
    p.add_argument(
        "--layers",
        type=int,
        default=None,
        help="cut every block stack to this many layers (full-size shapes, less time)",
    )
    p.add_argument("--uneven", action="store_true", help="use the zoo's uneven-rows input")


def _displaced_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pipefusion", type=int, default=1, help="PipeFusion stages")
    p.add_argument(
        "--patches", type=int, default=None, help="PipeFusion patches per step (default: stages)"
    )
    p.add_argument(
        "--stage-blocks",
        type=int,
        nargs="+",
        default=None,
        help="PipeFusion blocks per stage (default: balanced by FLOPs)",
    )
    p.add_argument("--distrifusion", type=int, default=1, help="DistriFusion degree")
    p.add_argument(
        "--warmup-steps",
        type=int,
        default=1,
        help="exact steps at the start of each request (PipeFusion, DistriFusion)",
    )


def _plan(a: argparse.Namespace) -> Any:
    from xdit_compile.plan import Plan

    return Plan(**_plan_kwargs(a))


def _plan_kwargs(a: argparse.Namespace) -> dict[str, Any]:
    return dict(
        ulysses=a.ulysses,
        ring=a.ring,
        cfg=a.cfg,
        pipefusion=a.pipefusion,
        dp=a.dp,
        distrifusion=a.distrifusion,
        patches=a.patches,
        warmup_steps=a.warmup_steps,
        stage_blocks=tuple(a.stage_blocks or ()),
        compile=a.compile,
        auto=getattr(a, "auto", False),
        hardware=getattr(a, "hardware", None),
    )


def _config(a: argparse.Namespace) -> dict[str, Any]:
    from xdit_compile.models import layer_overrides

    return layer_overrides(a.model, a.size, a.layers) if a.layers else {}


def _cmd_explain(a: argparse.Namespace) -> int:
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import xdit_compile as xc
    from xdit_compile.models import build_model, example_inputs

    plan = _plan(a)
    if not dist.is_initialized():
        dist.init_process_group("fake", store=FakeStore(), rank=a.rank, world_size=plan.world_size)
    model = build_model(a.model, a.size, uneven=a.uneven, **_config(a))
    kwargs = example_inputs(a.model, model, size=a.size, uneven=a.uneven)
    pm = xc.parallelize(model, plan)
    pm.prepare(**kwargs)
    report = xc.explain(pm)
    print(str(report) if a.graph else report.summary())
    if a.graph_after:
        print(pm.graphs[a.graph_after])
    return 0


def _worker_run(a: dict[str, Any]) -> Any:
    from xdit_compile.jobs.compare import compare_zoo_model
    from xdit_compile.plan import Plan

    return compare_zoo_model(
        a["model"],
        Plan(**a["plan"]),
        size=a["size"],
        uneven=a["uneven"],
        iters=a["iters"],
        warmup=a["warmup"],
        config=a["config"],
    )


def _print_run(results: list[Any], plan: Any, nproc: int) -> None:
    r0 = results[0]
    print(f"model {r0.model} (zoo inputs), {plan}, {nproc} processes")
    print(f"  seed: dim {r0.seed.get('dim')} split {list(r0.seed.get('split', ()))}")
    print(f"  serial latency   (1 process) : {r0.serial_ms:10.2f} ms")
    par = max(r.parallel_ms for r in results)
    print(f"  parallel latency ({nproc} procs) : {par:10.2f} ms   ratio {par / r0.serial_ms:.3f}")
    for r in results:
        comm = ", ".join(f"{k}: {v['calls']} calls {v['bytes']:,} B" for k, v in r.comm.items())
        print(f"  rank {r.rank}: {r.bytes_per_forward:,} bytes sent per forward ({comm})")
    err = max(r.rel_error for r in results)
    print(f"  max relative difference vs serial: {err:.3e}")
    print(f"  sharding breaks: {len(r0.breaks)}")
    for b in r0.breaks:
        print(f"    {b}")


def _launch(fn: Any, payload: Any, plan: Any, a: argparse.Namespace) -> list[Any] | None:
    """``fn(payload)`` on every rank: the ranks of torchrun, or worker processes this command
    starts (``--nproc``, default the plan's size). None (after printing the failing rank's
    message) when a worker failed or died: every worker is stopped then."""
    from xdit_compile.testing.launcher import WorkerError, WorkerPool

    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:  # inside torchrun
        import torch.distributed as dist

        from xdit_compile.api import init_distributed

        init_distributed()
        plan.check_world_size(int(os.environ["WORLD_SIZE"]))
        result = fn(payload)  # a rank that raises exits non-zero and torchrun stops the others
        # An orderly end: no rank closes its connections while another may still read them
        # (a gloo peer that vanishes mid-teardown can abort the other rank's process).
        dist.barrier()
        dist.destroy_process_group()
        return [result]
    nproc = a.nproc or plan.world_size
    plan.check_world_size(nproc)
    os.environ.setdefault("XDIT_WORKER_THREADS", str(a.threads))
    pool = WorkerPool(nproc)
    try:
        return list(pool.run(fn, payload, timeout=a.timeout))
    except WorkerError as e:
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        print(
            f"xdit-compile: {a.cmd} failed: " + " | ".join(lines[:1] + lines[-1:]), file=sys.stderr
        )
        return None
    finally:
        pool.close()


def _cmd_run(a: argparse.Namespace) -> int:
    plan = _plan(a)
    job = {
        "model": a.model,
        "plan": _plan_kwargs(a),
        "size": a.size,
        "uneven": a.uneven,
        "iters": a.iters,
        "warmup": a.warmup,
        "config": _config(a),
    }
    from xdit_compile.models import get_entry

    entry = get_entry(a.model)  # unknown names fail here, before any worker starts
    plan.check_model({**entry.config(a.size), **_config(a)}, a.model)  # heads vs ulysses
    results = _launch(_worker_run, job, plan, a)
    if results is None:
        return 1
    _print_run(results, plan, len(results))
    if a.json:
        with open(a.json, "w") as f:
            json.dump([r.as_dict() for r in results], f, indent=2)
    return 0


def _cmd_generate(a: argparse.Namespace) -> int:
    from xdit_compile.jobs.generate import (
        GenerateOptions,
        check_model,
        generate_job,
        transformer_configs,
    )

    plan = _plan(a)
    if plan.auto and not a.nproc and "WORLD_SIZE" not in os.environ:
        print(
            "xdit-compile generate: --auto needs --nproc N (the plan is chosen for N processes)",
            file=sys.stderr,
        )
        return 2
    check_model(a.model)  # a bad path fails here, before any worker starts
    for name, config in transformer_configs(a.model):
        plan.check_model(config, f"{a.model}'s {name}")
    opts = GenerateOptions(
        model=a.model,
        prompt=a.prompt,
        plan=_plan_kwargs(a),
        negative_prompt=a.negative_prompt,
        steps=a.steps,
        height=a.height,
        width=a.width,
        frames=a.frames,
        guidance_scale=a.guidance_scale,
        seed=a.seed,
        dtype=a.dtype,
        output=a.output,
        compare_serial=a.compare_serial,
        warmup=a.warmup,
        resolution_binning=a.resolution_binning,
        parallel_vae=a.parallel_vae,
        loras=_loras(a.lora),
        lora_weights={
            k: float(v) for k, v in _pairs(a.lora_weight, "--lora-weight", "NAME=WEIGHT").items()
        },
    )
    unknown = set(opts.lora_weights) - set(opts.loras)
    if unknown:
        raise ValueError(
            f"--lora-weight names adapters that no --lora loads: {', '.join(sorted(unknown))}"
        )
    results = _launch(generate_job, opts, plan, a)
    if results is None:
        return 1
    r0 = results[0]
    if r0.rank != 0:
        return 0
    chosen = f"{r0.plan} (chosen by the cost model)" if plan.auto else str(plan)
    print(f"{a.model}: {chosen}, {len(results)} process(es); output {r0.shape}")
    if r0.call:
        print("  call: " + ", ".join(f"{k}={v}" for k, v in r0.call.items()))
    if r0.vae_plan:
        print(f"  VAE decoder: {r0.vae_plan} (its rows cut over the processes)")
    if r0.first_call_s is not None:
        print(f"  first call (capture + compile + run): {r0.first_call_s:.3f} s")
    steps = r0.step_s
    if steps:
        print(
            f"  parallel: {r0.total_s:.3f} s total, {len(steps)} steps, "
            f"{1e3 * sum(steps) / len(steps):.1f} ms/step (mean)"
        )
    else:
        print(f"  parallel: {r0.total_s:.3f} s total")
    if r0.serial_total_s is not None:
        sst = r0.serial_step_s
        per = f", {1e3 * sum(sst) / len(sst):.1f} ms/step" if sst else ""
        print(
            f"  serial  : {r0.serial_total_s:.3f} s total{per}; speedup "
            f"{r0.serial_total_s / r0.total_s:.2f}x; max relative difference {r0.rel_error:.2e} "
            f"(expected below {r0.tolerance:.0e} in {a.dtype})"
        )
    print(f"  rank 0 sent {r0.bytes_sent:,} bytes")
    for path in r0.saved:
        print(f"  wrote {path}")
    return 0


def _pairs(values: list[str] | None, flag: str, form: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values or []:
        name, sep, rest = v.partition("=")
        if not sep or not name or not rest:
            raise ValueError(f"{flag} {v!r}: write {form}")
        out[name] = rest
    return out


def _loras(values: list[str] | None) -> dict[str, str]:
    """``--lora NAME=PATH`` (repeated): adapter name -> a LoRA directory or file."""
    loras = _pairs(values, "--lora", "NAME=PATH (a directory or file written by save_lora_weights)")
    missing = [p for p in loras.values() if not os.path.exists(p)]
    if missing:
        raise ValueError(f"--lora: no such file or directory: {', '.join(missing)}")
    return loras


def serve_options(a: argparse.Namespace) -> Any:
    """The ``ServeOptions`` of parsed ``serve`` arguments (``ray_serve.serve_args`` is the
    inverse)."""
    from xdit_compile.serve.options import ServeOptions

    return ServeOptions(
        model=a.model,
        plan=_plan_kwargs(a),
        host=a.host,
        port=a.port,
        dtype=a.dtype,
        parallel_vae=a.parallel_vae,
        sizes=list(a.sizes),
        default_steps=a.steps,
        max_steps=a.max_steps,
        max_n=a.max_n,
        max_batch=a.max_batch,
        max_queue=a.max_queue,
        max_prompt_chars=a.max_prompt_chars,
        timeout_s=a.request_timeout,
        max_start_failures=a.max_start_failures,
        warmup=not a.no_warmup,
        loras=_loras(a.lora),
    )


def _cmd_serve(a: argparse.Namespace) -> int:
    from xdit_compile.jobs.generate import check_model, transformer_configs
    from xdit_compile.serve.group import serve_job, serve_main
    from xdit_compile.serve.options import parse_size

    plan = _plan(a)
    check_model(a.model)
    for name, config in transformer_configs(a.model):
        plan.check_model(config, f"{a.model}'s {name}")
    for size in a.sizes:
        try:
            parse_size(size)
        except Exception as e:  # noqa: BLE001  (an ApiError: a CLI error here)
            raise ValueError(f"--sizes: {e}") from None
    opts = serve_options(a)
    print(
        f"xdit-compile serve: {a.model}, {plan}, http://{a.host}:{a.port} (POST /admin/shutdown "
        "from this machine stops it)",
        flush=True,
    )
    if a.replicas > 1:
        return _serve_ray(opts, a.nproc or plan.world_size, a)
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:  # torchrun: every rank serves its part
        a.timeout = 10 * 365 * 86400.0  # a service runs until it is stopped
        results = _launch(serve_job, opts, plan, a)
        if results is None:
            return 1
        stats = results[0]
    else:  # this process is rank 0 and restarts the other ranks when one dies
        nproc = a.nproc or plan.world_size
        plan.check_world_size(nproc)
        stats = serve_main(opts, nproc, a.threads)
    if stats.rank == 0:
        print(f"xdit-compile serve: stopped after {stats.batches} batches, {stats.images} images")
    return 0


def _serve_ray(opts: Any, world: int, a: argparse.Namespace) -> int:
    import time

    import ray
    from ray import serve

    from xdit_compile.serve.ray import deployment

    ray.init(address=os.environ.get("RAY_ADDRESS"))
    serve.start(http_options={"host": a.host, "port": a.port})
    serve.run(deployment(opts, world, num_replicas=a.replicas, threads=a.threads), route_prefix="/")
    print(
        f"xdit-compile serve: {a.replicas} replicas of {world} ranks behind "
        f"http://{a.host}:{a.port} (Ctrl-C stops them)",
        flush=True,
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


def _cmd_client(a: argparse.Namespace) -> int:
    from pathlib import Path

    from xdit_compile.serve.client import ClientError, generate_images

    try:
        res = generate_images(
            a.url,
            a.prompt,
            n=a.n,
            size=a.size,
            steps=a.steps,
            seed=a.seed,
            guidance_scale=a.guidance_scale,
            negative_prompt=a.negative_prompt,
            timeout=a.timeout,
        )
    except (ClientError, OSError) as e:  # OSError: no service at --url
        print(f"xdit-compile client: {e}", file=sys.stderr)
        return 1
    out = Path(a.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    for i, png in enumerate(res.images):
        path = out.with_name(f"{out.stem}_{i}{out.suffix}") if len(res.images) > 1 else out
        path.write_bytes(png)
        print(f"wrote {path}")
    print(f"seed {res.seed}, {res.seconds:.2f} s")
    return 0


def _cmd_plan(a: argparse.Namespace) -> int:
    from xdit_compile.analysis import cost, planner

    if a.calibrate:
        print(
            "calibrating this machine (matmul, attention, memory, dispatch, gloo link) ...",
            flush=True,
        )
        hw = cost.calibrate(threads=a.threads)
        if a.save_profile:
            with open(a.save_profile, "w") as f:
                json.dump(hw.as_dict(), f, indent=1)
            print(f"  wrote {a.save_profile}")
    else:
        hw = cost.get_hardware(a.hardware)
    gpus = a.gpus * a.nodes if a.per_node else a.gpus
    if gpus < 1 or a.nodes < 1 or gpus % a.nodes:
        raise ValueError(f"--gpus {gpus} must be a positive multiple of --nodes {a.nodes}")
    steps = a.steps or planner.zoo_steps(a.model)
    load = planner.zoo_workload(
        a.model, height=a.height, width=a.width, frames=a.frames, size=a.size
    )
    ranked = planner.rank_plans(
        load, gpus, hw, steps=steps, nodes=a.nodes, approximate=not a.exact, compile=a.compile
    )
    serial = planner.rank_plans(load, 1, hw, steps=steps, compile=a.compile)[0].prediction
    best = next((c for c in ranked if c.prediction is not None), None)
    print(
        f"{load.name}: {gpus} x {hw.name} ({hw.description}), {a.nodes} node(s), {steps} steps, "
        f"compile={a.compile}"
    )
    if serial is not None:
        print(
            f"  one GPU: {serial.total:.2f} s ({serial.step * 1e3:.1f} ms/step, "
            f"{serial.flops / 1e12:.1f} TFLOP per call)"
        )
    print(
        "  predicted latency per request (transformer only), fastest first; per-axis columns are "
        "exposed communication ms per step:"
    )
    print("\n".join("  " + ln for ln in planner.format_table(ranked, limit=a.top).splitlines()))
    if best is None:
        print("  no valid plan")
        return 1
    assert best.prediction is not None
    exact = next((c for c in ranked if c.prediction is not None and c.exact), None)
    speed = f", {serial.total / best.prediction.total:.2f}x one GPU" if serial else ""
    print(f"  best: {best.plan}{speed}")
    if exact is not None and exact is not best:
        print(f"  best exact plan: {exact.plan} ({exact.prediction.total:.2f} s)")  # type: ignore[union-attr]
    if a.json:
        with open(a.json, "w") as f:
            json.dump(
                {
                    "model": load.name,
                    "gpus": gpus,
                    "nodes": a.nodes,
                    "hardware": hw.as_dict(),
                    "steps": steps,
                    "serial": serial.as_dict() if serial else None,
                    "plans": [
                        c.prediction.as_dict()
                        if c.prediction
                        else {"plan": str(c.plan), "invalid": c.invalid}
                        for c in ranked
                    ],
                },
                f,
                indent=1,
            )
    return 0


def _print_demo() -> None:
    """What ``--model demo`` draws (its subjects, backgrounds, sizes and positions)."""
    import textwrap

    from xdit_compile.models import demo

    state = "trained" if demo.demo_path().is_dir() else "not trained yet"
    print(
        "\ngenerate --model demo: a PixArt-Sigma pipeline trained here on Noto Color Emoji "
        f"({state}, {demo.demo_path()}), 64x64 pixels. Prompts: 'a[n] [small] SUBJECT [on the "
        f"left|on the right] [BACKGROUND]', e.g. '{demo.caption(demo.SUBJECTS[0], 'in the snow')}'."
    )
    subjects = ", ".join(demo.subject_name(s) for s in demo.SUBJECTS)
    print(
        textwrap.fill(
            f"  subjects ({len(demo.SUBJECTS)}): {subjects}", 100, subsequent_indent="    "
        )
    )
    print("  backgrounds: " + ", ".join(b for b in demo.BACKGROUNDS if b) + " (none: white)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xdit-compile", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="log each pass")
    sub = p.add_subparsers(dest="cmd", required=True)
    _explain_parser(sub)
    _run_parser(sub)
    _generate_parser(sub)
    _plan_parser(sub)
    _serve_parser(sub)
    _client_parser(sub)
    sub.add_parser("models", help="list zoo models")
    return p


def _explain_parser(sub: Any) -> None:
    """``explain``: a plan's rewrite in one process."""
    e = sub.add_parser("explain", help="print what a plan rewrites (no workers needed)")
    _plan_args(e)
    e.add_argument("--rank", type=int, default=0, help="which rank's view to print")
    e.add_argument("--no-graph", dest="graph", action="store_false", help="summary only")
    e.add_argument("--graph-after", default=None, help="also print the graph after this pass")


def _run_parser(sub: Any) -> None:
    """``run``: serial against parallel on worker processes."""
    r = sub.add_parser("run", help="serial vs parallel: latency, bytes, difference")
    _plan_args(r)
    r.add_argument("--nproc", type=int, default=None, help="worker processes (default: plan size)")
    r.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    r.add_argument("--iters", type=int, default=3)
    r.add_argument("--warmup", type=int, default=1)
    r.add_argument(
        "--timeout", type=float, default=1800.0, help="seconds before workers are stopped"
    )
    r.add_argument("--json", default=None, help="write per-rank results to this file")


def _generate_parser(sub: Any) -> None:
    """``generate``: a whole pipeline."""
    g = sub.add_parser(
        "generate", help="run a whole pipeline in parallel and write the image/video"
    )
    g.add_argument(
        "--model",
        required=True,
        help=(
            "a saved pipeline directory, 'demo' (the trained emoji pipeline), or a tiny pipeline "
            "name"
        ),
    )
    g.add_argument(
        "--prompt", required=True, nargs="+", help="one or more prompts (data parallel cuts a list)"
    )
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--steps", type=int, default=None, help="denoising steps")
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--frames", type=int, default=None, help="video frames (video pipelines)")
    g.add_argument("--guidance-scale", type=float, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    g.add_argument(
        "--resolution-binning",
        action="store_true",
        help="let PixArt/HunyuanDiT pipelines snap the size to their resolution bins",
    )
    for axis in ("ulysses", "ring", "cfg", "dp"):
        g.add_argument(f"--{axis}", type=int, default=1)
    _displaced_args(g)
    g.add_argument("--compile", choices=["eager", "inductor"], default=None)
    g.add_argument(
        "--parallel-vae",
        action="store_true",
        help=(
            "also cut the VAE's rows (decoder and encoder) over every process (1/N of its "
            "activations each)"
        ),
    )
    g.add_argument(
        "--auto",
        action="store_true",
        help="let the cost model choose the degrees for --nproc processes (exact plans)",
    )
    g.add_argument(
        "--hardware",
        default=None,
        help="with --auto: the hardware profile (default: this machine's device)",
    )
    g.add_argument("--output", default=None, help="image .png, or video .mp4 / frame directory")
    g.add_argument(
        "--compare-serial", action="store_true", help="also time the plain pipeline on rank 0"
    )
    g.add_argument(
        "--lora",
        action="append",
        metavar="NAME=PATH",
        help="load a LoRA adapter (a directory or file written by save_lora_weights); repeatable",
    )
    g.add_argument(
        "--lora-weight",
        action="append",
        metavar="NAME=WEIGHT",
        help="use only these adapters, at these weights (default: every --lora at 1.0); repeatable",
    )
    g.add_argument("--warmup", type=int, default=1, help="untimed calls first (the first compiles)")
    g.add_argument("--nproc", type=int, default=None, help="worker processes (default: plan size)")
    g.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    g.add_argument(
        "--timeout", type=float, default=1800.0, help="seconds before workers are stopped"
    )


def _plan_parser(sub: Any) -> None:
    """``plan``: every plan ranked by the cost model."""
    c = sub.add_parser("plan", help="rank every plan for N GPUs by the cost model (no GPUs needed)")
    c.add_argument(
        "--model", required=True, help="zoo model name (published full-size config, no weights)"
    )
    c.add_argument("--gpus", type=int, required=True, help="GPUs in all (see --per-node)")
    c.add_argument("--nodes", type=int, default=1, help="nodes the GPUs are spread over")
    c.add_argument("--per-node", action="store_true", help="--gpus counts the GPUs of one node")
    c.add_argument(
        "--hardware",
        default="h100-sxm",
        help="h100-sxm, h200-sxm, a100-sxm, l40-pcie, rtx-4090, cpu, or a calibrated JSON profile",
    )
    c.add_argument(
        "--calibrate", action="store_true", help="measure this machine and use it as the hardware"
    )
    c.add_argument(
        "--save-profile", default=None, help="with --calibrate: write the profile (JSON) here"
    )
    c.add_argument("--threads", type=int, default=1, help="with --calibrate: CPU threads per rank")
    c.add_argument(
        "--size",
        choices=["tiny", "full"],
        default="full",
        help="the zoo config (default: published)",
    )
    c.add_argument(
        "--height", type=int, default=None, help="pixels (default: the zoo's input at --size)"
    )
    c.add_argument("--width", type=int, default=None)
    c.add_argument("--frames", type=int, default=None, help="video frames")
    c.add_argument(
        "--steps", type=int, default=None, help="denoising steps (default: the pipeline's)"
    )
    c.add_argument("--compile", choices=["eager", "inductor"], default=None)
    c.add_argument(
        "--exact", action="store_true", help="only exact plans (no PipeFusion / DistriFusion)"
    )
    c.add_argument("--top", type=int, default=15, help="rows to print")
    c.add_argument("--json", default=None, help="write every prediction to this file")


def _serve_parser(sub: Any) -> None:
    """``serve``: the HTTP service."""
    v = sub.add_parser(
        "serve", help="an HTTP service (OpenAI-style images API) over one parallel process group"
    )
    v.add_argument(
        "--model",
        required=True,
        help=(
            "a saved pipeline directory, 'demo' (the trained emoji pipeline), or a tiny pipeline "
            "name"
        ),
    )
    for axis in ("ulysses", "ring", "cfg", "dp"):
        v.add_argument(f"--{axis}", type=int, default=1)
    _displaced_args(v)
    v.add_argument("--compile", choices=["eager", "inductor"], default=None)
    v.add_argument(
        "--parallel-vae",
        action="store_true",
        help=(
            "also cut the VAE's rows (decoder and encoder) over every process (1/N of its "
            "activations each)"
        ),
    )
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    v.add_argument(
        "--sizes",
        nargs="+",
        default=[],
        help="sizes WxH a request may ask for (the first is the default; each compiled at start)",
    )
    v.add_argument("--steps", type=int, default=None, help="default denoising steps")
    v.add_argument("--max-steps", type=int, default=100)
    v.add_argument("--max-n", type=int, default=4, help="images per request")
    v.add_argument(
        "--max-batch",
        type=int,
        default=4,
        help="images per pipeline call (same-signature requests)",
    )
    v.add_argument("--max-queue", type=int, default=16, help="queued requests before 429")
    v.add_argument("--max-prompt-chars", type=int, default=2000)
    v.add_argument(
        "--request-timeout", type=float, default=600.0, help="seconds per request (queue + run)"
    )
    v.add_argument(
        "--no-warmup", action="store_true", help="do not compile the served sizes at start"
    )
    v.add_argument(
        "--lora",
        action="append",
        metavar="NAME=PATH",
        help=(
            'load a LoRA adapter a request may ask for by name ("lora": {NAME: weight}); repeatable'
        ),
    )
    v.add_argument(
        "--max-start-failures",
        type=int,
        default=3,
        help="consecutive failed starts of the process group before the command gives up",
    )
    v.add_argument("--nproc", type=int, default=None, help="worker processes (default: plan size)")
    v.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    v.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="replicas of the whole process group behind one endpoint (Ray Serve, local Ray "
        "cluster or RAY_ADDRESS)",
    )


def _client_parser(sub: Any) -> None:
    """``client``: requests to a running service."""
    k = sub.add_parser(
        "client", help="ask a running `xdit-compile serve` for images and write them"
    )
    k.add_argument("--url", default="http://127.0.0.1:8000")
    k.add_argument("--prompt", required=True)
    k.add_argument("--n", type=int, default=1)
    k.add_argument("--size", default=None, help="WxH (default: the service's)")
    k.add_argument("--steps", type=int, default=None)
    k.add_argument("--seed", type=int, default=None)
    k.add_argument("--guidance-scale", type=float, default=None)
    k.add_argument("--negative-prompt", default=None)
    k.add_argument(
        "--output", default="image.png", help="PNG path (several images: _0, _1 ... suffixes)"
    )
    k.add_argument("--timeout", type=float, default=600.0)


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # torch pytree deprecation noise
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s"
    )
    try:
        if args.cmd == "models":
            from xdit_compile.models import get_entry, list_models

            for n in list_models():
                print(f"{n:<14} {get_entry(n).description}")
            _print_demo()
            return 0
        cmds = {
            "explain": _cmd_explain,
            "run": _cmd_run,
            "generate": _cmd_generate,
            "plan": _cmd_plan,
            "serve": _cmd_serve,
            "client": _cmd_client,
        }
        return cmds[args.cmd](args)
    except (ValueError, KeyError, TypeError) as e:
        print(f"xdit-compile: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"xdit-compile: failed: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
