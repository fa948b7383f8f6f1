"""Tests of the model zoo: tiny builds, example inputs, determinism and torch.export capture."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from xdit_compile.models import (
    build_model,
    example_inputs,
    get_entry,
    list_models,
    token_rows,
)

NAMES = ["dit-xl-2", "pixart-alpha", "pixart-sigma", "sana", "hunyuan-dit", "latte"]

#: Output channels of the tiny configs (learned-sigma models output 2x the latent channels).
TINY_OUT_CHANNELS = {
    "dit-xl-2": 8,
    "pixart-alpha": 8,
    "pixart-sigma": 8,
    "sana": 8,
    "hunyuan-dit": 8,
    "latte": 8,
}


def _forward(model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    assert isinstance(out, tuple)
    return out[0]


def _expected_shape(inputs: dict[str, Any], out_channels: int) -> tuple[int, ...]:
    hs = inputs["hidden_states"]
    return (hs.shape[0], out_channels, *hs.shape[2:])


def _assert_same(a: Any, b: Any) -> None:
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, tuple):
        assert isinstance(b, tuple) and len(a) == len(b)
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


@pytest.mark.parametrize("uneven", [False, True], ids=["default", "uneven"])
@pytest.mark.parametrize("name", NAMES)
def test_tiny_forward(name: str, uneven: bool) -> None:
    model = build_model(name)
    assert not model.training
    inputs = example_inputs(name, model, uneven=uneven)
    assert inputs["return_dict"] is False
    patch = model.config.patch_size
    rows = inputs["hidden_states"].shape[-2] // patch
    assert rows == token_rows(name, uneven=uneven)
    out = _forward(model, inputs)
    assert out.shape == _expected_shape(inputs, TINY_OUT_CHANNELS[name])
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


@pytest.mark.parametrize("name", ["pixart-alpha", "pixart-sigma", "sana"])
def test_text_mask_has_padding(name: str) -> None:
    model = build_model(name)
    mask = example_inputs(name, model, batch=3)["encoder_attention_mask"]
    assert mask.shape == (3, 12)
    assert bool((mask == 0).any(dim=1).all()) and bool((mask[:, 0] == 1).all())


@pytest.mark.parametrize("name", NAMES)
def test_num_layers_override_and_batch(name: str) -> None:
    model = build_model(name, num_layers=2)
    assert model.config.num_layers == 2
    inputs = example_inputs(name, model, batch=2)
    out = _forward(model, inputs)
    assert out.shape == _expected_shape(inputs, TINY_OUT_CHANNELS[name])
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16(name: str) -> None:
    model = build_model(name, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
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


@pytest.mark.slow
@pytest.mark.parametrize("uneven", [False, True], ids=["default", "uneven"])
@pytest.mark.parametrize("name", NAMES)
def test_tiny_export(name: str, uneven: bool) -> None:
    model = build_model(name)
    inputs = example_inputs(name, model, uneven=uneven)
    exported = torch.export.export(model, (), inputs, strict=False)
    ref = _forward(model, inputs)
    out = _forward(exported.module(), inputs)
    torch.testing.assert_close(out, ref)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_full_config_small_input(name: str) -> None:
    """Full-size configs (2 layers) accept their full-size text/channel inputs."""
    model = build_model(name, "full", num_layers=2)
    entry = get_entry(name)
    full_rows = token_rows(name, "full")
    assert full_rows % 4 == 0 and token_rows(name, "full", uneven=True) % 2 == 1
    small = 16 if model.config.patch_size == 2 else 8
    inputs = example_inputs(name, model, size="full", height=small, width=small)
    if "encoder_hidden_states" in inputs and entry.latent_size("full").text_len is not None:
        assert inputs["encoder_hidden_states"].shape[1] == entry.latent_size("full").text_len
    out = _forward(model, inputs)
    cfg = model.config
    out_channels = cfg.in_channels * 2 if name == "hunyuan-dit" else cfg.out_channels
    assert out.shape == _expected_shape(inputs, out_channels)
    assert torch.isfinite(out).all()
