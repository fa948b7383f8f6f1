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
from collections.abc import Sequence

import torch
import torch.fx as fx

from xdit_compile.passes.context import Pass, PassContext, PassFn, PassResult, PassStat
from xdit_compile.passes.flops import node_flops
from xdit_compile.passes.verify import verify_local_shapes
from xdit_compile.placement import fmt

__all__ = ["PassError", "op_histogram", "run_passes"]

logger = logging.getLogger(__name__)


class PassError(RuntimeError):
    """A pass failed: which one, the passes that ran before it, and the error it raised
    (``cause``, also ``__cause__``). Callers decide by the cause's type, never by the message."""

    def __init__(self, name: str, ran_before: list[str], cause: BaseException) -> None:
        self.pass_name, self.ran_before, self.cause = name, list(ran_before), cause
        ran = ", ".join(ran_before) or "none"
        super().__init__(
            f"xdit_compile pass '{name}' failed (passes run before it: {ran}): {cause}"
        )


class PassValueError(PassError, ValueError):
    """A pass refused a plan or input the model cannot take (its cause is a ``ValueError``)."""


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


def run_passes(
    gm: fx.GraphModule,
    passes: Sequence[Pass | tuple[str, PassFn]],
    ctx: PassContext,
    *,
    verify: bool = True,
    keep_graphs: bool = True,
) -> fx.GraphModule:
    """Run ``passes`` in order on ``gm``; returns the final GraphModule.

    Before each pass the driver sets ``ctx.axis`` to the pass's axis; after it, nodes the pass
    created are stamped ``meta["xdit_pass"]`` with its name (unless the pass named them more
    precisely). ``verify=False`` skips ``XDIT_DEBUG``'s shape verifier (graphs that never run:
    the planner's); ``keep_graphs=False`` keeps no printed graphs.
    """
    specs = [p if isinstance(p, Pass) else Pass(*p) for p in passes]
    mode = os.environ.get("XDIT_DEBUG", "")
    debug = mode not in ("", "0") and verify
    last = specs[-1].name if specs else None
    if ctx.serial_flops is None:  # before any round cuts the batch or the sequence
        ctx.serial_flops = sum(node_flops(n) for n in gm.graph.nodes)
    if keep_graphs:
        ctx.graphs["capture"] = gm.print_readable(print_output=False)
    done: list[str] = []
    for spec in specs:
        gm, res, before_n, before_ops, dt = _run_one(
            gm, spec, ctx, done, debug and (mode != "final" or spec.name == last)
        )
        ctx.stats.append(
            PassStat(
                spec.name,
                res.modified,
                before_n,
                len(gm.graph.nodes),
                before_ops,
                op_histogram(gm),
                dt,
            )
        )
        if keep_graphs:
            ctx.graphs[spec.name] = _readable(gm)
        if res.modified:
            logger.info(
                "pass %s: %d -> %d nodes (%.2fs)", spec.name, before_n, len(gm.graph.nodes), dt
            )
        done.append(spec.name)
    return gm


def _run_one(
    gm: fx.GraphModule, spec: Pass, ctx: PassContext, done: list[str], verify: bool
) -> tuple[fx.GraphModule, PassResult, int, dict[str, int], float]:
    before_n, before_ops = len(gm.graph.nodes), op_histogram(gm)
    old = set(gm.graph.nodes)
    t0 = time.perf_counter()
    ctx.axis = spec.axis
    try:
        res = spec.fn(gm, ctx)
        if not isinstance(res, PassResult):
            raise TypeError(f"pass returned {type(res).__name__}, expected PassResult")
        gm = res.graph_module
        for n in gm.graph.nodes:
            if n not in old:
                n.meta.setdefault("xdit_pass", spec.name)
        gm.graph.lint()
        gm.recompile()
        if verify:
            verify_local_shapes(gm, ctx, after=spec.name)
    except Exception as e:
        cls = PassValueError if isinstance(e, ValueError) else PassError
        raise cls(spec.name, done, e) from e
    return gm, res, before_n, before_ops, time.perf_counter() - t0


def _readable(gm: fx.GraphModule) -> str:
    """The graph's code with each node's placement and the pass that created it."""
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
