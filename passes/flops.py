"""FLOP estimates of graph nodes (the ops that dominate DiTs), for reports and stage balancing."""

from __future__ import annotations

import torch
import torch.fx as fx

__all__ = ["block_flops", "node_flops"]

aten = torch.ops.aten


def node_flops(node: fx.Node) -> int:
    """Global FLOPs of one node (multiply-add = 2) for the ops that dominate DiTs."""
    val = node.meta.get("val")
    if node.target is torch.ops.higher_order.flex_attention:  # (out, logsumexp, ...)
        q, k = node.args[0].meta["val"], node.args[1].meta["val"]  # type: ignore[union-attr]
        return 4 * int(q.numel()) * int(k.shape[-2])
    if not isinstance(val, torch.Tensor):
        return 0
    packet = getattr(node.target, "overloadpacket", None)
    name = str(node.target)
    if packet is aten.linear:
        return 2 * val.numel() * int(node.args[1].meta["val"].shape[-1])  # type: ignore[union-attr]
    if packet in (aten.matmul, aten.bmm, aten.mm):
        return 2 * val.numel() * int(node.args[0].meta["val"].shape[-1])  # type: ignore[union-attr]
    if packet in (aten.conv2d, aten.conv3d, aten.conv1d):
        w = node.args[1].meta["val"]  # type: ignore[union-attr]
        return 2 * val.numel() * int(w[0].numel())
    if packet is aten.scaled_dot_product_attention or name.endswith("_attention.default"):
        q, k = node.args[0].meta["val"], node.args[1].meta["val"]  # type: ignore[union-attr]
        return 4 * int(q.numel()) * int(k.shape[-2])
    return 0


def block_flops(gm: fx.GraphModule) -> dict[str, int]:
    """FLOPs per block (``meta["xdit_block"]``), blocks in the order they first appear."""
    out: dict[str, int] = {}
    for node in gm.graph.nodes:
        blk = node.meta.get("xdit_block")
        if blk is not None:
            out[blk] = out.get(blk, 0) + node_flops(node)
    return out
