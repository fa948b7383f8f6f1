"""Classes of DiT the compiler once ran whole (exact, not parallel) or could not run, each as a
small model of the class, against the serial model on gloo.

- 1-D sequence latents ``[B, C, L]`` (audio DiTs): the token dim is ``L``, not the channels;
- several latents side by side ``[B, N, C, F, H, W]`` (image-edit DiTs) whose token-grid dims have
  fewer rows than ranks: another dim is tried, the one that parallelizes the most wins;
- a slice into the cut rows (``x[:, :, 1:] += pose``, character animation): an uneven cut;
- ``pad_sequence`` of one-length items (Z-Image): a stack;
- ``flex_attention`` with a block mask (frame-autoregressive video): cut over the heads, whole
  sequences per rank, so the mask sees global positions;
- sizes from ``.item()`` of an input (packed-frames video): specialized, the output too;
- parameters from ``torch.empty`` holding NaN bits, broadcast: not "different on every rank".

Each asserts exact (1e-5 relative, fp32: other summation orders), no sharding break, and a rank's
share of the forward's FLOPs of at most 0.85 (really parallel, as ``benchmarks/unseen.py`` counts).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from xdit_compile import Plan

EXACT, PARALLEL = 1e-5, 0.85


def _attend(x: torch.Tensor, qkv: nn.Linear, heads: int = 2) -> torch.Tensor:
    q, k, v = (z.unflatten(-1, (heads, -1)).transpose(1, 2) for z in qkv(x).chunk(3, -1))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


class Audio1D(nn.Module):
    """``hidden_states [B, C, L]``: a 1-D conv in, attention over ``L``, a 1-D conv out. Its
    config states no channel count (``[B, C, L]`` or packed ``[B, S, C]``: propagation decides)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_in, self.qkv, self.conv_out = (
            nn.Conv1d(8, 16, 1),
            nn.Linear(16, 48),
            nn.Conv1d(16, 8, 1),
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(hidden_states).transpose(1, 2)
        x = x + _attend(x, self.qkv)
        return self.conv_out(x.transpose(1, 2))


class SideBySide(nn.Module):
    """``hidden_states [B, N, C, F, H, W]``: N latents, each of 1 x 2 x 2 pixels (one 2x2
    patch), patchified and attended as one sequence of N tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.qkv, self.out = nn.Linear(16, 16), nn.Linear(16, 48), nn.Linear(16, 16)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        b, n, c, f, h, w = hidden_states.shape
        x = self.proj(hidden_states.reshape(b, n, c * f * h * w))
        x = x + _attend(x, self.qkv)
        return self.out(x).reshape(b, n, c, f, h, w)


class PoseAfterFirstFrame(nn.Module):
    """``hidden_states [B, C, F, H, W]`` with a pose latent added to every frame but the first
    (``x[:, :, 1:] = x[:, :, 1:] + pose``), then attention over all tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(4, 12), nn.Linear(4, 4)

    def forward(
        self, hidden_states: torch.Tensor, pose_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        x = hidden_states.clone()
        x[:, :, 1:] = x[:, :, 1:] + pose_hidden_states
        b, c, f, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        t = t + _attend(t, self.qkv, heads=1)
        return self.out(t).transpose(1, 2).reshape(b, c, f, h, w)


class PaddedBatch(nn.Module):
    """Z-Image's sequence preparation: per-sample token lists padded into a batch."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(8, 24), nn.Linear(8, 8)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        items = list(hidden_states.unbind(0))  # [S, C] per sample
        x = torch.nn.utils.rnn.pad_sequence(items, batch_first=True, padding_value=0.0)
        return self.out(x + _attend(x, self.qkv))


class ItemSizedText(nn.Module):
    """Text rows kept up to a length read from an input (``enc[:, :lengths[0].item()]``), joined
    to the image rows for attention; the output keeps the image rows."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(8, 24), nn.Linear(8, 8)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        lengths: torch.Tensor,
    ) -> torch.Tensor:
        text = encoder_hidden_states[:, : lengths[0].item()]
        x = torch.cat([text, hidden_states], 1)
        x = x + _attend(x, self.qkv)
        return self.out(x[:, text.shape[1] :])


class FrameCausalFlex(nn.Module):
    """Frame-autoregressive video attention through ``flex_attention``: a block mask built in
    the forward from each token's frame index (a buffer its mask function reads), every token
    attending to its own and earlier frames."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(32, 96), nn.Linear(32, 32)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        b, n, _ = hidden_states.shape
        frame = torch.arange(n, device=hidden_states.device) // 4

        def mask(b_, h_, q_idx, kv_idx):  # noqa: ANN001, ANN202
            return frame[q_idx] >= frame[kv_idx]

        block = create_block_mask(
            mask, None, None, n, n, device=hidden_states.device, _compile=False
        )
        q, k, v = (
            z.unflatten(-1, (2, 16)).transpose(1, 2) for z in self.qkv(hidden_states).chunk(3, -1)
        )
        o = flex_attention(q, k, v, block_mask=block)
        return self.out(hidden_states + o.transpose(1, 2).flatten(2))


class EmptyParameter(nn.Module):
    """A parameter made with ``torch.empty`` (uninitialized bits, NaN here), used where the
    output does not depend on it."""

    def __init__(self) -> None:
        super().__init__()
        self.pad_token = nn.Parameter(torch.full((8,), float("nan")))
        self.qkv, self.out = nn.Linear(8, 24), nn.Linear(8, 8)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = torch.where(hidden_states.abs() > 1e9, self.pad_token, hidden_states)
        return self.out(x + _attend(x, self.qkv))


def _inputs(name: str) -> tuple[nn.Module, dict[str, Any]]:
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    if name == "audio_1d":
        return Audio1D(), {"hidden_states": torch.randn(1, 8, 13, generator=g)}
    if name == "side_by_side":
        return SideBySide(), {"hidden_states": torch.randn(1, 4, 4, 1, 2, 2, generator=g)}
    if name == "pose_after_first_frame":
        # one pixel per frame: the frames are the dim to cut (5 frames: 3 + 2, then 2 + 2 after the
        # first)
        return PoseAfterFirstFrame(), {
            "hidden_states": torch.randn(1, 4, 5, 1, 1, generator=g),
            "pose_hidden_states": torch.randn(1, 4, 4, 1, 1, generator=g),
        }
    if name == "padded_batch":
        return PaddedBatch(), {"hidden_states": torch.randn(1, 11, 8, generator=g)}
    if name == "frame_causal_flex":
        return FrameCausalFlex(), {"hidden_states": torch.randn(1, 12, 32, generator=g)}
    if name == "item_sized_text":
        return ItemSizedText(), {
            "hidden_states": torch.randn(1, 9, 8, generator=g),
            "encoder_hidden_states": torch.randn(1, 6, 8, generator=g),
            "lengths": torch.tensor([4]),
        }
    return EmptyParameter(), {"hidden_states": torch.randn(1, 9, 8, generator=g)}


def _run(name: str, plan_kw: dict[str, int]) -> dict[str, Any]:
    import xdit_compile as xc
    from xdit_compile.jobs.compare import _flops_share, rel_error

    model, kw = _inputs(name)
    model.eval()
    pm = xc.parallelize(model, Plan(**plan_kw), broadcast_weights=True)
    with torch.no_grad():
        ref = model(**kw)
    out = pm(**kw)
    return {
        "err": rel_error(out, ref),
        "breaks": [b.reason for b in pm.last.breaks],
        "share": _flops_share(pm),
        "seed_dim": pm.last.seed.dim if pm.last.seed else None,
    }


CLASSES = [
    "audio_1d",
    "side_by_side",
    "pose_after_first_frame",
    "padded_batch",
    "item_sized_text",
    "frame_causal_flex",
    "empty_parameter",
]
SEED_DIMS = {"audio_1d": 2, "side_by_side": 1, "pose_after_first_frame": 2, "padded_batch": 1}


@pytest.mark.dist
@pytest.mark.parametrize("plan", [dict(ulysses=2), dict(ring=2)], ids=["ulysses2", "ring2"])
@pytest.mark.parametrize("name", CLASSES)
def test_class_is_exact_and_parallel(pools, name, plan):
    for r in pools(2).run(_run, name, plan):
        assert r["err"] < EXACT and r["breaks"] == [], r
        assert r["share"] <= PARALLEL, r
        if name in SEED_DIMS:
            assert r["seed_dim"] == SEED_DIMS[name], r


@pytest.mark.parametrize("name", ["pose_after_first_frame", "audio_1d", "side_by_side"])
def test_every_rank_chooses_the_same_cut(name):
    """A cut chosen by trial propagation depends on the graph only, never on the rank choosing
    it (ranks cutting different dims would enter mismatched collectives)."""
    from xdit_compile.compiler.capture import capture
    from xdit_compile.passes.context import PassContext
    from xdit_compile.passes.seed import seed_inputs_pass
    from xdit_compile.runtime.mesh import MeshInfo

    model, kw = _inputs(name)
    gm = capture(model.eval(), (), kw)
    plan = Plan(ulysses=3)
    seeds = set()
    for rank in range(3):
        ctx = PassContext(plan=plan, mesh=MeshInfo.of(plan, rank, key="k"))
        seed_inputs_pass(gm, ctx)
        seeds.add((ctx.seed.dim, ctx.seed.split))
    assert len(seeds) == 1, seeds


def test_flex_attention_reading_the_head_index_breaks():
    """A score function of the head index (ALiBi-like) would see this rank's local heads: the
    attention gathers instead (exact, reported)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from graph_harness import ALL, compile_for
    from torch.nn.attention.flex_attention import flex_attention

    from xdit_compile.compiler.capture import capture

    class Alibi(nn.Module):
        def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
            q = hidden_states.unflatten(-1, (2, 16)).transpose(1, 2)
            o = flex_attention(
                q, q * 2, q + 1, score_mod=lambda s, b, h, qi, ki: s - h * (qi - ki).abs()
            )
            return o.transpose(1, 2).flatten(2)

    gm = capture(Alibi(), (), {"hidden_states": torch.randn(1, 8, 32)})
    _, ctx = compile_for(gm, 0, ALL, Plan(ulysses=2))
    assert [b.reason for b in ctx.breaks] == [
        "flex attention whose score or mask function reads the head index"
    ]
