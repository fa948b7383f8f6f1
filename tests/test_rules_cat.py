"""Sharding rules of cat and stack, and the joint (text + image) shard they make.

Harness (capture, compile per rank, run against the reference): ``tests/rules_harness.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from graph_harness import USP, calls, one
from rules_harness import (
    S1,
    Case,
    R,
    X,
    aten,
    joint_then,
    reasons,
    seed_each_test,  # noqa: F401  (autouse: each test starts from seed 0)
    slices_of,
)

from xdit_compile.placement import Placement, Shard
from xdit_compile.plan import Plan
from xdit_compile.runtime.opargs import op_args
from xdit_compile.runtime.reshard import gather_shard

# --------------------------------------------------------------------------- cat / stack


def test_cat_along_an_unsharded_dim_slices_the_replicated_input() -> None:
    case = Case(lambda x, y: torch.cat([x, y], -1), X, torch.randn(4, 8, 3))
    for gm, ctx in case.check({0: S1}):
        assert ctx.breaks == []
        assert [n.meta["xdit_placement"] for n in slices_of(gm, "xs_1")] == [S1]
        assert one(gm, aten.cat.default).meta["xdit_placement"] == S1


def test_cat_along_the_sharded_dim_makes_a_joint_shard() -> None:
    # Replicated rows (text) joined after sharded rows (image): every rank holds all text rows.
    case = Case(lambda x, y: torch.cat([x, y], 1) * 2, X, torch.randn(4, 3, 6))
    for gm, ctx in case.check({0: S1}):
        assert ctx.breaks == []
        assert one(gm, aten.cat.default).meta["xdit_placement"] == Shard(1, (4, 4), tail=3)


def test_cat_of_two_sharded_pieces_along_the_sharded_dim_breaks() -> None:
    case = Case(lambda x: torch.cat([x, x * 2], 1), X)
    for gm, ctx in case.check({0: S1}):
        assert reasons(ctx) == ["concatenation of several sharded pieces along the sharded dim"]
        assert one(gm, aten.cat.default).meta["xdit_placement"] == R


@pytest.mark.parametrize(
    "fn,want",
    [
        (lambda j, tab: j * tab, Shard(1, (4, 4), head=3)),  # table sliced: head rows + body piece
        (lambda j, tab: torch.nn.functional.layer_norm(j, (6,)), Shard(1, (4, 4), head=3)),
        (lambda j, tab: j.reshape(4, 11, 2, 3).transpose(1, 2), Shard(2, (4, 4), head=3)),
        (lambda j, tab: j[:, :3] + 1, R),  # the text rows alone are replicated
        (lambda j, tab: j[:, 3:] + 1, Shard(1, (4, 4))),  # the image rows alone are the body
        (lambda j, tab: j[:, -8:] + 1, Shard(1, (4, 4))),
    ],
)
def test_joint_shard_through_ops(fn: Callable[..., Any], want: Placement) -> None:
    case = joint_then(fn)
    for gm, ctx in case.check({1: S1}):
        assert ctx.breaks == []
        out = [n for n in gm.graph.nodes if n.op == "output"][0].args[0][0]
        src = out.args[0] if out.target is gather_shard else out
        assert src.meta["xdit_placement"] == want


def test_joint_split_into_text_and_image() -> None:
    case = joint_then(lambda j, tab: tuple(t * 2 for t in j.split([3, 8], dim=1)))
    for gm, ctx in case.check({1: S1}):
        assert ctx.breaks == []
        split = one(gm, aten.split_with_sizes.default)
        assert split.meta["xdit_placement"] == (R, Shard(1, (4, 4)))
        assert split.args[1] == [3, 4]  # local sizes


def test_joint_slice_through_the_body_keeps_an_uneven_cut() -> None:
    """``j[:, 2:5]`` of [3 text rows | 8 image rows cut 4 + 4]: the last text row, replicated,
    then rank 0's first two image rows and none of rank 1's (checked against the global value)."""
    case = joint_then(lambda j, tab: j[:, 2:5] + 1)
    for gm, ctx in case.check({1: S1}):
        assert ctx.breaks == []
        sl = one(gm, aten.slice.Tensor)
        assert sl.meta["xdit_placement"] == Shard(1, (2, 0), head=1)


def test_joint_reshape_merging_the_dim_breaks() -> None:
    case = joint_then(lambda j, tab: j.reshape(4, 66) + 1)
    for _, ctx in case.check({1: S1}):
        assert len(ctx.breaks) == 1 and "reshape" in ctx.breaks[0].reason


def test_joint_self_attention_is_usp_with_head() -> None:
    def attn(j: torch.Tensor, tab: torch.Tensor) -> torch.Tensor:
        q = j.reshape(4, 11, 2, 3).transpose(1, 2)
        return F.scaled_dot_product_attention(q, q * 2, q + 1)

    case = joint_then(attn)
    for gm, ctx in case.check({1: S1}):
        assert ctx.breaks == []
        (usp,) = calls(gm, USP)
        # split, head, tail; the output's 3 text rows come back cut over the ranks (2 + 1)
        a = op_args(usp)
        assert (a["split"], a["head"], a["tail"], a["text_rank"]) == (
            [4, 4],
            3,
            0,
            ctx.mesh.sp_rank,
        )
        assert usp.meta["xdit_placement"] == Shard(2, (4, 4), head=3, text=True)
        sites = [c for c in ctx.collectives if c.what == "usp_attention"]
        assert {c.op for c in sites} == {"all_to_all"}  # text output pieces ride with the body


def test_joint_attention_text_rows_stay_whole_when_disabled() -> None:
    def attn(j: torch.Tensor, tab: torch.Tensor) -> torch.Tensor:
        q = j.reshape(4, 11, 2, 3).transpose(1, 2)
        return F.scaled_dot_product_attention(q, q * 2, q + 1)

    case = joint_then(attn)
    for gm, ctx in case.check({1: S1}, plan=Plan(ulysses=2, disable_passes=("shard_text_rows",))):
        (usp,) = calls(gm, USP)
        a = op_args(usp)
        assert (a["split"], a["head"], a["tail"], a["text_rank"], a["kv_split"]) == (
            [4, 4],
            3,
            0,
            -1,
            None,
        )
        assert usp.meta["xdit_placement"] == Shard(2, (4, 4), head=3)
        sites = [c for c in ctx.collectives if c.what == "usp_attention"]
        assert {c.op for c in sites} == {"all_to_all", "all_gather"}  # text outputs over heads


@pytest.mark.parametrize(("dim", "want"), [(1, Shard(2, (4, 4))), (-1, S1), (0, Shard(2, (4, 4)))])
def test_stack_shifts_the_shard(dim: int, want: Shard) -> None:
    case = Case(lambda x, y: torch.stack([x, y], dim), X, X * 2)
    for gm, ctx in case.check({0: S1}):
        assert ctx.breaks == []
        assert one(gm, aten.stack.default).meta["xdit_placement"] == want
        assert len(slices_of(gm, "xs_1")) == 1
