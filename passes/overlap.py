"""overlap_collectives_pass: start each graph-level collective early, wait for it late.

The ``lower`` pass inserts each all-gather / all-reduce where its result is first needed, as
one call that starts the collective and waits for it. This pass splits every such call into a
start (:data:`~xdit_compile.runtime.reshard.SPLIT`: packs the local piece and launches the
functional collective, no wait) placed right after the node that produces its input, and a
finish (waits, then cuts the received buffer to the global tensor) placed just before the
first node that uses the result. Whatever the graph computes in between (in Flux's single
blocks: the MLP input projection and Q, while the text rows for K and V are gathered) runs
while the collective is in flight: on GPUs the collective runs on its own stream, on gloo in
its own thread. Under ``compile="inductor"`` the functional collectives keep this order for
inductor's own scheduling.

Collectives start in the same order on every rank (the graphs of the ranks have the same
structure, and this pass only moves nodes by that structure), so no rank waits on a collective
another rank has not started. Bytes are unchanged: the recorded collective site moves to the
start node.
"""

from __future__ import annotations

from dataclasses import replace

import torch.fx as fx

from xdit_compile.passes.context import PassContext, PassResult
from xdit_compile.runtime.opargs import op_args
from xdit_compile.runtime.reshard import SPLIT, gather_shard

__all__ = ["overlap_collectives_pass"]


def overlap_collectives_pass(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    sites = {s.node: i for i, s in enumerate(ctx.collectives)}
    moved = 0
    # Node positions, kept up to date as starts and finishes are inserted (each gets the
    # midpoint of its neighbours), so the graph is numbered once, not once per collective.
    order = {n: float(i) for i, n in enumerate(gm.graph.nodes)}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in SPLIT or node.kwargs or not node.users:
            continue
        start_fn, finish_fn, k, full = SPLIT[node.target]
        if node.target is gather_shard and (op_args(node)["head"] or op_args(node)["tail"]):
            continue  # text rows around the body: two gathers in one call, kept as it is
        deps = [a for a in node.args[:k] if isinstance(a, fx.Node)]
        anchor = max(deps, key=order.__getitem__)
        if anchor.op == "placeholder":  # after every placeholder: they are the signature
            anchor = max(gm.graph.find_nodes(op="placeholder"), key=order.__getitem__)
        first_use = min(node.users, key=order.__getitem__)
        with gm.graph.inserting_after(anchor):
            start = gm.graph.call_function(start_fn, tuple(node.args[:k]))  # type: ignore[arg-type]
        order[start] = (order[anchor] + order[start.next]) / 2
        with gm.graph.inserting_before(first_use):
            finish = gm.graph.call_function(
                finish_fn, (start, *node.args[:k]) if full else (start,)
            )  # type: ignore[arg-type]
        order[finish] = (order[finish.prev] + order[first_use]) / 2
        for key in ("stack_trace", "nn_module_stack", "xdit_block"):
            if key in node.meta:
                start.meta[key] = node.meta[key]
        start.meta["xdit_pass"] = "overlap_collectives"
        finish.meta.update(node.meta)
        finish.meta["xdit_pass"] = "overlap_collectives"
        node.replace_all_uses_with(finish)
        gm.graph.erase_node(node)
        if node.name in sites:
            i = sites[node.name]
            ctx.collectives[i] = replace(ctx.collectives[i], node=start.name)
        moved += 1
    if moved:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, bool(moved))
