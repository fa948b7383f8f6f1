"""Video jobs as the API shows them (``GET /v1/videos/{id}``) and their frames encoded for
``GET /v1/videos/{id}/content``: mp4 (imageio-ffmpeg), animated PNG, or the exact frames."""

import io
import tempfile
from typing import Any

import numpy as np

from xdit_compile.jobs.generate import _video_writer
from xdit_compile.serve.options import ApiError
from xdit_compile.serve.scheduler import Job
from xdit_compile.serve.state import Service

__all__ = ["default_format", "encode_video", "video_object"]


def video_object(svc: Service, job: Job) -> dict[str, Any]:
    """A video job as ``GET /v1/videos/{id}`` shows it (OpenAI's fields where they exist)."""
    f = job.future
    if f.done():
        err = f.exception()
        status = "failed" if err is not None else "completed"
    else:
        err = None
        status = "in_progress" if job.step or job in svc.scheduler.running else "queued"
    progress = int(100 * job.step / job.steps_total) if job.steps_total else 0
    out: dict[str, Any] = {
        "id": job.id,
        "object": "video",
        "model": svc.name,
        "status": status,
        "progress": 100 if status == "completed" else progress,
        "created_at": job.created_at,
        "size": f"{job.width}x{job.height}",
        "frames": job.frames,
        "seed": job.seed,
        "step": job.step,
        "steps": job.steps_total,
    }
    if err is not None:
        out["error"] = {
            "message": getattr(err, "message", str(err)),
            "code": getattr(err, "status", 500),
        }
    return out


def default_format() -> str:
    """mp4 where the server can write it, else animated PNG."""
    return "mp4" if _video_writer() else "apng"


def encode_video(frames: np.ndarray, fmt: str) -> tuple[bytes, str]:
    """``frames`` ([F, H, W, C] uint8) as ``fmt``: "mp4" (needs imageio-ffmpeg), "apng", or
    "npy" (the exact frames). Returns (bytes, media type)."""
    if fmt == "npy":
        buf = io.BytesIO()
        np.save(buf, frames)
        return buf.getvalue(), "application/octet-stream"
    if fmt == "mp4":
        return _mp4(frames), "video/mp4"
    if fmt == "apng":
        return _apng(frames), "image/apng"
    raise ApiError(400, f"format {fmt!r}: choose mp4, apng or npy", "format")


def _mp4(frames: np.ndarray) -> bytes:
    if not _video_writer():
        msg = "mp4 needs imageio and imageio-ffmpeg on the server; ask for format=apng or npy"
        raise ApiError(400, msg, "format")
    from diffusers.utils import export_to_video

    with tempfile.TemporaryDirectory() as d:
        path = f"{d}/v.mp4"
        export_to_video([f.astype(np.float32) / 255.0 for f in frames], path, fps=8)
        with open(path, "rb") as fh:
            return fh.read()


def _apng(frames: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    imgs = [Image.fromarray(f) for f in frames]
    imgs[0].save(buf, format="PNG", save_all=True, append_images=imgs[1:], duration=125, loop=0)
    return buf.getvalue()
