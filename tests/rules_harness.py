"""The harness of the sharding-rule tests (``tests/test_rules_*.py``, one file per rule family).

Every graph test captures a tiny function once, seeds chosen inputs with a placement, runs the
real pass pipeline for rank 0 and rank 1 of a ulysses=2 mesh, and then executes each rank's
rewritten graph in this process. Collectives cannot run without other processes: the real
``gather_shard`` runs with its all-gather fed from the other rank's piece of the global value, and
all-reduce, Ulysses attention and conv halos are answered from the global reference values of
the original graph. Every other node runs for real on local tensors and its value is compared
with this rank's piece of the reference value (``slice_shard`` of it by the node's placement).
Partial results are checked by summing the two ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.fx as fx
from graph_harness import ALL_NO_SEED, Fn, RankRun, calls, compile_for, reference

from xdit_compile.compiler.capture import capture
from xdit_compile.passes.context import PassContext, PassFn
from xdit_compile.passes.sharding.engine import redistribute
from xdit_compile.placement import Replicate, Shard
from xdit_compile.plan import Plan
from xdit_compile.runtime.reshard import slice_shard

__all__ = [
    "TABLE",
    "TXT",
    "Case",
    "R",
    "S1",
    "X",
    "aten",
    "joint_then",
    "reasons",
    "seed_each_test",
    "slices_of",
]

aten = torch.ops.aten
R = Replicate()

# --------------------------------------------------------------------------- harness


class Case:
    """A captured function, its reference values, and compilation for each rank."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self.args = args
        self.gm = capture(Fn(fn).eval(), args, {})
        self.ref = reference(self.gm, *args)

    def compile(
        self,
        seeds: dict[int, Shard],
        rank: int = 0,
        plan: Plan | None = None,
        passes: list[tuple[str, PassFn]] | None = None,
    ) -> tuple[fx.GraphModule, PassContext]:
        passes = ALL_NO_SEED if passes is None else passes
        return compile_for(self.gm, rank, passes, plan, seeds=seeds)

    def check(self, seeds: dict[int, Shard], plan: Plan | None = None) -> list[Any]:
        """Compile and run every rank; returns [(gm, ctx)] per rank."""
        plan = plan or Plan(ulysses=2)
        done, partials = [], []
        for rank in range(plan.sp_degree):
            gm, ctx = self.compile(seeds, rank, plan)
            assert not [n for n in gm.graph.nodes if n.target is redistribute]
            run = RankRun(gm, self.ref, rank, self.gm)
            outs = run.run(*self.args, enable_io_processing=False)
            assert run.checked > 0
            for got, want in zip(outs, self.ref["output"], strict=True):
                torch.testing.assert_close(got, want)
            partials.append(run.partials)
            done.append((gm, ctx))
        for name in partials[0]:
            total = sum(p[name] for p in partials)
            torch.testing.assert_close(total, self.ref[name], msg=f"partial sums of {name}")
        return done


def slices_of(gm: fx.GraphModule, name: str) -> list[fx.Node]:
    return [n for n in calls(gm, slice_shard) if n.args[0].name == name]


def reasons(ctx: PassContext) -> list[str]:
    return [b.reason for b in ctx.breaks]


S1 = Shard(1, (4, 4))  # the middle dim of an [A, 8, C] tensor, cut in two
X = torch.randn(4, 8, 6, generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def seed_each_test() -> None:
    """Every test starts from seed 0 (import it into a test module: it is autouse there)."""
    torch.manual_seed(0)


TXT = torch.randn(4, 3, 6, generator=torch.Generator().manual_seed(5))
TABLE = torch.randn(11, 6, generator=torch.Generator().manual_seed(6))  # e.g. RoPE rows


def joint_then(fn: Callable[..., Any]) -> Case:
    """Text rows joined before the sharded image rows, then ``fn`` of the joint tensor."""
    return Case(lambda t, x, tab: fn(torch.cat([t, x], 1), tab), TXT, X, TABLE)
