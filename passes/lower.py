"""lower_collectives_pass: turn placement changes into collectives and local slices.

- ``redistribute(x, S, R)`` -> ``gather_shard``: all-gather over the sequence-parallel group
  (functional collective, uneven pieces padded for the transfer and cut back after);
- ``redistribute(x, P, R)`` -> all-reduce (sum) of partial results;
- ``redistribute(x, R, S)`` -> ``slice_shard``: this rank's piece, no communication;
- ``redistribute(x, S, S')`` -> gather then slice;
- a convolution on the sharded dim (stride 1 "same", or strided with the output rows 1/stride
  of the input's) gets ``xdit::halo_pad`` in front and its padding on that dim set to 0 (the
  halo rows are exactly the rows, or the padding, one device would read);
- a ``group_norm`` over a sharded spatial dim becomes ``group_norm_sharded`` (per-rank
  statistics, one all-gather of them, each rank normalizes its rows).

Every collective is recorded with its bytes for this rank (``ctx.collectives``).

On PipeFusion's virtual ``patch`` axis the "ranks" are patches computed one after another, so
nothing can be gathered from them: local slices are lowered as above, the output's gathers are
dropped (the pipeline runtime assembles the patches' outputs), and any other collective (a
sharding break, a halo exchange, a partial sum) refuses the plan with the op and source line.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.fx as fx

from xdit_compile.passes.context import CollectiveSite, PassContext, PassResult
from xdit_compile.passes.sharding.engine import redistribute
from xdit_compile.placement import Partial, Replicate, Shard, even_split
from xdit_compile.runtime.reshard import (
    all_reduce_bytes,
    all_reduce_sum,
    gather_bytes,
    gather_shard,
    gather_text,
    group_norm_bytes,
    group_norm_sharded,
    halo_bytes,
    placed_like,
    slice_shard,
    slice_text,
)

__all__ = ["PatchRefusal", "lower_collectives_pass"]


class PatchRefusal(ValueError):
    """The model mixes tokens of different patches outside attention: PipeFusion cannot run it."""


def _refuse(
    node: fx.Node, what: str, ctx: PassContext, user: fx.Node | None = None
) -> PatchRefusal:
    """``node``: the redistribute marker (its first user is the op that needed it)."""
    from xdit_compile.passes.sharding.propagate import source_line

    user = user or next(iter(node.users), node)
    reasons = [b.reason for b in ctx.breaks if b.node == user.name]
    why = f" ({reasons[0]})" if reasons else ""
    return PatchRefusal(
        f"PipeFusion cannot cut this model into patches: {user.name} ({user.target}) needs a "
        f"{what} across the token sequence outside attention{why}, at {source_line(user)}; the "
        f"patches of a step are computed one after another, so other patches' values do not "
        f"exist yet. Use ulysses/ring or distrifusion for this model"
    )


def _new(
    gm: fx.GraphModule, before: fx.Node, fn: object, args: tuple, like: fx.Node, placement: object
) -> fx.Node:
    with gm.graph.inserting_before(before):
        n = gm.graph.call_function(fn, args)  # type: ignore[arg-type]
    n.meta.update(
        {
            k: v
            for k, v in like.meta.items()
            if k in ("val", "stack_trace", "nn_module_stack", "xdit_block")
        }
    )
    n.meta["xdit_pass"] = "lower_collectives"
    n.meta["xdit_placement"] = placement
    return n


def _gather(gm: fx.GraphModule, node: fx.Node, x: fx.Node, src: Shard, ctx: PassContext) -> fx.Node:
    r = ctx.axis_rank
    args = (x, src.dim, src.outer, src.inner, list(src.split), ctx.group, src.head, src.tail)
    new = _new(gm, node, gather_shard, args + ((r,) if src.text else ()), node, Replicate())
    val = node.meta["val"]
    row = val.numel() // src.total
    nbytes = gather_bytes(row * src.outer * src.inner, val.element_size(), list(src.split))
    if src.text and src.joint:
        nbytes += _text_bytes(src, row, val.element_size(), r)
    brk = node.meta.get("xdit_break")
    what = (
        f"sharding break at {', '.join(brk)}"
        if brk
        else "output"
        if node.meta.get("xdit_output_gather")
        else "text rows"
        if src.text
        else "regroup"
    )  # regroup: a rule asked for another cut
    ctx.collectives.append(
        CollectiveSite(new.name, "all_gather", ctx.axis, 1, nbytes, what, graph_level=True)
    )
    return new


def _text_bytes(sh: Shard, row: int, itemsize: int, rank: int) -> int:
    n = len(sh.split)
    rows = [a + b for a, b in zip(even_split(sh.head, n), even_split(sh.tail, n), strict=True)]
    return row * max(rows) * itemsize * (n - 1)  # pieces padded to the largest (some may be empty)


def _text_move(
    gm: fx.GraphModule, node: fx.Node, x: fx.Node, src: Shard, dst: Shard, ctx: PassContext
) -> fx.Node:
    """Joint rows with cut text <-> whole text: gather or cut only the text rows."""
    r, n = ctx.axis_rank, ctx.degree
    if dst.text:
        return _new(
            gm, node, slice_text, (x, src.dim, src.head, src.tail, n, r, dst.text_to), node, dst
        )
    if ctx.axis == "patch":
        raise _refuse(node, "gather of text rows", ctx)
    new = _new(gm, node, gather_text, (x, src.dim, src.head, src.tail, n, ctx.group, r), node, dst)
    val = node.meta["val"]
    nbytes = _text_bytes(src, val.numel() // src.total, val.element_size(), r)
    ctx.collectives.append(
        CollectiveSite(new.name, "all_gather", ctx.axis, 1, nbytes, "text rows", graph_level=True)
    )
    return new


def _lower_one(gm: fx.GraphModule, node: fx.Node, ctx: PassContext) -> None:
    x = node.args[0]
    assert isinstance(x, fx.Node)
    src, dst = node.meta["xdit_src"], node.meta["xdit_dst"]
    cur = x
    if ctx.axis == "patch" and isinstance(src, Shard | Partial) and dst == Replicate():
        if not node.meta.get("xdit_output_gather") or isinstance(src, Partial):
            raise _refuse(
                node, "partial sum" if isinstance(src, Partial) else "gather (sharding break)", ctx
            )
        ctx.patch_outputs[x.name] = src  # the runtime joins the patches
        node.replace_all_uses_with(x)
        gm.graph.erase_node(node)
        return
    if (
        isinstance(src, Shard)
        and isinstance(dst, Shard)
        and replace(src, text=dst.text, text_to=dst.text_to) == dst
    ):
        if src.joint:  # only the text rows change
            cur = _text_move(gm, node, x, src, dst, ctx)
        node.replace_all_uses_with(cur)  # rows of text only: the same layout
        gm.graph.erase_node(node)
        return
    if ctx.axis == "patch" and isinstance(src, Partial | Shard):
        raise _refuse(
            node, "partial sum" if isinstance(src, Partial) else "regrouping of rows", ctx
        )
    if isinstance(src, Partial):
        cur = _new(gm, node, all_reduce_sum, (cur, ctx.group), node, Replicate())
        val = node.meta["val"]
        nbytes = all_reduce_bytes(val.numel() * val.element_size(), ctx.degree)
        ctx.collectives.append(
            CollectiveSite(
                cur.name, "all_reduce", ctx.axis, 1, nbytes, "partial sum", graph_level=True
            )
        )
    if isinstance(src, Shard):
        cur = _gather(gm, node, cur, src, ctx)
    if isinstance(dst, Shard):
        r = ctx.axis_rank
        args = (cur, dst.dim, dst.outer, dst.inner, dst.offset(r), dst.split[r], dst.head, dst.tail)
        text = ((r, ctx.degree) + ((dst.text_to,) if dst.text_to >= 0 else ()),) if dst.text else ()
        cur = _new(gm, node, slice_shard, args + text, node, dst)
    outputs = ctx.patch_outputs
    if node.meta.get("xdit_output_gather") and x.name in outputs:  # a patch's output, gathered here
        outputs[cur.name] = outputs[x.name]
    node.replace_all_uses_with(cur)
    gm.graph.erase_node(node)


def _lower_halo(gm: fx.GraphModule, conv: fx.Node, ctx: PassContext) -> None:
    """``conv`` (conv1d/2d/3d) over sharded rows: ``xdit::halo_pad`` in front of it (the
    neighbours' rows its kernel reaches; zeros at the global edges) and its padding on the
    sharded dim set to 0. ``xdit_halo``: (dim, top, bottom, head, rows, input body placement),
    ``rows >= 0`` when the input carries a constant pad's zero rows (cut away first)."""
    if ctx.axis == "patch":
        raise _refuse(conv, "halo exchange (a convolution over token rows)", ctx, user=conv)
    dim, top, bottom, head, rows, body = conv.meta.pop("xdit_halo")
    x = conv.args[0]
    assert isinstance(x, fx.Node)
    new = _new(
        gm,
        conv,
        torch.ops.xdit.halo_pad.default,
        (x, dim, top, bottom, ctx.mesh.key, head, rows),
        x,
        body,
    )
    args = list(conv.args)
    nsp = len(x.meta["val"].shape) - 2
    pos = 4
    while len(args) <= pos:
        args.append([1] * nsp if len(args) == 3 else [0] * nsp)
    padding = args[pos]
    padding = [padding] * nsp if isinstance(padding, int) else list(padding)  # type: ignore[arg-type]
    padding = padding * nsp if len(padding) == 1 else padding
    padding[dim - 2] = 0
    args[pos] = padding
    args[0] = new
    conv.args = tuple(args)
    val = x.meta["val"]
    row = val.numel() // val.shape[dim]
    shifts = int(top > 0) + int(bottom > 0)
    if shifts:  # (none: only a constant pad's rows to cut away)
        ctx.collectives.append(
            CollectiveSite(
                new.name,
                "send_recv",
                "sp",
                shifts,
                halo_bytes(row, top, bottom, val.element_size()),
                "conv halo",
            )
        )


def _lower_group_norm(gm: fx.GraphModule, node: fx.Node, ctx: PassContext) -> None:
    """``aten.group_norm(x, groups, weight, bias, eps, cudnn)`` over sharded rows."""
    if ctx.axis == "patch":
        raise _refuse(
            node, "group_norm statistics (a normalization over token rows)", ctx, user=node
        )
    del node.meta["xdit_group_norm"]
    args = list(node.args) + [None] * (5 - len(node.args))
    x, groups, weight, bias = args[0], int(args[1]), args[2], args[3]  # type: ignore[arg-type]
    eps = float(args[4]) if args[4] is not None else float(node.kwargs.get("eps", 1e-5))  # type: ignore[arg-type]
    weight = node.kwargs.get("weight", weight)
    bias = node.kwargs.get("bias", bias)
    new = _new(
        gm,
        node,
        group_norm_sharded,
        (x, groups, weight, bias, eps, ctx.group, ctx.degree),
        node,
        node.meta["xdit_placement"],
    )
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    batch = int(node.meta["val"].shape[0])
    ctx.collectives.append(
        CollectiveSite(
            new.name,
            "all_gather",
            ctx.axis,
            1,
            group_norm_bytes(batch, groups, ctx.degree),
            "group_norm statistics",
            graph_level=True,
        )
    )


def _rescale_earlier_rounds(gm: fx.GraphModule, ctx: PassContext) -> None:
    """An earlier (batch) round's gathers now move this round's local pieces: scale their
    static byte counts by the fraction of the tensor this rank holds."""
    nodes = {n.name: n for n in gm.graph.nodes}
    for i, site in enumerate(ctx.collectives):
        n = nodes.get(site.node)
        p = n.meta.get("xdit_placement") if n is not None else None
        if (
            site.graph_level
            and site.axis != ctx.axis
            and isinstance(p, Shard)
            and n is not None
            and n.target is gather_shard
        ):
            scaled = site.bytes_per_forward * p.local_size(ctx.axis_rank) // p.total
            ctx.collectives[i] = replace(site, bytes_per_forward=scaled)


def lower_collectives_pass(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    _rescale_earlier_rounds(gm, ctx)
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is redistribute:
            _lower_one(gm, node, ctx)
            changed = True
        elif node.target is placed_like:  # the marker has done its work
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            changed = True
        elif "xdit_halo" in node.meta:  # the conv rule only asks this of conv1d/2d/3d
            _lower_halo(gm, node, ctx)
            changed = True
        elif "xdit_group_norm" in node.meta:
            _lower_group_norm(gm, node, ctx)
            changed = True
    return PassResult(gm, changed)
