"""``xdit-compile generate``: a whole text-to-image/video pipeline, in parallel, on one node.

:func:`generate_job` runs on every rank (worker processes launched by the CLI, or torchrun):
load the pipeline (a local ``save_pretrained`` directory, ``demo`` - the trained emoji pipeline
committed under ``models/demo`` - or a tiny pipeline name), parallelize
its transformer(s), run it with the same seed on every rank (progress bar on rank 0 only),
optionally the plain pipeline on rank 0 alone for comparison, and have rank 0 write the result
(PNG for images; mp4 when a video writer is installed, else a directory of PNG frames).

A saved pipeline runs with its own call defaults (steps, size, guidance, text length) except
where the user sets them; resolution binning (PixArt, HunyuanDiT) is off unless
``resolution_binning`` is set, so the image has the requested size (binning knows only the
1024-px family's sizes and rejects other transformers).
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

__all__ = [
    "DEMO",
    "GenerateOptions",
    "GenerateResult",
    "TOLERANCE",
    "check_model",
    "generate_job",
    "load_pipeline",
    "model_path",
    "output_array",
    "run_timed",
    "save_output",
    "step_callback",
    "to_uint8",
    "transformer_configs",
]

DEMO = "demo"
"""``--model demo``: the trained emoji pipeline (:func:`xdit_compile.models.demo.demo_path`)."""

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

#: Largest max-abs relative difference between the parallel and the plain pipeline's images
#: expected per dtype: fp32 reorders sums only; in half precision each reordered matmul or
#: attention rounds differently (bf16: 8 mantissa bits, fp16: 11) and the sampler carries
#: those differences through the steps. Measured on the demo pipeline (20 steps, ``ring=2``, whose
#: log-sum-exp merge rounds differently): 4.9e-2 in bf16, 8.3e-3 in fp16, about half the bounds;
#: Ulysses and CFG parallel leave each row's arithmetic as it is (0 difference in bf16 there).
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 0.1, torch.float16: 0.02}


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
    resolution_binning: bool = False
    """Let pipelines with resolution binning (PixArt, HunyuanDiT) snap the size to their bins."""
    warmup: int = 1
    """Untimed calls first (the first one captures and compiles the transformer)."""
    parallel_vae: bool = False
    """Cut the VAE's rows (decoder and encoder) over every rank too
    (``parallelize_pipeline(vae=True)``)."""
    loras: dict[str, str] = field(default_factory=dict)
    """LoRA adapters to load (name -> what ``pipe.load_lora_weights`` takes: a directory or
    file)."""
    lora_weights: dict[str, float] = field(default_factory=dict)
    """The adapters the call uses, with their weights (empty: every loaded adapter at 1.0)."""


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
    tolerance: float | None = None
    """The expected bound on ``rel_error`` for the run's dtype (:data:`TOLERANCE`)."""
    call: dict[str, Any] = field(default_factory=dict)
    """The pipeline call's arguments (prompt and output type left out)."""
    bytes_sent: int = 0
    plan: str = ""
    """The plan the transformer ran with (with ``--auto``: the one the cost model chose)."""
    vae_plan: str = ""
    """The VAE decoder's plan with ``parallel_vae`` (empty: the VAE ran whole on every rank)."""
    saved: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_path(model: str) -> str:
    """``model`` with ``demo`` resolved to the committed demo pipeline's directory."""
    if model == DEMO:
        from xdit_compile.models.demo import demo_path

        return str(demo_path())
    return model


def check_model(model: str) -> None:
    """Fail fast, before any worker starts: ``model`` must be a pipeline directory, ``demo`` or
    a tiny pipeline name."""
    from xdit_compile.models.pipelines import list_pipelines

    if model == DEMO and not os.path.isdir(model_path(model)):
        raise ValueError(
            f"the demo pipeline is missing ({model_path(model)}); train it with "
            f"`python -m xdit_compile.models.train_demo`"
        )
    model = model_path(model)
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "model_index.json")):
            raise ValueError(
                f"{model} is a directory without model_index.json: not a saved diffusers pipeline"
            )
        return
    if model not in list_pipelines():
        raise ValueError(
            f"--model {model!r}: no such directory, and neither {DEMO!r} nor a tiny "
            f"pipeline name ({', '.join(list_pipelines())})"
        )


def transformer_configs(model: str) -> list[tuple[str, dict[str, Any]]]:
    """(name, config) of the transformer(s) ``model`` would run, read without loading weights:
    ``transformer*/config.json`` of a saved pipeline, the zoo config of a tiny one."""
    import json

    from xdit_compile.models import get_entry
    from xdit_compile.models.pipelines import list_pipelines, pipeline_info

    path = model_path(model)
    if os.path.isdir(path):
        out = []
        for sub in ("transformer", "transformer_2"):
            cfg = Path(path, sub, "config.json")
            if cfg.is_file():
                config = json.loads(cfg.read_text())
                out.append((f"{sub} ({config.get('_class_name', '?')})", config))
        return out
    if model in list_pipelines():
        return [("transformer", get_entry(pipeline_info(model).zoo_name).config("tiny"))]
    return []


def load_pipeline(model: str, dtype: torch.dtype) -> tuple[Any, dict[str, Any]]:
    """The pipeline and its default call arguments: none for a saved pipeline (``demo`` or a
    directory: the pipeline's own defaults apply), the tiny call's for a tiny pipeline name."""
    from xdit_compile.models.pipelines import build_pipeline, pipeline_defaults

    path = model_path(model)
    if os.path.isdir(path):
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.from_pretrained(path, torch_dtype=dtype), {}
    return build_pipeline(model, dtype=dtype), pipeline_defaults(model)


def load_loras(pipe: Any, loras: dict[str, str]) -> None:
    """Load LoRA adapters into ``pipe`` (name -> a directory or file written by
    ``save_lora_weights``), every one of them off; :func:`use_adapters` turns them on."""
    if not loras:
        return
    if not hasattr(pipe, "load_lora_weights"):
        raise ValueError(
            f"--lora: {type(pipe).__name__} cannot load LoRA weights (no load_lora_weights)"
        )
    for name, path in loras.items():
        pipe.load_lora_weights(path, adapter_name=name)
    pipe.disable_lora()


def use_adapters(pipe: Any, weights: dict[str, float]) -> None:
    """Exactly the loaded adapters named in ``weights`` on, at those weights; none: all off.
    (Pipelines with no adapter loaded are left as they are.)"""
    if not getattr(getattr(pipe, "transformer", None), "peft_config", None):
        return
    if not weights:
        pipe.disable_lora()
        return
    pipe.enable_lora()
    pipe.set_adapters(list(weights), list(weights.values()))


def _call_kwargs(pipe: Any, o: GenerateOptions, defaults: dict[str, Any]) -> dict[str, Any]:
    return pipeline_call(
        pipe,
        defaults,
        o.prompt if len(o.prompt) > 1 else o.prompt[0],
        steps=o.steps,
        height=o.height,
        width=o.width,
        frames=o.frames,
        guidance_scale=o.guidance_scale,
        negative_prompt=o.negative_prompt,
        resolution_binning=o.resolution_binning,
    )


def pipeline_call(
    pipe: Any,
    defaults: dict[str, Any],
    prompt: str | list[str],
    *,
    steps: int | None = None,
    height: int | None = None,
    width: int | None = None,
    frames: int | None = None,
    guidance_scale: float | None = None,
    negative_prompt: str | list[str] | None = None,
    resolution_binning: bool = False,
    **extra: Any,
) -> dict[str, Any]:
    """The keyword arguments of one pipeline call (``generate`` and ``serve``): ``defaults``
    updated by the values given (None: the default's or the pipeline's own), NumPy output,
    restricted to what ``pipe.__call__`` takes. ``extra`` (e.g. ``generator``) is passed as is."""
    kw = dict(defaults)
    given = {
        "num_inference_steps": steps,
        "height": height,
        "width": width,
        "num_frames": frames,
        "guidance_scale": guidance_scale,
        "negative_prompt": negative_prompt,
    }
    kw.update({k: v for k, v in given.items() if v is not None})
    kw.setdefault("use_resolution_binning", resolution_binning)
    if not _caption_cleaning():  # what PixArt pipelines fall back to, with a warning per rank
        kw.setdefault("clean_caption", False)
    params = inspect.signature(pipe.__call__).parameters
    if "num_frames" in kw and "num_frames" not in params:
        raise ValueError(f"{type(pipe).__name__} makes images: --frames does not apply")
    kw.update(extra, prompt=prompt, output_type="np")
    return {k: v for k, v in kw.items() if k in params}


def _caption_cleaning() -> bool:
    """Whether PixArt-style ``clean_caption=True`` can work (beautifulsoup4 and ftfy)."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("bs4", "ftfy"))


def _shown_call(pipe: Any, kw: dict[str, Any]) -> dict[str, Any]:
    """The call's steps/guidance/text length: given values, else the signature's defaults (the
    size is read from the output, since pipelines derive a ``None`` default in their own ways)."""
    params = inspect.signature(pipe.__call__).parameters
    shown = {}
    for key in ("num_frames", "num_inference_steps", "guidance_scale", "max_sequence_length"):
        if key in kw:
            shown[key] = kw[key]
        elif key in params and params[key].default is not inspect.Parameter.empty:
            shown[key] = params[key].default
    return {k: v for k, v in shown.items() if v is not None}


def step_callback(pipe: Any, fn: Any) -> dict[str, Any]:
    """Call arguments that make ``pipe`` call ``fn()`` at the end of every denoising step: its
    ``callback_on_step_end``, or the older ``callback``/``callback_steps`` (PixArt); none if
    it has neither."""
    params = inspect.signature(pipe.__call__).parameters
    if "callback_on_step_end" in params:

        def on_step(p: Any, i: int, t: Any, cb: dict[str, Any]) -> dict[str, Any]:
            fn()
            return cb

        return {"callback_on_step_end": on_step}
    if "callback" in params and "callback_steps" in params:
        return {"callback": lambda i, t, latents: fn(), "callback_steps": 1}
    return {}


def output_array(out: Any) -> np.ndarray:
    """A pipeline output's images (``[B, H, W, C]``) or videos (``[B, F, H, W, C]``)."""
    arr = getattr(out, "images", None)
    return np.asarray(getattr(out, "frames", None) if arr is None else arr)


def to_uint8(arr: np.ndarray) -> np.ndarray:
    """Pixels in [0, 1] as 8-bit values (what every written PNG, video frame and served image
    holds)."""
    return (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)


def run_timed(pipe: Any, kw: dict[str, Any], seed: int) -> tuple[np.ndarray, float, list[float]]:
    """One pipeline call with a fresh generator: output array, seconds, and seconds per
    denoising step (from the pipeline's step callback, where it has one)."""
    stamps: list[float] = []
    extra = step_callback(pipe, lambda: stamps.append(time.perf_counter()))
    t0 = time.perf_counter()
    with torch.no_grad():
        out = pipe(**kw, **extra, generator=torch.Generator().manual_seed(seed))
    total = time.perf_counter() - t0
    steps = np.diff([t0, *stamps]).tolist()
    return output_array(out), total, steps


def save_output(arr: np.ndarray, output: str) -> list[str]:
    """Write images (``[B, H, W, C]``) as PNG or videos (``[B, F, H, W, C]``) as mp4/PNG frames;
    several images or videos get ``_0``, ``_1``... suffixes. Returns the paths written."""
    from PIL import Image

    def png(a: np.ndarray, path: Path) -> None:
        Image.fromarray(to_uint8(a)).save(path)

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
    load_loras(pipe, o.loras)
    use_adapters(pipe, o.lora_weights or dict.fromkeys(o.loras, 1.0))
    kw = _call_kwargs(pipe, o, defaults)
    result = GenerateResult(
        rank=rank, shape=[], total_s=0.0, tolerance=TOLERANCE[dtype], call=_shown_call(pipe, kw)
    )
    serial = None
    if o.compare_serial:  # the plain pipeline, on rank 0 alone
        if rank == 0:
            pipe.set_progress_bar_config(disable=True)
            for _ in range(o.warmup):
                run_timed(pipe, kw, o.seed)
            serial, result.serial_total_s, result.serial_step_s = run_timed(pipe, kw, o.seed)
        dist.barrier()
    pipe = xc.parallelize_pipeline(pipe, xc.Plan(**o.plan), vae=o.parallel_vae)
    pipe.set_progress_bar_config(disable=rank != 0)
    for i in range(o.warmup):
        t = run_timed(pipe, kw, o.seed)[1]
        result.first_call_s = t if i == 0 else result.first_call_s
    dist.barrier()
    comm_stats().reset()
    arr, result.total_s, result.step_s = run_timed(pipe, kw, o.seed)
    result.bytes_sent = comm_stats().total_bytes
    result.plan = str(getattr(getattr(pipe, "transformer", None), "plan", xc.Plan(**o.plan)))
    decoder = getattr(getattr(pipe, "vae", None), "decoder", None)
    result.vae_plan = str(decoder.plan) if isinstance(decoder, xc.ParallelModule) else ""
    result.shape = list(arr.shape)
    result.call = {"height": int(arr.shape[-3]), "width": int(arr.shape[-2]), **result.call}
    if not np.isfinite(arr).all():
        raise RuntimeError("the parallel pipeline produced non-finite values")
    if serial is not None:
        result.rel_error = float(
            np.abs(arr - serial).max() / max(float(np.abs(serial).max()), 1e-30)
        )
    if rank == 0 and o.output:
        result.saved = save_output(arr, o.output)
    return result
