"""The pass driver: runs an explicit, ordered list of graph passes and records what each did.

After every pass the driver lints the graph and recompiles it; with ``XDIT_DEBUG=1`` it also
runs the verifier (local shapes of the rewritten graph vs. the placements), with
``XDIT_DEBUG=final`` only after the last pass (the test suite's default: every graph checked,
at a fraction of the cost; ``1`` names the pass that broke a shape). An exception inside
a pass is re-raised naming the pass and the passes that ran before it. Every intermediate graph
is kept (``ctx.graphs``), so users can read what each pass produced.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from xdit_compile.plan import OPTIONAL_PASSES, Plan
from xdit_compile.runtime.mesh import MeshInfo

__all__ = [
    "OPTIONAL_PASSES",
    "PassContext",
    "PassResult",
    "PassStat",
    "ShardingBreak",
    "CollectiveSite",
    "run_passes",
    "op_histogram",
]

logger = logging.getLogger(__name__)

#: Passes a plan may skip by name (the others are needed for a correct result).


@dataclass(frozen=True, slots=True)
class PassResult:
    graph_module: fx.GraphModule
    modified: bool


@dataclass(frozen=True, slots=True)
class ShardingBreak:
    """An op that could not keep its inputs sharded: they were gathered (correct, slower)."""

    node: str
    op: str
    reason: str
    source: str


@dataclass(frozen=True, slots=True)
class CollectiveSite:
    """A collective in the rewritten graph, with its static cost for this rank."""

    node: str
    op: str
    axis: str
    calls: int
    bytes_per_forward: int
    what: str
    graph_level: bool = False
    """A collective the graph itself runs (counted per forward by the module), as opposed to
    one inside an op that counts itself when it runs (attention, halo exchange)."""


@dataclass(frozen=True, slots=True)
class PassStat:
    name: str
    modified: bool
    nodes_before: int
    nodes_after: int
    ops_before: dict[str, int]
    ops_after: dict[str, int]
    seconds: float


@dataclass(kw_only=True)
class PassContext:
    """Everything passes share: the plan, the mesh (as data) and what passes record."""

    plan: Plan
    mesh: MeshInfo
    example_inputs: dict[str, Any] = field(default_factory=dict)
    """Flat input name -> example value, in placeholder order."""
    group_names: dict[str, str] = field(default_factory=dict)
    """Mesh axis -> process group name (what functional collectives in the graph refer to)."""
    hints: dict[str, Any] = field(default_factory=dict)
    """Generic facts about the model the graph cannot show, e.g. ``channels`` (the config's
    ``in_channels``, which tells ``[B,C,F,H,W]`` from ``[B,F,C,H,W]``)."""
    seed: dict[str, Any] = field(default_factory=dict)
    """What the seed pass chose: input name, dim, granularity, split."""
    breaks: list[ShardingBreak] = field(default_factory=list)
    collectives: list[CollectiveSite] = field(default_factory=list)
    stats: list[PassStat] = field(default_factory=list)
    graphs: dict[str, str] = field(default_factory=dict)
    """Pass name -> printed graph after that pass (``capture`` is the input)."""
    axis: str = "sp"
    """The mesh axis the sharding passes work on now: "sp" (the sequence axes), "cfg" / "dp"
    (the batch), each propagated in a round of its own, or a virtual axis (``virtual``)."""
    virtual: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Virtual axes: name -> (degree, this graph's index), e.g. PipeFusion's ``patch`` axis
    (M patches computed one after another on the same ranks; one graph per patch)."""

    @property
    def degree(self) -> int:
        if self.axis in self.virtual:
            return self.virtual[self.axis][0]
        return self.mesh.degree(self.axis)

    @property
    def axis_rank(self) -> int:
        if self.axis in self.virtual:
            return self.virtual[self.axis][1]
        return self.mesh.axis_rank(self.axis)

    @property
    def group(self) -> str:
        """Process group name of the current axis (what graph-level collectives use)."""
        return self.group_names.get(self.axis, self.axis)


PassFn = Callable[[fx.GraphModule, PassContext], PassResult]


def op_histogram(gm: fx.GraphModule) -> dict[str, int]:
    """Count call_function targets of a graph by name."""
    hist = collections.Counter(
        _op_name(n.target) for n in gm.graph.nodes if n.op == "call_function"
    )
    return dict(sorted(hist.items()))


def _op_name(target: object) -> str:
    name = getattr(target, "__name__", None) or str(target)
    if isinstance(target, torch._ops.OpOverload):
        return str(target).replace(".default", "")
    return name


def _verify(gm: fx.GraphModule, ctx: PassContext, name: str) -> None:
    from xdit_compile.passes.verify import verify_local_shapes

    verify_local_shapes(gm, ctx, after=name)


def run_passes(
    gm: fx.GraphModule, passes: list[tuple[str, PassFn]], ctx: PassContext
) -> fx.GraphModule:
    """Run ``passes`` in order on ``gm``; returns the final GraphModule."""
    from xdit_compile.passes.flops import node_flops

    mode = os.environ.get("XDIT_DEBUG", "")
    debug = mode not in ("", "0") and ctx.hints.get("verify", True)
    last = passes[-1][0] if passes else None
    # The serial model's FLOPs, before any round cuts the batch or the sequence (what a rank's
    # share is reported against).
    ctx.hints.setdefault("serial_flops", sum(node_flops(n) for n in gm.graph.nodes))
    keep = ctx.hints.get("keep_graphs", True)  # the planner's rewrites need no text of them
    if keep:
        ctx.graphs["capture"] = gm.print_readable(print_output=False)
    done: list[str] = []
    for name, fn in passes:
        before_n, before_ops = len(gm.graph.nodes), op_histogram(gm)
        t0 = time.perf_counter()
        try:
            res = fn(gm, ctx)
            if not isinstance(res, PassResult):
                raise TypeError(f"pass returned {type(res).__name__}, expected PassResult")
            gm = res.graph_module
            gm.graph.lint()
            gm.recompile()
            if debug and (mode != "final" or name == last):
                _verify(gm, ctx, name)
        except Exception as e:
            ran = ", ".join(done) or "none"
            msg = f"xdit_compile pass '{name}' failed (passes run before it: {ran}): {e}"
            if isinstance(e, ValueError):  # a plan/input the model cannot take: keep the type
                raise type(e)(msg) from e
            raise RuntimeError(msg) from e
        dt = time.perf_counter() - t0
        ctx.stats.append(
            PassStat(name, res.modified, before_n, len(gm.graph.nodes), before_ops, op_histogram(gm), dt)
        )
        if keep:
            ctx.graphs[name] = _readable(gm)
        if res.modified:
            logger.info("pass %s: %d -> %d nodes (%.2fs)", name, before_n, len(gm.graph.nodes), dt)
        done.append(name)
    return gm


def _readable(gm: fx.GraphModule) -> str:
    """The graph's code with each node's placement and the pass that created it."""
    from xdit_compile.placement import fmt

    lines = []
    for n in gm.graph.nodes:
        tags = []
        if "xdit_placement" in n.meta:
            tags.append(fmt(n.meta["xdit_placement"]))
        if "xdit_pass" in n.meta:
            tags.append(f"<{n.meta['xdit_pass']}>")
        val = n.meta.get("val")
        shape = list(val.shape) if isinstance(val, torch.Tensor) else ""
        lines.append(f"{n.format_node()}    # {shape} {' '.join(tags)}".rstrip())
    return "\n".join(lines)
