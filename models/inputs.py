"""Deterministic example inputs for the zoo's diffusers transformers.

Each builder takes the model (to read its config: channels, patch size, text dims), an
:class:`InputSpec` with the requested shapes, and a CPU :class:`torch.Generator`. Every random
tensor is drawn on the CPU from that generator and then moved to the model's device and dtype, so
the same seed gives the same inputs on every process and device. The kwargs mirror what the matching
diffusers pipeline passes to the transformer, always with ``return_dict=False``.

Heights and widths are latent pixels (the transformer's sample H/W), not image pixels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "VAE_SCALE_FACTOR",
    "InputBuilder",
    "InputSpec",
    "dit_inputs",
    "hunyuan_dit_inputs",
    "latte_inputs",
    "pixart_inputs",
    "sana_inputs",
]

#: Image pixels per latent pixel of the SD VAE used by DiT, PixArt, HunyuanDiT and Latte.
VAE_SCALE_FACTOR = 8

#: Number of DDPM training timesteps; integer timesteps are drawn from ``[0, NUM_TRAIN_TIMESTEPS)``.
NUM_TRAIN_TIMESTEPS = 1000


@dataclass(frozen=True, kw_only=True)
class InputSpec:
    """Shapes, dtype and device of one example input.

    ``text_len`` is the length of the main text sequence; ``None`` where the model takes no text or
    fixes its text lengths in its config (HunyuanDiT). ``frames`` is ``None`` for image models.
    """

    batch: int
    height: int
    width: int
    frames: int | None
    text_len: int | None
    dtype: torch.dtype
    device: torch.device


#: Signature of a builder: ``(model, spec, generator) -> kwargs for model(**kwargs)``.
InputBuilder = Callable[[torch.nn.Module, InputSpec, torch.Generator], dict[str, Any]]


def _cfg(model: torch.nn.Module) -> Any:
    """The diffusers ``FrozenDict`` config of ``model``."""
    return model.config


def _randn(gen: torch.Generator, shape: tuple[int, ...], spec: InputSpec) -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(device=spec.device, dtype=spec.dtype)


def _int_timestep(gen: torch.Generator, spec: InputSpec) -> torch.Tensor:
    """Integer timesteps ``[B]`` as DDPM/DPM-Solver schedulers give them (int64)."""
    return torch.randint(0, NUM_TRAIN_TIMESTEPS, (spec.batch,), generator=gen).to(spec.device)


def _float_timestep(gen: torch.Generator, spec: InputSpec) -> torch.Tensor:
    """Float timesteps ``[B]`` in ``[0, 1000)`` in the model dtype (flow-matching style)."""
    t = torch.rand((spec.batch,), generator=gen) * NUM_TRAIN_TIMESTEPS
    return t.to(device=spec.device, dtype=spec.dtype)


def _text_mask(gen: torch.Generator, spec: InputSpec, length: int) -> torch.Tensor:
    """Tokenizer-style int64 mask ``[B, length]``: ones for a prompt prefix, zeros for padding.

    Each batch row keeps between ``length // 4`` and ``length - 1`` tokens, so every row has at
    least one padded (zero) position whenever ``length >= 2``.
    """
    low = max(1, length // 4)
    high = max(low + 1, length)  # exclusive
    valid = torch.randint(low, high, (spec.batch,), generator=gen)
    mask = (torch.arange(length)[None, :] < valid[:, None]).to(torch.int64)
    return mask.to(spec.device)


def _check_image(spec: InputSpec, patch_size: int, name: str) -> None:
    if spec.frames is not None:
        raise ValueError(f"{name} is an image model; frames must be None, got {spec.frames}")
    if spec.height % patch_size or spec.width % patch_size:
        raise ValueError(
            f"{name}: latent height/width ({spec.height}, {spec.width}) must be divisible by "
            f"patch_size {patch_size}"
        )


def _text_len(spec: InputSpec, name: str) -> int:
    if spec.text_len is None or spec.text_len < 1:
        raise ValueError(f"{name} needs a positive text length, got {spec.text_len}")
    return spec.text_len


def dit_inputs(model: torch.nn.Module, spec: InputSpec, gen: torch.Generator) -> dict[str, Any]:
    """Class-conditional DiT: latents, integer timestep and ImageNet class labels."""
    cfg = _cfg(model)
    _check_image(spec, cfg.patch_size, "DiTTransformer2DModel")
    if spec.height != spec.width:
        raise ValueError(
            "DiTTransformer2DModel unpatchifies a square token grid (sqrt of the token count); "
            f"height must equal width, got {spec.height}x{spec.width}"
        )
    b = spec.batch
    return {
        "hidden_states": _randn(gen, (b, cfg.in_channels, spec.height, spec.width), spec),
        "timestep": _int_timestep(gen, spec),
        "class_labels": torch.randint(0, cfg.num_embeds_ada_norm, (b,), generator=gen).to(
            spec.device
        ),
        "return_dict": False,
    }


def pixart_inputs(model: torch.nn.Module, spec: InputSpec, gen: torch.Generator) -> dict[str, Any]:
    """PixArt-alpha/sigma: latents, T5 embeddings with a padded mask, integer timestep.

    With ``use_additional_conditions`` (PixArt-alpha 1024-MS) ``added_cond_kwargs`` carries the
    image-pixel resolution ``[B, 2]`` and aspect ratio ``[B, 1]`` as PixArtAlphaPipeline builds
    them.
    """
    cfg = _cfg(model)
    _check_image(spec, cfg.patch_size, "PixArtTransformer2DModel")
    b, length = spec.batch, _text_len(spec, "PixArtTransformer2DModel")
    inputs: dict[str, Any] = {
        "hidden_states": _randn(gen, (b, cfg.in_channels, spec.height, spec.width), spec),
        "encoder_hidden_states": _randn(gen, (b, length, cfg.caption_channels), spec),
        "encoder_attention_mask": _text_mask(gen, spec, length),
        "timestep": _int_timestep(gen, spec),
    }
    if getattr(model, "use_additional_conditions", False):
        px_h, px_w = spec.height * VAE_SCALE_FACTOR, spec.width * VAE_SCALE_FACTOR
        resolution = torch.tensor([[px_h, px_w]], dtype=torch.float32).repeat(b, 1)
        aspect_ratio = torch.tensor([[float(px_h / px_w)]]).repeat(b, 1)
        inputs["added_cond_kwargs"] = {
            "resolution": resolution.to(device=spec.device, dtype=spec.dtype),
            "aspect_ratio": aspect_ratio.to(device=spec.device, dtype=spec.dtype),
        }
    inputs["return_dict"] = False
    return inputs


def sana_inputs(model: torch.nn.Module, spec: InputSpec, gen: torch.Generator) -> dict[str, Any]:
    """SANA: DC-AE latents, Gemma-2 embeddings with a padded mask, float timestep."""
    cfg = _cfg(model)
    _check_image(spec, cfg.patch_size, "SanaTransformer2DModel")
    b, length = spec.batch, _text_len(spec, "SanaTransformer2DModel")
    return {
        "hidden_states": _randn(gen, (b, cfg.in_channels, spec.height, spec.width), spec),
        "encoder_hidden_states": _randn(gen, (b, length, cfg.caption_channels), spec),
        "encoder_attention_mask": _text_mask(gen, spec, length),
        "timestep": _float_timestep(gen, spec) * cfg.timestep_scale,
        "return_dict": False,
    }


def hunyuan_dit_inputs(
    model: torch.nn.Module, spec: InputSpec, gen: torch.Generator
) -> dict[str, Any]:
    """HunyuanDiT: latents, CLIP/BERT + T5 embeddings and masks, size/style conditions, 2D RoPE.

    Text lengths come from the config (``text_len``, ``text_len_t5``); the rotary tables are built
    exactly as ``HunyuanDiTPipeline.__call__`` does, with diffusers'
    ``get_resize_crop_region_for_grid`` and ``get_2d_rotary_pos_embed`` (float32 ``(cos, sin)``,
    each ``[tokens, head_dim]``).
    """
    from diffusers.models.embeddings import get_2d_rotary_pos_embed
    from diffusers.pipelines.hunyuandit.pipeline_hunyuandit import (
        get_resize_crop_region_for_grid,
    )

    cfg = _cfg(model)
    p = cfg.patch_size
    _check_image(spec, p, "HunyuanDiT2DModel")
    b = spec.batch
    grid_h, grid_w = spec.height // p, spec.width // p
    base_size = 512 // VAE_SCALE_FACTOR // p
    crops = get_resize_crop_region_for_grid((grid_h, grid_w), base_size)
    inner_dim = cfg.num_attention_heads * cfg.attention_head_dim
    head_dim = inner_dim // cfg.num_attention_heads  # pipeline: transformer.inner_dim // num_heads
    cos, sin = get_2d_rotary_pos_embed(
        head_dim, crops, (grid_h, grid_w), device=spec.device, output_type="pt"
    )
    px_h, px_w = spec.height * VAE_SCALE_FACTOR, spec.width * VAE_SCALE_FACTOR
    # original_size (pipeline default 1024x1024) + target_size + crops_coords_top_left (0, 0)
    meta = torch.tensor([[1024, 1024, px_h, px_w, 0, 0]], dtype=torch.float32).repeat(b, 1)
    return {
        "hidden_states": _randn(gen, (b, cfg.in_channels, spec.height, spec.width), spec),
        "timestep": _float_timestep(gen, spec),
        "encoder_hidden_states": _randn(gen, (b, cfg.text_len, cfg.cross_attention_dim), spec),
        "text_embedding_mask": _text_mask(gen, spec, cfg.text_len),
        "encoder_hidden_states_t5": _randn(
            gen, (b, cfg.text_len_t5, cfg.cross_attention_dim_t5), spec
        ),
        "text_embedding_mask_t5": _text_mask(gen, spec, cfg.text_len_t5),
        "image_meta_size": meta.to(device=spec.device, dtype=spec.dtype),
        "style": torch.zeros((b,), dtype=torch.int64, device=spec.device),
        "image_rotary_emb": (cos, sin),
        "return_dict": False,
    }


def latte_inputs(model: torch.nn.Module, spec: InputSpec, gen: torch.Generator) -> dict[str, Any]:
    """Latte: video latents ``[B, C, F, H, W]``, T5 embeddings, integer timestep.

    LattePipeline passes no text mask (it trims padded tokens instead), so none is given here.
    ``frames`` must equal the config's ``video_length`` (the temporal position table) or be 1.
    """
    cfg = _cfg(model)
    name = "LatteTransformer3DModel"
    frames = spec.frames
    if frames is None or frames not in (1, cfg.video_length):
        raise ValueError(
            f"{name}: frames must be 1 or the config's video_length {cfg.video_length}, got "
            f"{frames}"
        )
    p = cfg.patch_size
    if spec.height % p or spec.width % p:
        raise ValueError(
            f"{name}: latent height/width ({spec.height}, {spec.width}) must be divisible by "
            f"patch_size {p}"
        )
    b, length = spec.batch, _text_len(spec, name)
    return {
        "hidden_states": _randn(gen, (b, cfg.in_channels, frames, spec.height, spec.width), spec),
        "timestep": _int_timestep(gen, spec),
        "encoder_hidden_states": _randn(gen, (b, length, cfg.caption_channels), spec),
        "enable_temporal_attentions": True,
        "return_dict": False,
    }
