"""``xdit-compile serve``: an HTTP service over one parallel process group.

Process model. Every rank runs :func:`serve_job`: it loads the pipeline once, parallelizes it
once (the plan of the command line) and enters the engine loop. Rank 0 also runs the HTTP API
(FastAPI + uvicorn, in a thread) and the request queue. At every decision point rank 0 decides
and broadcasts, the other ranks follow:

- which batch runs next (or "idle", or "stop"): one ``broadcast_object_list`` per turn of the
  loop, so every rank enters the same pipeline call with the same arguments;
- at every denoising step boundary, which requests of the running batch are aborted (client
  gone, deadline passed): one small ``broadcast``; when all of them are, every rank leaves the
  call at the same step.

So no rank ever enters a collective the others skip.

Scheduling. A bounded queue (full: 429 with ``Retry-After``). The oldest request always runs
next (no starvation); queued requests with the same compiled signature (size, steps, guidance,
negative prompt) join its batch, up to ``max_batch`` images, so one pipeline call (one
compiled graph) serves them together. Each image keeps its own seed: the pipeline gets one
generator per image, so a request's image does not depend on what it was batched with (up to
the float reordering of a larger batch's matmuls).

API (OpenAI-compatible where OpenAI defines it): ``POST /v1/images/generations``,
``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text), and
``POST /admin/shutdown`` (loopback clients only: finishes the running batch, answers the queued
requests with 503, stops every rank).
"""

# No ``from __future__ import annotations`` here: FastAPI reads the handlers' annotations
# (request models, ``Request``) at runtime.
import base64
import contextlib
import io
import itertools
import math
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["GroupFailure", "ServeOptions", "ServeStats", "parse_size", "serve_job", "serve_main"]

#: Seconds rank 0 waits for a request before it tells the other ranks "idle" (they wait in a
#: broadcast meanwhile; this bounds how long a collective waits).
_IDLE_S = 0.5
#: Latency histogram buckets (seconds), Prometheus style.
_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, math.inf)


@dataclass
class ServeOptions:
    model: str
    """A ``save_pretrained`` directory, ``demo`` or a tiny pipeline name (as ``generate``)."""
    plan: dict[str, Any]
    host: str = "127.0.0.1"
    port: int = 8000
    dtype: str = "float32"
    sizes: list[str] = field(default_factory=list)
    """Sizes ("WxH") a request may ask for; the first is the default. Empty: the pipeline's
    default size only. Each is compiled once at start (``warmup``)."""
    default_steps: int | None = None
    max_steps: int = 100
    max_n: int = 4
    max_frames: int = 129
    max_videos_kept: int = 64
    """Finished video jobs kept for ``GET /v1/videos/{id}`` (the oldest are dropped)."""
    max_batch: int = 4
    """Images per pipeline call (requests of one signature batched together)."""
    max_queue: int = 16
    max_prompt_chars: int = 2000
    timeout_s: float = 600.0
    """Per request: queued plus running. Past it the client gets 504 and the request is
    aborted at the next step boundary."""
    warmup: bool = True
    max_start_failures: int = 3
    """Consecutive failed starts of the group (load, parallelize, warm up) before the service
    gives up (the command exits non-zero)."""
    collective_timeout_s: float = 300.0
    """gloo's timeout for one collective (a rank that hangs breaks the group after this)."""
    parallel_vae: bool = False
    """Cut the VAE's rows (decoder and encoder) over every rank too (``parallelize_pipeline(vae=True)``)."""
    served_name: str | None = None
    """The model id in ``/v1/models`` and responses (default: ``model``)."""
    loras: dict[str, str] = field(default_factory=dict)
    """LoRA adapters loaded at start (name -> a directory or file written by ``save_lora_weights``).
    A request picks its own (``"lora": {name: weight}``; none: every adapter off); requests run
    only with requests of the same adapters and weights, each combination compiled once."""


@dataclass
class ServeStats:
    """What rank 0 returns when the service stops."""

    rank: int
    requests: dict[str, int] = field(default_factory=dict)
    batches: int = 0
    images: int = 0
    aborted_batches: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class ApiError(Exception):
    """An error answered to the client (``status``, OpenAI-style body)."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


# --------------------------------------------------------------------------- requests and queue


@dataclass
class Job:
    """One request: ``n`` images of one prompt, or one video (``frames``)."""

    id: str
    prompt: str
    n: int
    seed: int
    width: int
    height: int
    steps: int | None
    guidance_scale: float | None
    negative_prompt: str | None
    frames: int | None = None
    kind: str = "image"
    lora: tuple[tuple[str, float], ...] = ()
    """The adapters this request runs with, and their weights (sorted by name)."""
    created: float = field(default_factory=time.monotonic)
    created_at: int = field(default_factory=lambda: int(time.time()))
    step: int = 0
    """Denoising steps done (rank 0 updates it at every step boundary)."""
    steps_total: int = 0
    timeout_s: float = math.inf
    deadline: float = math.inf
    future: Future = field(default_factory=Future, repr=False)
    aborted: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def signature(self) -> tuple[Any, ...]:
        """What must be equal for requests to share one pipeline call."""
        return (self.width, self.height, self.frames, self.steps, self.guidance_scale, self.negative_prompt,
                self.lora)

    def spec(self) -> dict[str, Any]:
        """What the other ranks need to run it (plain data, broadcast)."""
        return {"id": self.id, "prompt": self.prompt, "n": self.n, "seed": self.seed, "width": self.width,
                "height": self.height, "frames": self.frames, "steps": self.steps,
                "guidance_scale": self.guidance_scale, "negative_prompt": self.negative_prompt,
                "lora": [list(x) for x in self.lora]}

    def should_abort(self) -> bool:
        return self.aborted.is_set() or time.monotonic() > self.deadline

    def abort_error(self) -> "ApiError":
        """Why it stopped: its deadline (504) or its client (499: gone, or the job deleted)."""
        if not self.aborted.is_set() and time.monotonic() > self.deadline:
            return ApiError(504, f"the request took longer than {self.timeout_s:g} s", kind="timeout")
        return ApiError(499, "aborted", kind="aborted")


class Scheduler:
    """Rank 0's bounded queue: the oldest request first, same-signature requests batched with it."""

    def __init__(self, max_queue: int, max_batch: int) -> None:
        self.max_queue, self.max_batch = max_queue, max_batch
        self._cv = threading.Condition()
        self._queue: list[Job] = []
        self.stopping = False
        self.running: list[Job] = []
        self.last_batch_s = 0.0

    def __len__(self) -> int:
        with self._cv:
            return len(self._queue)

    def submit(self, job: Job) -> None:
        with self._cv:
            if self.stopping:
                raise ApiError(503, "the service is shutting down", kind="server_error")
            if len(self._queue) >= self.max_queue:
                retry = max(1, math.ceil(self.last_batch_s or 1.0))
                raise ApiError(429, f"the queue is full ({self.max_queue} requests); retry later",
                               kind="rate_limit_error", headers={"Retry-After": str(retry)})
            self._queue.append(job)
            self._cv.notify_all()

    def next_batch(self, timeout: float) -> list[Job]:
        """The oldest request and the queued ones of its signature (up to ``max_batch`` images);
        requests already aborted are answered and dropped. Empty after ``timeout`` s idle."""
        with self._cv:
            if not self._queue and not self.stopping:
                self._cv.wait(timeout)
            while self._queue and self._queue[0].should_abort():
                gone = self._queue.pop(0)
                _fail(gone, gone.abort_error())
            if not self._queue:
                return []
            head = self._queue[0]
            batch: list[Job] = []
            images = 0
            for job in list(self._queue):
                if job.signature == head.signature and not job.should_abort() and (
                        not batch or images + job.n <= self.max_batch):
                    batch.append(job)
                    images += job.n
                    self._queue.remove(job)
            self.running = batch
            return batch

    def requeue(self, jobs: list[Job]) -> None:
        """Put a batch that never started back at the front, in its order."""
        with self._cv:
            self._queue[:0] = jobs
            self.running = []
            self._cv.notify_all()

    def stop(self) -> list[Job]:
        """No more requests; returns (and removes) the queued ones."""
        with self._cv:
            self.stopping = True
            left, self._queue = self._queue, []
            self._cv.notify_all()
            return left


def _fail(job: Job, err: Exception) -> None:
    if not job.future.done():
        job.future.set_exception(err)


# --------------------------------------------------------------------------- metrics


class Metrics:
    """Counters for ``/metrics`` (rank 0)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[str, int] = {}
        self.latency = [0] * len(_BUCKETS)
        self.latency_sum = 0.0
        self.latency_count = 0
        self.images = 0
        self.batches = 0
        self.batch_images = 0
        self.aborted_batches = 0
        self.step_s_sum = 0.0
        self.steps = 0
        self.queue_s_sum = 0.0
        self.run_s_sum = 0.0
        self.encode_s_sum = 0.0
        self.timed_jobs = 0

    def request(self, status: int, seconds: float | None = None) -> None:
        with self._lock:
            self.requests[str(status)] = self.requests.get(str(status), 0) + 1
            if seconds is not None:
                self.latency_sum += seconds
                self.latency_count += 1
                for i, b in enumerate(_BUCKETS):
                    if seconds <= b:
                        self.latency[i] += 1

    def render(self, queue_len: int, running: int, bytes_sent: int) -> str:
        with self._lock:
            out = [
                "# HELP xdit_queue_length Requests waiting.", "# TYPE xdit_queue_length gauge",
                f"xdit_queue_length {queue_len}",
                "# HELP xdit_running_requests Requests in the running batch.", "# TYPE xdit_running_requests gauge",
                f"xdit_running_requests {running}",
                "# HELP xdit_requests_total Answered requests by HTTP status.", "# TYPE xdit_requests_total counter",
            ]
            out += [f'xdit_requests_total{{status="{s}"}} {c}' for s, c in sorted(self.requests.items())]
            out += ["# HELP xdit_request_seconds Latency of successful requests (queue + run).",
                    "# TYPE xdit_request_seconds histogram"]
            out += [f'xdit_request_seconds_bucket{{le="{"+Inf" if math.isinf(b) else b}"}} {c}'
                    for b, c in zip(_BUCKETS, self.latency, strict=True)]
            out += [f"xdit_request_seconds_sum {self.latency_sum:.6f}", f"xdit_request_seconds_count {self.latency_count}",
                    "# TYPE xdit_images_total counter", f"xdit_images_total {self.images}",
                    "# TYPE xdit_batches_total counter", f"xdit_batches_total {self.batches}",
                    "# TYPE xdit_batch_images_total counter", f"xdit_batch_images_total {self.batch_images}",
                    "# TYPE xdit_aborted_batches_total counter", f"xdit_aborted_batches_total {self.aborted_batches}",
                    "# HELP xdit_step_seconds Denoising steps (rank 0).", "# TYPE xdit_step_seconds summary",
                    f"xdit_step_seconds_sum {self.step_s_sum:.6f}", f"xdit_step_seconds_count {self.steps}",
                    "# HELP xdit_stage_seconds Time per stage of finished requests: waiting in the queue, the "
                    "pipeline call (steps, VAE), encoding the answer.", "# TYPE xdit_stage_seconds summary",
                    f'xdit_stage_seconds_sum{{stage="queue"}} {self.queue_s_sum:.6f}',
                    f'xdit_stage_seconds_sum{{stage="run"}} {self.run_s_sum:.6f}',
                    f'xdit_stage_seconds_sum{{stage="encode"}} {self.encode_s_sum:.6f}',
                    f"xdit_stage_seconds_count {self.timed_jobs}",
                    "# HELP xdit_bytes_sent_total Bytes rank 0 sent to other ranks.",
                    "# TYPE xdit_bytes_sent_total counter", f"xdit_bytes_sent_total {bytes_sent}"]
            return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- HTTP (rank 0)


def parse_size(size: str) -> tuple[int, int]:
    """"WxH" -> (width, height)."""
    try:
        w, h = (int(x) for x in size.lower().split("x"))
    except ValueError:
        raise ApiError(400, f"size {size!r} is not WIDTHxHEIGHT", "size") from None
    return w, h


class Service:
    """Rank 0's side: validation, the queue, metrics; shared by the HTTP thread and the engine."""

    def __init__(self, opts: ServeOptions) -> None:
        self.opts = opts
        self.sizes = [parse_size(s) for s in opts.sizes]
        self.default_steps = opts.default_steps
        self.workers: list[int] = []
        """PIDs of the other ranks (when this process started them)."""
        self.restarts = 0
        self.last_failure = ""
        self.scheduler = Scheduler(opts.max_queue, opts.max_batch)
        self.metrics = Metrics()
        self.name = opts.served_name or opts.model
        self.started = time.time()
        self.ready = threading.Event()
        self._ids = itertools.count()
        self.default_frames: int | None = None
        self.video = False
        self.videos: dict[str, Job] = {}
        self._videos_lock = threading.Lock()

    def configure(self, default_size: tuple[int, int], default_steps: int | None, default_frames: int | None = None,
                  video: bool = False) -> None:
        """The pipeline's defaults, once it is loaded: the default size (when none is given),
        steps, and for video pipelines the default frame count."""
        self.sizes = self.sizes or [default_size]
        self.default_steps = self.opts.default_steps or default_steps
        self.default_frames = default_frames
        self.video = video

    def make_job(self, body: Any, kind: str = "image") -> Job:
        o = self.opts
        if kind == "image" and self.video:
            raise ApiError(400, f"{self.name} makes videos: POST /v1/videos", kind="invalid_request_error")
        if kind == "video" and not self.video:
            raise ApiError(400, f"{self.name} makes images: POST /v1/images/generations")
        if body.model not in (None, "", self.name):
            raise ApiError(404, f"model {body.model!r} is not served here (this service: {self.name!r})", "model",
                           kind="not_found_error")
        if len(body.prompt) > o.max_prompt_chars:
            raise ApiError(400, f"prompt is {len(body.prompt)} characters; the limit is {o.max_prompt_chars}",
                           "prompt")
        n = getattr(body, "n", 1)
        if n > o.max_n:
            raise ApiError(400, f"n={n}: at most {o.max_n} images per request", "n")
        if n > o.max_batch:
            raise ApiError(400, f"n={n}: at most {o.max_batch} images per request (--max-batch)", "n")
        if getattr(body, "response_format", "b64_json") != "b64_json":
            raise ApiError(400, f"response_format {body.response_format!r}: only 'b64_json' is served", "response_format")
        w, h = parse_size(body.size) if body.size else self.sizes[0]
        if (w, h) not in self.sizes:
            allowed = ", ".join(f"{a}x{b}" for a, b in self.sizes)
            raise ApiError(400, f"size {w}x{h} is not served; choose one of {allowed}", "size")
        steps = body.steps if body.steps is not None else self.default_steps
        if steps is not None and steps > o.max_steps:
            raise ApiError(400, f"steps={steps}: at most {o.max_steps}", "steps")
        frames = None
        if kind == "video":
            frames = body.frames if body.frames is not None else self.default_frames
            if frames is not None and frames > o.max_frames:
                raise ApiError(400, f"frames={frames}: at most {o.max_frames}", "frames")
        seed = body.seed if body.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
        prefix = "video" if kind == "video" else "img"
        return Job(id=f"{prefix}-{next(self._ids)}", prompt=body.prompt, n=n, seed=seed, width=w, height=h,
                   steps=steps, guidance_scale=body.guidance_scale, negative_prompt=body.negative_prompt,
                   frames=frames, kind=kind, deadline=time.monotonic() + o.timeout_s, timeout_s=o.timeout_s,
                   lora=self._lora(getattr(body, "lora", None)))

    def _lora(self, asked: dict[str, float] | None) -> tuple[tuple[str, float], ...]:
        if not asked:
            return ()
        unknown = sorted(set(asked) - set(self.opts.loras))
        if unknown:
            served = ", ".join(sorted(self.opts.loras)) or "none (start the service with --lora NAME=PATH)"
            raise ApiError(400, f"lora {', '.join(map(repr, unknown))} is not loaded; loaded: {served}", "lora")
        bad = [k for k, w in asked.items() if not math.isfinite(w)]
        if bad:
            raise ApiError(400, f"lora weight of {bad[0]!r} is not a finite number", "lora")
        return tuple(sorted((k, float(w)) for k, w in asked.items()))

    def keep_video(self, job: Job) -> None:
        with self._videos_lock:
            self.videos[job.id] = job
            done = [k for k, j in self.videos.items() if j.future.done()]
            for k in done[:max(0, len(done) - self.opts.max_videos_kept)]:
                del self.videos[k]


def video_object(svc: Service, job: Job) -> dict[str, Any]:
    """A video job as ``GET /v1/videos/{id}`` shows it (OpenAI's fields where they exist)."""
    f = job.future
    if f.done():
        err = f.exception()
        status = "failed" if err is not None else "completed"
    else:
        err = None
        status = "in_progress" if job.step or job in svc.scheduler.running else "queued"
    out: dict[str, Any] = {"id": job.id, "object": "video", "model": svc.name, "status": status,
                           "progress": 100 if status == "completed" else
                           int(100 * job.step / job.steps_total) if job.steps_total else 0,
                           "created_at": job.created_at, "size": f"{job.width}x{job.height}", "frames": job.frames,
                           "seed": job.seed, "step": job.step, "steps": job.steps_total}
    if err is not None:
        out["error"] = {"message": getattr(err, "message", str(err)), "code": getattr(err, "status", 500)}
    return out


def encode_video(frames: np.ndarray, fmt: str) -> tuple[bytes, str]:
    """``frames`` ([F, H, W, C] uint8) as ``fmt``: "mp4" (needs imageio-ffmpeg), "apng", or
    "npy" (the exact frames). Returns (bytes, media type)."""
    if fmt == "npy":
        buf = io.BytesIO()
        np.save(buf, frames)
        return buf.getvalue(), "application/octet-stream"
    if fmt == "mp4":
        import tempfile

        from xdit_compile.jobs.generate import _video_writer

        if not _video_writer():
            raise ApiError(400, "mp4 needs imageio and imageio-ffmpeg on the server; ask for format=apng or npy",
                           "format")
        from diffusers.utils import export_to_video

        with tempfile.TemporaryDirectory() as d:
            path = f"{d}/v.mp4"
            export_to_video([f.astype(np.float32) / 255.0 for f in frames], path, fps=8)
            with open(path, "rb") as fh:
                return fh.read(), "video/mp4"
    if fmt == "apng":
        from PIL import Image

        buf = io.BytesIO()
        imgs = [Image.fromarray(f) for f in frames]
        imgs[0].save(buf, format="PNG", save_all=True, append_images=imgs[1:], duration=125, loop=0)
        return buf.getvalue(), "image/apng"
    raise ApiError(400, f"format {fmt!r}: choose mp4, apng or npy", "format")


def build_app(svc: Service) -> Any:
    """The FastAPI application of rank 0."""
    import asyncio
    from typing import Literal

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse
    from pydantic import BaseModel, ConfigDict, Field

    class ImageRequest(BaseModel):
        model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use
        prompt: str = Field(min_length=1)
        n: int = Field(1, ge=1)
        size: str | None = None
        response_format: Literal["b64_json", "url"] = "b64_json"
        model: str | None = None
        steps: int | None = Field(None, ge=1)
        guidance_scale: float | None = Field(None, ge=0.0, le=100.0)
        seed: int | None = Field(None, ge=0, le=2**63 - 1)
        negative_prompt: str | None = None
        lora: dict[str, float] | None = None
        """LoRA adapters (loaded with ``--lora``) and their weights for this request."""
        stream: bool = False
        """Server-sent events: ``image_generation.progress`` at every step, then
        ``image_generation.completed`` with the images (or ``error``)."""

    class VideoRequest(BaseModel):
        model_config = ConfigDict(extra="ignore")
        prompt: str = Field(min_length=1)
        size: str | None = None
        frames: int | None = Field(None, ge=1)
        model: str | None = None
        steps: int | None = Field(None, ge=1)
        guidance_scale: float | None = Field(None, ge=0.0, le=100.0)
        seed: int | None = Field(None, ge=0, le=2**63 - 1)
        negative_prompt: str | None = None
        lora: dict[str, float] | None = None

    app = FastAPI(title="xdit_compile", version="0.1.0")

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        svc.metrics.request(exc.status)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        msg = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body')}: {e.get('msg')}" for e in errs)
        err = ApiError(400, msg or "invalid request", loc or None)
        svc.metrics.request(400)
        return JSONResponse(err.body(), status_code=400)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = svc.ready.is_set() and not svc.scheduler.stopping
        status = "ok" if ok else "stopping" if svc.scheduler.stopping else "restarting" if svc.restarts else "starting"
        return JSONResponse({"status": status, "model": svc.name, "plan": svc.opts.plan, "queue": len(svc.scheduler),
                             "workers": svc.workers, "restarts": svc.restarts, "last_failure": svc.last_failure,
                             "uptime_s": round(time.time() - svc.started, 3)}, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": svc.name, "object": "model", "created": int(svc.started),
                                             "owned_by": "xdit_compile"}]}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        from xdit_compile.runtime.collectives import comm_stats

        return PlainTextResponse(svc.metrics.render(len(svc.scheduler), sum(j.n for j in svc.scheduler.running),
                                                    comm_stats().total_bytes))

    @app.post("/v1/images/generations")
    async def generations(body: ImageRequest, request: Request) -> JSONResponse:
        if not svc.ready.is_set():
            what = "restarting its workers" if svc.restarts else "still warming up"
            raise ApiError(503, f"the service is {what}", kind="server_error", headers={"Retry-After": "5"})
        job = svc.make_job(body)
        t0 = time.monotonic()
        svc.scheduler.submit(job)
        fut = asyncio.wrap_future(job.future)
        if body.stream:
            return _stream(job, fut, request, t0)
        while True:  # wait, watching for the client leaving and the deadline
            done, _ = await asyncio.wait({fut}, timeout=0.2)
            if done:
                break
            if await request.is_disconnected():
                job.aborted.set()  # the engine drops it, or stops its batch at the next step
                svc.metrics.request(499)
                return JSONResponse({"error": {"message": "client disconnected", "type": "aborted"}}, status_code=499)
            if time.monotonic() > job.deadline:
                job.aborted.set()
                raise ApiError(504, f"the request took longer than {svc.opts.timeout_s:g} s", kind="timeout")
        images = fut.result()  # raises the ApiError the engine set
        svc.metrics.request(200, time.monotonic() - t0)
        return JSONResponse({"created": int(time.time()), "model": svc.name, "seed": job.seed,
                             "data": [{"b64_json": b} for b in images]})

    def _stream(job: Job, fut: Any, request: Request, t0: float) -> Any:
        import json

        from fastapi.responses import StreamingResponse

        def event(name: str, data: dict[str, Any]) -> str:
            return f"event: {name}\ndata: {json.dumps(data)}\n\n"

        async def events() -> Any:
            last = -1
            while True:
                done, _ = await asyncio.wait({fut}, timeout=0.1)
                if job.step != last and job.steps_total:
                    last = job.step
                    yield event("image_generation.progress", {"id": job.id, "step": job.step,
                                                              "steps": job.steps_total})
                if done:
                    break
                if await request.is_disconnected():
                    job.aborted.set()
                    svc.metrics.request(499)
                    return
                if time.monotonic() > job.deadline:
                    job.aborted.set()
                    svc.metrics.request(504)
                    yield event("error", {"message": f"the request took longer than {svc.opts.timeout_s:g} s",
                                           "code": 504})
                    return
            err = fut.exception()
            if err is not None:
                code = getattr(err, "status", 500)
                svc.metrics.request(code)
                yield event("error", {"message": getattr(err, "message", str(err)), "code": code})
                return
            svc.metrics.request(200, time.monotonic() - t0)
            yield event("image_generation.completed", {"id": job.id, "created": int(time.time()), "model": svc.name,
                                                       "seed": job.seed,
                                                       "data": [{"b64_json": b} for b in fut.result()]})

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    def _video(video_id: str) -> Job:
        job = svc.videos.get(video_id)
        if job is None:
            raise ApiError(404, f"no video {video_id!r}", "video_id", kind="not_found_error")
        return job

    @app.post("/v1/videos")
    async def create_video(body: VideoRequest) -> JSONResponse:
        if not svc.ready.is_set():
            raise ApiError(503, "the service is not ready", kind="server_error", headers={"Retry-After": "5"})
        job = svc.make_job(body, kind="video")
        job.deadline = math.inf  # nobody waits on a connection: it runs until done or deleted
        svc.scheduler.submit(job)
        svc.keep_video(job)
        svc.metrics.request(200)
        return JSONResponse(video_object(svc, job))

    @app.get("/v1/videos/{video_id}")
    async def get_video(video_id: str) -> JSONResponse:
        return JSONResponse(video_object(svc, _video(video_id)))

    @app.get("/v1/videos/{video_id}/content")
    async def video_content(video_id: str, format: str | None = None) -> Any:
        from fastapi.responses import Response

        from xdit_compile.jobs.generate import _video_writer

        job = _video(video_id)
        if not job.future.done():
            raise ApiError(409, f"video {video_id} is {video_object(svc, job)['status']}; poll GET "
                                f"/v1/videos/{video_id} until it is completed", kind="invalid_request_error")
        if job.future.exception() is not None:
            raise ApiError(409, f"video {video_id} failed: {video_object(svc, job)['error']['message']}")
        fmt = format or ("mp4" if _video_writer() else "apng")
        data, media = await asyncio.to_thread(encode_video, job.future.result(), fmt)
        return Response(content=data, media_type=media)

    @app.delete("/v1/videos/{video_id}")
    async def delete_video(video_id: str) -> JSONResponse:
        job = _video(video_id)
        job.aborted.set()  # dropped from the queue, or its batch stops at the next step
        with svc._videos_lock:
            svc.videos.pop(video_id, None)
        return JSONResponse({"id": video_id, "object": "video", "deleted": True})

    @app.post("/admin/shutdown")
    async def shutdown(request: Request) -> dict[str, Any]:
        host = request.client.host if request.client else ""
        if host not in ("127.0.0.1", "::1", "localhost"):
            raise ApiError(403, "shutdown is accepted from loopback clients only", kind="permission_error")
        left = svc.scheduler.stop()
        for job in left:
            _fail(job, ApiError(503, "the service is shutting down", kind="server_error"))
        return {"status": "stopping", "rejected": len(left)}

    return app


def _start_http(svc: Service) -> Any:
    import uvicorn

    config = uvicorn.Config(build_app(svc), host=svc.opts.host, port=svc.opts.port, log_level="warning",
                            access_log=False, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="xdit-http", daemon=True)
    thread.start()
    return server, thread


# --------------------------------------------------------------------------- the engine (every rank)


class _Aborted(Exception):
    """Every request of the running batch was aborted: leave the pipeline call (all ranks at the
    same step boundary)."""


def _png_b64(img: np.ndarray) -> str:
    from PIL import Image

    from xdit_compile.jobs.generate import to_uint8

    buf = io.BytesIO()
    Image.fromarray(to_uint8(img)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _call_for(pipe: Any, defaults: dict[str, Any], specs: list[dict[str, Any]]) -> dict[str, Any]:
    """The pipeline call of one batch (every spec has the same signature): one prompt and one
    generator (seed + i) per image."""
    from xdit_compile.jobs.generate import pipeline_call

    s = specs[0]
    images = sum(x["n"] for x in specs)
    negative = [s["negative_prompt"]] * images if s["negative_prompt"] is not None else None
    return pipeline_call(
        pipe, {**defaults, "use_resolution_binning": False}, [x["prompt"] for x in specs for _ in range(x["n"])],
        steps=s["steps"], height=s["height"], width=s["width"], frames=s.get("frames"),
        guidance_scale=s["guidance_scale"], negative_prompt=negative,
        generator=[torch.Generator().manual_seed(x["seed"] + k) for x in specs for k in range(x["n"])])


def _run_batch(pipe: Any, call: dict[str, Any], on_step: Callable[[], None],
               lora: list[list[Any]] | None = None) -> np.ndarray:
    """One batch: its adapters on (every rank: the batch's spec carries them), then the call."""
    from xdit_compile.jobs.generate import output_array, step_callback, use_adapters

    use_adapters(pipe, {name: float(w) for name, w in lora or []})
    with torch.no_grad():
        return output_array(pipe(**call, **step_callback(pipe, on_step)))


def _setup(opts: ServeOptions) -> tuple[Any, dict[str, Any]]:
    """This rank's pipeline, loaded and parallelized (inside an initialized process group)."""
    import xdit_compile as xc
    from xdit_compile.jobs.generate import _DTYPES, load_loras, load_pipeline

    dtype = _DTYPES.get(opts.dtype)
    if dtype is None:
        raise ValueError(f"--dtype {opts.dtype!r}: choose one of {', '.join(_DTYPES)}")
    pipe, defaults = load_pipeline(opts.model, dtype)
    load_loras(pipe, opts.loras)
    pipe = xc.parallelize_pipeline(pipe, xc.Plan(**opts.plan), vae=opts.parallel_vae)
    pipe.set_progress_bar_config(disable=True)
    return pipe, defaults


def _warmup(pipe: Any, defaults: dict[str, Any], svc: "Service") -> None:
    """Compile every served size at every batch size once, before the first request (every
    rank, same calls)."""
    if svc.opts.warmup:  # every batch size too: each is an input signature of its own
        # no adapter, and each loaded adapter alone at weight 1 (other combinations compile at first use)
        for lora in [(), *(((name, 1.0),) for name in sorted(svc.opts.loras))]:
            for w, h in svc.sizes:
                for b in range(1, svc.opts.max_batch + 1):
                    spec = Job(id="warmup", prompt="warmup", n=b, seed=0, width=w, height=h, steps=svc.default_steps,
                               guidance_scale=None, negative_prompt=None, lora=lora).spec()
                    _run_batch(pipe, _call_for(pipe, defaults, [spec]), lambda: None, spec["lora"])
    dist.barrier()


def serve_job(opts: ServeOptions) -> ServeStats:
    """One rank's part of ``xdit-compile serve`` under torchrun (inside an initialized process
    group): rank 0 also serves HTTP. Returns when the service stops (``POST /admin/shutdown``).
    A rank that dies takes the group down (torchrun's ``--max-restarts`` restarts it);
    :func:`serve_main` restarts its own workers instead."""
    rank = dist.get_rank()
    pipe, defaults = _setup(opts)
    svc = Service(opts)
    _configure(svc, pipe, defaults)
    server = _start_http(svc)[0] if rank == 0 else None
    stats = ServeStats(rank=rank)
    try:
        _warmup(pipe, defaults, svc)
        svc.ready.set()
        _engine(pipe, defaults, svc, stats)
    finally:
        if server is not None:
            server.should_exit = True
    return stats


# --------------------------------------------------------------------------- supervisor mode


class GroupFailure(RuntimeError):
    """A rank of the serving group died or its collectives broke: the group is restarted."""


def _follower(rank: int, world: int, port: int, opts: ServeOptions, threads: int, parent: int) -> None:
    """Ranks 1..N-1 of :func:`serve_main` (child processes of rank 0)."""
    import datetime
    import os

    from xdit_compile.testing.launcher import _exit_with_parent

    _exit_with_parent(parent)
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=opts.collective_timeout_s))
    try:
        pipe, defaults = _setup(opts)
        svc = Service(opts)
        _configure(svc, pipe, defaults)
        _warmup(pipe, defaults, svc)
        _engine(pipe, defaults, svc, ServeStats(rank=rank))
    except Exception as e:  # noqa: BLE001  (rank 0 sees the group break and restarts it)
        print(f"xdit-compile serve: rank {rank} stops: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        os._exit(1)
    dist.destroy_process_group()


class _Group:
    """Rank 0 (this process) and its child ranks, one process group."""

    def __init__(self, opts: ServeOptions, world: int, threads: int) -> None:
        self.opts, self.world, self.threads = opts, world, threads
        self.procs: list[Any] = []

    def start(self, svc: Service) -> tuple[Any, dict[str, Any]]:
        import datetime
        import os

        import torch.multiprocessing as mp

        from xdit_compile.testing.launcher import free_port

        port = free_port()
        ctx = mp.get_context("spawn")
        self.procs = [ctx.Process(target=_follower, args=(r, self.world, port, self.opts, self.threads, os.getpid()),
                                  daemon=True) for r in range(1, self.world)]
        for p in self.procs:
            p.start()
        svc.workers = [int(p.pid) for p in self.procs if p.pid is not None]
        torch.set_num_threads(self.threads)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=self.world,
                                timeout=datetime.timedelta(seconds=self.opts.collective_timeout_s))
        pipe, defaults = _setup(self.opts)
        _configure(svc, pipe, defaults)
        _warmup(pipe, defaults, svc)
        return pipe, defaults

    def dead(self) -> str:
        """Which child ranks have exited, if any."""
        gone = [f"rank {r} (exit code {p.exitcode})" for r, p in enumerate(self.procs, 1) if not p.is_alive()]
        return ", ".join(gone)

    def close(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            p.join(10)
        if dist.is_initialized():
            with contextlib.suppress(Exception):  # a broken group: nothing more to tear down
                dist.destroy_process_group()


def serve_main(opts: ServeOptions, world: int, threads: int = 1) -> ServeStats:
    """``xdit-compile serve`` without torchrun: this process is rank 0 (HTTP, queue, engine) and
    starts ranks 1..``world``-1 as its children. When one dies (or the group's collectives
    break), the requests in flight get 500 with the reason, the queued ones wait, and the group
    is started again (pipeline reloaded, parallelized and warmed up) while ``/health`` says
    "restarting". Returns when the service stops."""
    svc = Service(opts)
    server, _ = _start_http(svc)
    stats = ServeStats(rank=0)
    failed_starts = 0
    try:
        while not svc.scheduler.stopping:
            group = _Group(opts, world, threads)
            started = False
            try:
                pipe, defaults = group.start(svc)
                started = True
                failed_starts = 0
                svc.ready.set()
                _engine(pipe, defaults, svc, stats, group=group)
                break
            except Exception as e:  # noqa: BLE001  (a rank died, the group broke: start it again)
                why = group.dead() or f"{type(e).__name__}: {e}"
                failed_starts += 0 if started else 1
                if failed_starts >= opts.max_start_failures:  # it will not come up: say so and stop
                    for j in svc.scheduler.stop() + svc.scheduler.running:
                        _fail(j, ApiError(503, f"the service could not start its workers: {why}", kind="server_error"))
                    raise RuntimeError(f"the process group failed to start {failed_starts} times in a row; "
                                       f"last: {why}") from e
                svc.ready.clear()
                svc.restarts += 1
                svc.last_failure = why
                for j in svc.scheduler.running:
                    _fail(j, ApiError(500, f"a worker of the parallel group failed ({why}); the service is "
                                           "restarting its workers: retry the request", kind="server_error"))
                svc.scheduler.running = []
                print(f"xdit-compile serve: the group failed ({why}); restarting", file=sys.stderr, flush=True)
            finally:
                group.close()
    finally:
        server.should_exit = True
    stats.requests = dict(svc.metrics.requests)
    return stats


def _configure(svc: Service, pipe: Any, defaults: dict[str, Any]) -> None:
    import inspect

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


def _engine(pipe: Any, defaults: dict[str, Any], svc: Service, stats: ServeStats, group: _Group | None = None) -> None:
    """The loop every rank runs: rank 0 decides (next batch, idle, stop), all follow. With
    ``group`` (rank 0 of :func:`serve_main`), a dead child rank raises :class:`GroupFailure`
    before rank 0 enters a collective it would wait in forever."""
    from xdit_compile.jobs.generate import to_uint8

    rank = dist.get_rank()
    sched = svc.scheduler
    while True:
        jobs: list[Job] = []
        if group is not None and group.dead():
            raise GroupFailure(group.dead())
        if rank == 0:
            jobs = sched.next_batch(_IDLE_S)
            if group is not None and jobs and group.dead():  # not started: they wait for the new group
                sched.requeue(jobs)
                raise GroupFailure(group.dead())
            cmd: tuple[Any, ...] = ("run", [j.spec() for j in jobs]) if jobs else (
                ("stop",) if sched.stopping else ("idle",))
        box: list[Any] = [cmd if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        cmd = box[0]
        if cmd[0] == "stop":
            break
        if cmd[0] == "idle":
            continue
        specs = cmd[1]
        stamps = [time.perf_counter()]

        def on_step(jobs: list[Job] = jobs, n: int = len(specs), stamps: list[float] = stamps) -> None:
            # Rank 0 decides which requests are gone; every rank learns it at the same step.
            flags = torch.tensor([j.should_abort() for j in jobs] if rank == 0 else [False] * n, dtype=torch.uint8)
            dist.broadcast(flags, src=0)
            stamps.append(time.perf_counter())
            for j in jobs:
                j.step += 1
            if bool(flags.all()):
                raise _Aborted

        call = _call_for(pipe, defaults, specs)
        total = call.get("num_inference_steps") or svc.default_steps or 0
        for j in jobs:
            j.step, j.steps_total = 0, int(total)
        t0, started = time.perf_counter(), time.monotonic()
        try:
            arr = _run_batch(pipe, call, on_step, specs[0].get("lora"))
        except _Aborted:
            stats.aborted_batches += 1
            if rank == 0:
                sched.running = []
                svc.metrics.aborted_batches += 1
                for j in jobs:
                    _fail(j, j.abort_error())
            continue
        except Exception as e:  # noqa: BLE001  (every rank ran the same call: the same error)
            if group is not None:
                time.sleep(0.5)  # a rank that broke the collective is exiting: let it show
                if group.dead():
                    raise GroupFailure(group.dead()) from e
            if rank == 0:
                sched.running = []
                for j in jobs:
                    _fail(j, ApiError(500, f"the pipeline failed: {type(e).__name__}: {e}", kind="server_error"))
            continue
        stats.batches += 1
        stats.images += len(arr)
        if rank == 0:
            sched.running = []
            sched.last_batch_s = time.perf_counter() - t0
            m = svc.metrics
            with m._lock:
                m.batches += 1
                m.batch_images += len(arr)
                m.images += len(arr)
                m.step_s_sum += stamps[-1] - stamps[0]
                m.steps += len(stamps) - 1
            t_run = time.perf_counter() - t0
            t_enc = time.perf_counter()
            i = 0
            for j in jobs:
                imgs = arr[i:i + j.n]
                i += j.n
                if j.should_abort():
                    _fail(j, j.abort_error())
                elif not j.future.done():
                    if j.kind == "video":  # [F, H, W, C] uint8, encoded when fetched
                        j.future.set_result(to_uint8(imgs[0]))
                    else:
                        j.future.set_result([_png_b64(img) for img in imgs])
            with m._lock:
                m.timed_jobs += len(jobs)
                m.queue_s_sum += sum(max(0.0, started - j.created) for j in jobs)
                m.run_s_sum += t_run * len(jobs)
                m.encode_s_sum += time.perf_counter() - t_enc
    if rank == 0:
        stats.requests = dict(svc.metrics.requests)
