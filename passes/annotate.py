"""annotate_graph_pass: record each node's global shape and owning block.

``meta["xdit_shape"]`` is the global (unsharded) shape, kept for reports after later passes
make the graph rank-local. ``meta["xdit_block"]`` is the outermost numbered module that
produced the node (``transformer_blocks.7`` for ``transformer_blocks.7.attn1.to_q``), the unit
pipeline stages cut on. Metadata only:
the graph's meaning is unchanged.
"""

from __future__ import annotations

import re

import torch
import torch.fx as fx

from xdit_compile.passes.context import PassContext, PassResult

__all__ = ["annotate_graph_pass", "block_of"]


def block_of(node: fx.Node) -> str | None:
    """Fully qualified name of the outermost ``<list>.<index>`` module of ``node``, if any."""
    stack = node.meta.get("nn_module_stack") or {}
    best = None
    for fqn, _ in stack.values():
        fqn = fqn.replace("L['self'].", "").replace("L__self___", "")
        m = re.match(r"^(.*?\.\d+)(?:\.|$)", fqn)
        if m:
            best = m.group(1)
    return best


def _data_dependent(node: fx.Node) -> ValueError:
    from xdit_compile.passes.sharding.propagate import source_line

    return ValueError(
        f"{node.name} ({node.target}) has a data-dependent shape {list(node.meta['val'].shape)}, "
        f"at {source_line(node)}; the sharding passes need static shapes: run them through "
        f"ParallelModule, which specializes such sizes to the inputs' values "
        f"(xdit_compile.compiler.specialize)"
    )


def annotate_graph_pass(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            if not all(isinstance(s, int) for s in val.shape):
                raise _data_dependent(node)
            node.meta["xdit_shape"] = tuple(int(s) for s in val.shape)
        blk = block_of(node)
        if blk is not None:
            node.meta["xdit_block"] = blk
    return PassResult(gm, False)
