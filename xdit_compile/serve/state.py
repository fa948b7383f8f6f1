"""Rank 0's state, shared by the HTTP thread and the engine loop: the options, the queue, the
metrics, health (ready, restarts), the video jobs kept for polling; and the validation that turns
a request body into a :class:`~xdit_compile.serve.scheduler.Job`."""

import itertools
import math
import threading
import time
from typing import Any

import torch

from xdit_compile.serve.metrics import Metrics
from xdit_compile.serve.options import ApiError, ServeOptions, parse_size
from xdit_compile.serve.scheduler import Job, Scheduler

__all__ = ["Service"]


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

    def configure(
        self,
        default_size: tuple[int, int],
        default_steps: int | None,
        default_frames: int | None = None,
        video: bool = False,
    ) -> None:
        """The pipeline's defaults, once it is loaded: the default size (when none is given),
        steps, and for video pipelines the default frame count."""
        self.sizes = self.sizes or [default_size]
        self.default_steps = self.opts.default_steps or default_steps
        self.default_frames = default_frames
        self.video = video

    def make_job(self, body: Any, kind: str = "image") -> Job:
        """The job of a request ``body`` (an image or video request), or the :class:`ApiError`
        that says what is wrong with it."""
        o = self.opts
        self._check_kind(body, kind)
        n = self._check_n(body)
        w, h = self._size(body.size)
        steps = body.steps if body.steps is not None else self.default_steps
        if steps is not None and steps > o.max_steps:
            raise ApiError(400, f"steps={steps}: at most {o.max_steps}", "steps")
        frames = self._frames(body) if kind == "video" else None
        seed = body.seed if body.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
        prefix = "video" if kind == "video" else "img"
        return Job(
            id=f"{prefix}-{next(self._ids)}",
            prompt=body.prompt,
            n=n,
            seed=seed,
            width=w,
            height=h,
            steps=steps,
            guidance_scale=body.guidance_scale,
            negative_prompt=body.negative_prompt,
            frames=frames,
            kind=kind,
            deadline=time.monotonic() + o.timeout_s,
            timeout_s=o.timeout_s,
            lora=self._lora(getattr(body, "lora", None)),
        )

    def _check_kind(self, body: Any, kind: str) -> None:
        """The right endpoint for this pipeline, this service's model, a prompt within limits."""
        if kind == "image" and self.video:
            raise ApiError(
                400, f"{self.name} makes videos: POST /v1/videos", kind="invalid_request_error"
            )
        if kind == "video" and not self.video:
            raise ApiError(400, f"{self.name} makes images: POST /v1/images/generations")
        if body.model not in (None, "", self.name):
            msg = f"model {body.model!r} is not served here (this service: {self.name!r})"
            raise ApiError(404, msg, "model", kind="not_found_error")
        limit = self.opts.max_prompt_chars
        if len(body.prompt) > limit:
            msg = f"prompt is {len(body.prompt)} characters; the limit is {limit}"
            raise ApiError(400, msg, "prompt")

    def _check_n(self, body: Any) -> int:
        """The images asked for (1 for a video), and the one response format served."""
        o = self.opts
        n = getattr(body, "n", 1)
        if n > o.max_n:
            raise ApiError(400, f"n={n}: at most {o.max_n} images per request", "n")
        if n > o.max_batch:
            raise ApiError(
                400, f"n={n}: at most {o.max_batch} images per request (--max-batch)", "n"
            )
        if getattr(body, "response_format", "b64_json") != "b64_json":
            msg = f"response_format {body.response_format!r}: only 'b64_json' is served"
            raise ApiError(400, msg, "response_format")
        return n

    def _size(self, size: str | None) -> tuple[int, int]:
        w, h = parse_size(size) if size else self.sizes[0]
        if (w, h) not in self.sizes:
            allowed = ", ".join(f"{a}x{b}" for a, b in self.sizes)
            raise ApiError(400, f"size {w}x{h} is not served; choose one of {allowed}", "size")
        return w, h

    def _frames(self, body: Any) -> int | None:
        frames = body.frames if body.frames is not None else self.default_frames
        if frames is not None and frames > self.opts.max_frames:
            raise ApiError(400, f"frames={frames}: at most {self.opts.max_frames}", "frames")
        return frames

    def _lora(self, asked: dict[str, float] | None) -> tuple[tuple[str, float], ...]:
        if not asked:
            return ()
        unknown = sorted(set(asked) - set(self.opts.loras))
        if unknown:
            served = (
                ", ".join(sorted(self.opts.loras))
                or "none (start the service with --lora NAME=PATH)"
            )
            names = ", ".join(map(repr, unknown))
            raise ApiError(400, f"lora {names} is not loaded; loaded: {served}", "lora")
        bad = [k for k, w in asked.items() if not math.isfinite(w)]
        if bad:
            raise ApiError(400, f"lora weight of {bad[0]!r} is not a finite number", "lora")
        return tuple(sorted((k, float(w)) for k, w in asked.items()))

    def keep_video(self, job: Job) -> None:
        """Keep ``job`` for polling; drop the oldest finished ones past ``max_videos_kept``."""
        with self._videos_lock:
            self.videos[job.id] = job
            done = [k for k, j in self.videos.items() if j.future.done()]
            for k in done[: max(0, len(done) - self.opts.max_videos_kept)]:
                del self.videos[k]

    def forget_video(self, video_id: str) -> None:
        with self._videos_lock:
            self.videos.pop(video_id, None)
