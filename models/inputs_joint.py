"""Example inputs of the joint text+image/video attention DiTs (SD3, Flux, CogVideoX, Mochi,
HunyuanVideo, Wan, Qwen-Image), built like :mod:`.inputs`: random tensors drawn on the CPU from
the given generator, then moved to the model's device and dtype; kwargs as the matching diffusers
pipeline passes them to the transformer, with ``return_dict=False``.

Heights/widths are VAE-latent pixels and ``frames`` latent frames (after the VAE's temporal
compression; every video config here has temporal patch 1, so they are also the token frames).
Packed-latent models (Flux, Qwen-Image) pack ``[B, C, H, W]`` latents into ``[B, H/2 * W/2,
4C]`` tokens with the pipelines' own ``_pack_latents``.

Timestep dtypes follow the pipelines: float32 in ``[0, 1000)`` for SD3 / Mochi / HunyuanVideo
(their latents, and so timesteps, stay float32), the model dtype divided by 1000 for Flux and
Qwen-Image, int64 for CogVideoX (DDIM/DPM) and Wan 2.1 (UniPC).
"""

from __future__ import annotations

from typing import Any

import torch

from .inputs import (
    NUM_TRAIN_TIMESTEPS,
    InputSpec,
    _cfg,
    _check_image,
    _float_timestep,
    _int_timestep,
    _randn,
    _text_len,
    _text_mask,
)

__all__ = [
    "cogvideox_inputs",
    "flux_inputs",
    "hunyuan_video_inputs",
    "mochi_inputs",
    "qwen_image_inputs",
    "sd3_inputs",
    "wan_inputs",
]

#: Guidance scales of the guidance-distilled pipelines' defaults (FluxPipeline: 3.5,
#: HunyuanVideoPipeline: 6.0).
FLUX_GUIDANCE = 3.5
HUNYUAN_VIDEO_GUIDANCE = 6.0


def _f32_timestep(gen: torch.Generator, spec: InputSpec) -> torch.Tensor:
    """Float32 timesteps ``[B]`` in ``[0, 1000)`` (pipelines whose latents stay float32)."""
    return (torch.rand((spec.batch,), generator=gen) * NUM_TRAIN_TIMESTEPS).to(spec.device)


def _check_video(spec: InputSpec, patch: int, patch_t: int, name: str) -> int:
    frames = spec.frames
    if frames is None or frames < 1 or frames % patch_t:
        raise ValueError(
            f"{name}: frames must be a positive multiple of the temporal patch {patch_t}, "
            f"got {frames}"
        )
    if spec.height % patch or spec.width % patch:
        raise ValueError(
            f"{name}: latent height/width ({spec.height}, {spec.width}) must be divisible by "
            f"patch_size {patch}"
        )
    return frames


def _zero_padding(embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero the padded text positions, as pipelines that trim and re-pad embeddings do."""
    return embeds * mask[:, :, None].to(embeds.dtype)


def _packed(
    model: torch.nn.Module, spec: InputSpec, gen: torch.Generator, name: str
) -> tuple[torch.Tensor, int, int]:
    """Packed latents ``[B, H/2 * W/2, in_channels]`` and the token grid ``(H/2, W/2)``."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import QwenImagePipeline

    _check_image(spec, 2, name)
    cfg = _cfg(model)
    if cfg.in_channels % 4:
        raise ValueError(f"{name}: packed in_channels must be 4 x latent channels")
    b, c = spec.batch, cfg.in_channels // 4
    latents = torch.randn((b, c, spec.height, spec.width), generator=gen)
    # Flux's and Qwen-Image's _pack_latents are the same 2x2 space-to-channel packing.
    packed = QwenImagePipeline._pack_latents(latents, b, c, spec.height, spec.width)
    return packed.to(device=spec.device, dtype=spec.dtype), spec.height // 2, spec.width // 2


def sd3_inputs(model: torch.nn.Module, spec: InputSpec, gen: torch.Generator) -> dict[str, Any]:
    """SD3 / SD3.5: latents, CLIP+T5 joint text tokens, pooled CLIP embeddings, float timestep."""
    cfg = _cfg(model)
    _check_image(spec, cfg.patch_size, "SD3Transformer2DModel")
    b, length = spec.batch, _text_len(spec, "SD3Transformer2DModel")
    return {
        "hidden_states": _randn(gen, (b, cfg.in_channels, spec.height, spec.width), spec),
        "encoder_hidden_states": _randn(gen, (b, length, cfg.joint_attention_dim), spec),
        "pooled_projections": _randn(gen, (b, cfg.pooled_projection_dim), spec),
        "timestep": _f32_timestep(gen, spec),
        "return_dict": False,
    }


def flux_inputs(model: torch.nn.Module, spec: InputSpec, gen: torch.Generator) -> dict[str, Any]:
    """Flux: packed latents, T5 tokens, pooled CLIP, position ids, timestep (and guidance).

    ``img_ids`` (``[S, 3]``) come from ``FluxPipeline._prepare_latent_image_ids`` and ``txt_ids``
    are zeros ``[T, 3]``, both in the model dtype; ``timestep`` is ``t / 1000``; ``guidance``
    (float32, 3.5) only for ``guidance_embeds`` configs (FLUX.1-dev).
    """
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    name = "FluxTransformer2DModel"
    cfg = _cfg(model)
    hidden_states, rows, cols = _packed(model, spec, gen, name)
    b, length = spec.batch, _text_len(spec, name)
    inputs: dict[str, Any] = {
        "hidden_states": hidden_states,
        "encoder_hidden_states": _randn(gen, (b, length, cfg.joint_attention_dim), spec),
        "pooled_projections": _randn(gen, (b, cfg.pooled_projection_dim), spec),
        "timestep": _float_timestep(gen, spec) / 1000,
        "img_ids": FluxPipeline._prepare_latent_image_ids(b, rows, cols, spec.device, spec.dtype),
        "txt_ids": torch.zeros(length, 3).to(device=spec.device, dtype=spec.dtype),
    }
    if cfg.guidance_embeds:
        inputs["guidance"] = torch.full((b,), FLUX_GUIDANCE, device=spec.device)
    inputs["return_dict"] = False
    return inputs


def cogvideox_inputs(
    model: torch.nn.Module, spec: InputSpec, gen: torch.Generator
) -> dict[str, Any]:
    """CogVideoX: latents ``[B, F, C, H, W]`` (frames first), T5 tokens, int64 timestep.

    With sincos position embeddings (2b) the text length must be the config's
    ``max_text_seq_length`` (the table has that many text slots). With rotary embeddings (5b)
    ``image_rotary_emb`` is built as ``CogVideoXPipeline._prepare_rotary_positional_embeddings``
    does, with diffusers' ``get_resize_crop_region_for_grid`` and ``get_3d_rotary_pos_embed``
    (float32 ``(cos, sin)``, each ``[F * H/p * W/p, head_dim]``).
    """
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    name = "CogVideoXTransformer3DModel"
    cfg = _cfg(model)
    p, p_t = cfg.patch_size, cfg.patch_size_t
    frames = _check_video(spec, p, p_t or 1, name)
    b, length = spec.batch, _text_len(spec, name)
    rotary = cfg.use_rotary_positional_embeddings
    if not rotary and length != cfg.max_text_seq_length:
        raise ValueError(
            f"{name} with sincos position embeddings needs text_len == max_text_seq_length "
            f"({cfg.max_text_seq_length}), got {length}"
        )
    inputs: dict[str, Any] = {
        "hidden_states": _randn(gen, (b, frames, cfg.in_channels, spec.height, spec.width), spec),
        "encoder_hidden_states": _randn(gen, (b, length, cfg.text_embed_dim), spec),
        "timestep": _int_timestep(gen, spec),
    }
    if rotary:
        grid = (spec.height // p, spec.width // p)
        base_w, base_h = cfg.sample_width // p, cfg.sample_height // p
        if p_t is None:  # CogVideoX 1.0
            crops = get_resize_crop_region_for_grid(grid, base_w, base_h)
            rope = get_3d_rotary_pos_embed(
                cfg.attention_head_dim, crops, grid, frames, device=spec.device
            )
        else:  # CogVideoX 1.5
            rope = get_3d_rotary_pos_embed(
                cfg.attention_head_dim,
                None,
                grid,
                (frames + p_t - 1) // p_t,
                grid_type="slice",
                max_size=(base_h, base_w),
                device=spec.device,
            )
        inputs["image_rotary_emb"] = rope
    inputs["return_dict"] = False
    return inputs


def mochi_inputs(model: torch.nn.Module, spec: InputSpec, gen: torch.Generator) -> dict[str, Any]:
    """Mochi: latents ``[B, C, F, H, W]``, T5 tokens with a padded bool mask, float32 timestep."""
    name = "MochiTransformer3DModel"
    cfg = _cfg(model)
    frames = _check_video(spec, cfg.patch_size, 1, name)
    b, length = spec.batch, _text_len(spec, name)
    return {
        "hidden_states": _randn(gen, (b, cfg.in_channels, frames, spec.height, spec.width), spec),
        "encoder_hidden_states": _randn(gen, (b, length, cfg.text_embed_dim), spec),
        "timestep": _f32_timestep(gen, spec),
        "encoder_attention_mask": _text_mask(gen, spec, length).bool(),
        "return_dict": False,
    }


def hunyuan_video_inputs(
    model: torch.nn.Module, spec: InputSpec, gen: torch.Generator
) -> dict[str, Any]:
    """HunyuanVideo: latents ``[B, C, F, H, W]``, LLaMA tokens with a padded mask (model dtype),
    pooled CLIP, float32 timestep and (``guidance_embeds``) guidance ``6.0 * 1000``."""
    name = "HunyuanVideoTransformer3DModel"
    cfg = _cfg(model)
    frames = _check_video(spec, cfg.patch_size, cfg.patch_size_t, name)
    b, length = spec.batch, _text_len(spec, name)
    inputs: dict[str, Any] = {
        "hidden_states": _randn(gen, (b, cfg.in_channels, frames, spec.height, spec.width), spec),
        "timestep": _f32_timestep(gen, spec),
        "encoder_hidden_states": _randn(gen, (b, length, cfg.text_embed_dim), spec),
        "encoder_attention_mask": _text_mask(gen, spec, length).to(spec.dtype),
        "pooled_projections": _randn(gen, (b, cfg.pooled_projection_dim), spec),
    }
    if cfg.guidance_embeds:
        guidance = torch.full((b,), HUNYUAN_VIDEO_GUIDANCE, dtype=spec.dtype) * 1000.0
        inputs["guidance"] = guidance.to(spec.device)
    inputs["return_dict"] = False
    return inputs


def wan_inputs(model: torch.nn.Module, spec: InputSpec, gen: torch.Generator) -> dict[str, Any]:
    """Wan 2.1: latents ``[B, C, F, H, W]``, umT5 tokens zero-padded past the prompt (WanPipeline
    trims and re-pads them; no mask is passed), int64 timestep."""
    name = "WanTransformer3DModel"
    cfg = _cfg(model)
    p_t, p_h, p_w = cfg.patch_size
    if p_h != p_w:
        raise ValueError(f"{name}: non-square spatial patches {cfg.patch_size} are not supported")
    frames = _check_video(spec, p_h, p_t, name)
    b, length = spec.batch, _text_len(spec, name)
    text = _randn(gen, (b, length, cfg.text_dim), spec)
    return {
        "hidden_states": _randn(gen, (b, cfg.in_channels, frames, spec.height, spec.width), spec),
        "timestep": _int_timestep(gen, spec),
        "encoder_hidden_states": _zero_padding(text, _text_mask(gen, spec, length)),
        "return_dict": False,
    }


def qwen_image_inputs(
    model: torch.nn.Module, spec: InputSpec, gen: torch.Generator
) -> dict[str, Any]:
    """Qwen-Image: packed latents, Qwen2.5-VL tokens (zeroed past the prompt) with a padded int64
    mask, ``img_shapes`` ``[[(1, H/2, W/2)]] * B`` and ``timestep = t / 1000``.

    Like ``QwenImagePipeline`` in this diffusers version, no ``txt_seq_lens`` is passed (the model
    reads the text length off the mask); ``guidance`` only for ``guidance_embeds`` configs.
    """
    name = "QwenImageTransformer2DModel"
    cfg = _cfg(model)
    hidden_states, rows, cols = _packed(model, spec, gen, name)
    b, length = spec.batch, _text_len(spec, name)
    text = _randn(gen, (b, length, cfg.joint_attention_dim), spec)
    mask = _text_mask(gen, spec, length)
    inputs: dict[str, Any] = {
        "hidden_states": hidden_states,
        "timestep": _float_timestep(gen, spec) / 1000,
        "encoder_hidden_states": _zero_padding(text, mask),
        "encoder_hidden_states_mask": mask,
        "img_shapes": [[(1, rows, cols)]] * b,
    }
    if cfg.guidance_embeds:
        inputs["guidance"] = torch.full((b,), 1.0, device=spec.device)
    inputs["return_dict"] = False
    return inputs
