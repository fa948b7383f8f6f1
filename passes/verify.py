"""Verifier: run the rewritten graph on fake tensors of this rank's local input shapes and
check that every node's local shape matches its placement (``XDIT_DEBUG=1`` and tests).

It catches a rule that forgot to rewrite a size or mis-tracked a dimension, without running
any collective: fake collectives only produce shapes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from xdit_compile.passes.context import PassContext
from xdit_compile.passes.fake import fake_run
from xdit_compile.passes.sharding.engine import redistribute
from xdit_compile.placement import Partial, Replicate, Shard, local_shape

__all__ = ["verify_local_shapes"]


def verify_local_shapes(gm: fx.GraphModule, ctx: PassContext, after: str = "") -> None:
    """Raise ``AssertionError`` listing nodes whose local shape disagrees with their placement."""
    if not any("xdit_placement" in n.meta for n in gm.graph.nodes):
        return
    if gm.graph.find_nodes(op="call_function", target=redistribute):
        return  # markers are not executable before lowering
    errors: list[str] = []

    def check(n: fx.Node, out: Any) -> None:
        p = n.meta.get("xdit_placement")
        glob = n.meta.get("xdit_shape")
        if isinstance(out, torch.Tensor) and glob is not None and not isinstance(p, tuple):
            want = local_shape(
                glob,
                p if isinstance(p, Replicate | Shard | Partial) else Replicate(),
                ctx.axis_rank,
            )
            if list(out.shape) != want:
                errors.append(
                    f"{n.format_node()}: local shape {list(out.shape)}, expected {want} ({p})"
                )

    fake_run(gm, on_node=check)
    if errors:
        raise AssertionError(f"local shapes wrong after {after}:\n" + "\n".join(errors[:20]))
