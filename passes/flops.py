"""FLOP estimates of graphs, for reports and stage balancing.

Per node: :func:`xdit_compile.passes.ops.node_flops` (re-exported here for its callers).
"""

from __future__ import annotations

import torch.fx as fx

from xdit_compile.passes.ops import node_flops

__all__ = ["block_flops", "node_flops"]


def block_flops(gm: fx.GraphModule) -> dict[str, int]:
    """FLOPs per block (``meta["xdit_block"]``), blocks in the order they first appear."""
    out: dict[str, int] = {}
    for node in gm.graph.nodes:
        blk = node.meta.get("xdit_block")
        if blk is not None:
            out[blk] = out.get(blk, 0) + node_flops(node)
    return out
