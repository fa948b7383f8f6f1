"""Sharding rules of slice, select, split and of writes into a slice (slice_scatter).

Harness (capture, compile per rank, run against the reference): ``tests/rules_harness.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from graph_harness import one
from rules_harness import (
    S1,
    Case,
    X,
    aten,
    joint_then,
    seed_each_test,  # noqa: F401  (autouse: each test starts from seed 0)
)

from xdit_compile.placement import Shard

# --------------------------------------------------------------------------- slice / select / split


def test_full_range_slice_of_the_sharded_dim_becomes_local() -> None:
    case = Case(lambda x: aten.slice.Tensor(x, 1, 0, 8) * 2, X)
    for gm, ctx in case.check({0: S1}):
        assert ctx.breaks == []
        sl = one(gm, aten.slice.Tensor)
        assert sl.args[1:] == (1, 0, 4, 1) and sl.meta["xdit_placement"] == S1


def test_partial_slice_of_the_sharded_dim_keeps_each_ranks_rows() -> None:
    """``x[:, 2:6]`` of rows cut 4 + 4: rows 2-3 of rank 0, 4-5 of rank 1 (2 + 2)."""
    case = Case(lambda x: x[:, 2:6] * 2, X)
    for gm, ctx in case.check({0: S1}):
        assert ctx.breaks == []
        assert one(gm, aten.slice.Tensor).meta["xdit_placement"] == Shard(1, (2, 2))


def test_slice_of_another_dim_keeps_shard() -> None:
    case = Case(lambda x: x[..., 1:4] * 2, X)
    for gm, ctx in case.check({0: S1}):
        assert ctx.breaks == []
        assert one(gm, aten.slice.Tensor).args[1:] == (2, 1, 4)


@pytest.mark.parametrize(
    ("fn", "want"), [(lambda x: x[1] * 2, Shard(0, (4, 4))), (lambda x: x[..., 1] * 2, S1)]
)
def test_select_drops_a_dim(fn: Callable[..., Any], want: Shard) -> None:
    for gm, ctx in Case(fn, X).check({0: S1}):
        assert ctx.breaks == []
        assert one(gm, aten.select.int).meta["xdit_placement"] == want


@pytest.mark.parametrize(
    ("fn", "target", "want"),
    [
        (lambda x: x.chunk(2, -1)[1] * 2, aten.split.Tensor, (S1, S1)),
        (lambda x: x.split([2, 4], 2)[0] * 2, aten.split_with_sizes.default, (S1, S1)),
        (lambda x: x.unbind(0)[1] * 2, aten.unbind.int, (Shard(0, (4, 4)),) * 4),
    ],
)
def test_split_and_chunk_keep_shard(
    fn: Callable[..., Any], target: Any, want: tuple[Shard, ...]
) -> None:
    for gm, ctx in Case(fn, X).check({0: S1}):
        assert ctx.breaks == []
        assert one(gm, target).meta["xdit_placement"] == want
        assert one(gm, aten.mul.Tensor).meta["xdit_placement"] == want[0]


def test_split_along_the_sharded_dim_keeps_uneven_cuts() -> None:
    """``x.split([3, 5], 1)`` of rows cut 4 + 4: pieces cut 3 + 0 and 1 + 4."""
    for gm, ctx in Case(lambda x: x.split([3, 5], 1)[1] * 2, X).check({0: S1}):
        assert ctx.breaks == []
        assert one(gm, aten.mul.Tensor).meta["xdit_placement"] == Shard(1, (1, 4))


# --------------------------------------------------------------------------- joint writes


def _rope_on_image_part(j: torch.Tensor, tab: torch.Tensor) -> torch.Tensor:
    out = j.clone()
    out[:, 3:] = j[:, 3:] * tab[3:]  # functionalized into slice_scatter on the joint dim
    return out


def test_slice_scatter_into_the_body_of_a_joint_dim() -> None:
    case = joint_then(_rope_on_image_part)
    for gm, ctx in case.check({1: S1}):
        assert ctx.breaks == []
        sc = one(gm, aten.slice_scatter.default)
        assert sc.meta["xdit_placement"] == Shard(1, (4, 4), head=3)
        assert sc.args[2:] == (1, 3, 7, 1)  # local rows of the body


def test_slice_scatter_through_the_body_writes_each_ranks_rows() -> None:
    def write(j: torch.Tensor, tab: torch.Tensor) -> torch.Tensor:
        out = j.clone()
        out[:, 2:6] = 0.0
        return out

    for _, ctx in joint_then(write).check({1: S1}):  # (check: every node against the global value)
        assert ctx.breaks == []


def test_slice_scatter_along_another_dim_is_elementwise() -> None:
    def write(x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        out[..., 0::2] = x[..., 1::2] * 2  # interleaved real RoPE
        return out

    for gm, ctx in Case(write, X).check({0: S1}):
        assert ctx.breaks == []
        assert one(gm, aten.slice_scatter.default).meta["xdit_placement"] == S1
