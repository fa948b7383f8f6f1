"""Sharding rules of convolutions and of the VAE decoder's upsampling.

Harness (capture, compile per rank, run against the reference): ``tests/rules_harness.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from graph_harness import FRONT_NO_SEED, HALO, calls, one
from rules_harness import (
    Case,
    aten,
    reasons,
    seed_each_test,  # noqa: F401  (autouse: each test starts from seed 0)
)

from xdit_compile.placement import Shard
from xdit_compile.runtime.reshard import slice_shard

# --------------------------------------------------------------------------- convolution


IMG = torch.randn(1, 3, 8, 6, generator=torch.Generator().manual_seed(1))


def test_conv_patch_embed_divides_the_split_by_the_stride() -> None:
    case = Case(lambda x, w: F.conv2d(x, w, stride=2), IMG, torch.randn(5, 3, 2, 2))
    for rank, (gm, ctx) in enumerate(case.check({0: Shard(2, (4, 4))})):
        assert ctx.breaks == []
        conv = one(gm, aten.conv2d.default)
        assert conv.meta["xdit_placement"] == Shard(2, (2, 2))
        assert "xdit_halo" not in conv.meta and calls(gm, HALO) == []
        assert one(gm, slice_shard).args[1:] == (2, 1, 1, 4 * rank, 4, 0, 0)  # rank's rows


def test_conv_patch_embed_with_split_not_divisible_by_stride_breaks() -> None:
    case = Case(lambda x, w: F.conv2d(x, w, stride=2), IMG, torch.randn(5, 3, 2, 2))
    for _, ctx in case.check({0: Shard(2, (5, 3))}):
        assert reasons(ctx) == ["conv kernel 2 stride 2 padding 0 on the sharded dim"]


@pytest.mark.parametrize(("split", "pad"), [((4, 4), 1), ((5, 3), 1)])
def test_same_conv_keeps_shard_with_a_halo(split: tuple[int, int], pad: int) -> None:
    case = Case(lambda x, w: F.conv2d(x, w, padding=pad), IMG, torch.randn(5, 3, 3, 3))
    gm, _ = case.compile({0: Shard(2, split)}, passes=FRONT_NO_SEED)
    conv = one(gm, aten.conv2d.default)
    assert conv.meta["xdit_halo"] == (
        2,
        1,
        1,
        0,
        -1,
        Shard(2, split),
    )  # dim, top, bottom, no pad rows
    assert conv.meta["xdit_placement"] == Shard(2, split)
    for gm, ctx in case.check({0: Shard(2, split)}):
        assert ctx.breaks == []
        conv = one(gm, aten.conv2d.default)
        halo = one(gm, HALO)
        assert conv.args[0] is halo and halo.args[1:4] == (2, 1, 1)
        assert list(conv.args[4]) == [0, 1]  # H padding comes from the neighbours now
        assert "xdit_halo" not in conv.meta
        site = next(c for c in ctx.collectives if c.op == "send_recv")
        assert site.what == "conv halo" and site.calls == 2
        assert site.bytes_per_forward == 2 * 3 * 6 * 1 * 4  # pad row of C*W floats, both ways


def test_conv1d_same_conv_halo() -> None:
    case = Case(lambda x, w: F.conv1d(x, w, padding=2), torch.randn(2, 3, 10), torch.randn(4, 3, 5))
    for gm, ctx in case.check({0: Shard(2, (5, 5))}):
        assert ctx.breaks == []
        assert one(gm, HALO).args[1:4] == (2, 2, 2)


@pytest.mark.parametrize(
    ("k", "stride", "pad", "split", "halo", "dil"),
    [
        (3, 2, 1, (4, 4), (1, 0), 1),  # a symmetric stride-2 downsampling: one row from above
        (3, 2, 1, (6, 2), (1, 0), 1),  # uneven (even pieces)
        (4, 2, 1, (4, 4), (1, 1), 1),  # kernel 4: one row each way
        (1, 2, 0, (4, 4), (0, 0), 1),  # every other row: no halo, just the stride
        (5, 1, 2, (3, 5), (2, 2), 1),  # "same" kernel 5
        (3, 1, 2, (4, 4), (2, 2), 2),  # dilated "same": the kernel spans 5 rows
    ],
)
def test_strided_conv_keeps_the_row_shard_with_a_halo(k, stride, pad, split, halo, dil) -> None:
    """Output rows 1/stride of the input's, pieces multiples of the stride: each rank computes
    its own output rows from its rows plus `padding` rows of the previous rank and
    `kernel span - stride - padding` of the next."""
    case = Case(
        lambda x, w: F.conv2d(x, w, stride=stride, padding=pad, dilation=dil),
        IMG,
        torch.randn(4, 3, k, k),
    )
    for gm, ctx in case.check({0: Shard(2, split)}):
        assert ctx.breaks == []
        conv = one(gm, aten.conv2d.default)
        assert conv.meta["xdit_placement"] == Shard(2, tuple(p // stride for p in split))
        if halo == (0, 0):
            assert calls(gm, HALO) == [] and ctx.collectives[:-1] == []  # only the output's gather
        else:
            assert one(gm, HALO).args[1:4] == (2, *halo)
            site = next(c for c in ctx.collectives if c.what == "conv halo")
            assert (
                site.calls == sum(1 for h in halo if h)
                and site.bytes_per_forward == 3 * 6 * sum(halo) * 4
            )


def test_conv_after_a_zero_pad_of_the_rows_takes_the_pad_as_halo_padding() -> None:
    """A VAE encoder's downsampling: F.pad(x, (0, 1, 0, 1)) then a stride-2 kernel-3 conv with
    no padding. The pad's zero row after the last row is the conv's bottom padding: each rank
    cuts it off again, takes one row from the next rank (zeros on the last), and no rows are
    gathered. The W padding stays in the pad."""
    case = Case(
        lambda x, w: F.conv2d(F.pad(x, (0, 1, 0, 1)), w, stride=2), IMG, torch.randn(4, 3, 3, 3)
    )
    for gm, ctx in case.check({0: Shard(2, (4, 4))}):
        assert ctx.breaks == []
        halo = one(gm, HALO)
        assert halo.args[1:4] == (2, 0, 1) and halo.args[5:] == (
            0,
            4,
        )  # no head rows; this rank's 4 rows
        assert one(gm, aten.conv2d.default).meta["xdit_placement"] == Shard(2, (2, 2))


def test_conv_after_a_nonzero_pad_of_the_rows_breaks() -> None:
    case = Case(
        lambda x, w: F.conv2d(F.pad(x, (0, 1, 0, 1), value=1.0), w, stride=2),
        IMG,
        torch.randn(4, 3, 3, 3),
    )
    for _, ctx in case.check({0: Shard(2, (4, 4))}):
        assert reasons(ctx) == ["conv on a merged or joint sharded dim"]


def test_strided_conv_with_odd_pieces_breaks() -> None:
    case = Case(lambda x, w: F.conv2d(x, w, stride=2, padding=1), IMG, torch.randn(4, 3, 3, 3))
    for _, ctx in case.check({0: Shard(2, (5, 3))}):
        assert reasons(ctx) == ["conv kernel 3 stride 2 padding 1 on the sharded dim"]


def test_conv_shard_thinner_than_the_halo_breaks() -> None:
    case = Case(
        lambda x, w: F.conv2d(x, w, padding=2), torch.randn(1, 3, 5, 6), torch.randn(2, 3, 5, 5)
    )
    for _, ctx in case.check({0: Shard(2, (4, 1))}):
        assert reasons(ctx) == ["shard thinner than the conv halo"]


def test_conv_over_sharded_channels_breaks() -> None:
    case = Case(lambda x, w: F.conv2d(x, w), torch.randn(1, 4, 8, 6), torch.randn(5, 4, 1, 1))
    for _, ctx in case.check({0: Shard(1, (2, 2))}):
        assert reasons(ctx) == ["conv contracts the sharded channel dim"]


# --------------------------------------------------------------------------- VAE decoder upsampling


@pytest.mark.parametrize("how", ["scale", "size", "exact"])
def test_nearest_upsampling_keeps_the_row_shard(how: str) -> None:
    """Output row j copies input row j // 2: each rank upsamples its own rows, and a global
    output size in the call becomes this rank's."""
    fns = {
        "scale": lambda x: F.interpolate(x, scale_factor=2.0, mode="nearest"),
        "size": lambda x: F.interpolate(x, size=(14, 12), mode="nearest"),
        "exact": lambda x: F.interpolate(x, scale_factor=2.0, mode="nearest-exact"),
    }
    case = Case(fns[how], torch.randn(1, 3, 7, 6))
    for gm, ctx in case.check({0: Shard(2, (4, 3))}):
        assert ctx.breaks == [] and [c.op for c in ctx.collectives] == [
            "all_gather"
        ]  # the output only
        up = next(n for n in gm.graph.nodes if "upsample" in str(n.target))
        assert up.meta["xdit_placement"] == Shard(2, (8, 6))
        if how == "size":
            assert up.args[1] == [8 if ctx.mesh.sp_rank == 0 else 6, 12]


def test_nearest_upsampling_by_a_scale_other_than_the_size_ratio_breaks() -> None:
    """Output 4 rows from 2 with scale 2.4: the kernel reads row floor(j / 2.4), not j // 2."""
    case = Case(
        lambda x: torch.ops.aten.upsample_nearest2d.default(x, [4, 12], 2.4, 2.0),
        torch.randn(1, 3, 2, 6),
    )
    for _, ctx in case.check({0: Shard(2, (1, 1))}):
        assert reasons(ctx) == ["nearest upsampling with a scale that differs from its size ratio"]


def test_nearest_resize_by_a_fraction_breaks() -> None:
    case = Case(lambda x: F.interpolate(x, size=(10, 6), mode="nearest"), torch.randn(1, 3, 8, 6))
    for _, ctx in case.check({0: Shard(2, (4, 4))}):
        assert reasons(ctx) == ["nearest resize 8 -> 10 rows is not an integer upsampling"]


def test_aten_convolution_same_padding_compiles() -> None:
    case = Case(
        lambda x, w: torch.convolution(x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1),
        IMG,
        torch.randn(5, 3, 3, 3),
    )
    case.check({0: Shard(2, (4, 4))})
