"""Sharding rules of views: reshapes, permute and transpose.

Harness (capture, compile per rank, run against the reference): ``tests/rules_harness.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from graph_harness import FRONT_NO_SEED, calls, one, piece
from rules_harness import (
    S1,
    Case,
    R,
    X,
    aten,
    seed_each_test,  # noqa: F401  (autouse: each test starts from seed 0)
)

from xdit_compile.passes.sharding.engine import redistribute
from xdit_compile.passes.sharding.rules_shape import reshape_shard
from xdit_compile.placement import Shard, even_split, local_shape

# --------------------------------------------------------------------------- reshapes


@pytest.mark.parametrize(
    ("in_shape", "sh", "out_shape", "want"),
    [
        # merge the shard with the dim after it: rows of 4 fold into the split
        ((2, 8, 4), Shard(1, (4, 4)), (2, 32), Shard(1, (16, 16))),
        # merge with the dim before it: interleaved, outer > 1 keeps inner
        ((2, 8, 4), Shard(1, (4, 4)), (64,), Shard(0, (4, 4), outer=2, inner=4)),
        ((4, 6), Shard(1, (3, 3)), (8, 3), Shard(0, (1, 1), outer=4)),
        # split a token dim into rows of an inner factor
        ((1, 64, 3), Shard(1, (32, 32)), (1, 8, 8, 3), Shard(1, (4, 4))),
        ((1, 32, 4), Shard(1, (16, 16)), (1, 8, 16), Shard(1, (4, 4))),
        # uneven splits stay exact
        ((1, 12, 4), Shard(1, (8, 4)), (1, 48), Shard(1, (32, 16))),
        ((1, 12, 4), Shard(1, (8, 4)), (1, 3, 16), Shard(1, (2, 1))),
        # a piece that is not a whole number of output rows cannot be kept
        ((1, 12, 4), Shard(1, (6, 6)), (1, 3, 16), None),
        ((6, 4), Shard(0, (3, 3)), (3, 8), None),
        ((2, 6, 4), Shard(1, (3, 3)), (2, 3, 8), None),
        # back out of an interleaved layout
        ((64,), Shard(0, (4, 4), outer=2, inner=4), (2, 8, 4), Shard(1, (4, 4))),
        ((64,), Shard(0, (4, 4), outer=2, inner=4), (4, 16), Shard(0, (1, 1), outer=2)),
    ],
)
def test_reshape_shard(
    in_shape: tuple[int, ...], sh: Shard, out_shape: tuple[int, ...], want: Shard | None
) -> None:
    got = reshape_shard(in_shape, sh, out_shape)
    assert got == want
    if got is None:
        return
    x = torch.arange(math.prod(in_shape)).reshape(in_shape)
    for r in range(len(sh.split)):
        local = piece(x, sh, r)
        assert torch.equal(
            local.reshape(local_shape(out_shape, got, r)), piece(x.reshape(out_shape), got, r)
        )


def _factorizations(n: int, k: int) -> list[tuple[int, ...]]:
    if k == 1:
        return [(n,)]
    return [
        (d, *rest) for d in range(1, n + 1) if n % d == 0 for rest in _factorizations(n // d, k - 1)
    ]


@pytest.mark.parametrize("in_shape", [(2, 8, 4), (2, 3, 4, 2), (12, 4)])
def test_reshape_shard_sweep_local_reshape_equals_sliced_global(in_shape: tuple[int, ...]) -> None:
    """Whenever reshape_shard keeps a shard, reshaping each local piece gives exactly its piece."""
    n = math.prod(in_shape)
    x = torch.arange(n).reshape(in_shape)
    kept = 0
    for dim, size in enumerate(in_shape):
        for split in {even_split(size, 2), (size - 1, 1)}:
            sh = Shard(dim, split)
            for out in _factorizations(n, 2) + _factorizations(n, 3):
                new = reshape_shard(in_shape, sh, out)
                if new is None:
                    continue
                kept += 1
                for r in range(2):
                    local = piece(x, sh, r).reshape(local_shape(out, new, r))
                    assert torch.equal(local, piece(x.reshape(out), new, r)), (
                        in_shape,
                        sh,
                        out,
                        new,
                    )
    assert kept > 20


def test_view_rule_rewrites_sizes_to_local_and_keeps_shard() -> None:
    case = Case(lambda x: (x.reshape(4, 4, 12) * 2, x.flatten(0, 1) * 2), X)
    for gm, ctx in case.check({0: S1}):
        assert ctx.breaks == []
        views = calls(gm, aten.reshape.default)
        assert len(views) == 2 and calls(gm, aten.view.default) == []
        rows = next(v for v in views if v.meta["xdit_shape"] == (4, 4, 12))
        assert rows.args[1] == [4, 2, 12] and rows.meta["xdit_placement"] == Shard(1, (2, 2))
        merged = next(v for v in views if v.meta["xdit_shape"] == (32, 6))
        assert merged.args[1] == [16, 6]
        assert merged.meta["xdit_placement"] == Shard(0, (4, 4), outer=4)


def test_view_that_splits_a_piece_breaks() -> None:
    case = Case(lambda x: x.reshape(4, 6, 8) * 2, X)
    for rank in (0, 1):
        gm, ctx = case.compile({0: Shard(1, (5, 3))}, rank, passes=FRONT_NO_SEED)
        (brk,) = ctx.breaks
        # every view becomes a reshape (inputs moved by the passes may have other strides)
        assert brk.op == "aten.reshape.default" and "splits the sharded dim" in brk.reason
        view = one(gm, aten.reshape.default)
        assert view.meta["xdit_placement"] == R
        assert view.args[0].target is redistribute and view.args[0].meta["xdit_dst"] == R


def test_view_that_splits_a_piece_runs_after_the_gather() -> None:
    Case(lambda x: x.reshape(4, 6, 8) * 2, X).check({0: Shard(1, (5, 3))})


# --------------------------------------------------------------------------- permute / transpose


@pytest.mark.parametrize(
    ("fn", "want"),
    [
        (lambda x: x.permute(2, 0, 1) * 1, Shard(2, (4, 4))),
        (lambda x: x.permute(-1, -2, -3) * 1, Shard(1, (4, 4))),
        (lambda x: x.transpose(0, 1) * 1, Shard(0, (4, 4))),
        (lambda x: x.transpose(0, 2) * 1, S1),
        (lambda x: torch.movedim(x, 1, 2) * 1, Shard(2, (4, 4))),
        (lambda x: x.mT * 1, Shard(2, (4, 4))),
    ],
)
def test_permute_and_transpose_move_the_shard(fn: Callable[..., Any], want: Shard) -> None:
    case = Case(fn, X)
    for gm, ctx in case.check({0: S1}):
        assert ctx.breaks == []
        assert one(gm, aten.mul.Tensor).meta["xdit_placement"] == want
