"""Rank 0's queue, and what every rank must agree on.

Scheduling. A bounded queue (full: 429 with ``Retry-After``). The oldest request always runs
next (no starvation); queued requests with the same compiled signature (size, steps, guidance,
negative prompt, adapters) join its batch, up to ``max_batch`` images, so one pipeline call (one
compiled graph) serves them together. Each image keeps its own seed: the pipeline gets one
generator per image, so a request's image does not depend on what it was batched with (up to
the float reordering of a larger batch's matmuls).

Agreement. Rank 0 decides and broadcasts, the other ranks follow:

- which batch runs next (or "idle", or "stop"): one ``broadcast_object_list`` per turn of the
  engine loop (:func:`broadcast_command`), so every rank enters the same pipeline call with the
  same arguments;
- at every denoising step boundary, which requests of the running batch are aborted (client
  gone, deadline passed): one small ``broadcast`` (:func:`step_boundary`); when all of them are,
  every rank leaves the call at the same step (:class:`BatchAborted`).

So no rank ever enters a collective the others skip.
"""

import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from xdit_compile.serve.options import ApiError

__all__ = [
    "IDLE_S",
    "BatchAborted",
    "Job",
    "Scheduler",
    "broadcast_command",
    "command",
    "fail",
    "step_boundary",
]

#: Seconds rank 0 waits for a request before it tells the other ranks "idle" (they wait in a
#: broadcast meanwhile; this bounds how long a collective waits).
IDLE_S = 0.5


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
        return (
            self.width,
            self.height,
            self.frames,
            self.steps,
            self.guidance_scale,
            self.negative_prompt,
            self.lora,
        )

    def spec(self) -> dict[str, Any]:
        """What the other ranks need to run it (plain data, broadcast)."""
        return {
            "id": self.id,
            "prompt": self.prompt,
            "n": self.n,
            "seed": self.seed,
            "width": self.width,
            "height": self.height,
            "frames": self.frames,
            "steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "negative_prompt": self.negative_prompt,
            "lora": [list(x) for x in self.lora],
        }

    def should_abort(self) -> bool:
        return self.aborted.is_set() or time.monotonic() > self.deadline

    def abort_error(self) -> ApiError:
        """Why it stopped: its deadline (504) or its client (499: gone, or the job deleted)."""
        if not self.aborted.is_set() and time.monotonic() > self.deadline:
            return ApiError(
                504, f"the request took longer than {self.timeout_s:g} s", kind="timeout"
            )
        return ApiError(499, "aborted", kind="aborted")


def fail(job: Job, err: Exception) -> None:
    """Answer ``job`` with ``err`` (unless it is answered already)."""
    if not job.future.done():
        job.future.set_exception(err)


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
                raise ApiError(
                    429,
                    f"the queue is full ({self.max_queue} requests); retry later",
                    kind="rate_limit_error",
                    headers={"Retry-After": str(retry)},
                )
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
                fail(gone, gone.abort_error())
            if not self._queue:
                return []
            self.running = self._take_batch(self._queue[0].signature)
            return self.running

    def _take_batch(self, signature: tuple[Any, ...]) -> list[Job]:
        """Remove and return the queued jobs of ``signature`` that fit one batch, oldest first
        (the first always fits). Called with the lock held."""
        batch: list[Job] = []
        images = 0
        for job in list(self._queue):
            fits = not batch or images + job.n <= self.max_batch
            if job.signature == signature and not job.should_abort() and fits:
                batch.append(job)
                images += job.n
                self._queue.remove(job)
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


# --------------------------------------------------------------------------- agreement


class BatchAborted(Exception):
    """Every request of the running batch was aborted: leave the pipeline call (all ranks at the
    same step boundary)."""


def command(sched: Scheduler, jobs: list[Job]) -> tuple[Any, ...]:
    """Rank 0's decision for this turn: run ``jobs`` (their specs), or stop, or idle."""
    if jobs:
        return ("run", [j.spec() for j in jobs])
    return ("stop",) if sched.stopping else ("idle",)


def broadcast_command(cmd: tuple[Any, ...] | None) -> tuple[Any, ...]:
    """Every rank gets rank 0's ``cmd`` (the other ranks pass None)."""
    box: list[Any] = [cmd]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def step_boundary(jobs: list[Job], n: int, stamps: list[float], rank: int) -> Callable[[], None]:
    """The callback of every denoising step of a batch of ``n`` requests (``jobs``: rank 0's,
    empty elsewhere): rank 0 says which requests are gone, every rank learns it at the same
    step; it stamps the step's end in ``stamps`` and raises :class:`BatchAborted` when all are."""

    def on_step() -> None:
        aborts = [j.should_abort() for j in jobs] if rank == 0 else [False] * n
        flags = torch.tensor(aborts, dtype=torch.uint8)
        dist.broadcast(flags, src=0)
        stamps.append(time.perf_counter())
        for j in jobs:
            j.step += 1
        if bool(flags.all()):
            raise BatchAborted

    return on_step
