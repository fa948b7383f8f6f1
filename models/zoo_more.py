"""Coverage entries: more diffusers transformer classes, for ``benchmarks/coverage.py``.

These entries measure how the compiler does on DiTs nobody tuned it for: each is a diffusers class
with a tiny config of our own and inputs shaped the way its pipeline calls it. ``full`` is the
class's default config (the shapes of the checkpoint diffusers documents it with). They are in the
registry (``get_entry``, ``build_model``, ``example_inputs``) but not in ``list_models()``'s
default list, which the test suite iterates: ``list_models(coverage=True)`` adds them.
"""

from __future__ import annotations

from typing import Any

import torch

from .entry import LatentSize, ZooEntry
from .inputs import (
    InputSpec,
    _cfg,
    _check_image,
    _float_timestep,
    _int_timestep,
    _randn,
    _text_len,
    _text_mask,
)
from .inputs_joint import _check_video, _packed

__all__ = ["MORE_ENTRIES"]

_IMG = LatentSize(height=16, width=16, uneven_height=10, uneven_width=16, text_len=12)
_IMG_FULL = LatentSize(height=128, width=128, uneven_height=126, uneven_width=128, text_len=256)
_VID = LatentSize(
    height=16, width=16, uneven_height=10, uneven_width=16, frames=4, uneven_frames=5, text_len=12
)
_VID_FULL = LatentSize(
    height=60,
    width=104,
    uneven_height=58,
    uneven_width=104,
    frames=21,
    uneven_frames=21,
    text_len=256,
)


def _ids(rows: int, cols: int, axes: int, spec: InputSpec) -> torch.Tensor:
    """Flux-style image position ids ``[rows * cols, axes]``: (0, row, col[, 0])."""
    ids = torch.zeros(rows, cols, axes)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, axes).to(device=spec.device, dtype=spec.dtype)


def _flux_like(text_dim_key: str, axes: int = 3, pooled: str | None = None, guidance: bool = False):  # noqa: ANN202
    def build(model: torch.nn.Module, spec: InputSpec, gen: torch.Generator) -> dict[str, Any]:
        cfg = _cfg(model)
        name = type(model).__name__
        hidden, rows, cols = _packed(model, spec, gen, name)
        b, length = spec.batch, _text_len(spec, name)
        out: dict[str, Any] = {
            "hidden_states": hidden,
            "encoder_hidden_states": _randn(gen, (b, length, cfg[text_dim_key]), spec),
            "timestep": _float_timestep(gen, spec) / 1000,
            "img_ids": _ids(rows, cols, axes, spec),
            "txt_ids": torch.zeros(length, axes).to(device=spec.device, dtype=spec.dtype),
            "return_dict": False,
        }
        if pooled:
            out["pooled_projections"] = _randn(gen, (b, cfg[pooled]), spec)
        if guidance:
            out["guidance"] = torch.full((b,), 3.5, device=spec.device)
        return out

    return build


def auraflow_inputs(
    model: torch.nn.Module, spec: InputSpec, gen: torch.Generator
) -> dict[str, Any]:
    cfg = _cfg(model)
    _check_image(spec, cfg.patch_size, "AuraFlowTransformer2DModel")
    b, length = spec.batch, _text_len(spec, "AuraFlowTransformer2DModel")
    return {
        "hidden_states": _randn(gen, (b, cfg.in_channels, spec.height, spec.width), spec),
        "encoder_hidden_states": _randn(gen, (b, length, cfg.joint_attention_dim), spec),
        "timestep": _float_timestep(gen, spec) / 1000,
        "return_dict": False,
    }


def cogview_inputs(model: torch.nn.Module, spec: InputSpec, gen: torch.Generator) -> dict[str, Any]:
    """CogView3-Plus / CogView4: latents, GLM/T5 tokens, timestep and the SDXL-style size
    conditions (original size, target size, crop) as ``[B, 2]`` floats."""
    cfg = _cfg(model)
    _check_image(spec, cfg.patch_size, type(model).__name__)
    b, length = spec.batch, _text_len(spec, type(model).__name__)
    size = torch.tensor(
        [[spec.height * 8.0, spec.width * 8.0]] * b, device=spec.device, dtype=spec.dtype
    )
    return {
        "hidden_states": _randn(gen, (b, cfg.in_channels, spec.height, spec.width), spec),
        "encoder_hidden_states": _randn(gen, (b, length, cfg.text_embed_dim), spec),
        "timestep": _float_timestep(gen, spec),
        "original_size": size,
        "target_size": size,
        "crop_coords": torch.zeros_like(size),
        "return_dict": False,
    }


def ltx_inputs(model: torch.nn.Module, spec: InputSpec, gen: torch.Generator) -> dict[str, Any]:
    """LTX-Video: packed ``[B, F*H*W, C]`` latents (patch 1), T5 tokens with their mask, the
    grid sizes as ints, float timestep."""
    cfg = _cfg(model)
    frames = _check_video(spec, cfg.patch_size, cfg.patch_size_t, "LTXVideoTransformer3DModel")
    b, length = spec.batch, _text_len(spec, "LTXVideoTransformer3DModel")
    return {
        "hidden_states": _randn(gen, (b, frames * spec.height * spec.width, cfg.in_channels), spec),
        "encoder_hidden_states": _randn(gen, (b, length, cfg.caption_channels), spec),
        "timestep": _float_timestep(gen, spec),
        "encoder_attention_mask": _text_mask(gen, spec, length),
        "num_frames": frames,
        "height": spec.height,
        "width": spec.width,
        "return_dict": False,
    }


def _video_text(dim_key: str, mask: bool = False, int_t: bool = True, extra: Any = None):  # noqa: ANN202
    """``[B, C, F, H, W]`` latents, text tokens of ``cfg[dim_key]`` (with a mask), a timestep."""

    def build(model: torch.nn.Module, spec: InputSpec, gen: torch.Generator) -> dict[str, Any]:
        cfg = _cfg(model)
        name = type(model).__name__
        ps = cfg.patch_size
        p, pt = (
            (ps[1], ps[0])
            if isinstance(ps, list | tuple)
            else (ps, getattr(cfg, "patch_size_t", 1) or 1)
        )
        frames = _check_video(spec, p, pt, name)
        b, length = spec.batch, _text_len(spec, name)
        out: dict[str, Any] = {
            "hidden_states": _randn(
                gen, (b, cfg.in_channels, frames, spec.height, spec.width), spec
            ),
            "encoder_hidden_states": _randn(gen, (b, length, cfg[dim_key]), spec),
            "timestep": _int_timestep(gen, spec) if int_t else _float_timestep(gen, spec),
            "return_dict": False,
        }
        if mask:
            out["encoder_attention_mask"] = _text_mask(gen, spec, length)
        if extra is not None:
            out.update(extra(model, spec, gen, frames))
        return out

    return build


def _vace_control(
    model: torch.nn.Module, spec: InputSpec, gen: torch.Generator, frames: int
) -> dict[str, Any]:
    cfg = _cfg(model)
    return {
        "control_hidden_states": _randn(
            gen, (spec.batch, cfg.vace_in_channels, frames, spec.height, spec.width), spec
        )
    }


def _image_text(dim_key: str, mask_key: str | None = None, int_t: bool = False):  # noqa: ANN202
    def build(model: torch.nn.Module, spec: InputSpec, gen: torch.Generator) -> dict[str, Any]:
        cfg = _cfg(model)
        name = type(model).__name__
        ps = cfg.patch_size
        _check_image(spec, ps[-1] if isinstance(ps, list | tuple) else ps, name)
        b, length = spec.batch, _text_len(spec, name)
        out: dict[str, Any] = {
            "hidden_states": _randn(gen, (b, cfg.in_channels, spec.height, spec.width), spec),
            "encoder_hidden_states": _randn(gen, (b, length, cfg[dim_key]), spec),
            "timestep": _int_timestep(gen, spec) if int_t else _float_timestep(gen, spec),
            "return_dict": False,
        }
        if mask_key:
            out[mask_key] = _text_mask(gen, spec, length)
        return out

    return build


_WAN_TINY = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 4,
    "attention_head_dim": 16,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 32,
    "freq_dim": 32,
    "ffn_dim": 128,
    "num_layers": 2,
}
_FLUXLIKE_TINY = {
    "patch_size": 1,
    "in_channels": 16,
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "axes_dims_rope": (4, 6, 6),
}


def _e(
    name: str,
    cls: str,
    tiny: dict[str, Any],
    builder: Any,
    video: bool = False,
    layout: str = "BCHW",
    description: str = "",
    row_patch: int | None = None,
) -> ZooEntry:
    return ZooEntry(
        name=name,
        cls_name=cls,
        tiny=tiny,
        full={},
        description=description or f"{cls} (coverage)",
        input_builder=builder,
        sizes={"tiny": _VID if video else _IMG, "full": _VID_FULL if video else _IMG_FULL},
        video=video,
        layout=layout,
        row_patch=row_patch,
        group="coverage",
    )


def consisid_inputs(
    model: torch.nn.Module, spec: InputSpec, gen: torch.Generator
) -> dict[str, Any]:
    """ConsisID (CogVideoX-style, frames first ``[B, F, C, H, W]``), without the face identity
    branch (``is_train_face=False``)."""
    cfg = _cfg(model)
    frames = _check_video(spec, cfg.patch_size, 1, "ConsisIDTransformer3DModel")
    b = spec.batch
    return {
        "hidden_states": _randn(gen, (b, frames, cfg.in_channels, spec.height, spec.width), spec),
        "encoder_hidden_states": _randn(
            gen, (b, cfg.max_text_seq_length, cfg.text_embed_dim), spec
        ),
        "timestep": _int_timestep(gen, spec),
        "return_dict": False,
    }


MORE_ENTRIES: tuple[ZooEntry, ...] = (
    _e(
        "lumina2",
        "Lumina2Transformer2DModel",
        {
            "sample_size": 16,
            "patch_size": 2,
            "in_channels": 4,
            "hidden_size": 32,
            "num_layers": 2,
            "num_refiner_layers": 1,
            "num_attention_heads": 2,
            "num_kv_heads": 1,
            "multiple_of": 16,
            "axes_dim_rope": (4, 6, 6),
            "axes_lens": (32, 32, 32),
            "cap_feat_dim": 32,
        },
        _image_text("cap_feat_dim", "encoder_attention_mask"),
    ),
    _e(
        "consisid",
        "ConsisIDTransformer3DModel",
        {
            "num_attention_heads": 2,
            "attention_head_dim": 16,
            "in_channels": 4,
            "out_channels": 4,
            "time_embed_dim": 32,
            "text_embed_dim": 32,
            "num_layers": 2,
            "sample_width": 16,
            "sample_height": 16,
            "sample_frames": 13,
            "patch_size": 2,
            "max_text_seq_length": 12,
            "use_rotary_positional_embeddings": True,
        },
        consisid_inputs,
        video=True,
        layout="BFCHW",
    ),
    _e(
        "auraflow",
        "AuraFlowTransformer2DModel",
        {
            "sample_size": 16,
            "patch_size": 2,
            "in_channels": 4,
            "num_mmdit_layers": 1,
            "num_single_dit_layers": 2,
            "attention_head_dim": 16,
            "num_attention_heads": 2,
            "joint_attention_dim": 32,
            "caption_projection_dim": 32,
            "out_channels": 4,
            "pos_embed_max_size": 64,
        },
        auraflow_inputs,
    ),
    _e(
        "cogview3plus",
        "CogView3PlusTransformer2DModel",
        {
            "patch_size": 2,
            "in_channels": 4,
            "num_layers": 2,
            "attention_head_dim": 16,
            "num_attention_heads": 2,
            "out_channels": 4,
            "text_embed_dim": 32,
            "time_embed_dim": 32,
            "condition_dim": 8,
            "pos_embed_max_size": 16,
            "sample_size": 16,
        },
        cogview_inputs,
    ),
    _e(
        "cogview4",
        "CogView4Transformer2DModel",
        {
            "patch_size": 2,
            "in_channels": 4,
            "out_channels": 4,
            "num_layers": 2,
            "attention_head_dim": 16,
            "num_attention_heads": 2,
            "text_embed_dim": 32,
            "time_embed_dim": 32,
            "condition_dim": 8,
            "pos_embed_max_size": 16,
            "sample_size": 16,
            "rope_axes_dim": (8, 8),
        },
        cogview_inputs,
    ),
    _e(
        "ltx-video",
        "LTXVideoTransformer3DModel",
        {
            "in_channels": 8,
            "out_channels": 8,
            "num_attention_heads": 2,
            "attention_head_dim": 16,
            "cross_attention_dim": 32,
            "num_layers": 2,
            "caption_channels": 32,
        },
        ltx_inputs,
        video=True,
        layout="BSC",
    ),
    _e(
        "allegro",
        "AllegroTransformer3DModel",
        {
            "patch_size": 2,
            "patch_size_t": 1,
            "num_attention_heads": 2,
            "attention_head_dim": 16,
            "in_channels": 4,
            "out_channels": 4,
            "num_layers": 2,
            "cross_attention_dim": 32,
            "sample_height": 16,
            "sample_width": 16,
            "sample_frames": 4,
            "caption_channels": 32,
        },
        _video_text("caption_channels"),
        video=True,
        layout="BCFHW",
    ),
    _e(
        "skyreels-v2",
        "SkyReelsV2Transformer3DModel",
        dict(_WAN_TINY),
        _video_text("text_dim"),
        video=True,
        layout="BCFHW",
    ),
    _e(
        "wan-vace",
        "WanVACETransformer3DModel",
        {**_WAN_TINY, "vace_layers": [0], "vace_in_channels": 8},
        _video_text("text_dim", extra=_vace_control),
        video=True,
        layout="BCFHW",
    ),
    _e(
        "sana-video",
        "SanaVideoTransformer3DModel",
        {
            "in_channels": 16,
            "out_channels": 16,
            "num_attention_heads": 2,
            "attention_head_dim": 16,
            "num_layers": 2,
            "num_cross_attention_heads": 2,
            "cross_attention_head_dim": 16,
            "cross_attention_dim": 32,
            "caption_channels": 32,
            "sample_size": 16,
        },
        _video_text("caption_channels", mask=True, int_t=False),
        video=True,
        layout="BCFHW",
    ),
    _e(
        "chroma",
        "ChromaTransformer2DModel",
        {
            **_FLUXLIKE_TINY,
            "joint_attention_dim": 32,
            "approximator_num_channels": 8,
            "approximator_hidden_dim": 32,
            "approximator_layers": 1,
        },
        _flux_like("joint_attention_dim"),
        layout="BSC",
        row_patch=2,
    ),
    _e(
        "longcat-image",
        "LongCatImageTransformer2DModel",
        {**_FLUXLIKE_TINY, "joint_attention_dim": 32, "pooled_projection_dim": 32},
        _flux_like("joint_attention_dim"),
        layout="BSC",
        row_patch=2,
    ),
    _e(
        "ovis-image",
        "OvisImageTransformer2DModel",
        {**_FLUXLIKE_TINY, "out_channels": 16, "joint_attention_dim": 32},
        _flux_like("joint_attention_dim"),
        layout="BSC",
        row_patch=2,
    ),
    _e(
        "bria",
        "BriaTransformer2DModel",
        {**_FLUXLIKE_TINY, "joint_attention_dim": 32},
        _flux_like("joint_attention_dim"),
        layout="BSC",
        row_patch=2,
    ),
    _e(
        "hunyuan-image",
        "HunyuanImageTransformer2DModel",
        {
            "in_channels": 16,
            "out_channels": 16,
            "num_attention_heads": 2,
            "attention_head_dim": 16,
            "num_layers": 1,
            "num_single_layers": 1,
            "num_refiner_layers": 1,
            "patch_size": (1, 1),
            "text_embed_dim": 32,
            "rope_axes_dim": (8, 8),
        },
        _image_text("text_embed_dim", "encoder_attention_mask"),
    ),
    _e(
        "prx",
        "PRXTransformer2DModel",
        {
            "in_channels": 16,
            "patch_size": 2,
            "context_in_dim": 32,
            "hidden_size": 32,
            "num_heads": 2,
            "depth": 2,
            "axes_dim": [8, 8],
        },
        _image_text("context_in_dim", "attention_mask"),
    ),
)
