"""Tests of the model zoo: tiny builds, example inputs, determinism and torch.export capture."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch

from xdit_compile.compiler.capture import capture
from xdit_compile.models import (
    build_model,
    example_inputs,
    get_entry,
    list_models,
    token_frames,
    token_rows,
)

#: Cross-attention DiTs (zoo.py), then the joint-attention DiTs (zoo_joint.py).
CROSS_NAMES = ["dit-xl-2", "pixart-alpha", "pixart-sigma", "sana", "hunyuan-dit", "latte"]
JOINT_NAMES = [
    "sd3",
    "sd3.5",
    "flux-dev",
    "flux-schnell",
    "cogvideox-2b",
    "cogvideox-5b",
    "mochi",
    "hunyuan-video",
    "wan2.1",
    "qwen-image",
]
NAMES = CROSS_NAMES + JOINT_NAMES

#: Output channels of the tiny configs (learned-sigma models output 2x the latent channels;
#: packed-latent models output 4x, one per pixel of a 2x2 patch).
TINY_OUT_CHANNELS = {
    "dit-xl-2": 8,
    "pixart-alpha": 8,
    "pixart-sigma": 8,
    "sana": 8,
    "hunyuan-dit": 8,
    "latte": 8,
    "sd3": 16,
    "sd3.5": 16,
    "flux-dev": 64,
    "flux-schnell": 64,
    "cogvideox-2b": 16,
    "cogvideox-5b": 16,
    "mochi": 12,
    "hunyuan-video": 16,
    "wan2.1": 16,
    "qwen-image": 64,
}

#: Published full-size video inputs: (latent frames, token rows, token columns).
FULL_VIDEO_GRID = {
    "cogvideox-2b": (13, 30, 45),  # 49 x 480 x 720
    "cogvideox-5b": (13, 30, 45),
    "mochi": (28, 30, 53),  # 163 x 480 x 848
    "hunyuan-video": (16, 34, 60),  # 61 x 544 x 960
    "wan2.1": (21, 30, 52),  # 81 x 480 x 832
}

#: Models whose capture needs the strict (TorchDynamo) fallback of xdit_compile.compiler.capture.
STRICT_CAPTURE: set[str] = set()

#: Text mask kwarg of the models whose example inputs carry a padded text mask.
TEXT_MASKS = {
    "pixart-alpha": "encoder_attention_mask",
    "pixart-sigma": "encoder_attention_mask",
    "sana": "encoder_attention_mask",
    "mochi": "encoder_attention_mask",
    "hunyuan-video": "encoder_attention_mask",
    "qwen-image": "encoder_hidden_states_mask",
}


def _forward(model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    assert isinstance(out, tuple)
    return out[0]


def _expected_shape(name: str, inputs: dict[str, Any], out_channels: int) -> tuple[int, ...]:
    shape = list(inputs["hidden_states"].shape)
    shape[get_entry(name).layout.index("C")] = out_channels
    return tuple(shape)


def _grid(name: str, model: torch.nn.Module, inputs: dict[str, Any]) -> tuple[int | None, int]:
    """(frames or None, token rows) of ``inputs`` as the model patches them."""
    entry, hs = get_entry(name), inputs["hidden_states"]
    if entry.layout == "BSC":  # packed: the grid is in the position ids / img_shapes
        if "img_ids" in inputs:
            rows = int(inputs["img_ids"][:, 1].max()) + 1
            cols = int(inputs["img_ids"][:, 2].max()) + 1
        else:
            _, rows, cols = inputs["img_shapes"][0][0]
        assert hs.shape[1] == rows * cols
        return None, rows
    patch = model.config.patch_size
    p_t, p = (patch[0], patch[1]) if isinstance(patch, (tuple, list)) else (1, patch)
    frames = hs.shape[entry.layout.index("F")] // p_t if entry.video else None
    return frames, hs.shape[-2] // p


def _assert_same(a: Any, b: Any) -> None:
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (tuple, list)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    else:
        assert a == b


def test_list_models() -> None:
    assert list_models() == NAMES
    for name in NAMES:
        entry = get_entry(name)
        assert entry.name == name
        assert entry.description
        assert entry.tiny["num_layers"] <= 4
        assert entry.tiny.get("num_single_layers", 1) <= 2


def test_unknown_name_raises_keyerror_listing_known_names() -> None:
    for call in (
        lambda: get_entry("no-such-model"),
        lambda: build_model("no-such-model"),
        lambda: example_inputs("no-such-model", torch.nn.Linear(1, 1)),
    ):
        with pytest.raises(KeyError) as info:
            call()
        message = str(info.value)
        assert "no-such-model" in message
        for name in NAMES:
            assert name in message


@pytest.mark.parametrize("name", NAMES)
def test_tiny_config_constraints(name: str) -> None:
    cfg = get_entry(name).tiny
    assert cfg["num_attention_heads"] % 4 == 0
    assert token_rows(name) % 4 == 0
    rows = token_rows(name, uneven=True)
    assert rows >= 4 and rows % 2 != 0
    if get_entry(name).video:
        frames = token_frames(name)
        assert frames >= 4 and frames % 4 == 0
        assert token_frames(name, uneven=True) % 2 != 0
    else:
        with pytest.raises(ValueError, match="frames"):
            token_frames(name)


@pytest.mark.parametrize("uneven", [False, True], ids=["default", "uneven"])
@pytest.mark.parametrize("name", NAMES)
def test_tiny_forward(name: str, uneven: bool) -> None:
    model = build_model(name, uneven=uneven)
    assert not model.training
    inputs = example_inputs(name, model, uneven=uneven)
    assert inputs["return_dict"] is False
    frames, rows = _grid(name, model, inputs)
    assert rows == token_rows(name, uneven=uneven)
    if get_entry(name).video:
        assert frames == token_frames(name, uneven=uneven)
    out = _forward(model, inputs)
    assert out.shape == _expected_shape(name, inputs, TINY_OUT_CHANNELS[name])
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_parameters(name: str) -> None:
    a = build_model(name, seed=3)
    b = build_model(name, seed=3)
    c = build_model(name, seed=4)
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    assert pa.keys() == pb.keys() == pc.keys()
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert not all(torch.equal(pa[k], pc[k]) for k in pa)


def test_build_restores_global_rng() -> None:
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    build_model("pixart-sigma", seed=7)
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize("name", NAMES)
def test_inputs_deterministic(name: str) -> None:
    model = build_model(name)
    _assert_same(example_inputs(name, model, seed=5), example_inputs(name, model, seed=5))
    a = example_inputs(name, model, seed=5)["hidden_states"]
    b = example_inputs(name, model, seed=6)["hidden_states"]
    assert not torch.equal(a, b)


@pytest.mark.parametrize("name", list(TEXT_MASKS))
def test_text_mask_has_padding(name: str) -> None:
    model = build_model(name)
    mask = example_inputs(name, model, batch=3)[TEXT_MASKS[name]]
    assert mask.shape == (3, 12)
    assert bool((mask == 0).any(dim=1).all()) and bool((mask[:, 0] == 1).all())


def test_joint_inputs_follow_pipelines() -> None:
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    dev = example_inputs("flux-dev", build_model("flux-dev"), batch=2)
    assert dev["hidden_states"].shape == (2, 64, 64)  # 16x16 latent -> 8x8 tokens of 4x16
    ids = FluxPipeline._prepare_latent_image_ids(2, 8, 8, "cpu", torch.float32)
    assert torch.equal(dev["img_ids"], ids)
    assert dev["txt_ids"].shape == (12, 3) and not dev["txt_ids"].any()
    assert dev["guidance"].tolist() == [3.5, 3.5] and bool((dev["timestep"] < 1).all())
    assert "guidance" not in example_inputs("flux-schnell", build_model("flux-schnell"))
    uneven = example_inputs("flux-dev", build_model("flux-dev"), uneven=True)
    assert uneven["hidden_states"].shape[1] == 35 and uneven["img_ids"][-1].tolist() == [0, 4, 6]

    qwen = example_inputs("qwen-image", build_model("qwen-image"), batch=2, uneven=True)
    assert qwen["img_shapes"] == [[(1, 5, 7)], [(1, 5, 7)]]
    assert qwen["hidden_states"].shape == (2, 35, 64) and "txt_seq_lens" not in qwen
    pad = qwen["encoder_hidden_states_mask"] == 0
    assert not qwen["encoder_hidden_states"][pad].any()

    wan = example_inputs("wan2.1", build_model("wan2.1"))
    assert wan["timestep"].dtype == torch.int64
    assert not wan["encoder_hidden_states"][0, -1].any()  # zero-padded past the prompt

    cog5 = build_model("cogvideox-5b")
    cos, sin = example_inputs("cogvideox-5b", cog5)["image_rotary_emb"]
    assert cos.shape == sin.shape == (4 * 8 * 8, cog5.config.attention_head_dim)
    assert "image_rotary_emb" not in example_inputs("cogvideox-2b", build_model("cogvideox-2b"))
    hv = example_inputs("hunyuan-video", build_model("hunyuan-video"))
    assert hv["guidance"].tolist() == [6000.0] and hv["timestep"].dtype == torch.float32


@pytest.mark.parametrize("name", NAMES)
def test_num_layers_override_and_batch(name: str) -> None:
    model = build_model(name, num_layers=2)
    assert model.config.num_layers == 2
    inputs = example_inputs(name, model, batch=2)
    out = _forward(model, inputs)
    assert out.shape == _expected_shape(name, inputs, TINY_OUT_CHANNELS[name])
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16(name: str) -> None:
    model = build_model(name, dtype=torch.bfloat16)
    keep = list(getattr(model, "_keep_in_fp32_modules", None) or [])  # Wan: norms, time embedder
    for p_name, p in model.named_parameters():
        fp32 = any(k in p_name.split(".") for k in keep)
        assert p.dtype == (torch.float32 if fp32 else torch.bfloat16), p_name
    inputs = example_inputs(name, model)
    assert inputs["hidden_states"].dtype == torch.bfloat16
    out = _forward(model, inputs)
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out.float()).all()


def test_invalid_requests() -> None:
    with pytest.raises(ValueError, match="even num_layers"):
        build_model("hunyuan-dit", num_layers=3)
    with pytest.raises(ValueError, match="size"):
        build_model("dit-xl-2", "huge")
    dit = build_model("dit-xl-2")
    with pytest.raises(ValueError, match="square"):
        example_inputs("dit-xl-2", dit, height=16, width=10)
    with pytest.raises(ValueError, match="frames"):
        example_inputs("dit-xl-2", dit, frames=4)
    latte = build_model("latte")
    with pytest.raises(ValueError, match="video_length"):
        example_inputs("latte", latte, frames=3)
    with pytest.raises(ValueError, match="axes_dims_rope"):
        build_model("flux-dev", attention_head_dim=16)
    with pytest.raises(ValueError, match="patch_size 2"):
        example_inputs("qwen-image", build_model("qwen-image"), height=9)
    with pytest.raises(ValueError, match="max_text_seq_length"):
        example_inputs("cogvideox-2b", build_model("cogvideox-2b"), text_len=5)


# Joint-attention models capture their uneven input only (the odd token grid, and for
# CogVideoX-2b the uneven config), to keep this file near a minute: each capture takes 1-3 s.
# Their default inputs capture the same way (checked when the entries were added).
_EXPORT_CASES = [
    *(
        pytest.param(n, u, id=f"{n}-{'uneven' if u else 'default'}")
        for n in CROSS_NAMES
        for u in (False, True)
    ),
    *(pytest.param(n, True, id=f"{n}-uneven") for n in JOINT_NAMES),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,uneven", _EXPORT_CASES)
def test_tiny_export(name: str, uneven: bool, caplog: pytest.LogCaptureFixture) -> None:
    """``xdit_compile.compiler.capture`` (non-strict export, strict fallback) gives an exact
    graph."""
    model = build_model(name, uneven=uneven)
    inputs = example_inputs(name, model, uneven=uneven)
    with caplog.at_level(logging.INFO, logger="xdit_compile.compiler.capture"):
        gm = capture(model, (), inputs)
    assert ("with strict export" in caplog.text) == (name in STRICT_CAPTURE)
    ref = _forward(model, inputs)
    out = _forward(gm, inputs)
    torch.testing.assert_close(out, ref)


@pytest.mark.slow
@pytest.mark.parametrize("name", [*CROSS_NAMES, "mochi"])
def test_full_config_small_input(name: str) -> None:
    """Full-size configs (2 layers; Mochi 1) accept their full-size text/channel inputs.

    The other joint-attention models run their full configs at full resolution on the meta
    device instead (test_full_default_inputs_on_meta); MochiRoPE cannot (it autocasts).
    """
    model = build_model(name, "full", num_layers=1 if name == "mochi" else 2)
    entry = get_entry(name)
    if not entry.video:
        full_rows = token_rows(name, "full")
        assert full_rows % 4 == 0 and token_rows(name, "full", uneven=True) % 2 == 1
    small = 16 if model.config.patch_size == 2 else 8
    frames = 2 if name == "mochi" else None
    inputs = example_inputs(name, model, size="full", height=small, width=small, frames=frames)
    if "encoder_hidden_states" in inputs and entry.latent_size("full").text_len is not None:
        assert inputs["encoder_hidden_states"].shape[1] == entry.latent_size("full").text_len
    out = _forward(model, inputs)
    cfg = model.config
    if name == "hunyuan-dit":
        out_channels = cfg.in_channels * 2
    else:
        out_channels = cfg.out_channels or cfg.in_channels
    assert out.shape == _expected_shape(name, inputs, out_channels)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", JOINT_NAMES)
def test_full_default_inputs_on_meta(name: str) -> None:
    """The published configs (all layers, on the meta device) take their full default inputs."""
    import diffusers

    entry = get_entry(name)
    with torch.device("meta"):
        model = getattr(diffusers, entry.cls_name)(**entry.config("full")).eval()
    geo = entry.latent_size("full")
    for uneven in (False, True):
        inputs = example_inputs(name, model, size="full", uneven=uneven)
        if entry.layout == "BSC":  # meta img_ids have no values: check the packed length
            h, w = (geo.uneven_height, geo.uneven_width) if uneven else (geo.height, geo.width)
            assert inputs["hidden_states"].shape[1] == (h // 2) * (w // 2)
            frames, rows = None, h // 2
        else:
            frames, rows = _grid(name, model, inputs)
        assert rows == token_rows(name, "full", uneven=uneven)
        if entry.video:
            assert frames == token_frames(name, "full", uneven=uneven)
            if uneven:
                assert frames % 2 == 1 and rows % 2 == 1
            else:
                cols = inputs["hidden_states"].shape[-1] // 2
                assert (frames, rows, cols) == FULL_VIDEO_GRID[name]
        else:
            assert rows == (63 if uneven else 64)  # 1024 px
        text = inputs["encoder_hidden_states"].shape[1]
        assert text == entry.latent_size("full").text_len
        if not uneven and name != "mochi":  # MochiRoPE autocasts: no meta device there
            out = _forward(model, inputs)
            assert out.shape == inputs["hidden_states"].shape
