"""``xdit-compile generate``: a whole text-to-image/video pipeline, in parallel, on one node.

:func:`generate_job` runs on every rank (worker processes launched by the CLI, or torchrun):
load the pipeline (a local ``save_pretrained`` directory or a tiny pipeline name), parallelize
its transformer(s), run it with the same seed on every rank (progress bar on rank 0 only),
optionally the plain pipeline on rank 0 alone for comparison, and have rank 0 write the result
(PNG for images; mp4 when a video writer is installed, else a directory of PNG frames).
"""

from __future__ import annotations

import inspect
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["GenerateOptions", "GenerateResult", "check_model", "generate_job", "load_pipeline", "run_timed", "save_output"]

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass
class GenerateOptions:
    model: str
    prompt: list[str]
    plan: dict[str, Any]
    negative_prompt: str | None = None
    steps: int | None = None
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    guidance_scale: float | None = None
    seed: int = 0
    dtype: str = "float32"
    output: str | None = None
    compare_serial: bool = False
    warmup: int = 1
    """Untimed calls first (the first one captures and compiles the transformer)."""


@dataclass
class GenerateResult:
    rank: int
    shape: list[int]
    total_s: float
    step_s: list[float] = field(default_factory=list)
    first_call_s: float | None = None
    """The first (warm-up) call, with capture and compilation."""
    serial_total_s: float | None = None
    serial_step_s: list[float] = field(default_factory=list)
    rel_error: float | None = None
    bytes_sent: int = 0
    saved: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_model(model: str) -> None:
    """Fail fast, before any worker starts: ``model`` must be a pipeline directory or a tiny
    pipeline name."""
    from xdit_compile.models.pipelines import list_pipelines

    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "model_index.json")):
            raise ValueError(f"{model} is a directory without model_index.json: not a saved diffusers pipeline")
        return
    if model not in list_pipelines():
        raise ValueError(f"--model {model!r}: no such directory, and not a tiny pipeline name "
                         f"({', '.join(list_pipelines())})")


def load_pipeline(model: str, dtype: torch.dtype) -> tuple[Any, dict[str, Any]]:
    """The pipeline and its default call arguments (a tiny pipeline's, matched by class for a
    saved one)."""
    from xdit_compile.models.pipelines import (
        build_pipeline,
        list_pipelines,
        pipeline_defaults,
        pipeline_info,
    )

    if os.path.isdir(model):
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype)
        cls = type(pipe).__name__
        names = [n for n in list_pipelines() if pipeline_info(n).cls_name == cls]
        return pipe, pipeline_defaults(names[0]) if names else {}
    return build_pipeline(model, dtype=dtype), pipeline_defaults(model)


def _call_kwargs(pipe: Any, o: GenerateOptions, defaults: dict[str, Any]) -> dict[str, Any]:
    kw = dict(defaults)
    given = {"num_inference_steps": o.steps, "height": o.height, "width": o.width,
             "num_frames": o.frames, "guidance_scale": o.guidance_scale, "negative_prompt": o.negative_prompt}
    kw.update({k: v for k, v in given.items() if v is not None})
    params = inspect.signature(pipe.__call__).parameters
    if "num_frames" in kw and "num_frames" not in params:
        raise ValueError(f"{type(pipe).__name__} makes images: --frames does not apply")
    kw["prompt"] = o.prompt if len(o.prompt) > 1 else o.prompt[0]
    kw["output_type"] = "np"
    return {k: v for k, v in kw.items() if k in params}


def run_timed(pipe: Any, kw: dict[str, Any], seed: int) -> tuple[np.ndarray, float, list[float]]:
    """One pipeline call with a fresh generator: output array, seconds, and seconds per
    denoising step (from the pipeline's step callback, where it has one)."""
    stamps: list[float] = []
    params = inspect.signature(pipe.__call__).parameters
    extra: dict[str, Any] = {}
    if "callback_on_step_end" in params:
        def on_step(p: Any, i: int, t: Any, cb: dict[str, Any]) -> dict[str, Any]:
            stamps.append(time.perf_counter())
            return cb
        extra["callback_on_step_end"] = on_step
    elif "callback" in params and "callback_steps" in params:  # older pipelines (PixArt)
        extra.update(callback=lambda i, t, latents: stamps.append(time.perf_counter()), callback_steps=1)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = pipe(**kw, **extra, generator=torch.Generator().manual_seed(seed))
    total = time.perf_counter() - t0
    arr = getattr(out, "images", None)
    arr = getattr(out, "frames", None) if arr is None else arr
    steps = np.diff([t0, *stamps]).tolist()
    return np.asarray(arr), total, steps


def save_output(arr: np.ndarray, output: str) -> list[str]:
    """Write images (``[B, H, W, C]``) as PNG or videos (``[B, F, H, W, C]``) as mp4/PNG frames;
    several images or videos get ``_0``, ``_1``... suffixes. Returns the paths written."""
    from PIL import Image

    def png(a: np.ndarray, path: Path) -> None:
        Image.fromarray((np.clip(a, 0, 1) * 255).round().astype(np.uint8)).save(path)

    out, written = Path(output), []
    out.parent.mkdir(parents=True, exist_ok=True)
    for i, item in enumerate(arr):
        stem = out.with_name(f"{out.stem}_{i}{out.suffix}") if len(arr) > 1 else out
        if item.ndim == 3:
            path = stem if stem.suffix else stem.with_suffix(".png")
            png(item, path)
            written.append(str(path))
        elif stem.suffix == ".mp4" and _video_writer():
            from diffusers.utils import export_to_video

            export_to_video(list(item), str(stem), fps=8)
            written.append(str(stem))
        else:
            folder = stem.with_suffix("") if stem.suffix else stem
            folder.mkdir(parents=True, exist_ok=True)
            for f, frame in enumerate(item):
                png(frame, folder / f"frame_{f:04d}.png")
            written.append(str(folder))
    return written


def _video_writer() -> bool:
    try:
        import imageio  # noqa: F401
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        return False
    return True


def generate_job(o: GenerateOptions) -> GenerateResult:
    """One rank's part of ``xdit-compile generate`` (inside an initialized process group)."""
    import xdit_compile as xc
    from xdit_compile.runtime.collectives import comm_stats

    rank = dist.get_rank()
    dtype = _DTYPES.get(o.dtype)
    if dtype is None:
        raise ValueError(f"--dtype {o.dtype!r}: choose one of {', '.join(_DTYPES)}")
    pipe, defaults = load_pipeline(o.model, dtype)
    kw = _call_kwargs(pipe, o, defaults)
    result = GenerateResult(rank=rank, shape=[], total_s=0.0)
    serial = None
    if o.compare_serial:  # the plain pipeline, on rank 0 alone
        if rank == 0:
            pipe.set_progress_bar_config(disable=True)
            for _ in range(o.warmup):
                run_timed(pipe, kw, o.seed)
            serial, result.serial_total_s, result.serial_step_s = run_timed(pipe, kw, o.seed)
        dist.barrier()
    pipe = xc.parallelize_pipeline(pipe, xc.Plan(**o.plan))
    pipe.set_progress_bar_config(disable=rank != 0)
    for i in range(o.warmup):
        t = run_timed(pipe, kw, o.seed)[1]
        result.first_call_s = t if i == 0 else result.first_call_s
    dist.barrier()
    comm_stats().reset()
    arr, result.total_s, result.step_s = run_timed(pipe, kw, o.seed)
    result.bytes_sent = comm_stats().total_bytes
    result.shape = list(arr.shape)
    if not np.isfinite(arr).all():
        raise RuntimeError("the parallel pipeline produced non-finite values")
    if serial is not None:
        result.rel_error = float(np.abs(arr - serial).max() / max(float(np.abs(serial).max()), 1e-30))
    if rank == 0 and o.output:
        result.saved = save_output(arr, o.output)
    return result
