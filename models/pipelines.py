"""Offline tiny diffusers pipelines: whole text-to-image/video pipelines with random weights.

The zoo (``zoo.py``) builds transformers alone; compiling a real pipeline call (text encoding,
classifier-free guidance, the scheduler loop, VAE decoding) needs every other component too. No
model hub is reachable here, so :func:`build_pipeline` constructs each component from a tiny
config under a fixed seed: the zoo's tiny transformer, tiny T5 / UMT5 / CLIP text encoders whose
hidden sizes fit the transformer's text dims, a tiny VAE whose latent channels match the
transformer's and a scheduler configured like the published one. Tokenizers are built locally
with the ``tokenizers`` library over a small English vocabulary (common prompt words, then
single characters, so any English prompt tokenizes; characters outside the vocabulary map to
the unknown token) and wrapped in the ``transformers`` class the pipeline expects, mirroring
that class's own normalizer/pre-tokenizer so ``save_pretrained`` +
``DiffusionPipeline.from_pretrained`` round-trips them.

Classifier-free guidance is the pipelines' own (no pipeline code is patched). It takes three
shapes, recorded per pipeline in :attr:`PipelineInfo.cfg`:

* ``"batched"`` (PixArt-Sigma, SD3, CogVideoX): cond and uncond latents are concatenated into one
  batch of 2 and the transformer is called once per step;
* ``"two-calls"`` (Wan): the transformer is called twice per step, cond then uncond;
* ``"guidance-embedding"`` (Flux-dev): ``guidance_scale`` is fed to the transformer's guidance
  embedding and there is one batch-1 call per step; the optional "true CFG" of FluxPipeline
  (``true_cfg_scale > 1`` together with a ``negative_prompt``) adds a second call per step.

Default call sizes (:func:`pipeline_defaults`) give the zoo's tiny latent geometry: 16x16 latents
(8x8 tokens of 2x2 patches), and 4 latent frames for the videos. The image VAEs downsample by 2
(32x32 px), the video VAEs by 4 in space and time (13 frames of 64x64 px). Wan's VAE decodes the
4 latent frames back to 13 frames; CogVideoX's to 16, as the real one does for an even latent
frame count (its published 49 frames are 13 latent frames).
"""

from __future__ import annotations

import string
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch

from .zoo import _cast, build_model

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

__all__ = [
    "PipelineInfo",
    "build_pipeline",
    "list_pipelines",
    "pipeline_defaults",
    "pipeline_info",
]

# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------

#: Whole-word tokens of the tiny tokenizers; any other word is spelled in single characters.
_WORDS: tuple[str, ...] = (
    "a",
    "an",
    "the",
    "of",
    "in",
    "on",
    "at",
    "with",
    "and",
    "or",
    "by",
    "to",
    "from",
    "under",
    "over",
    "near",
    "is",
    "are",
    "photo",
    "picture",
    "painting",
    "drawing",
    "render",
    "portrait",
    "landscape",
    "close",
    "up",
    "view",
    "scene",
    "style",
    "art",
    "digital",
    "oil",
    "watercolor",
    "cat",
    "dog",
    "bird",
    "horse",
    "fish",
    "astronaut",
    "robot",
    "man",
    "woman",
    "child",
    "person",
    "people",
    "car",
    "boat",
    "house",
    "city",
    "street",
    "forest",
    "tree",
    "flower",
    "mountain",
    "river",
    "lake",
    "sea",
    "ocean",
    "beach",
    "sky",
    "cloud",
    "sun",
    "moon",
    "star",
    "night",
    "day",
    "light",
    "water",
    "fire",
    "snow",
    "rain",
    "red",
    "green",
    "blue",
    "yellow",
    "black",
    "white",
    "orange",
    "purple",
    "golden",
    "big",
    "small",
    "old",
    "young",
    "beautiful",
    "cute",
    "happy",
    "dark",
    "bright",
    "detailed",
    "realistic",
    "high",
    "quality",
    "sharp",
    "soft",
    "running",
    "flying",
    "sitting",
    "walking",
    "riding",
    "playing",
    "swimming",
    "standing",
    "video",
    "camera",
    "slow",
    "motion",
    "cinematic",
    "wearing",
    "hat",
    "table",
    "window",
    "garden",
    "park",
    "road",
    "field",
    "space",
    "planet",
)

# T5 / UMT5: SentencePiece-style Unigram. Ids 0-2 are fixed by the transformers T5 tokenizer.
_T5_SPECIALS = ("<pad>", "</s>", "<unk>")
# CLIP: byte-level BPE with an end-of-word suffix; bos/eos at the end of the vocabulary.
_CLIP_BOS, _CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
_CLIP_SPLIT = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
    r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)


def _t5_vocab(words: tuple[str, ...] = _WORDS) -> list[tuple[str, float]]:
    """Pieces and log-probability scores of the tiny T5 Unigram model (whole words score higher
    than their spelling, so known words stay one piece)."""
    vocab: list[tuple[str, float]] = [(s, 0.0) for s in _T5_SPECIALS]
    vocab.append(("\u2581", -2.0))
    vocab += [("\u2581" + w, -3.0) for w in words]
    vocab += [(c, -6.0) for c in string.ascii_letters + string.digits + string.punctuation]
    return vocab


def _t5_backend(words: tuple[str, ...] = _WORDS) -> Any:
    """A T5-style Unigram ``tokenizers.Tokenizer``: ``<pad>``, ``</s>``, ``<unk>`` (ids 0-2),
    ``"▁"``, the ``"▁word"`` pieces of :data:`_WORDS`, then single ASCII characters.

    Normalizer/pre-tokenizer/decoder/post-processor are those the transformers ``T5Tokenizer``
    builds itself (it rebuilds them from the vocabulary when loading a saved tokenizer)."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram

    backend = Tokenizer(Unigram(_t5_vocab(words), unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True),
        ]
    )
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    backend.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    return backend


def _t5_tokenizer(words: tuple[str, ...] = _WORDS) -> Any:
    """A ``T5TokenizerFast`` over :func:`_t5_backend` (no ``<extra_id_*>`` sentinels) whose
    whole-word pieces are ``words``."""
    # transformers 5 resolves the *TokenizerFast names to T5Tokenizer / CLIPTokenizer (which
    # are tokenizers-backed there) without exporting them statically.
    from transformers import T5TokenizerFast  # type: ignore[attr-defined]

    return T5TokenizerFast(tokenizer_object=_t5_backend(words), extra_ids=0, model_max_length=512)


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE ``ranks`` to ``symbols`` the way ``tokenizers`` does (lowest rank first)."""
    while len(symbols) > 1:
        ranked = [
            (ranks[pair], i)
            for i, pair in enumerate(zip(symbols, symbols[1:], strict=False))
            if pair in ranks
        ]
        if not ranked:
            break
        _, i = min(ranked)
        symbols = [*symbols[:i], symbols[i] + symbols[i + 1], *symbols[i + 2 :]]
    return symbols


def _clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of the tiny CLIP BPE: the 256 byte-level symbols with and without
    ``"</w>"``, merges that make each word of :data:`_WORDS` one token, then bos/eos.

    Each word's merges join, left to right, the tokens the earlier merges already split it
    into. Later merges rank lower, so they never fire inside an earlier word: every word of
    the list stays one token."""
    from tokenizers import pre_tokenizers

    tokens = [t for c in sorted(pre_tokenizers.ByteLevel.alphabet()) for t in (c, c + "</w>")]
    ranks: dict[tuple[str, str], int] = {}
    for word in _WORDS:
        parts = _bpe([*word[:-1], word[-1] + "</w>"], ranks)
        left = parts[0]
        for right in parts[1:]:
            ranks.setdefault((left, right), len(ranks))
            tokens.append(left + right)
            left += right
    tokens += [_CLIP_BOS, _CLIP_EOS]
    vocab: dict[str, int] = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    return vocab, list(ranks)


def _clip_backend() -> Any:
    """A CLIP-style byte-level BPE ``tokenizers.Tokenizer`` over :func:`_clip_vocab`, with the
    pipeline the transformers ``CLIPTokenizer`` builds itself (lowercasing, CLIP's word split,
    byte-level symbols, ``<|startoftext|> ... <|endoftext|>``)."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    vocab, merges = _clip_vocab()
    backend = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            fuse_unk=False,
            unk_token=_CLIP_EOS,
        )
    )
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.RobertaProcessing(
        (_CLIP_EOS, vocab[_CLIP_EOS]), (_CLIP_BOS, vocab[_CLIP_BOS]), False, False
    )
    return backend


def _clip_tokenizer() -> Any:
    """A ``CLIPTokenizerFast`` over :func:`_clip_backend`, 77 tokens like the real ones."""
    from transformers import CLIPTokenizerFast  # type: ignore[attr-defined]

    return CLIPTokenizerFast(
        tokenizer_object=_clip_backend(),
        bos_token=_CLIP_BOS,
        eos_token=_CLIP_EOS,
        unk_token=_CLIP_EOS,
        pad_token=_CLIP_EOS,
        model_max_length=77,
    )


# ---------------------------------------------------------------------------------------------
# Text encoders, VAEs, schedulers
# ---------------------------------------------------------------------------------------------


def _dim(model: torch.nn.Module, key: str) -> int:
    """Integer entry ``key`` of a diffusers model's config."""
    return int(cast(Any, model).config[key])


def _seeded(seed: int, make: Callable[[], Any]) -> Any:
    """``make()`` under ``torch.manual_seed(seed)``, restoring the caller's CPU RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def _t5_config(d_model: int, heads: int = 4) -> dict[str, Any]:
    """Tiny T5 v1.1 encoder kwargs (gated-GELU, as the T5-XXL/umT5-XXL of the real pipelines)."""
    return {
        "vocab_size": len(_t5_vocab()),
        "d_model": d_model,
        "d_kv": d_model // heads,
        "d_ff": 2 * d_model,
        "num_layers": 2,
        "num_heads": heads,
        "relative_attention_num_buckets": 8,
        "relative_attention_max_distance": 32,
        "dropout_rate": 0.0,
        "feed_forward_proj": "gated-gelu",
        "is_encoder_decoder": False,
        "use_cache": False,
    }


def _t5_encoder(d_model: int) -> Any:
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(**_t5_config(d_model)))


def _umt5_encoder(d_model: int) -> Any:
    from transformers import UMT5Config, UMT5EncoderModel

    return UMT5EncoderModel(UMT5Config(**_t5_config(d_model)))


def _clip_config(hidden: int, projection: int | None = None) -> Any:
    """Tiny CLIP text config: 2 layers (SD3 reads the penultimate hidden state), 77 positions,
    token ids of :func:`_clip_vocab` (pooling reads the first ``<|endoftext|>``)."""
    from transformers import CLIPTextConfig

    vocab, _ = _clip_vocab()
    return CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        projection_dim=projection if projection is not None else hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act="gelu",
        bos_token_id=vocab[_CLIP_BOS],
        eos_token_id=vocab[_CLIP_EOS],
        pad_token_id=vocab[_CLIP_EOS],
    )


def _autoencoder_kl(latent_channels: int, **extra: Any) -> Any:
    """Tiny ``AutoencoderKL``: two blocks, so ``vae_scale_factor`` is 2."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=32,
        **extra,
    )


# ---------------------------------------------------------------------------------------------
# Pipelines
# ---------------------------------------------------------------------------------------------


def _pixart_sigma(seed: int, dtype: torch.dtype, overrides: dict[str, Any]) -> dict[str, Any]:
    from diffusers import DPMSolverMultistepScheduler

    transformer = build_model("pixart-sigma", "tiny", dtype=dtype, seed=seed, **overrides)
    caption = _dim(transformer, "caption_channels")  # T5 hidden size
    return {
        "tokenizer": _t5_tokenizer(),
        "text_encoder": _seeded(seed + 1, lambda: _t5_encoder(caption)),
        "vae": _seeded(seed + 2, lambda: _autoencoder_kl(4, scaling_factor=0.13025)),
        "transformer": transformer,
        # PixArt-alpha/PixArt-Sigma-XL-2-1024-MS scheduler_config.json
        "scheduler": DPMSolverMultistepScheduler(
            num_train_timesteps=1000,
            beta_start=0.0001,
            beta_end=0.02,
            beta_schedule="linear",
            prediction_type="epsilon",
            algorithm_type="dpmsolver++",
            solver_order=2,
            solver_type="midpoint",
            lower_order_final=True,
            timestep_spacing="linspace",
        ),
    }


def _sd3(seed: int, dtype: torch.dtype, overrides: dict[str, Any]) -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextModelWithProjection

    transformer = build_model("sd3", "tiny", dtype=dtype, seed=seed, **overrides)
    joint = _dim(transformer, "joint_attention_dim")  # T5 hidden size
    pooled = _dim(transformer, "pooled_projection_dim")
    # Like CLIP-L (768) + CLIP-G (1280) < T5 (4096): the two CLIP hidden states, concatenated,
    # are narrower than T5's and zero-padded; their projections concatenate to the pooled dim.
    clip_l, clip_g = joint // 4, joint // 2
    return {
        "transformer": transformer,
        # stabilityai/stable-diffusion-3-medium-diffusers scheduler_config.json
        "scheduler": FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        "vae": _seeded(
            seed + 2,
            lambda: _autoencoder_kl(
                16,
                scaling_factor=1.5305,
                shift_factor=0.0609,
                use_quant_conv=False,
                use_post_quant_conv=False,
            ),
        ),
        "text_encoder": _seeded(
            seed + 1,
            lambda: CLIPTextModelWithProjection(_clip_config(clip_l, pooled // 2)),
        ),
        "tokenizer": _clip_tokenizer(),
        "text_encoder_2": _seeded(
            seed + 3,
            lambda: CLIPTextModelWithProjection(_clip_config(clip_g, pooled - pooled // 2)),
        ),
        "tokenizer_2": _clip_tokenizer(),
        "text_encoder_3": _seeded(seed + 4, lambda: _t5_encoder(joint)),
        "tokenizer_3": _t5_tokenizer(),
        "image_encoder": None,
        "feature_extractor": None,
    }


def _flux(seed: int, dtype: torch.dtype, overrides: dict[str, Any]) -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextModel

    transformer = build_model("flux-dev", "tiny", dtype=dtype, seed=seed, **overrides)
    joint = _dim(transformer, "joint_attention_dim")  # T5 hidden size
    pooled = _dim(transformer, "pooled_projection_dim")
    return {
        # black-forest-labs/FLUX.1-dev scheduler_config.json (resolution-dependent shift)
        "scheduler": FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        ),
        "vae": _seeded(
            seed + 2,
            lambda: _autoencoder_kl(
                16,
                scaling_factor=0.3611,
                shift_factor=0.1159,
                use_quant_conv=False,
                use_post_quant_conv=False,
            ),
        ),
        # Flux pools CLIP-L's pooler_output (no projection): its hidden size is the pooled dim.
        "text_encoder": _seeded(seed + 1, lambda: CLIPTextModel(_clip_config(pooled))),
        "tokenizer": _clip_tokenizer(),
        "text_encoder_2": _seeded(seed + 3, lambda: _t5_encoder(joint)),
        "tokenizer_2": _t5_tokenizer(),
        "transformer": transformer,
        "image_encoder": None,
        "feature_extractor": None,
    }


def _cogvideox(seed: int, dtype: torch.dtype, overrides: dict[str, Any]) -> dict[str, Any]:
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler

    transformer = build_model("cogvideox-2b", "tiny", dtype=dtype, seed=seed, **overrides)
    text_dim, latent = _dim(transformer, "text_embed_dim"), _dim(transformer, "in_channels")

    def vae() -> Any:
        # Three blocks: the first two halve H, W and T (temporal_compression_ratio 4 needs two
        # time-compressing blocks), so vae_scale_factor_spatial is 4.
        return AutoencoderKLCogVideoX(
            in_channels=3,
            out_channels=3,
            down_block_types=("CogVideoXDownBlock3D",) * 3,
            up_block_types=("CogVideoXUpBlock3D",) * 3,
            block_out_channels=(8, 8, 16),
            latent_channels=latent,
            layers_per_block=1,
            norm_num_groups=4,
            temporal_compression_ratio=4,
            sample_height=64,
            sample_width=64,
            scaling_factor=1.15258426,
        )

    return {
        "tokenizer": _t5_tokenizer(),
        "text_encoder": _seeded(seed + 1, lambda: _t5_encoder(text_dim)),
        "vae": _seeded(seed + 2, vae),
        "transformer": transformer,
        # THUDM/CogVideoX-2b scheduler_config.json
        "scheduler": CogVideoXDDIMScheduler(
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=True,
            steps_offset=0,
            prediction_type="v_prediction",
            rescale_betas_zero_snr=True,
            snr_shift_scale=3.0,
            timestep_spacing="trailing",
        ),
    }


def _wan(seed: int, dtype: torch.dtype, overrides: dict[str, Any]) -> dict[str, Any]:
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler

    transformer = build_model("wan2.1", "tiny", dtype=dtype, seed=seed, **overrides)
    text_dim, latent = _dim(transformer, "text_dim"), _dim(transformer, "in_channels")

    def vae() -> Any:
        # Three stages, both downsamplings also halve time: 4x spatial, 4x temporal.
        return AutoencoderKLWan(
            base_dim=8,
            z_dim=latent,
            dim_mult=[1, 1, 2],
            num_res_blocks=1,
            temperal_downsample=[True, True],
            scale_factor_spatial=4,
            scale_factor_temporal=4,
        )

    return {
        "tokenizer": _t5_tokenizer(),  # google/umt5-xxl's tokenizer is a T5TokenizerFast
        "text_encoder": _seeded(seed + 1, lambda: _umt5_encoder(text_dim)),
        "vae": _seeded(seed + 2, vae),
        # Wan-AI/Wan2.1-T2V-1.3B-Diffusers scheduler_config.json (480p flow shift)
        "scheduler": UniPCMultistepScheduler(
            num_train_timesteps=1000,
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=3.0,
            solver_order=2,
            solver_type="bh2",
            lower_order_final=True,
            final_sigmas_type="zero",
        ),
        "transformer": transformer,
    }


@dataclass(frozen=True, kw_only=True)
class PipelineInfo:
    """One tiny pipeline.

    ``cls_name`` is the diffusers pipeline class, ``zoo_name`` the zoo entry of its transformer,
    ``cfg`` how a call with ``guidance_scale > 1`` guides (``"batched"``: one transformer call
    on a cond+uncond batch of 2 per step; ``"two-calls"``: cond and uncond calls per step;
    ``"guidance-embedding"``: one call, the scale fed to the transformer), ``defaults`` the
    keyword arguments of a tiny call (see :func:`pipeline_defaults`).
    """

    name: str
    cls_name: str
    zoo_name: str
    cfg: str
    defaults: dict[str, Any]
    build: Callable[[int, torch.dtype, dict[str, Any]], dict[str, Any]] = field(repr=False)


_STEPS = {"num_inference_steps": 2}
_TEXT_LEN = 12  # the zoo's tiny text length; CogVideoX's transformer fixes it (max_text_seq_length)

_PIPELINES: dict[str, PipelineInfo] = {
    p.name: p
    for p in (
        PipelineInfo(
            name="pixart-sigma",
            cls_name="PixArtSigmaPipeline",
            zoo_name="pixart-sigma",
            cfg="batched",
            # Resolution binning only knows 256-2048 px transformers (sample_size 32-256);
            # caption cleaning needs beautifulsoup4 + ftfy (the pipeline falls back to False).
            defaults={
                "height": 32,
                "width": 32,
                **_STEPS,
                "guidance_scale": 4.5,
                "max_sequence_length": _TEXT_LEN,
                "use_resolution_binning": False,
                "clean_caption": False,
            },
            build=_pixart_sigma,
        ),
        PipelineInfo(
            name="sd3",
            cls_name="StableDiffusion3Pipeline",
            zoo_name="sd3",
            cfg="batched",
            defaults={
                "height": 32,
                "width": 32,
                **_STEPS,
                "guidance_scale": 7.0,
                "max_sequence_length": _TEXT_LEN,
            },
            build=_sd3,
        ),
        PipelineInfo(
            name="flux",
            cls_name="FluxPipeline",
            zoo_name="flux-dev",
            cfg="guidance-embedding",
            defaults={
                "height": 32,
                "width": 32,
                **_STEPS,
                "guidance_scale": 3.5,
                "max_sequence_length": _TEXT_LEN,
            },
            build=_flux,
        ),
        PipelineInfo(
            name="cogvideox",
            cls_name="CogVideoXPipeline",
            zoo_name="cogvideox-2b",
            cfg="batched",
            defaults={
                "height": 64,
                "width": 64,
                "num_frames": 13,
                **_STEPS,
                "guidance_scale": 6.0,
                "max_sequence_length": _TEXT_LEN,
            },
            build=_cogvideox,
        ),
        PipelineInfo(
            name="wan",
            cls_name="WanPipeline",
            zoo_name="wan2.1",
            cfg="two-calls",
            defaults={
                "height": 64,
                "width": 64,
                "num_frames": 13,
                **_STEPS,
                "guidance_scale": 5.0,
                "max_sequence_length": _TEXT_LEN,
            },
            build=_wan,
        ),
    )
}


def list_pipelines() -> list[str]:
    """Names of the tiny pipelines, in registry order."""
    return list(_PIPELINES)


def pipeline_info(name: str) -> PipelineInfo:
    """The :class:`PipelineInfo` called ``name``; ``ValueError`` listing the known names
    otherwise."""
    try:
        return _PIPELINES[name]
    except KeyError:
        raise ValueError(
            f"unknown pipeline {name!r}; known pipelines: {', '.join(list_pipelines())}"
        ) from None


def pipeline_defaults(name: str) -> dict[str, Any]:
    """Keyword arguments of a tiny call of pipeline ``name`` (a fresh dict).

    ``height``/``width`` (and ``num_frames`` for videos) give the zoo's tiny latent geometry,
    ``num_inference_steps=2``, a ``guidance_scale > 1`` (classifier-free guidance active;
    Flux-dev's guidance embedding), ``max_sequence_length=12`` and, for PixArt-Sigma,
    ``use_resolution_binning=False, clean_caption=False``. Add ``prompt``, ``generator`` and
    ``output_type``. The pipelines' own defaults do not all fit the tiny models: PixArt's
    resolution binning rejects them, CogVideoX's transformer needs exactly 12 text tokens (the
    pipeline default is 226) and Wan defaults to 81 frames of 480x832.
    """
    return dict(pipeline_info(name).defaults)


def build_pipeline(
    name: str,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    transformer: dict[str, Any] | None = None,
) -> DiffusionPipeline:
    """Tiny diffusers pipeline ``name`` (see :func:`list_pipelines`) with random weights.

    Every module is initialised under its own seed derived from ``seed`` (the caller's RNG
    state is kept), so two calls give identical weights; modules are in eval mode and cast to
    ``dtype`` except their ``_keep_in_fp32_modules`` (e.g. T5's ``wo``), as ``from_pretrained``
    keeps them. ``transformer``: overrides of the transformer's tiny config (e.g. a wider,
    deeper transformer for benchmarks; keep its text and latent dims). Returns the
    ``diffusers.DiffusionPipeline`` subclass of :attr:`PipelineInfo.cls_name`.
    """
    info = pipeline_info(name)
    import diffusers

    components = info.build(seed, dtype, dict(transformer or {}))
    for key, component in components.items():
        if isinstance(component, torch.nn.Module):
            component.eval()
            if key != "transformer":  # build_model cast it already
                _cast(component, dtype)
    cls = getattr(diffusers, info.cls_name)
    return cast("DiffusionPipeline", cls(**components))
