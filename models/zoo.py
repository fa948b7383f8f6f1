"""Registry of diffusers Diffusion Transformers used by tests and benchmarks.

Every entry names a diffusers transformer class together with two constructor configs: ``tiny``
(a few heads of a few dims, 2-4 layers; runs on CPU in milliseconds, used by the tests) and
``full`` (the published full-size config, built with random weights for benchmarks). No weights
are ever downloaded: :func:`build_model` constructs the class from its config under
``torch.manual_seed(seed)``, so every process that builds the same name/size/seed/overrides gets
bit-identical parameters. :func:`example_inputs` returns the keyword arguments of
``model(**inputs)`` the way the matching diffusers pipeline calls the transformer.

Token rows of the default inputs (latent H / patch size) are divisible by 4; ``uneven=True``
gives an input whose token rows are divisible by neither 2 nor 4 (and are at least 4).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, cast

import torch

from .inputs import (
    InputBuilder,
    InputSpec,
    dit_inputs,
    hunyuan_dit_inputs,
    latte_inputs,
    pixart_inputs,
    sana_inputs,
)

__all__ = [
    "SIZES",
    "LatentSize",
    "ZooEntry",
    "build_model",
    "example_inputs",
    "get_entry",
    "list_models",
    "token_rows",
]

#: The two config sizes every entry provides.
SIZES: tuple[str, ...] = ("tiny", "full")


@dataclass(frozen=True, kw_only=True)
class LatentSize:
    """Default example-input geometry of one config size, in latent pixels.

    ``height``/``width`` give token rows divisible by 4; ``uneven_height``/``uneven_width`` give
    token rows divisible by neither 2 nor 4. ``frames`` is the video length (``None`` for images;
    for Latte the model config's ``video_length`` is used instead). ``text_len`` is the main text
    sequence length (``None`` where the model has no text or fixes it in its config).
    """

    height: int
    width: int
    uneven_height: int
    uneven_width: int
    frames: int | None = None
    text_len: int | None = None


@dataclass(frozen=True, kw_only=True)
class ZooEntry:
    """One model of the zoo.

    ``tiny`` and ``full`` are constructor kwargs of the diffusers class ``cls_name``.
    ``input_builder`` makes ``example_inputs``; ``sizes`` holds the default input geometry per
    size; ``video`` marks ``[B, C, F, H, W]`` inputs; ``check_config`` (optional) rejects configs
    the class accepts but cannot run (raises ``ValueError``).
    """

    name: str
    cls_name: str
    tiny: dict[str, Any]
    full: dict[str, Any]
    description: str
    input_builder: InputBuilder
    sizes: dict[str, LatentSize]
    video: bool = False
    check_config: Callable[[dict[str, Any]], None] | None = field(default=None, repr=False)
    uneven_config: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per size, config overrides that ``build_model(..., uneven=True)`` applies (for models
    whose uneven input needs another config, e.g. Latte's frame count is its video_length)."""

    def config(self, size: str = "tiny") -> dict[str, Any]:
        """A fresh copy of the constructor kwargs of ``size`` (``"tiny"`` or ``"full"``)."""
        if size == "tiny":
            return dict(self.tiny)
        if size == "full":
            return dict(self.full)
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")

    def latent_size(self, size: str = "tiny") -> LatentSize:
        """Default input geometry of ``size``."""
        if size not in self.sizes:
            raise ValueError(f"size must be one of {SIZES}, got {size!r}")
        return self.sizes[size]


def _check_hunyuan(config: dict[str, Any]) -> None:
    n = config.get("num_layers", 28)
    if n > 1 and n % 2:
        raise ValueError(
            "HunyuanDiT2DModel needs an even num_layers (its long skips pop one saved state per "
            f"layer past num_layers // 2), got {n}"
        )
    heads, head_dim = config.get("num_attention_heads", 16), config.get("attention_head_dim", 88)
    if config.get("hidden_size", 1152) != heads * head_dim:
        raise ValueError("HunyuanDiT2DModel needs hidden_size == num_attention_heads * head_dim")


def _check_pixart(config: dict[str, Any]) -> None:
    inner = config.get("num_attention_heads", 16) * config.get("attention_head_dim", 72)
    if config.get("use_additional_conditions") and inner % 3:
        raise ValueError(
            "PixArt with use_additional_conditions splits the inner dim in thirds for the "
            f"resolution/aspect-ratio embeddings; {inner} is not divisible by 3"
        )


# Shared pieces of the PixArt / DiT / Latte BasicTransformerBlock configs.
_ADA_SINGLE = {
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "num_embeds_ada_norm": 1000,
    "norm_type": "ada_norm_single",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
}
_XL_2 = {"num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4, "out_channels": 8}
_TINY_2 = {"num_attention_heads": 4, "attention_head_dim": 8, "in_channels": 4, "out_channels": 8}

_DIT = {
    "patch_size": 2,
    "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 1000,
    "norm_type": "ada_norm_zero",
    "attention_bias": True,
    "norm_elementwise_affine": False,
}
_SANA = {
    "mlp_ratio": 2.5,
    "attention_bias": False,
    "patch_size": 1,
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "interpolation_scale": None,  # no absolute position embedding
}
_HUNYUAN = {
    "in_channels": 4,
    "patch_size": 2,
    "activation_fn": "gelu-approximate",
    "learn_sigma": True,
    "norm_type": "layer_norm",
    "use_style_cond_and_image_meta_size": True,
}

# Default input geometry of the 2x2-patch image models: 8x8 / 5x8 tokens (tiny), 1024 px (full).
_IMG_TINY = LatentSize(height=16, width=16, uneven_height=10, uneven_width=16, text_len=12)
_IMG_1024 = LatentSize(height=128, width=128, uneven_height=126, uneven_width=128)


_ENTRIES: tuple[ZooEntry, ...] = (
    ZooEntry(
        name="dit-xl-2",
        cls_name="DiTTransformer2DModel",
        description=(
            "DiT-XL/2 (facebook/DiT-XL-2-512), class-conditional ImageNet DiT with adaLN-Zero; "
            "inputs: latents, timestep, class_labels. The token grid must be square; inputs "
            "other than its 64x64 sample size recompute the sincos position table in forward."
        ),
        tiny={**_TINY_2, "num_layers": 2, "sample_size": 16, **_DIT},
        full={**_XL_2, "num_layers": 28, "sample_size": 64, **_DIT},
        input_builder=dit_inputs,
        sizes={
            "tiny": LatentSize(height=16, width=16, uneven_height=10, uneven_width=10),
            "full": LatentSize(height=128, width=128, uneven_height=126, uneven_width=126),
        },
    ),
    ZooEntry(
        name="pixart-alpha",
        cls_name="PixArtTransformer2DModel",
        description=(
            "PixArt-alpha (PixArt-alpha/PixArt-XL-2-1024-MS): adaLN-single DiT with T5 "
            "cross-attention (120 tokens) and resolution/aspect-ratio conditions."
        ),
        tiny={
            "num_attention_heads": 4,
            "attention_head_dim": 12,  # inner dim 48: divisible by 3 for the size embeddings
            "in_channels": 4,
            "out_channels": 8,
            **_ADA_SINGLE,
            "num_layers": 2,
            "cross_attention_dim": 48,
            "sample_size": 16,
            "patch_size": 2,
            "caption_channels": 64,
            "use_additional_conditions": True,
        },
        full={
            **_XL_2,
            **_ADA_SINGLE,
            "num_layers": 28,
            "cross_attention_dim": 1152,
            "sample_size": 128,
            "patch_size": 2,
            "caption_channels": 4096,
            "use_additional_conditions": True,
        },
        input_builder=pixart_inputs,
        sizes={"tiny": _IMG_TINY, "full": replace(_IMG_1024, text_len=120)},
        check_config=_check_pixart,
    ),
    ZooEntry(
        name="pixart-sigma",
        cls_name="PixArtTransformer2DModel",
        description=(
            "PixArt-Sigma (PixArt-alpha/PixArt-Sigma-XL-2-1024-MS): adaLN-single DiT with T5 "
            "cross-attention (300 tokens), no additional conditions."
        ),
        tiny={
            **_TINY_2,
            **_ADA_SINGLE,
            "num_layers": 2,
            "cross_attention_dim": 32,
            "sample_size": 16,
            "patch_size": 2,
            "caption_channels": 64,
            "use_additional_conditions": False,
        },
        full={
            **_XL_2,
            **_ADA_SINGLE,
            "num_layers": 28,
            "cross_attention_dim": 1152,
            "sample_size": 128,
            "patch_size": 2,
            "caption_channels": 4096,
            "interpolation_scale": 2,
            "use_additional_conditions": False,
        },
        input_builder=pixart_inputs,
        sizes={"tiny": _IMG_TINY, "full": replace(_IMG_1024, text_len=300)},
        check_config=_check_pixart,
    ),
    ZooEntry(
        name="sana",
        cls_name="SanaTransformer2DModel",
        description=(
            "SANA 1.6B (Efficient-Large-Model/Sana_1600M_1024px): linear self-attention, "
            "GLUMBConv feed-forward, Gemma-2 cross-attention (300 tokens x 2304); DC-AE latents "
            "(32x compression, patch 1)."
        ),
        tiny={
            "in_channels": 8,
            "out_channels": 8,
            "num_attention_heads": 4,
            "attention_head_dim": 8,
            "num_layers": 2,
            "num_cross_attention_heads": 4,
            "cross_attention_head_dim": 8,
            "cross_attention_dim": 32,
            "caption_channels": 64,
            "sample_size": 8,
            **_SANA,
        },
        full={
            "in_channels": 32,
            "out_channels": 32,
            "num_attention_heads": 70,
            "attention_head_dim": 32,
            "num_layers": 20,
            "num_cross_attention_heads": 20,
            "cross_attention_head_dim": 112,
            "cross_attention_dim": 2240,
            "caption_channels": 2304,
            "sample_size": 32,
            **_SANA,
        },
        input_builder=sana_inputs,
        sizes={
            "tiny": LatentSize(height=8, width=8, uneven_height=5, uneven_width=8, text_len=12),
            "full": LatentSize(
                height=32, width=32, uneven_height=31, uneven_width=32, text_len=300
            ),
        },
    ),
    ZooEntry(
        name="hunyuan-dit",
        cls_name="HunyuanDiT2DModel",
        description=(
            "HunyuanDiT v1.1 (Tencent-Hunyuan/HunyuanDiT-v1.1-Diffusers): U-shaped DiT with long "
            "skips, 2D RoPE, bilingual CLIP (77 x 1024) + mT5 (256 x 2048) text, image-size and "
            "style conditions. num_layers must be even (or 1)."
        ),
        tiny={
            "num_attention_heads": 4,
            "attention_head_dim": 8,
            **_HUNYUAN,
            "sample_size": 16,
            "hidden_size": 32,
            "num_layers": 4,  # smallest count that exercises one long skip
            "mlp_ratio": 4.0,
            "cross_attention_dim": 32,
            "cross_attention_dim_t5": 32,  # the T5 attention pool has 8 heads
            "pooled_projection_dim": 32,
            "text_len": 8,
            "text_len_t5": 12,
        },
        full={
            "num_attention_heads": 16,
            "attention_head_dim": 88,
            **_HUNYUAN,
            "sample_size": 128,
            "hidden_size": 1408,
            "num_layers": 40,
            "mlp_ratio": 4.3637,
            "cross_attention_dim": 1024,
            "cross_attention_dim_t5": 2048,
            "pooled_projection_dim": 1024,
            "text_len": 77,
            "text_len_t5": 256,
        },
        input_builder=hunyuan_dit_inputs,
        sizes={"tiny": replace(_IMG_TINY, text_len=None), "full": _IMG_1024},
        check_config=_check_hunyuan,
    ),
    ZooEntry(
        name="latte",
        cls_name="LatteTransformer3DModel",
        description=(
            "Latte-1 (maxin-cn/Latte-1): text-to-video DiT alternating spatial (with T5 "
            "cross-attention, 120 tokens) and temporal blocks; inputs [B, C, F, H, W]."
        ),
        tiny={
            **_TINY_2,
            **_ADA_SINGLE,
            "num_layers": 2,
            "cross_attention_dim": 32,
            "sample_size": 16,
            "patch_size": 2,
            "caption_channels": 64,
            "video_length": 4,
        },
        full={
            **_XL_2,
            **_ADA_SINGLE,
            "num_layers": 28,
            "cross_attention_dim": 1152,
            "sample_size": 64,
            "patch_size": 2,
            "caption_channels": 4096,
            "video_length": 16,
        },
        input_builder=latte_inputs,
        sizes={
            "tiny": LatentSize(
                height=16, width=16, uneven_height=10, uneven_width=16, frames=4, text_len=12
            ),
            "full": LatentSize(
                height=64, width=64, uneven_height=62, uneven_width=64, frames=16, text_len=120
            ),
        },
        video=True,
        # Sequence parallelism splits the frames first: an uneven input needs an odd frame
        # count, and Latte's frame count is fixed by its temporal position table.
        uneven_config={"tiny": {"video_length": 5}, "full": {"video_length": 15}},
    ),
)

_REGISTRY: dict[str, ZooEntry] = {entry.name: entry for entry in _ENTRIES}


def list_models() -> list[str]:
    """Names of all zoo models, in registry order."""
    return list(_REGISTRY)


def get_entry(name: str) -> ZooEntry:
    """The :class:`ZooEntry` called ``name``; ``KeyError`` listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown model {name!r}; known models: {', '.join(list_models())}"
        ) from None


def build_model(
    name: str,
    size: str = "tiny",
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    uneven: bool = False,
    **config_overrides: Any,
) -> torch.nn.Module:
    """Construct zoo model ``name`` at ``size`` with random weights, in eval mode.

    The weights are initialised in float32 under ``torch.manual_seed(seed)`` (the caller's CPU RNG
    state is restored afterwards) and then cast to ``dtype``, so every process gets identical
    parameters. ``config_overrides`` replace constructor kwargs, e.g. ``num_layers=2``.
    ``uneven=True`` applies the entry's ``uneven_config`` (pair it with ``example_inputs(...,
    uneven=True)``).
    """
    entry = get_entry(name)
    extra = entry.uneven_config.get(size, {}) if uneven else {}
    config = {**entry.config(size), **extra, **config_overrides}
    if entry.check_config is not None:
        entry.check_config(config)

    import diffusers

    cls = getattr(diffusers, entry.cls_name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cast(torch.nn.Module, cls(**config))
    _cast(model, dtype)
    return model.eval()


def _cast(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast ``model`` to ``dtype`` in place, keeping its ``_keep_in_fp32_modules`` in float32.

    Uses ``torch.nn.Module.to`` directly: ``ModelMixin.to`` logs a warning on every dtype cast.
    """
    if dtype == torch.float32:
        return
    torch.nn.Module.to(model, dtype=dtype)
    keep = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    if keep:
        for mod_name, sub in model.named_modules():
            if any(k in mod_name.split(".") for k in keep):
                sub.float()


def _param_dtype_device(model: torch.nn.Module) -> tuple[torch.dtype, torch.device]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype, p.device
    return torch.float32, torch.device("cpu")


def example_inputs(
    name: str,
    model: torch.nn.Module,
    *,
    size: str = "tiny",
    seed: int = 0,
    uneven: bool = False,
    batch: int = 1,
    height: int | None = None,
    width: int | None = None,
    frames: int | None = None,
    text_len: int | None = None,
) -> dict[str, Any]:
    """Keyword arguments for ``model(**inputs)``, deterministic in ``seed``.

    ``height``/``width`` are latent pixels (the transformer's sample H/W); by default they come
    from the entry's ``size`` geometry, the uneven variant when ``uneven=True`` (explicit values
    always win). ``frames`` is for video models only and defaults to the model's ``video_length``.
    ``text_len`` overrides the default text length (ignored by HunyuanDiT, whose text lengths are
    part of its config). Tensors are created on the model's device, in its dtype (masks, labels
    and integer timesteps in int64; HunyuanDiT's rotary tables in float32); ``return_dict=False``.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    entry = get_entry(name)
    geo = entry.latent_size(size)
    h = height if height is not None else (geo.uneven_height if uneven else geo.height)
    w = width if width is not None else (geo.uneven_width if uneven else geo.width)
    if entry.video:
        if frames is None:
            frames = int(getattr(model, "config", {}).get("video_length", geo.frames or 1))
    elif frames is not None:
        raise ValueError(f"{name} is an image model; frames must be None, got {frames}")
    dtype, device = _param_dtype_device(model)
    spec = InputSpec(
        batch=batch,
        height=h,
        width=w,
        frames=frames,
        text_len=text_len if text_len is not None else geo.text_len,
        dtype=dtype,
        device=device,
    )
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return entry.input_builder(model, spec, gen)


def token_rows(name: str, size: str = "tiny", *, uneven: bool = False) -> int:
    """Token rows (latent H // patch size) of the default input of ``name`` at ``size``."""
    entry = get_entry(name)
    geo = entry.latent_size(size)
    patch = int(entry.config(size)["patch_size"])
    return (geo.uneven_height if uneven else geo.height) // patch
