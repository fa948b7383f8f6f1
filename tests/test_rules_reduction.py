"""Sharding rules of reductions and of ops along one dim (softmax).

Harness (capture, compile per rank, run against the reference): ``tests/rules_harness.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from graph_harness import FRONT_NO_SEED, one
from rules_harness import (
    S1,
    Case,
    R,
    X,
    aten,
    reasons,
    seed_each_test,  # noqa: F401  (autouse: each test starts from seed 0)
)

from xdit_compile.placement import Partial, Shard
from xdit_compile.runtime.reshard import gather_shard

# --------------------------------------------------------------------------- reductions


@pytest.mark.parametrize(
    ("fn", "want"),
    [
        (lambda x: x.sum(-1), S1),
        (lambda x: x.amax(0), Shard(0, (4, 4))),
        (lambda x: x.sum(0, keepdim=True), S1),
        (lambda x: x.mean([0, 2]), Shard(0, (4, 4))),
        (lambda x: torch.logsumexp(x, 0), Shard(0, (4, 4))),
        (lambda x: x.var(-1, keepdim=True), S1),
        (lambda x: x.max(0)[0] + x.max(0)[1], Shard(0, (4, 4))),
    ],
)
def test_reduction_over_other_dims_keeps_shard(fn: Callable[..., Any], want: Shard) -> None:
    for gm, ctx in Case(fn, X).check({0: S1}):
        assert ctx.breaks == []
        out = gm.graph.find_nodes(op="output")[0].args[0][0]
        assert out.target is gather_shard and out.args[0].meta["xdit_placement"] == want


@pytest.mark.parametrize(
    ("fn", "reason"),
    [
        (lambda x: x.mean(1), "reduction over the sharded dim"),
        (lambda x: x.amax([-2, -1]), "reduction over the sharded dim"),
        (lambda x: x.sum(), "reduction over all dims"),
    ],
)
def test_reduction_over_the_sharded_dim_breaks(fn: Callable[..., Any], reason: str) -> None:
    for _, ctx in Case(fn, X).check({0: S1}):
        assert reasons(ctx) == [reason]


def test_sum_over_the_sharded_dim_is_a_partial_sum() -> None:
    """Each rank sums its own rows; the all-reduce that completes the sum comes before the
    first consumer (here the output)."""
    for gm, ctx in Case(lambda x: x.sum(1) * 2, X).check({0: S1}):
        assert ctx.breaks == []
        assert one(gm, aten.sum.dim_IntList).meta["xdit_placement"] == Partial()


def test_var_with_unbiased_and_keepdim() -> None:
    case = Case(lambda x: x.var(0, unbiased=False, keepdim=True), X)
    gm, _ = case.compile({0: S1}, passes=FRONT_NO_SEED)
    assert one(gm, aten.var.dim).meta["xdit_placement"] == S1
    case.check({0: S1})


def test_elementwise_max_of_two_tensors() -> None:
    case = Case(lambda x, y: torch.max(x, y), X, torch.randn(8, 6))
    for _, ctx in case.check({0: S1}):
        assert ctx.breaks == []


# --------------------------------------------------------------------------- softmax


def test_softmax_over_another_dim_keeps_shard() -> None:
    for gm, ctx in Case(lambda x: x.softmax(-1) + x.cumsum(0), X).check({0: S1}):
        assert ctx.breaks == []
        assert one(gm, aten.softmax.int).meta["xdit_placement"] == S1
        assert one(gm, aten.cumsum.default).meta["xdit_placement"] == S1


def test_softmax_over_the_sharded_dim_breaks() -> None:
    for gm, ctx in Case(lambda x: x.softmax(1), X).check({0: S1}):
        assert reasons(ctx) == ["normalization along the sharded dim"]
        assert one(gm, aten.softmax.int).meta["xdit_placement"] == R
