"""Registry of diffusers Diffusion Transformers used by tests and benchmarks.

Every entry names a diffusers transformer class together with two constructor configs: ``tiny``
(a few heads of a few dims, 2-4 layers; runs on CPU in milliseconds, used by the tests) and
``full`` (the published full-size config, built with random weights for benchmarks). No weights
are ever downloaded: :func:`build_model` constructs the class from its config under
``torch.manual_seed(seed)``, so every process that builds the same name/size/seed/overrides gets
bit-identical parameters. :func:`example_inputs` returns the keyword arguments of
``model(**inputs)`` the way the matching diffusers pipeline calls the transformer.

Token rows of the default inputs (latent H / patch size) are divisible by 4; ``uneven=True``
gives an input whose token rows are divisible by neither 2 nor 4 (and are at least 4). Video
models' uneven inputs also have an odd number of latent frames. The full-size video defaults
are the published video shapes (their rows need not divide by 4). The entries themselves are
in this file (cross-attention DiTs) and in ``zoo_joint.py`` (joint-attention DiTs).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, cast

import torch

from .entry import SIZES, LatentSize, ZooEntry
from .inputs import (
    InputSpec,
    dit_inputs,
    hunyuan_dit_inputs,
    latte_inputs,
    pixart_inputs,
    sana_inputs,
)
from .zoo_joint import JOINT_ENTRIES
from .zoo_more import MORE_ENTRIES

__all__ = [
    "SIZES",
    "LatentSize",
    "ZooEntry",
    "build_model",
    "example_inputs",
    "get_entry",
    "layer_overrides",
    "list_models",
    "token_frames",
    "token_rows",
]


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
        steps=20,
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
        steps=20,
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
        pipefusion_refused="partial sum",
        vae_spatial=32,
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
        vae_temporal=1,
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
        layout="BCFHW",
        # Sequence parallelism splits the frames first: an uneven input needs an odd frame
        # count, and Latte's frame count is fixed by its temporal position table.
        uneven_config={"tiny": {"video_length": 5}, "full": {"video_length": 15}},
    ),
)

# Cross-attention DiTs first, then the joint text+image/video attention DiTs of zoo_joint.py.
# Then the coverage entries of zoo_more.py (not in the default list).
_REGISTRY: dict[str, ZooEntry] = {
    entry.name: entry for entry in (*_ENTRIES, *JOINT_ENTRIES, *MORE_ENTRIES)
}


def list_models(coverage: bool = False) -> list[str]:
    """Names of the zoo models, in registry order; with ``coverage``, also the coverage entries
    (more diffusers classes with configs of our own, see ``zoo_more.py``)."""
    return [n for n, e in _REGISTRY.items() if coverage or e.group == "zoo"]


def get_entry(name: str) -> ZooEntry:
    """The :class:`ZooEntry` called ``name``; ``KeyError`` listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown model {name!r}; known models: {', '.join(list_models())}"
        ) from None


def layer_overrides(name: str, size: str, layers: int) -> dict[str, int]:
    """Config overrides that cut every stack of blocks of ``name`` to ``layers`` (e.g. Flux's
    ``num_layers`` and ``num_single_layers``), for full-size shapes at a fraction of the cost."""
    config = get_entry(name).config(size)
    return {
        k: min(layers, int(v))
        for k, v in config.items()
        if k.startswith("num_") and k.endswith("layers") and isinstance(v, int)
    }


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


def _keeps_fp32(model: torch.nn.Module, name: str) -> bool:
    """Whether diffusers keeps parameter/buffer ``name`` in float32 (``_keep_in_fp32_modules``,
    matched on name components as ``from_pretrained`` does)."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    return any(k in name.split(".") for k in keep)


def _cast(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast ``model`` to ``dtype`` in place, keeping its ``_keep_in_fp32_modules`` in float32.

    Uses ``torch.nn.Module.to`` directly: ``ModelMixin.to`` logs a warning on every dtype cast.
    """
    if dtype == torch.float32:
        return
    torch.nn.Module.to(model, dtype=dtype)
    for tensors in (model.named_parameters(), model.named_buffers()):
        for t_name, t in tensors:
            if t.is_floating_point() and _keeps_fp32(model, t_name):
                t.data = t.data.float()


def _param_dtype_device(model: torch.nn.Module) -> tuple[torch.dtype, torch.device]:
    """The model's compute dtype and device: those of its first floating-point parameter that
    is not kept in float32."""
    params = [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]
    for p_name, p in params:
        if not _keeps_fp32(model, p_name):
            return p.dtype, p.device
    if params:
        return params[0][1].dtype, params[0][1].device
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
    always win). ``frames`` is for video models only (latent frames as the model sees them) and
    defaults to the model's ``video_length`` (Latte) or the entry's (uneven) frame count.
    ``text_len`` overrides the default text length (ignored by HunyuanDiT, whose text lengths are
    part of its config). Tensors are created on the model's device, in its dtype (masks, labels
    and integer timesteps in int64; HunyuanDiT's rotary tables in float32; the joint-attention
    models' masks, timesteps and guidance in the dtypes their pipelines pass, see
    ``inputs_joint.py``); ``return_dict=False``.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    entry = get_entry(name)
    geo = entry.latent_size(size)
    h = height if height is not None else (geo.uneven_height if uneven else geo.height)
    w = width if width is not None else (geo.uneven_width if uneven else geo.width)
    if entry.video:
        if frames is None:
            default = geo.uneven_frames if uneven and geo.uneven_frames else geo.frames
            frames = int(getattr(model, "config", {}).get("video_length", default or 1))
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
    patch = entry.row_patch or entry.config(size)["patch_size"]
    if isinstance(patch, (tuple, list)):  # (p_t, p_h, p_w), e.g. Wan
        patch = patch[1]
    return (geo.uneven_height if uneven else geo.height) // int(patch)


def token_frames(name: str, size: str = "tiny", *, uneven: bool = False) -> int:
    """Latent frames (as the transformer sees them) of the default input of video model ``name``.

    Pair ``uneven=True`` with ``build_model(..., uneven=True)`` (Latte's frames are its config's
    ``video_length``, which the uneven config changes).
    """
    entry = get_entry(name)
    if not entry.video:
        raise ValueError(f"{name} is an image model; it has no frames")
    geo = entry.latent_size(size)
    config = {**entry.config(size), **(entry.uneven_config.get(size, {}) if uneven else {})}
    default = geo.uneven_frames if uneven and geo.uneven_frames else geo.frames
    return int(config.get("video_length", default or 1))
