"""Per-rank shares of a rewritten graph: how much of each value and of the FLOPs a rank holds.

The report (``explain``) and the planner's accounting both read these, from the placements the
sharding passes left on the nodes.
"""

from __future__ import annotations

import torch.fx as fx

from xdit_compile.passes.flops import node_flops
from xdit_compile.placement import Shard

__all__ = ["estimate_flops", "local_fraction"]


def local_fraction(node: fx.Node, rank: int) -> float:
    """The share of ``node``'s (global) value that ``rank`` holds under its placement (for
    parallel attention, of its work: ``meta["xdit_work"]``, set for the graph's own rank)."""
    if "xdit_work" in node.meta:
        return float(node.meta["xdit_work"])
    p = node.meta.get("xdit_placement")
    if isinstance(p, tuple) and p:  # several outputs (flex attention: its output first)
        p = p[0]
    if isinstance(p, Shard):
        return p.local_size(rank) / p.total
    return 1.0


def estimate_flops(gm: fx.GraphModule, rank: int) -> tuple[int, int]:
    """(FLOPs on ``rank``, serial FLOPs) estimated from global shapes and placements."""
    local = serial = 0
    for node in gm.graph.nodes:
        f = node_flops(node)
        serial += f
        local += int(f * local_fraction(node, rank))
    return local, serial
