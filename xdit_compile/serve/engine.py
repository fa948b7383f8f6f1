"""What every rank of the service runs: its pipeline loaded and parallelized once (the plan of
the command line, through :mod:`xdit_compile.jobs.generate`), warmed up on every served size and
batch size, then the engine loop: rank 0 decides each turn (next batch, idle, stop), every rank
runs the same pipeline call (see :mod:`xdit_compile.serve.scheduler` for what they agree on),
and rank 0 answers the batch's requests and counts it."""

import base64
import inspect
import io
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

import xdit_compile as xc
from xdit_compile.jobs.generate import (
    _DTYPES,
    load_loras,
    load_pipeline,
    output_array,
    pipeline_call,
    step_callback,
    to_uint8,
    use_adapters,
)
from xdit_compile.serve.options import ApiError, ServeOptions, ServeStats
from xdit_compile.serve.scheduler import (
    IDLE_S,
    BatchAborted,
    Job,
    broadcast_command,
    command,
    fail,
    step_boundary,
)
from xdit_compile.serve.state import Service

__all__ = ["GroupFailure", "configure", "run_engine", "setup", "warmup"]

#: Names the child ranks that have exited ("" while all live): given by :func:`serve_main`'s
#: supervisor, which owns them.
Dead = Callable[[], str]


class GroupFailure(RuntimeError):
    """A rank of the serving group died or its collectives broke: the group is restarted."""


# --------------------------------------------------------------------------- before the loop


def setup(opts: ServeOptions) -> tuple[Any, dict[str, Any]]:
    """This rank's pipeline, loaded and parallelized (inside an initialized process group)."""
    dtype = _DTYPES.get(opts.dtype)
    if dtype is None:
        raise ValueError(f"--dtype {opts.dtype!r}: choose one of {', '.join(_DTYPES)}")
    pipe, defaults = load_pipeline(opts.model, dtype)
    load_loras(pipe, opts.loras)
    pipe = xc.parallelize_pipeline(pipe, xc.Plan(**opts.plan), vae=opts.parallel_vae)
    pipe.set_progress_bar_config(disable=True)
    return pipe, defaults


def configure(svc: Service, pipe: Any, defaults: dict[str, Any]) -> None:
    """Tell ``svc`` the pipeline's defaults: size, steps, and for a video pipeline frames."""
    params = inspect.signature(pipe.__call__).parameters
    video = "num_frames" in params
    frames = defaults.get("num_frames")
    if video and frames is None and params["num_frames"].default is not inspect.Parameter.empty:
        frames = params["num_frames"].default
    steps = defaults.get("num_inference_steps")
    if steps is None and "num_inference_steps" in params:
        steps = params["num_inference_steps"].default
    svc.configure(_default_size(pipe, defaults), steps, frames, video)


def _default_size(pipe: Any, defaults: dict[str, Any]) -> tuple[int, int]:
    if "height" in defaults and "width" in defaults:
        return int(defaults["width"]), int(defaults["height"])
    t = getattr(pipe, "transformer", None)
    sample = getattr(getattr(t, "config", None), "sample_size", None) or 64
    scale = getattr(pipe, "vae_scale_factor", 8)
    side = int(sample if isinstance(sample, int) else sample[0]) * int(scale)
    return side, side


def warmup(pipe: Any, defaults: dict[str, Any], svc: Service) -> None:
    """Compile every served size at every batch size once, before the first request (every
    rank, same calls)."""
    if svc.opts.warmup:  # every batch size too: each is an input signature of its own
        # no adapter, and each loaded adapter alone at weight 1 (other combinations compile at
        # first use)
        for lora in [(), *(((name, 1.0),) for name in sorted(svc.opts.loras))]:
            for w, h in svc.sizes:
                for b in range(1, svc.opts.max_batch + 1):
                    spec = _warmup_job(svc, b, w, h, lora).spec()
                    _run_batch(pipe, _call_for(pipe, defaults, [spec]), lambda: None, spec["lora"])
    dist.barrier()


def _warmup_job(svc: Service, n: int, w: int, h: int, lora: tuple[tuple[str, float], ...]) -> Job:
    return Job(
        id="warmup",
        prompt="warmup",
        n=n,
        seed=0,
        width=w,
        height=h,
        steps=svc.default_steps,
        guidance_scale=None,
        negative_prompt=None,
        lora=lora,
    )


# --------------------------------------------------------------------------- one batch


def _call_for(pipe: Any, defaults: dict[str, Any], specs: list[dict[str, Any]]) -> dict[str, Any]:
    """The pipeline call of one batch (every spec has the same signature): one prompt and one
    generator (seed + i) per image."""
    s = specs[0]
    images = sum(x["n"] for x in specs)
    negative = [s["negative_prompt"]] * images if s["negative_prompt"] is not None else None
    return pipeline_call(
        pipe,
        {**defaults, "use_resolution_binning": False},
        [x["prompt"] for x in specs for _ in range(x["n"])],
        steps=s["steps"],
        height=s["height"],
        width=s["width"],
        frames=s.get("frames"),
        guidance_scale=s["guidance_scale"],
        negative_prompt=negative,
        generator=[
            torch.Generator().manual_seed(x["seed"] + k) for x in specs for k in range(x["n"])
        ],
    )


def _run_batch(
    pipe: Any,
    call: dict[str, Any],
    on_step: Callable[[], None],
    lora: list[list[Any]] | None = None,
) -> np.ndarray:
    """One batch: its adapters on (every rank: the batch's spec carries them), then the call."""
    use_adapters(pipe, {name: float(w) for name, w in lora or []})
    with torch.no_grad():
        return output_array(pipe(**call, **step_callback(pipe, on_step)))


def _png_b64(img: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(to_uint8(img)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


# --------------------------------------------------------------------------- the loop


def run_engine(
    pipe: Any, defaults: dict[str, Any], svc: Service, stats: ServeStats, dead: Dead | None = None
) -> None:
    """The loop every rank runs: rank 0 decides (next batch, idle, stop), all follow. With
    ``dead`` (rank 0 of :func:`~xdit_compile.serve.group.serve_main`), a dead child rank raises
    :class:`GroupFailure` before rank 0 enters a collective it would wait in forever."""
    rank = dist.get_rank()
    while True:
        cmd, jobs = _next_turn(svc, rank, dead)
        if cmd[0] == "stop":
            break
        if cmd[0] == "run":
            _run_turn(pipe, defaults, svc, stats, jobs, cmd[1], dead)
    if rank == 0:
        stats.requests = dict(svc.metrics.requests)


def _next_turn(svc: Service, rank: int, dead: Dead | None) -> tuple[tuple[Any, ...], list[Job]]:
    """This turn's command, the same on every rank, and the jobs it runs (rank 0's; empty
    elsewhere)."""
    jobs: list[Job] = []
    if dead is not None and dead():
        raise GroupFailure(dead())
    cmd = None
    if rank == 0:
        jobs = svc.scheduler.next_batch(IDLE_S)
        if dead is not None and jobs and dead():  # not started: they wait for the new group
            svc.scheduler.requeue(jobs)
            raise GroupFailure(dead())
        cmd = command(svc.scheduler, jobs)
    return broadcast_command(cmd), jobs


def _run_turn(
    pipe: Any,
    defaults: dict[str, Any],
    svc: Service,
    stats: ServeStats,
    jobs: list[Job],
    specs: list[dict[str, Any]],
    dead: Dead | None,
) -> None:
    """One batch on every rank; rank 0 answers its requests (images, or the error)."""
    rank = dist.get_rank()
    stamps = [time.perf_counter()]
    on_step = step_boundary(jobs, len(specs), stamps, rank)
    call = _call_for(pipe, defaults, specs)
    total = call.get("num_inference_steps") or svc.default_steps or 0
    for j in jobs:
        j.step, j.steps_total = 0, int(total)
    t0, started = time.perf_counter(), time.monotonic()
    try:
        arr = _run_batch(pipe, call, on_step, specs[0].get("lora"))
    except BatchAborted:
        _aborted(svc, stats, jobs, rank)
        return
    except Exception as e:  # noqa: BLE001  (every rank ran the same call: the same error)
        _failed(svc, jobs, e, rank, dead)
        return
    stats.batches += 1
    stats.images += len(arr)
    if rank == 0:
        _answer(svc, jobs, arr, stamps, t0, started)


def _aborted(svc: Service, stats: ServeStats, jobs: list[Job], rank: int) -> None:
    stats.aborted_batches += 1
    if rank == 0:
        svc.scheduler.running = []
        svc.metrics.aborted_batches += 1
        for j in jobs:
            fail(j, j.abort_error())


def _failed(svc: Service, jobs: list[Job], e: Exception, rank: int, dead: Dead | None) -> None:
    """The pipeline call raised: a dead rank (the group restarts) or the call's own error (its
    requests get 500)."""
    if dead is not None:
        time.sleep(0.5)  # a rank that broke the collective is exiting: let it show
        if dead():
            raise GroupFailure(dead()) from e
    if rank == 0:
        svc.scheduler.running = []
        for j in jobs:
            fail(
                j,
                ApiError(500, f"the pipeline failed: {type(e).__name__}: {e}", kind="server_error"),
            )


def _answer(
    svc: Service, jobs: list[Job], arr: np.ndarray, stamps: list[float], t0: float, started: float
) -> None:
    """Rank 0 after a batch: every request answered with its slice of ``arr``, metrics counted."""
    sched = svc.scheduler
    sched.running = []
    sched.last_batch_s = time.perf_counter() - t0
    svc.metrics.batch(len(arr), stamps[-1] - stamps[0], len(stamps) - 1)
    t_run = time.perf_counter() - t0
    t_enc = time.perf_counter()
    i = 0
    for j in jobs:
        _resolve(j, arr[i : i + j.n])
        i += j.n
    queue_s = sum(max(0.0, started - j.created) for j in jobs)
    svc.metrics.stages(len(jobs), queue_s, t_run * len(jobs), time.perf_counter() - t_enc)


def _resolve(job: Job, imgs: np.ndarray) -> None:
    """Answer ``job`` with its images (or its video's frames), unless it was aborted meanwhile."""
    if job.should_abort():
        fail(job, job.abort_error())
    elif not job.future.done():
        if job.kind == "video":  # [F, H, W, C] uint8, encoded when fetched
            job.future.set_result(to_uint8(imgs[0]))
        else:
            job.future.set_result([_png_b64(img) for img in imgs])
