"""A small client for ``xdit-compile serve`` (standard library only): ``xdit-compile client``.

The service speaks the OpenAI images API, so the ``openai`` package works too::

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    img = client.images.generate(prompt="a fox face in the snow", size="64x64",
                                 response_format="b64_json", extra_body={"steps": 20, "seed": 3})
"""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ClientError", "ImageResult", "generate_images", "wait_ready"]


class ClientError(RuntimeError):
    """The service answered with an error (``status``, its message, and ``Retry-After``)."""

    def __init__(self, status: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message, self.retry_after = status, message, retry_after


def wait_ready(
    url: str,
    *,
    timeout: float = 300.0,
    alive: Callable[[], bool] = lambda: True,
    interval: float = 0.3,
) -> float:
    """Wait until ``GET {url}/health`` answers 200 (the group is up and warmed); returns the
    seconds waited. ``alive()`` (e.g. a ``Popen.poll() is None`` check of the service process)
    is asked between polls: RuntimeError when it says the service is gone, TimeoutError after
    ``timeout`` seconds."""
    t0 = time.monotonic()
    while True:
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=2) as r:
                if r.status == 200:
                    return time.monotonic() - t0
        except (OSError, urllib.error.URLError):  # refused, 503 while starting, timeouts
            pass
        if not alive():
            raise RuntimeError(f"the service at {url} exited before it was ready")
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"the service at {url} was not ready after {timeout:.0f} s")
        time.sleep(interval)


@dataclass
class ImageResult:
    images: list[bytes]
    """PNG bytes, one per image."""
    seed: int
    seconds: float
    retries: int = 0
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


def generate_images(
    url: str,
    prompt: str,
    *,
    n: int = 1,
    size: str | None = None,
    steps: int | None = None,
    seed: int | None = None,
    guidance_scale: float | None = None,
    negative_prompt: str | None = None,
    timeout: float = 600.0,
    retries_on_429: int = 0,
) -> ImageResult:
    """``POST {url}/v1/images/generations``; with ``retries_on_429``, a full queue is retried after
    the ``Retry-After`` the service sends."""
    body: dict[str, Any] = {"prompt": prompt, "n": n, "response_format": "b64_json"}
    for k, v in (
        ("size", size),
        ("steps", steps),
        ("seed", seed),
        ("guidance_scale", guidance_scale),
        ("negative_prompt", negative_prompt),
    ):
        if v is not None:
            body[k] = v
    data = json.dumps(body).encode()
    t0 = time.monotonic()
    tries = 0
    while True:
        req = urllib.request.Request(
            url.rstrip("/") + "/v1/images/generations",
            data=data,
            method="POST",
            headers={"content-type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                out = json.loads(r.read())
            break
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                msg = json.loads(raw)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                msg = raw.decode(errors="replace")[:500]
            retry = e.headers.get("Retry-After")
            err = ClientError(e.code, msg, float(retry) if retry else None)
            if e.code == 429 and tries < retries_on_429:
                tries += 1
                time.sleep(err.retry_after or 1.0)
                continue
            raise err from None
    images = [base64.b64decode(d["b64_json"]) for d in out["data"]]
    return ImageResult(
        images=images,
        seed=int(out.get("seed", -1)),
        seconds=time.monotonic() - t0,
        retries=tries,
        raw={k: v for k, v in out.items() if k != "data"},
    )
