"""The service's vocabulary: its options (what ``xdit-compile serve`` parsed), what rank 0 returns
when it stops, and the error a client is answered with. Imports nothing of the package."""

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["ApiError", "ServeOptions", "ServeStats", "parse_size"]


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
    """Cut the VAE's rows (decoder and encoder) over every rank too
    (``parallelize_pipeline(vae=True)``)."""
    served_name: str | None = None
    """The model id in ``/v1/models`` and responses (default: ``model``)."""
    loras: dict[str, str] = field(default_factory=dict)
    """LoRA adapters loaded at start (name -> a directory or file written by
    ``save_lora_weights``). A request picks its own (``"lora": {name: weight}``; none: every
    adapter off); requests run only with requests of the same adapters and weights, each
    combination compiled once."""


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

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.status,
            }
        }


def parse_size(size: str) -> tuple[int, int]:
    """ "WxH" -> (width, height)."""
    try:
        w, h = (int(x) for x in size.lower().split("x"))
    except ValueError:
        raise ApiError(400, f"size {size!r} is not WIDTHxHEIGHT", "size") from None
    return w, h
