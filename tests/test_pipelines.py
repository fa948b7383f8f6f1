"""Tests of the offline tiny diffusers pipelines (``models/pipelines.py``): deterministic builds,
2-step calls, classifier-free guidance call patterns and save_pretrained/from_pretrained."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest
import torch

from xdit_compile.models import get_entry, list_models
from xdit_compile.models.pipelines import (
    build_pipeline,
    list_pipelines,
    pipeline_defaults,
    pipeline_info,
)

NAMES = ["pixart-sigma", "sd3", "flux", "cogvideox", "wan"]
VIDEO = {"cogvideox", "wan"}

#: Output of a default call with ``output_type="np"``: [B, H, W, 3] images, [B, F, H, W, 3]
#: videos. CogVideoX's VAE decodes its 4 latent frames (an even count; the published 49 frames
#: give 13) to 16 frames, as the real VAE would; Wan's decodes 4 latent frames to 13.
OUT_SHAPE = {
    "pixart-sigma": (1, 32, 32, 3),
    "sd3": (1, 32, 32, 3),
    "flux": (1, 32, 32, 3),
    "cogvideox": (1, 16, 64, 64, 3),
    "wan": (1, 13, 64, 64, 3),
}

#: Transformer calls of a 2-step call, as input batch sizes (guidance_scale > 1).
CFG_CALLS = {
    "pixart-sigma": [2, 2],  # cond + uncond in one batch
    "sd3": [2, 2],
    "cogvideox": [2, 2],
    "wan": [1, 1, 1, 1],  # cond, then uncond, every step
    "flux": [1, 1],  # guidance embedding: no CFG batch
}

# DPMSolverMultistepScheduler.set_timesteps (PixArt) under numpy 2.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

PROMPT = "A photo of an astronaut riding a zebra on the Moon, 4K; très détaillé"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The tiny models are far faster on one thread (and the CI machine's cores are shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _call(pipe: Any, name: str, **overrides: Any) -> np.ndarray:
    """A default tiny call of ``pipe`` (seeded), its images/frames as a numpy array."""
    pipe.set_progress_bar_config(disable=True)
    kwargs: dict[str, Any] = {
        "prompt": PROMPT,
        **pipeline_defaults(name),
        "generator": torch.Generator().manual_seed(0),
        "output_type": "np",
        **overrides,
    }
    out = pipe(**kwargs)
    return np.asarray(out.frames if name in VIDEO else out.images)


def _modules(pipe: Any) -> dict[str, torch.nn.Module]:
    return {k: v for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}


def _assert_same_weights(a: Any, b: Any) -> None:
    ma, mb = _modules(a), _modules(b)
    assert ma.keys() == mb.keys()
    for key in ma:
        sa, sb = ma[key].state_dict(), mb[key].state_dict()
        assert sa.keys() == sb.keys(), key
        for t_name in sa:
            assert sa[t_name].dtype == sb[t_name].dtype, (key, t_name)
            assert torch.equal(sa[t_name], sb[t_name]), (key, t_name)


def _public(config: Any) -> dict[str, Any]:
    """A diffusers config without its private entries (``_use_default_values`` etc.)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def test_registry():
    assert list_pipelines() == NAMES
    for name in NAMES:
        info = pipeline_info(name)
        assert info.zoo_name in list_models()
        assert info.cfg in ("batched", "two-calls", "guidance-embedding")
        defaults = pipeline_defaults(name)
        assert defaults["num_inference_steps"] == 2
        assert defaults["guidance_scale"] > 1
        assert defaults["max_sequence_length"] <= 16
        assert ("num_frames" in defaults) == (name in VIDEO)
        defaults["height"] = 0  # a fresh dict every time
        assert pipeline_defaults(name)["height"] > 0


@pytest.mark.parametrize("fn", [build_pipeline, pipeline_defaults, pipeline_info])
def test_unknown_name(fn):
    with pytest.raises(ValueError, match="unknown pipeline 'sdxl'") as err:
        fn("sdxl")
    for name in NAMES:
        assert name in str(err.value)


@pytest.mark.parametrize("name", NAMES)
def test_build_is_deterministic(name):
    rng = torch.get_rng_state()
    a, b = build_pipeline(name), build_pipeline(name)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG is untouched
    info = pipeline_info(name)
    assert type(a).__name__ == info.cls_name
    _assert_same_weights(a, b)
    assert not any(m.training for m in _modules(a).values())
    # The transformer is the zoo's tiny model of the same seed.
    zoo_config = get_entry(info.zoo_name).config("tiny")
    config = dict(a.transformer.config)
    for key, value in zoo_config.items():
        seq = (list, tuple)
        got = list(config[key]) if isinstance(config[key], seq) else config[key]
        assert got == (list(value) if isinstance(value, seq) else value), key
    _assert_same_weights(build_pipeline(name, seed=1), build_pipeline(name, seed=1))
    assert not torch.equal(
        next(iter(build_pipeline(name, seed=1).text_encoder.parameters())),
        next(iter(a.text_encoder.parameters())),
    )


@pytest.mark.parametrize("name", NAMES)
def test_call(name):
    pipe = build_pipeline(name)
    out = _call(pipe, name)
    assert out.shape == OUT_SHAPE[name]
    assert out.dtype == np.float32
    assert np.isfinite(out).all()
    assert out.std() > 0
    np.testing.assert_array_equal(_call(pipe, name), out)
    np.testing.assert_array_equal(_call(build_pipeline(name), name), out)


@pytest.mark.parametrize("name", NAMES)
def test_cfg_call_pattern(name):
    """PixArt, SD3 and CogVideoX batch cond + uncond into one transformer call per step, Wan calls
    the transformer twice per step, Flux-dev feeds the scale to its guidance embedding."""
    pipe = build_pipeline(name)
    batches: list[int] = []

    def record(module, args, kwargs):  # PixArt passes the latents positionally
        batches.append((args[0] if args else kwargs["hidden_states"]).shape[0])

    pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    _call(pipe, name, output_type="latent")
    assert batches == CFG_CALLS[name]
    batches.clear()
    _call(pipe, name, output_type="latent", guidance_scale=1.0)
    assert batches == [1, 1]  # no CFG
    if name == "flux":  # FluxPipeline's "true CFG": a negative prompt and true_cfg_scale > 1
        batches.clear()
        _call(pipe, name, output_type="latent", negative_prompt="blurry", true_cfg_scale=2.0)
        assert batches == [1, 1, 1, 1]


def test_tokenizers():
    """Any English prompt tokenizes: listed words are one token, other words are spelled in
    characters, characters outside the vocabulary map to the unknown token."""
    pipe = build_pipeline("flux")
    clip, t5 = pipe.tokenizer, pipe.tokenizer_2
    assert clip.convert_ids_to_tokens(clip("An astronaut, riding").input_ids) == [
        "<|startoftext|>",
        "an</w>",
        "astronaut</w>",
        ",</w>",
        "riding</w>",
        "<|endoftext|>",
    ]
    assert t5.convert_ids_to_tokens(t5("a zebra").input_ids) == [
        "\u2581a",
        "\u2581",
        "z",
        "e",
        "b",
        "r",
        "a",
        "</s>",
    ]
    assert t5("\u2603").input_ids == [t5.convert_tokens_to_ids("\u2581"), t5.unk_token_id, 1]
    assert (t5.pad_token_id, t5.eos_token_id, t5.unk_token_id) == (0, 1, 2)
    assert pipe.text_encoder.config.eos_token_id == clip.eos_token_id
    for tok, encoder in ((clip, pipe.text_encoder), (t5, pipe.text_encoder_2)):
        ids = tok(PROMPT, padding="max_length", max_length=12, truncation=True).input_ids
        assert len(ids) == 12
        assert len(tok) == encoder.config.vocab_size


@pytest.mark.parametrize("name", NAMES)
def test_save_and_load(name, tmp_path):
    from diffusers import DiffusionPipeline

    pipe = build_pipeline(name)
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(loaded) is type(pipe)
    assert pipe.components.keys() == loaded.components.keys()
    _assert_same_weights(pipe, loaded)
    assert _public(loaded.scheduler.config) == _public(pipe.scheduler.config)
    for key, tok in pipe.components.items():
        if key.startswith("tokenizer"):
            assert loaded.components[key](PROMPT).input_ids == tok(PROMPT).input_ids, key
            assert loaded.components[key].model_max_length == tok.model_max_length, key

    expected = _call(pipe, name)
    # The loaded weights are views of the (mmap'd) safetensors files: their memory alignment
    # can change the CPU matmul kernel and so the last bit of a few results.
    np.testing.assert_allclose(_call(loaded, name), expected, rtol=0, atol=1e-5)
    for module in _modules(loaded).values():
        for tensor in (*module.parameters(), *module.buffers()):
            tensor.data = tensor.data.clone()
    np.testing.assert_array_equal(_call(loaded, name), expected)


def test_dtype():
    """Every module is cast, except the parts diffusers/transformers keep in float32."""
    pipe = build_pipeline("wan", dtype=torch.bfloat16)
    for key, module in _modules(pipe).items():
        keep = getattr(module, "_keep_in_fp32_modules", None) or []
        for p_name, param in module.named_parameters():
            kept = any(k in p_name.split(".") for k in keep)
            assert param.dtype == (torch.float32 if kept else torch.bfloat16), (key, p_name)


def test_pixart_needs_no_resolution_binning_default():
    """The tiny PixArt transformer (sample_size 16) is outside PixArt's resolution-binning
    tables: the defaults turn binning off."""
    pipe = build_pipeline("pixart-sigma")
    with pytest.raises(ValueError, match=re.escape("Invalid sample size")):
        _call(pipe, "pixart-sigma", use_resolution_binning=True, output_type="latent")
