"""The service's process group, run two ways.

Process model. Every rank loads the pipeline once, parallelizes it once (the plan of the command
line) and enters the engine loop (:mod:`xdit_compile.serve.engine`). Rank 0 also runs the HTTP
API (:mod:`xdit_compile.serve.app`, in a thread) and the request queue.

- :func:`serve_job`: one rank's part under torchrun; a rank that dies takes the group down
  (torchrun's ``--max-restarts`` restarts it).
- :func:`serve_main`: without torchrun, this process is rank 0 and starts ranks 1..N-1 as its
  children (``spawn``, gloo over loopback); it supervises them and starts the whole group again
  when one dies or the group's collectives break.
"""

import contextlib
import datetime
import os
import sys
import threading
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from xdit_compile.serve.engine import configure, run_engine, setup, warmup
from xdit_compile.serve.options import ApiError, ServeOptions, ServeStats
from xdit_compile.serve.scheduler import fail
from xdit_compile.serve.state import Service
from xdit_compile.testing.launcher import _exit_with_parent, free_port

__all__ = ["serve_job", "serve_main"]


def _start_http(svc: Service) -> tuple[Any, threading.Thread]:
    # fastapi and uvicorn (the serve extra) are imported only when a server starts
    from xdit_compile.serve.app import start_http

    return start_http(svc)


def serve_job(opts: ServeOptions) -> ServeStats:
    """One rank's part of ``xdit-compile serve`` under torchrun (inside an initialized process
    group): rank 0 also serves HTTP. Returns when the service stops (``POST /admin/shutdown``).
    A rank that dies takes the group down (torchrun's ``--max-restarts`` restarts it);
    :func:`serve_main` restarts its own workers instead."""
    rank = dist.get_rank()
    pipe, defaults = setup(opts)
    svc = Service(opts)
    configure(svc, pipe, defaults)
    server = _start_http(svc)[0] if rank == 0 else None
    stats = ServeStats(rank=rank)
    try:
        warmup(pipe, defaults, svc)
        svc.ready.set()
        run_engine(pipe, defaults, svc, stats)
    finally:
        if server is not None:
            server.should_exit = True
    return stats


def serve_main(opts: ServeOptions, world: int, threads: int = 1) -> ServeStats:
    """``xdit-compile serve`` without torchrun: this process is rank 0 (HTTP, queue, engine) and
    starts ranks 1..``world``-1 as its children. When one dies (or the group's collectives
    break), the requests in flight get 500 with the reason, the queued ones wait, and the group
    is started again (pipeline reloaded, parallelized and warmed up) while ``/health`` says
    "restarting". Returns when the service stops."""
    svc = Service(opts)
    server, _ = _start_http(svc)
    stats = ServeStats(rank=0)
    try:
        _supervise(svc, world, threads, stats)
    finally:
        server.should_exit = True
    stats.requests = dict(svc.metrics.requests)
    return stats


def _supervise(svc: Service, world: int, threads: int, stats: ServeStats) -> None:
    """Start the group and run the engine until the service stops; start it again when it fails
    (up to ``max_start_failures`` failed starts in a row)."""
    failed_starts = 0
    while not svc.scheduler.stopping:
        group = _Group(svc.opts, world, threads)
        started = False
        try:
            pipe, defaults = group.start(svc)
            started = True
            failed_starts = 0
            svc.ready.set()
            run_engine(pipe, defaults, svc, stats, dead=group.dead)
            break
        except Exception as e:  # noqa: BLE001  (a rank died, the group broke: start it again)
            why = group.dead() or f"{type(e).__name__}: {e}"
            failed_starts += 0 if started else 1
            _after_failure(svc, why, failed_starts, e)
        finally:
            group.close()


def _after_failure(svc: Service, why: str, failed_starts: int, e: Exception) -> None:
    """The group failed (``why``): give up after too many failed starts, else answer the running
    batch with 500 and mark the service restarting."""
    if failed_starts >= svc.opts.max_start_failures:  # it will not come up: say so and stop
        for j in svc.scheduler.stop() + svc.scheduler.running:
            fail(
                j,
                ApiError(
                    503, f"the service could not start its workers: {why}", kind="server_error"
                ),
            )
        raise RuntimeError(
            f"the process group failed to start {failed_starts} times in a row; last: {why}"
        ) from e
    svc.ready.clear()
    svc.restarts += 1
    svc.last_failure = why
    for j in svc.scheduler.running:
        msg = (
            f"a worker of the parallel group failed ({why}); the service is restarting its "
            "workers: retry the request"
        )
        fail(j, ApiError(500, msg, kind="server_error"))
    svc.scheduler.running = []
    print(f"xdit-compile serve: the group failed ({why}); restarting", file=sys.stderr, flush=True)


def _init_group(port: int, rank: int, world: int, opts: ServeOptions) -> None:
    timeout = datetime.timedelta(seconds=opts.collective_timeout_s)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timeout
    )


def _follower(
    rank: int, world: int, port: int, opts: ServeOptions, threads: int, parent: int
) -> None:
    """Ranks 1..N-1 of :func:`serve_main` (child processes of rank 0)."""
    _exit_with_parent(parent)
    torch.set_num_threads(threads)
    _init_group(port, rank, world, opts)
    try:
        pipe, defaults = setup(opts)
        svc = Service(opts)
        configure(svc, pipe, defaults)
        warmup(pipe, defaults, svc)
        run_engine(pipe, defaults, svc, ServeStats(rank=rank))
    except Exception as e:  # noqa: BLE001  (rank 0 sees the group break and restarts it)
        print(
            f"xdit-compile serve: rank {rank} stops: {type(e).__name__}: {e}",
            file=sys.stderr,
            flush=True,
        )
        os._exit(1)
    dist.destroy_process_group()


class _Group:
    """Rank 0 (this process) and its child ranks, one process group."""

    def __init__(self, opts: ServeOptions, world: int, threads: int) -> None:
        self.opts, self.world, self.threads = opts, world, threads
        self.procs: list[Any] = []

    def start(self, svc: Service) -> tuple[Any, dict[str, Any]]:
        """Start the child ranks, join the group as rank 0, load and warm up the pipeline."""
        port = free_port()
        ctx = mp.get_context("spawn")
        self.procs = [
            ctx.Process(
                target=_follower,
                args=(r, self.world, port, self.opts, self.threads, os.getpid()),
                daemon=True,
            )
            for r in range(1, self.world)
        ]
        for p in self.procs:
            p.start()
        svc.workers = [int(p.pid) for p in self.procs if p.pid is not None]
        torch.set_num_threads(self.threads)
        _init_group(port, 0, self.world, self.opts)
        pipe, defaults = setup(self.opts)
        configure(svc, pipe, defaults)
        warmup(pipe, defaults, svc)
        return pipe, defaults

    def dead(self) -> str:
        """Which child ranks have exited, if any."""
        gone = [
            f"rank {r} (exit code {p.exitcode})"
            for r, p in enumerate(self.procs, 1)
            if not p.is_alive()
        ]
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
