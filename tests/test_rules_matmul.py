"""Sharding rules of linear and matmul.

Harness (capture, compile per rank, run against the reference): ``tests/rules_harness.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from graph_harness import FRONT_NO_SEED, calls, one
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
from xdit_compile.runtime.reshard import all_reduce_sum, gather_shard

# --------------------------------------------------------------------------- linear / matmul


def test_linear_keeps_a_token_shard() -> None:
    case = Case(lambda x, w, b: F.linear(x, w, b), X, torch.randn(3, 6), torch.randn(3))
    for gm, ctx in case.check({0: S1}):
        assert ctx.breaks == []
        assert one(gm, aten.linear.default).meta["xdit_placement"] == S1
        assert len(calls(gm, gather_shard)) == 1  # the output only


def test_linear_contracting_the_shard_breaks() -> None:
    case = Case(lambda x, w: F.linear(x, w), X, torch.randn(3, 6))
    for gm, ctx in case.check({0: Shard(2, (3, 3))}):
        assert reasons(ctx) == ["linear contracts the sharded dim"]
        lin = one(gm, aten.linear.default)
        assert lin.meta["xdit_placement"] == R
        assert lin.args[0].target is gather_shard


@pytest.mark.parametrize(
    ("a", "b", "seeds", "want"),
    [
        ((4, 8, 6), (4, 6, 3), {0: S1}, S1),  # rows of a batched matmul
        ((8, 6), (4, 6, 3), {0: Shard(0, (4, 4))}, S1),  # 2-D rows broadcast over a batch
        ((5, 6), (4, 6, 8), {1: Shard(2, (4, 4))}, Shard(2, (4, 4))),  # columns of b
        ((4, 8, 6), (4, 6, 3), {0: Shard(0, (2, 2)), 1: Shard(0, (2, 2))}, Shard(0, (2, 2))),
    ],
)
def test_matmul_keeps_non_contracted_shards(
    a: tuple[int, ...], b: tuple[int, ...], seeds: dict[int, Shard], want: Shard
) -> None:
    case = Case(lambda a, b: a @ b, torch.randn(a), torch.randn(b))
    for gm, ctx in case.check(seeds):
        assert ctx.breaks == []
        assert one(gm, aten.matmul.default).meta["xdit_placement"] == want


def test_matmul_of_two_contracted_shards_is_partial_and_all_reduced() -> None:
    case = Case(
        lambda a, b, c: (a @ b) * 1 + c,
        torch.randn(2, 4, 8),
        torch.randn(2, 8, 3),
        torch.randn(4, 3),
    )
    for gm, ctx in case.check({0: Shard(2, (4, 4)), 1: Shard(1, (4, 4))}):
        assert ctx.breaks == []
        mm = one(gm, aten.matmul.default)
        assert mm.meta["xdit_placement"] == Partial()
        ar = one(gm, all_reduce_sum)
        assert ar.args[0] is mm
        assert [c.op for c in ctx.collectives] == ["all_reduce"]
        assert one(gm, aten.mul.Tensor).meta["xdit_placement"] == R


def test_matmul_contracting_one_sharded_operand_breaks() -> None:
    case = Case(lambda a, b: a @ b, X, torch.randn(6, 3))
    for _, ctx in case.check({0: Shard(2, (3, 3))}):
        assert reasons(ctx) == ["matmul contracts the sharded dim"]


def test_matmul_with_vector_keeps_rows() -> None:
    case = Case(lambda a, v: a @ v, X, torch.randn(6))
    gm, ctx = case.compile({0: S1}, passes=FRONT_NO_SEED)
    assert one(gm, aten.matmul.default).meta["xdit_placement"] == S1  # [4, 8] keeps dim 1
    case.check({0: S1})


def test_addmm_partial_counts_bias_once() -> None:
    case = Case(
        lambda a, b, c: torch.addmm(c, a, b), torch.randn(4, 8), torch.randn(8, 3), torch.randn(3)
    )
    case.check({0: Shard(1, (4, 4)), 1: Shard(0, (4, 4))})
