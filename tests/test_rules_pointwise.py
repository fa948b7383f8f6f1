"""Sharding rules of pointwise ops, dtype casts, complex views, and of ops that have no rule.

Harness (capture, compile per rank, run against the reference): ``tests/rules_harness.py``.
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn as nn
from graph_harness import ALL_NO_SEED, RankRun, calls, one, reference
from rules_harness import (
    S1,
    TABLE,
    Case,
    R,
    X,
    aten,
    seed_each_test,  # noqa: F401  (autouse: each test starts from seed 0)
    slices_of,
)

from xdit_compile.compiler.capture import capture
from xdit_compile.compiler.driver import run_passes
from xdit_compile.passes.context import PassContext
from xdit_compile.placement import Shard
from xdit_compile.plan import Plan
from xdit_compile.runtime.mesh import MeshInfo
from xdit_compile.runtime.reshard import gather_shard

# --------------------------------------------------------------------------- pointwise


def test_pointwise_broadcast_slices_full_size_replicated_operand_only() -> None:
    case = Case(lambda x, y, z: x * y + z, X, torch.randn(8, 6), torch.randn(1, 6))
    for gm, ctx in case.check({0: S1}):
        assert ctx.breaks == []
        ys, zs = slices_of(gm, "xs_1"), slices_of(gm, "xs_2")
        assert len(ys) == 1 and zs == []
        assert ys[0].meta["xdit_placement"] == Shard(0, (4, 4))  # right-aligned dim of y
        assert one(gm, aten.mul.Tensor).meta["xdit_placement"] == S1
        assert one(gm, aten.add.Tensor).meta["xdit_placement"] == S1
        assert len(calls(gm, gather_shard)) == 1


def test_pointwise_inputs_sharded_differently_break() -> None:
    case = Case(lambda x, y: x + y, X, X * 2)
    for gm, ctx in case.check({0: S1, 1: Shard(1, (5, 3))}):
        assert len(ctx.breaks) == 1 and "sharded differently" in ctx.breaks[0].reason
        assert one(gm, aten.add.Tensor).meta["xdit_placement"] == R


# --------------------------------------------------------------------------- dtype, complex


def test_type_as_takes_only_the_dtype_of_other() -> None:
    case = Case(lambda x, y: y.type_as(x) + 1, X, torch.randn(5, 6))
    for gm, ctx in case.check({0: S1}):
        assert ctx.breaks == []
        assert one(gm, aten.type_as.default).meta["xdit_placement"] == R


def test_complex_rope_keeps_the_shard() -> None:
    def rope(x: torch.Tensor, tab: torch.Tensor) -> torch.Tensor:
        xc = torch.view_as_complex(x.reshape(4, 8, 3, 2))
        fc = torch.polar(torch.ones_like(tab[:8, :3]), tab[:8, :3])
        return torch.view_as_real(xc * fc).flatten(2)

    for gm, ctx in Case(rope, X, TABLE).check({0: S1}):
        assert ctx.breaks == []
        assert one(gm, aten.view_as_complex.default).meta["xdit_placement"] == S1


# --------------------------------------------------------------------------- unknown ops


class _Flip(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * 2
        return torch.flip(y, [2]) + 1


def test_unknown_op_breaks_with_its_source_line() -> None:
    gm0 = capture(_Flip(), (X,), {})
    for rank in (0, 1):
        gm = fx.GraphModule(gm0, copy.deepcopy(gm0.graph))
        next(iter(gm.graph.find_nodes(op="placeholder"))).meta["xdit_seed"] = S1
        ctx = PassContext(plan=Plan(ulysses=2), mesh=MeshInfo.of(Plan(ulysses=2), rank, key="k"))
        gm = run_passes(gm, ALL_NO_SEED, ctx)
        (brk,) = ctx.breaks
        assert (brk.node, brk.op, brk.reason) == (
            "flip",
            "aten.flip.default",
            "no sharding rule for this op",
        )
        assert (
            "test_rules_pointwise.py" in brk.source
            and "in forward: return torch.flip(y, [2]) + 1" in brk.source
        )
        flip = one(gm, aten.flip.default)
        assert flip.meta["xdit_placement"] == R and flip.args[0].target is gather_shard
        assert one(gm, aten.mul.Tensor).meta["xdit_placement"] == S1
        assert [c.what for c in ctx.collectives] == ["sharding break at flip"]
        got = RankRun(gm, reference(gm0, X), rank).run(X, enable_io_processing=False)[0]
        torch.testing.assert_close(got, _Flip()(X))
