"""Run functions in N gloo worker processes on CPU, reusing the workers across calls.

Distributed tests compare a parallel result with the single-process one. Starting processes
and importing torch/diffusers costs seconds, so a :class:`WorkerPool` keeps N workers with an
initialized gloo group and feeds them functions. If a call fails or times out on any rank,
the pool is torn down (no worker is left hanging in a collective) and the error is raised;
the next call starts a fresh pool.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

__all__ = ["WorkerError", "WorkerPool", "free_port", "run_distributed"]


class WorkerError(RuntimeError):
    """A function failed (or timed out) on at least one worker."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _exit_with_parent(parent: int) -> None:
    """Exit this worker when the process that started it is gone (killed without closing its
    pool): an orphaned worker would otherwise wait, or spin in a collective, forever."""
    import threading

    def watch() -> None:
        while True:
            time.sleep(2.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="xdit-parent-watch").start()


def _worker(
    rank: int,
    world: int,
    port: int,
    path: list[str],
    inbox: Any,
    outbox: Any,
    parent: int | None = None,
) -> None:
    sys.path[:] = path
    if parent is not None:
        _exit_with_parent(parent)
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # torch pytree deprecation noise
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(int(os.environ.get("XDIT_WORKER_THREADS", "1")))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    while True:
        job = inbox.get()
        if job is None:
            break
        fn, args, kwargs = job
        try:
            outbox.put((rank, True, fn(*args, **kwargs)))
        except BaseException as e:  # noqa: BLE001  (reported to the parent)
            outbox.put((rank, False, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    dist.destroy_process_group()


class WorkerPool:
    """N persistent gloo workers. ``pool.run(fn, *args)`` returns the per-rank results."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._procs: list[Any] = []

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        port = free_port()
        self._out = ctx.Queue()
        self._ins = [ctx.Queue() for _ in range(self.world_size)]
        self._procs = [
            ctx.Process(
                target=_worker,
                args=(
                    r,
                    self.world_size,
                    port,
                    list(sys.path),
                    self._ins[r],
                    self._out,
                    os.getpid(),
                ),
                daemon=True,
            )
            for r in range(self.world_size)
        ]
        for p in self._procs:
            p.start()

    def run(
        self, fn: Callable[..., Any], *args: Any, timeout: float = 300.0, **kwargs: Any
    ) -> list[Any]:
        if not self._procs:
            self._start()
        for q in self._ins:
            q.put((fn, args, kwargs))
        results: dict[int, Any] = {}
        errors: list[str] = []
        deadline = time.monotonic() + timeout
        while len(results) + len(errors) < self.world_size:
            try:
                rank, ok, val = self._out.get(timeout=0.5)
            except queue.Empty:
                dead = self._dead()
                if dead:  # a worker died (killed, crashed at startup): its peers would wait forever
                    self.close(force=True)
                    raise WorkerError(f"{fn.__name__}:{dead}") from None
                if time.monotonic() > deadline:
                    self.close(force=True)
                    raise WorkerError(f"{fn.__name__} timed out after {timeout}s") from None
                continue
            if ok:
                results[rank] = val
            else:
                errors.append(f"rank {rank}: {val}")
                time.sleep(0.2)  # a peer's death often shows first as this rank's broken connection
                dead = self._dead()
                # Peers may now wait forever in a collective: stop everyone.
                self.close(force=True)
                raise WorkerError(f"{fn.__name__} failed on " + "\n".join(errors) + dead)
        return [results[r] for r in range(self.world_size)]

    def _dead(self) -> str:
        codes = [
            f"rank {i}: exit code {p.exitcode}"
            for i, p in enumerate(self._procs)
            if not p.is_alive()
        ]
        return f" (worker process died: {', '.join(codes)})" if codes else ""

    def close(self, force: bool = False) -> None:
        for p, q in zip(self._procs, getattr(self, "_ins", []), strict=False):
            if force:
                p.kill()
            else:
                q.put(None)
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        self._procs = []


def run_distributed(
    fn: Callable[..., Any], world_size: int, *args: Any, **kwargs: Any
) -> list[Any]:
    """Run ``fn`` once in a fresh pool of ``world_size`` workers; returns per-rank results."""
    pool = WorkerPool(world_size)
    try:
        return pool.run(fn, *args, **kwargs)
    finally:
        pool.close()
