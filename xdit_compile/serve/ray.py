"""Replicas of a whole parallel group behind one endpoint, with Ray Serve.

One replica is one ``xdit-compile serve`` process group (rank 0 and its child ranks, see
:func:`xdit_compile.serve.group.serve_main`) on a private loopback port; the Ray Serve deployment in
front of it forwards every request to its own group and adds an ``x-xdit-replica`` header. Ray
Serve spreads requests over the replicas; each group still batches, aborts and restarts its
ranks on its own.

    import ray
    from ray import serve
    from xdit_compile.serve.ray import deployment
    from xdit_compile.serve.options import ServeOptions

    ray.init()
    serve.start(http_options={"host": "0.0.0.0", "port": 8000})
    serve.run(deployment(ServeOptions(model="demo", plan={"cfg": 2}), world=2, num_replicas=4),
              route_prefix="/")

Or ``xdit-compile serve --replicas 4 ...``. Video jobs live in the replica that made them, so
``GET /v1/videos/{id}`` needs a single replica (or a client that keeps to one).
"""

# No ``from __future__ import annotations``: FastAPI reads the proxy's annotations at runtime.
import os
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import asdict
from typing import Any

from xdit_compile.serve.client import wait_ready
from xdit_compile.serve.options import ServeOptions

__all__ = ["deployment", "serve_args"]

#: Request headers not forwarded to the group (hop-by-hop, or recomputed).
_DROP = {"host", "content-length", "connection", "transfer-encoding", "keep-alive"}


def serve_args(opts: ServeOptions, world: int, threads: int = 1) -> list[str]:
    """The ``xdit-compile serve`` command line of one replica's group (its port included)."""
    p = opts.plan
    args = [
        sys.executable,
        "-m",
        "xdit_compile.cli",
        "serve",
        "--model",
        opts.model,
        "--host",
        "127.0.0.1",
        "--port",
        str(opts.port),
        "--nproc",
        str(world),
        "--threads",
        str(threads),
        "--dtype",
        opts.dtype,
        "--max-steps",
        str(opts.max_steps),
        "--max-n",
        str(opts.max_n),
        "--max-batch",
        str(opts.max_batch),
        "--max-queue",
        str(opts.max_queue),
        "--max-prompt-chars",
        str(opts.max_prompt_chars),
        "--request-timeout",
        str(opts.timeout_s),
        "--max-start-failures",
        str(opts.max_start_failures),
    ]
    for axis in ("ulysses", "ring", "cfg", "dp", "pipefusion", "distrifusion"):
        if p.get(axis, 1) != 1:
            args += [f"--{axis}", str(p[axis])]
    if p.get("patches"):
        args += ["--patches", str(p["patches"])]
    if p.get("stage_blocks"):
        args += ["--stage-blocks", *map(str, p["stage_blocks"])]
    if p.get("warmup_steps", 1) != 1:
        args += ["--warmup-steps", str(p["warmup_steps"])]
    if p.get("compile"):
        args += ["--compile", str(p["compile"])]
    if opts.sizes:
        args += ["--sizes", *opts.sizes]
    if opts.default_steps:
        args += ["--steps", str(opts.default_steps)]
    if not opts.warmup:
        args.append("--no-warmup")
    if opts.parallel_vae:
        args.append("--parallel-vae")
    for name, path in opts.loras.items():
        args += ["--lora", f"{name}={path}"]
    return args


def deployment(
    opts: ServeOptions,
    world: int,
    *,
    num_replicas: int = 1,
    threads: int = 1,
    ray_actor_options: dict[str, Any] | None = None,
    start_timeout_s: float = 600.0,
) -> Any:
    """A Ray Serve application: ``num_replicas`` replicas, each a process group of ``world``
    ranks serving ``opts`` (its ``port`` and ``host`` are chosen per replica)."""
    from fastapi import FastAPI, Request, Response
    from ray import serve

    app = FastAPI(title="xdit_compile (Ray Serve)")
    options = asdict(opts)

    @serve.deployment(
        num_replicas=num_replicas, ray_actor_options=ray_actor_options or {"num_cpus": 0}
    )
    @serve.ingress(app)
    class XditReplica:
        def __init__(self) -> None:
            from xdit_compile.testing.launcher import free_port

            o = ServeOptions(**{**options, "port": free_port(), "host": "127.0.0.1"})
            self.url = f"http://127.0.0.1:{o.port}"
            self.replica = f"{os.uname().nodename}:{os.getpid()}"  # this replica's actor process
            self.proc = subprocess.Popen(
                serve_args(o, world, threads),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=dict(os.environ, PYTHONWARNINGS="ignore"),
            )
            try:
                wait_ready(
                    self.url, timeout=start_timeout_s, alive=lambda: self.proc.poll() is None
                )
            except RuntimeError:
                raise RuntimeError(
                    f"the replica's group exited with code {self.proc.returncode}"
                ) from None
            except TimeoutError:
                raise RuntimeError("the replica's group did not become healthy") from None

        def _forward(
            self, method: str, path: str, query: str, headers: dict[str, str], body: bytes
        ) -> tuple[int, dict[str, str], bytes]:
            url = f"{self.url}/{path}" + (f"?{query}" if query else "")
            req = urllib.request.Request(
                url,
                data=body or None,
                method=method,
                headers={k: v for k, v in headers.items() if k.lower() not in _DROP},
            )
            try:
                with urllib.request.urlopen(req, timeout=3600) as r:
                    return r.status, dict(r.headers), r.read()
            except urllib.error.HTTPError as e:
                return e.code, dict(e.headers), e.read()

        @app.api_route("/{path:path}", methods=["GET", "POST", "DELETE"])
        async def proxy(self, path: str, request: Request) -> Response:
            import asyncio

            if path == "admin/shutdown":
                return Response(
                    status_code=403,
                    content=b'{"error": {"message": "stop replicas with serve.shutdown()"}}',
                    media_type="application/json",
                )
            status, headers, data = await asyncio.to_thread(
                self._forward,
                request.method,
                path,
                request.url.query,
                dict(request.headers),
                await request.body(),
            )
            keep = {
                k: v for k, v in headers.items() if k.lower() in ("content-type", "retry-after")
            }
            keep["x-xdit-replica"] = str(self.replica)
            return Response(content=data, status_code=status, headers=keep)

        def __del__(self) -> None:
            proc = getattr(self, "proc", None)
            if proc is not None and proc.poll() is None:
                try:
                    urllib.request.urlopen(
                        urllib.request.Request(self.url + "/admin/shutdown", method="POST"),
                        timeout=10,
                    )
                    proc.wait(30)
                except (OSError, subprocess.TimeoutExpired):
                    proc.kill()

    return XditReplica.bind()  # type: ignore[attr-defined]
