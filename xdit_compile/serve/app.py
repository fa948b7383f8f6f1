"""Rank 0's HTTP API (FastAPI, served by uvicorn in a thread), one function per route group.

OpenAI-compatible where OpenAI defines it: ``POST /v1/images/generations`` (optionally as
server-sent events), ``POST /v1/videos`` with ``GET``/``DELETE /v1/videos/{id}`` and
``GET /v1/videos/{id}/content``, ``GET /v1/models``; and ``GET /health``, ``GET /metrics``
(Prometheus text), ``POST /admin/shutdown`` (loopback clients only: finishes the running batch,
answers the queued requests with 503, stops every rank).
"""

# No ``from __future__ import annotations`` here: FastAPI reads the handlers' annotations
# (request models, ``Request``) at runtime.
import asyncio
import json
import math
import threading
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from xdit_compile.runtime.collectives import comm_stats
from xdit_compile.serve.options import ApiError
from xdit_compile.serve.scheduler import Job, fail
from xdit_compile.serve.state import Service
from xdit_compile.serve.video import default_format, encode_video, video_object

__all__ = ["ImageRequest", "VideoRequest", "build_app", "start_http"]

_LOOPBACK = ("127.0.0.1", "::1", "localhost")


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


def build_app(svc: Service) -> FastAPI:
    """The FastAPI application of rank 0."""
    app = FastAPI(title="xdit_compile", version="0.1.0")
    _add_error_handlers(app, svc)
    _add_status_routes(app, svc)
    _add_image_routes(app, svc)
    _add_video_routes(app, svc)
    _add_admin_routes(app, svc)
    return app


def start_http(svc: Service) -> tuple[uvicorn.Server, threading.Thread]:
    """uvicorn serving :func:`build_app` in a daemon thread (``server.should_exit`` stops it)."""
    config = uvicorn.Config(
        build_app(svc),
        host=svc.opts.host,
        port=svc.opts.port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="xdit-http", daemon=True)
    thread.start()
    return server, thread


# --------------------------------------------------------------------------- errors


def _add_error_handlers(app: FastAPI, svc: Service) -> None:
    """ApiError and invalid bodies as OpenAI-style error bodies (invalid: 400), counted."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        svc.metrics.request(exc.status)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        svc.metrics.request(400)
        return JSONResponse(_invalid_error(exc).body(), status_code=400)


def _invalid_error(exc: RequestValidationError) -> ApiError:
    """One 400 naming every invalid field (the first one as ``param``)."""
    errs = exc.errors()
    first = errs[0] if errs else {}
    loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
    msg = "; ".join(
        f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body')}: {e.get('msg')}" for e in errs
    )
    return ApiError(400, msg or "invalid request", loc or None)


# --------------------------------------------------------------------------- status


def _add_status_routes(app: FastAPI, svc: Service) -> None:
    """``/health``, ``/v1/models`` and ``/metrics``."""

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = svc.ready.is_set() and not svc.scheduler.stopping
        return JSONResponse(_health(svc, ok), status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        model = {
            "id": svc.name,
            "object": "model",
            "created": int(svc.started),
            "owned_by": "xdit_compile",
        }
        return {"object": "list", "data": [model]}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        running = sum(j.n for j in svc.scheduler.running)
        return PlainTextResponse(
            svc.metrics.render(len(svc.scheduler), running, comm_stats().total_bytes)
        )


def _health(svc: Service, ok: bool) -> dict[str, Any]:
    stopping = svc.scheduler.stopping
    status = (
        "ok" if ok else "stopping" if stopping else "restarting" if svc.restarts else "starting"
    )
    return {
        "status": status,
        "model": svc.name,
        "plan": svc.opts.plan,
        "queue": len(svc.scheduler),
        "workers": svc.workers,
        "restarts": svc.restarts,
        "last_failure": svc.last_failure,
        "uptime_s": round(time.time() - svc.started, 3),
    }


# --------------------------------------------------------------------------- images


def _add_image_routes(app: FastAPI, svc: Service) -> None:
    """``POST /v1/images/generations``: wait for the images, or stream progress events."""

    @app.post("/v1/images/generations")
    async def generations(body: ImageRequest, request: Request) -> Response:
        if not svc.ready.is_set():
            what = "restarting its workers" if svc.restarts else "still warming up"
            raise ApiError(
                503, f"the service is {what}", kind="server_error", headers={"Retry-After": "5"}
            )
        job = svc.make_job(body)
        t0 = time.monotonic()
        svc.scheduler.submit(job)
        fut = asyncio.wrap_future(job.future)
        if body.stream:
            return _stream(svc, job, fut, request, t0)
        return await _wait(svc, job, fut, request, t0)


async def _wait(
    svc: Service, job: Job, fut: asyncio.Future[Any], request: Request, t0: float
) -> JSONResponse:
    """The images, watching for the client leaving and the deadline meanwhile."""
    while True:
        done, _ = await asyncio.wait({fut}, timeout=0.2)
        if done:
            break
        if await request.is_disconnected():
            job.aborted.set()  # the engine drops it, or stops its batch at the next step
            svc.metrics.request(499)
            return JSONResponse(
                {"error": {"message": "client disconnected", "type": "aborted"}}, status_code=499
            )
        if time.monotonic() > job.deadline:
            job.aborted.set()
            raise ApiError(
                504, f"the request took longer than {svc.opts.timeout_s:g} s", kind="timeout"
            )
    images = fut.result()  # raises the ApiError the engine set
    svc.metrics.request(200, time.monotonic() - t0)
    body = {
        "created": int(time.time()),
        "model": svc.name,
        "seed": job.seed,
        "data": [{"b64_json": b} for b in images],
    }
    return JSONResponse(body)


def _stream(
    svc: Service, job: Job, fut: asyncio.Future[Any], request: Request, t0: float
) -> StreamingResponse:
    return StreamingResponse(
        _events(svc, job, fut, request, t0),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache"},
    )


def _event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


async def _events(
    svc: Service, job: Job, fut: asyncio.Future[Any], request: Request, t0: float
) -> AsyncIterator[str]:
    """A progress event at every step, then the images (or an error event)."""
    last = -1
    while True:
        done, _ = await asyncio.wait({fut}, timeout=0.1)
        if job.step != last and job.steps_total:
            last = job.step
            yield _event(
                "image_generation.progress",
                {"id": job.id, "step": job.step, "steps": job.steps_total},
            )
        if done:
            break
        if await request.is_disconnected():
            job.aborted.set()
            svc.metrics.request(499)
            return
        if time.monotonic() > job.deadline:
            job.aborted.set()
            svc.metrics.request(504)
            msg = f"the request took longer than {svc.opts.timeout_s:g} s"
            yield _event("error", {"message": msg, "code": 504})
            return
    yield _last_event(svc, job, fut, t0)


def _last_event(svc: Service, job: Job, fut: asyncio.Future[Any], t0: float) -> str:
    """The finished request's event (counted): its images, or its error."""
    err = fut.exception()
    if err is not None:
        code = getattr(err, "status", 500)
        svc.metrics.request(code)
        return _event("error", {"message": getattr(err, "message", str(err)), "code": code})
    svc.metrics.request(200, time.monotonic() - t0)
    data = [{"b64_json": b} for b in fut.result()]
    body = {
        "id": job.id,
        "created": int(time.time()),
        "model": svc.name,
        "seed": job.seed,
        "data": data,
    }
    return _event("image_generation.completed", body)


# --------------------------------------------------------------------------- videos


def _add_video_routes(app: FastAPI, svc: Service) -> None:
    """``/v1/videos``: create a job, poll it, fetch its content, delete it."""

    def find(video_id: str) -> Job:
        job = svc.videos.get(video_id)
        if job is None:
            raise ApiError(404, f"no video {video_id!r}", "video_id", kind="not_found_error")
        return job

    @app.post("/v1/videos")
    async def create_video(body: VideoRequest) -> JSONResponse:
        if not svc.ready.is_set():
            raise ApiError(
                503, "the service is not ready", kind="server_error", headers={"Retry-After": "5"}
            )
        job = svc.make_job(body, kind="video")
        job.deadline = math.inf  # nobody waits on a connection: it runs until done or deleted
        svc.scheduler.submit(job)
        svc.keep_video(job)
        svc.metrics.request(200)
        return JSONResponse(video_object(svc, job))

    @app.get("/v1/videos/{video_id}")
    async def get_video(video_id: str) -> JSONResponse:
        return JSONResponse(video_object(svc, find(video_id)))

    @app.get("/v1/videos/{video_id}/content")
    async def video_content(video_id: str, format: str | None = None) -> Any:
        job = find(video_id)
        _check_finished(svc, job)
        data, media = await asyncio.to_thread(
            encode_video, job.future.result(), format or default_format()
        )
        return Response(content=data, media_type=media)

    @app.delete("/v1/videos/{video_id}")
    async def delete_video(video_id: str) -> JSONResponse:
        job = find(video_id)
        job.aborted.set()  # dropped from the queue, or its batch stops at the next step
        svc.forget_video(video_id)
        return JSONResponse({"id": video_id, "object": "video", "deleted": True})


def _check_finished(svc: Service, job: Job) -> None:
    """409 unless ``job`` completed."""
    if not job.future.done():
        status = video_object(svc, job)["status"]
        msg = f"video {job.id} is {status}; poll GET /v1/videos/{job.id} until it is completed"
        raise ApiError(409, msg, kind="invalid_request_error")
    if job.future.exception() is not None:
        raise ApiError(409, f"video {job.id} failed: {video_object(svc, job)['error']['message']}")


# --------------------------------------------------------------------------- admin


def _add_admin_routes(app: FastAPI, svc: Service) -> None:
    """``POST /admin/shutdown`` (loopback clients only)."""

    @app.post("/admin/shutdown")
    async def shutdown(request: Request) -> dict[str, Any]:
        host = request.client.host if request.client else ""
        if host not in _LOOPBACK:
            raise ApiError(
                403, "shutdown is accepted from loopback clients only", kind="permission_error"
            )
        left = svc.scheduler.stop()
        for job in left:
            fail(job, ApiError(503, "the service is shutting down", kind="server_error"))
        return {"status": "stopping", "rejected": len(left)}
