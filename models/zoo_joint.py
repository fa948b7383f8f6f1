"""Zoo entries of the joint text+image/video attention DiTs (registered after those of ``zoo.py``).

SD3 / SD3.5 and Flux (MMDiT: text and image tokens in one attention), CogVideoX, Mochi and
HunyuanVideo (joint text+video attention), Wan 2.1 (video self-attention + text cross-attention)
and Qwen-Image (MMDiT with a padded text mask). ``tiny`` configs have 4 heads of 8-16 dims and
1-2 blocks of each kind; ``full`` configs are the published ones (random weights).

Default tiny inputs: 8 token rows (images) or 4 latent frames of 8x8 tokens (videos); the uneven
inputs have 5 token rows, and 5 latent frames for videos. Packed-latent models (Flux,
Qwen-Image) also get 7 token columns there, so the packed token count (35) is odd too. Full
image inputs are 1024x1024 px (128x128 latent; uneven: 63 token rows); full video inputs are
the published default shapes (uneven: an odd frame count and odd token rows).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from .entry import LatentSize, ZooEntry
from .inputs_joint import (
    cogvideox_inputs,
    flux_inputs,
    hunyuan_video_inputs,
    mochi_inputs,
    qwen_image_inputs,
    sd3_inputs,
    wan_inputs,
)

__all__ = ["JOINT_ENTRIES"]


def _check_rope_axes(key: str, default: tuple[int, ...]) -> Callable[[dict[str, Any]], None]:
    """A ``check_config`` that the rotary axes split the head dim (a bad split fails deep in
    the first attention otherwise)."""

    def check(config: dict[str, Any]) -> None:
        axes, head_dim = config.get(key, default), config.get("attention_head_dim", 128)
        if sum(axes) != head_dim or any(a % 2 for a in axes):
            raise ValueError(
                f"{key} {tuple(axes)} must be even sizes summing to attention_head_dim {head_dim}"
            )

    return check


_ROPE_3 = (16, 56, 56)  # Flux / HunyuanVideo / Qwen-Image rotary axes of 128-dim heads
_TINY_HEADS = {"num_attention_heads": 4, "attention_head_dim": 8}

# Token grids: 8x8 / 5x8 tokens of 2x2 patches (5x7 for packed latents), 1024 px at full size.
_IMG_TINY = LatentSize(height=16, width=16, uneven_height=10, uneven_width=16, text_len=12)
_PACKED_TINY = LatentSize(height=16, width=16, uneven_height=10, uneven_width=14, text_len=12)
_IMG_FULL = LatentSize(height=128, width=128, uneven_height=126, uneven_width=128)
_PACKED_FULL = LatentSize(height=128, width=128, uneven_height=126, uneven_width=126)
# 4 latent frames of 8x8 tokens; uneven: 5 frames of 5x8 tokens.
_VIDEO_TINY = LatentSize(
    height=16, width=16, uneven_height=10, uneven_width=16, frames=4, uneven_frames=5, text_len=12
)


_SD3_TINY: dict[str, Any] = {
    "sample_size": 16,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 2,  # the last block is context_pre_only
    **_TINY_HEADS,
    "joint_attention_dim": 32,
    "caption_projection_dim": 32,
    "pooled_projection_dim": 32,
    "pos_embed_max_size": 16,
}
_SD3_FULL: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 24,
    "num_attention_heads": 24,
    "attention_head_dim": 64,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192,
}
_SD3_1024 = replace(_IMG_FULL, text_len=333)  # 77 CLIP + 256 T5 tokens
_SD35_EXTRA = {"qk_norm": "rms_norm"}


def _flux(guidance: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    tiny = {
        "patch_size": 1,
        "in_channels": 64,
        "num_layers": 1,
        "num_single_layers": 1,
        **_TINY_HEADS,
        "joint_attention_dim": 32,
        "pooled_projection_dim": 32,
        "guidance_embeds": guidance,
        "axes_dims_rope": (2, 2, 4),
    }
    full = {
        "patch_size": 1,
        "in_channels": 64,
        "num_layers": 19,
        "num_single_layers": 38,
        "num_attention_heads": 24,
        "attention_head_dim": 128,
        "joint_attention_dim": 4096,
        "pooled_projection_dim": 768,
        "guidance_embeds": guidance,
        "axes_dims_rope": _ROPE_3,
    }
    return tiny, full


_FLUX_DEV, _FLUX_SCHNELL = _flux(True), _flux(False)


def _cogvideox(heads: int, layers: int, rotary: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    shared = {
        "in_channels": 16,
        "out_channels": 16,
        "patch_size": 2,
        "use_rotary_positional_embeddings": rotary,
    }
    tiny = {
        "num_attention_heads": 4,
        "attention_head_dim": 16,  # 3D RoPE splits head_dim in 4/16 + 6/16 + 6/16
        "num_layers": 2,
        "time_embed_dim": 32,
        "text_embed_dim": 32,
        "max_text_seq_length": 12,
        "sample_height": 16,
        "sample_width": 16,
        "sample_frames": 13,  # 4 latent frames
        **shared,
    }
    full = {
        "num_attention_heads": heads,
        "attention_head_dim": 64,
        "num_layers": layers,
        "time_embed_dim": 512,
        "text_embed_dim": 4096,
        "max_text_seq_length": 226,
        "sample_height": 60,
        "sample_width": 90,
        "sample_frames": 49,
        **shared,
    }
    return tiny, full


_COG_2B_TINY, _COG_2B_FULL = _cogvideox(30, 30, rotary=False)
_COG_5B_TINY, _COG_5B_FULL = _cogvideox(48, 42, rotary=True)
# 49 frames of 480x720 -> 13 x 60 x 90 latents (30 x 45 tokens); uneven: 29 token rows.
_COG_FULL = LatentSize(
    height=60,
    width=90,
    uneven_height=58,
    uneven_width=90,
    frames=13,
    uneven_frames=13,
    text_len=226,
)
_COG_DESC = (
    "T5 text (226 tokens) and video tokens in one 3D full attention (expert adaLN per modality); "
    "inputs: hidden_states [B, F, C, H, W] (frames before channels), encoder_hidden_states, "
    "int64 timestep. Full input: 49 frames of 480x720 -> 13 latent frames of 60x90."
)


JOINT_ENTRIES: tuple[ZooEntry, ...] = (
    ZooEntry(
        name="sd3",
        steps=28,
        cls_name="SD3Transformer2DModel",
        description=(
            "Stable Diffusion 3 medium (stabilityai/stable-diffusion-3-medium-diffusers): MMDiT, "
            "joint attention over 333 CLIP+T5 text tokens (77 + 256) and image tokens; inputs: "
            "latents, encoder_hidden_states, pooled_projections [B, 2048], float timestep."
        ),
        tiny=_SD3_TINY,
        full=_SD3_FULL,
        input_builder=sd3_inputs,
        sizes={"tiny": _IMG_TINY, "full": _SD3_1024},
    ),
    ZooEntry(
        name="sd3.5",
        steps=28,
        cls_name="SD3Transformer2DModel",
        description=(
            "Stable Diffusion 3.5 medium (stabilityai/stable-diffusion-3.5-medium): MMDiT-X, "
            "RMSNorm q/k, an extra image-only self-attention in blocks 0-12 (the tiny config: "
            "block 0); inputs as sd3. SD3.5-large: num_layers=38, num_attention_heads=38, "
            "caption_projection_dim=2432, pos_embed_max_size=192, dual_attention_layers=()."
        ),
        tiny={**_SD3_TINY, **_SD35_EXTRA, "dual_attention_layers": (0,)},
        full={
            **_SD3_FULL,
            **_SD35_EXTRA,
            "pos_embed_max_size": 384,
            "dual_attention_layers": tuple(range(13)),
        },
        input_builder=sd3_inputs,
        sizes={"tiny": _IMG_TINY, "full": _SD3_1024},
    ),
    ZooEntry(
        name="flux-dev",
        steps=28,
        cfg_in_batch=False,
        cls_name="FluxTransformer2DModel",
        description=(
            "FLUX.1-dev (black-forest-labs/FLUX.1-dev): 19 double-stream (joint) + 38 "
            "single-stream blocks, 3-axis RoPE, guidance embedding; inputs: packed latents "
            "[B, H/2*W/2, 64], T5 tokens [B, 512, 4096], pooled CLIP [B, 768], img_ids, txt_ids, "
            "timestep, guidance."
        ),
        tiny=_FLUX_DEV[0],
        full=_FLUX_DEV[1],
        input_builder=flux_inputs,
        sizes={"tiny": _PACKED_TINY, "full": replace(_PACKED_FULL, text_len=512)},
        layout="BSC",
        row_patch=2,
        check_config=_check_rope_axes("axes_dims_rope", _ROPE_3),
    ),
    ZooEntry(
        name="flux-schnell",
        steps=4,
        cfg_in_batch=False,
        cls_name="FluxTransformer2DModel",
        description=(
            "FLUX.1-schnell (black-forest-labs/FLUX.1-schnell): flux-dev without the guidance "
            "embedding, 256 T5 tokens; inputs as flux-dev minus guidance."
        ),
        tiny=_FLUX_SCHNELL[0],
        full=_FLUX_SCHNELL[1],
        input_builder=flux_inputs,
        sizes={"tiny": _PACKED_TINY, "full": replace(_PACKED_FULL, text_len=256)},
        layout="BSC",
        row_patch=2,
        check_config=_check_rope_axes("axes_dims_rope", _ROPE_3),
    ),
    ZooEntry(
        name="cogvideox-2b",
        cls_name="CogVideoXTransformer3DModel",
        description="CogVideoX-2b (THUDM/CogVideoX-2b): 3D sincos position table; " + _COG_DESC,
        tiny=_COG_2B_TINY,
        full=_COG_2B_FULL,
        input_builder=cogvideox_inputs,
        sizes={"tiny": _VIDEO_TINY, "full": _COG_FULL},
        video=True,
        layout="BFCHW",
        # Inputs of another size than sample_* rebuild the sincos table in forward through an
        # in-place .data copy that torch.export refuses: the uneven input gets its own config.
        uneven_config={
            "tiny": {"sample_height": 10, "sample_frames": 17},  # 5 latent frames, 5 rows
            "full": {"sample_height": 58},
        },
    ),
    ZooEntry(
        name="cogvideox-5b",
        cls_name="CogVideoXTransformer3DModel",
        description=(
            "CogVideoX-5b (THUDM/CogVideoX-5b): 3D RoPE passed as image_rotary_emb; " + _COG_DESC
        ),
        tiny=_COG_5B_TINY,
        full=_COG_5B_FULL,
        input_builder=cogvideox_inputs,
        sizes={"tiny": _VIDEO_TINY, "full": _COG_FULL},
        video=True,
        layout="BFCHW",
    ),
    ZooEntry(
        name="mochi",
        pipefusion_refused="aten.index.Tensor",
        steps=64,
        vae_temporal=6,
        cls_name="MochiTransformer3DModel",
        description=(
            "Mochi 1 preview (genmo/mochi-1-preview): asymmetric joint attention (video 3072 / "
            "text 1536 dims), 3D RoPE; inputs: hidden_states [B, 12, F, H, W], T5 tokens "
            "[B, 256, 4096], bool encoder_attention_mask (padded), float32 timestep. Full input: "
            "163 frames of 480x848 -> 28 latent frames of 60x106."
        ),
        tiny={
            "patch_size": 2,
            **_TINY_HEADS,
            "num_layers": 2,  # the last block is context_pre_only
            "pooled_projection_dim": 16,
            "in_channels": 12,
            "text_embed_dim": 32,  # the caption attention pool has 8 heads
            "time_embed_dim": 16,
            "max_sequence_length": 12,
        },
        full={
            "patch_size": 2,
            "num_attention_heads": 24,
            "attention_head_dim": 128,
            "num_layers": 48,
            "pooled_projection_dim": 1536,
            "in_channels": 12,
            "text_embed_dim": 4096,
            "time_embed_dim": 256,
            "max_sequence_length": 256,
        },
        input_builder=mochi_inputs,
        sizes={
            "tiny": _VIDEO_TINY,
            "full": LatentSize(
                height=60,
                width=106,
                uneven_height=58,
                uneven_width=106,
                frames=28,
                uneven_frames=27,
                text_len=256,
            ),
        },
        video=True,
        layout="BCFHW",
    ),
    ZooEntry(
        name="hunyuan-video",
        cfg_in_batch=False,
        cls_name="HunyuanVideoTransformer3DModel",
        description=(
            "HunyuanVideo (hunyuanvideo-community/HunyuanVideo): token refiner, 20 dual-stream + "
            "40 single-stream blocks, 3D RoPE, guidance embedding; inputs: hidden_states "
            "[B, 16, F, H, W], LLaMA tokens [B, 256, 4096] with a padded mask, pooled CLIP "
            "[B, 768], float32 timestep, guidance. Full input: 61 frames of 544x960 -> 16 latent "
            "frames of 68x120 (the published 720p x 129 frames is 33 x 90 x 160)."
        ),
        tiny={
            "in_channels": 16,
            "out_channels": 16,
            "patch_size": 2,
            "patch_size_t": 1,
            **_TINY_HEADS,
            "num_layers": 1,
            "num_single_layers": 1,
            "num_refiner_layers": 1,
            "text_embed_dim": 32,
            "pooled_projection_dim": 32,
            "rope_axes_dim": (2, 2, 4),
        },
        full={
            "in_channels": 16,
            "out_channels": 16,
            "patch_size": 2,
            "patch_size_t": 1,
            "num_attention_heads": 24,
            "attention_head_dim": 128,
            "num_layers": 20,
            "num_single_layers": 40,
            "num_refiner_layers": 2,
            "text_embed_dim": 4096,
            "pooled_projection_dim": 768,
            "rope_axes_dim": _ROPE_3,
        },
        input_builder=hunyuan_video_inputs,
        sizes={
            "tiny": _VIDEO_TINY,
            "full": LatentSize(
                height=68,
                width=120,
                uneven_height=66,
                uneven_width=120,
                frames=16,
                uneven_frames=15,
                text_len=256,
            ),
        },
        video=True,
        layout="BCFHW",
        check_config=_check_rope_axes("rope_axes_dim", _ROPE_3),
    ),
    ZooEntry(
        name="wan2.1",
        cls_name="WanTransformer3DModel",
        description=(
            "Wan 2.1 T2V 1.3B (Wan-AI/Wan2.1-T2V-1.3B-Diffusers): video self-attention with 3D "
            "RoPE + umT5 cross-attention (512 zero-padded tokens); inputs: hidden_states "
            "[B, 16, F, H, W], encoder_hidden_states [B, 512, 4096], int64 timestep. Full input: "
            "81 frames of 480x832 -> 21 latent frames of 60x104."
        ),
        tiny={
            "patch_size": (1, 2, 2),
            "num_attention_heads": 4,
            "attention_head_dim": 16,  # 3D RoPE splits head_dim in 8 + 4 + 4
            "in_channels": 16,
            "out_channels": 16,
            "text_dim": 32,
            "freq_dim": 32,
            "ffn_dim": 128,
            "num_layers": 2,
        },
        full={
            "patch_size": (1, 2, 2),
            "num_attention_heads": 12,
            "attention_head_dim": 128,
            "in_channels": 16,
            "out_channels": 16,
            "text_dim": 4096,
            "freq_dim": 256,
            "ffn_dim": 8960,
            "num_layers": 30,
        },
        input_builder=wan_inputs,
        sizes={
            "tiny": _VIDEO_TINY,
            "full": LatentSize(
                height=60,
                width=104,
                uneven_height=58,
                uneven_width=104,
                frames=21,
                uneven_frames=21,
                text_len=512,
            ),
        },
        video=True,
        layout="BCFHW",
    ),
    ZooEntry(
        name="qwen-image",
        cls_name="QwenImageTransformer2DModel",
        description=(
            "Qwen-Image (Qwen/Qwen-Image): 60 MMDiT blocks, scaled 3-axis RoPE; inputs: packed "
            "latents [B, H/2*W/2, 64], Qwen2.5-VL tokens [B, 512, 3584] with a padded "
            "encoder_hidden_states_mask, img_shapes, timestep."
        ),
        tiny={
            "patch_size": 2,
            "in_channels": 64,
            "out_channels": 16,
            "num_layers": 2,
            **_TINY_HEADS,
            "joint_attention_dim": 32,
            "axes_dims_rope": (2, 2, 4),
        },
        full={
            "patch_size": 2,
            "in_channels": 64,
            "out_channels": 16,
            "num_layers": 60,
            "num_attention_heads": 24,
            "attention_head_dim": 128,
            "joint_attention_dim": 3584,
            "axes_dims_rope": _ROPE_3,
        },
        input_builder=qwen_image_inputs,
        sizes={"tiny": _PACKED_TINY, "full": replace(_PACKED_FULL, text_len=512)},
        layout="BSC",
        row_patch=2,
        check_config=_check_rope_axes("axes_dims_rope", _ROPE_3),
    ),
)
