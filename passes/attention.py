"""rewrite_attention_pass: replace sequence-sharded SDPA with exact parallel attention.

For every ``aten.scaled_dot_product_attention`` whose placements the sharding rule marked
``usp`` (Q, K, V sharded on the sequence dim), the node becomes ``xdit::usp_attention``:
Ulysses all-to-all over the ``ulysses`` axis, Ring K/V passing with log-sum-exp merging over
the ``ring`` axis, or both. Attention the rule marked ``local`` (replicated K/V, or a shard on
a batch-like dim) is left as plain SDPA: every rank has all the keys its queries need.

Before::   %o = scaled_dot_product_attention(%q, %k, %v)          # S(2/4)
After::    %o = xdit.usp_attention(%q, %k, %v, None, None, 'mesh0_r2u2', [16, 16, 16, 16], 0, 0)

Joint sequences (``Shard(head=a, tail=b)``: replicated text rows joined to sharded image rows)
keep their text K/V local: Ulysses slices their heads on each rank, Ring attends to them once.

The op computes softmax(QK^T)V over the whole global sequence, so the meaning is unchanged.

Under DistriFusion (``Plan(distrifusion=N)``) the same attention nodes become
``xdit::distrifusion_attention`` instead: this rank's K/V fresh, the other ranks' from the previous
step (see :mod:`xdit_compile.runtime.displaced`): the meaning changes exactly that way after the
warmup steps.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from xdit_compile.passes.context import CollectiveSite, PassContext, PassResult
from xdit_compile.passes.rewrite import replace_node
from xdit_compile.placement import even_split
from xdit_compile.runtime import attention as _rt_attention  # noqa: F401  (registers xdit ops)
from xdit_compile.runtime.attention import ulysses_heads, usp_comm_bytes
from xdit_compile.runtime.displaced import distrifusion_comm_bytes
from xdit_compile.runtime.mesh import MeshInfo

__all__ = ["expand_gqa", "rewrite_attention_pass"]

aten = torch.ops.aten


def _arg(node: fx.Node, i: int, name: str, default: object) -> object:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _repeat_heads(gm: fx.GraphModule, node: fx.Node, kv: fx.Node, groups: int) -> fx.Node:
    with gm.graph.inserting_before(node):
        rep = gm.graph.call_function(aten.repeat_interleave.self_int, (kv, groups, -3))
    rep.meta.update(kv.meta)  # same placement: the head dim is never the sharded one here
    val = kv.meta["val"].repeat_interleave(groups, dim=-3)
    rep.meta["val"] = val
    if "xdit_shape" in kv.meta:
        shape = list(kv.meta["xdit_shape"])
        shape[-3] *= groups
        rep.meta["xdit_shape"] = tuple(shape)
    rep.meta["xdit_pass"] = "expand_gqa"
    return rep


def expand_gqa(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, fx.Node]:
    """K and V of SDPA ``node`` with as many heads as Q.

    ``enable_gqa=True`` lets K/V have fewer heads than Q (each K/V head serves a group of query
    heads). The parallel attention ops take equal heads, so under GQA each K/V head is repeated
    for its group first (``repeat_interleave`` on the head dim, as SDPA pairs them): the same
    attention, with K/V sent at the query's head count.
    """
    q, k, v = node.args[:3]
    if not _arg(node, 7, "enable_gqa", False):
        return k, v  # type: ignore[return-value]
    hq, hk = int(q.meta["val"].shape[-3]), int(k.meta["val"].shape[-3])  # type: ignore[union-attr]
    if hq == hk:
        return k, v  # type: ignore[return-value]
    if hq % hk:
        raise ValueError(f"{node.name}: enable_gqa with {hq} query heads and {hk} K/V heads")
    return _repeat_heads(gm, node, k, hq // hk), _repeat_heads(gm, node, v, hq // hk)  # type: ignore[arg-type]


def rewrite_attention_pass(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    changed = False
    for node in list(gm.graph.nodes):
        if node.target is not aten.scaled_dot_product_attention.default:
            continue
        if node.meta.get("xdit_attention") != "usp":
            continue
        q = node.args[0]
        k, v = expand_gqa(gm, node)
        mask = _arg(node, 3, "attn_mask", None)
        if _arg(node, 4, "dropout_p", 0.0):
            raise ValueError(
                f"{node.name}: attention dropout > 0 is not supported (inference only)"
            )
        scale = _arg(node, 6, "scale", None)
        split = list(node.meta["xdit_split"])
        head, tail = node.meta.get("xdit_joint", (0, 0))
        if ctx.mesh.distrifusion > 1:
            _distrifusion(gm, node, ctx, (q, k, v, mask, scale), split, head, tail)
            changed = True
            continue
        shard_text = bool(node.meta.get("xdit_shard_text", False))
        q_cut = bool(node.meta.get("xdit_q_text_cut", False))
        kv_split: list[int] | None = None
        kwargs: dict[str, object] = {"text_rank": ctx.mesh.sp_rank} if shard_text else {}
        if q_cut:
            kwargs["q_cut"] = True
        if (
            "xdit_kv" in node.meta
        ):  # K/V in a layout of their own (e.g. image queries, image + text keys)
            rows, kv_head, kv_tail = node.meta["xdit_kv"]
            kv_split = list(rows)
            kwargs.update(kv_split=kv_split, kv_head=kv_head, kv_tail=kv_tail)
        u_eff = int(node.meta.get("xdit_ulysses", -1))  # fewer heads than the ulysses degree
        if u_eff > 0:
            kwargs["ulysses"] = u_eff
        # xdit_origin: the captured SDPA it replaces (tests compare with it)
        new = replace_node(
            gm,
            node,
            torch.ops.xdit.usp_attention.default,
            (q, k, v, mask, scale, ctx.mesh.key, split, head, tail),
            kwargs,
            xdit_origin=node.name,
        )
        qv, vv = q.meta["val"], v.meta["val"]  # type: ignore[union-attr]
        new.meta["xdit_work"] = _work_share(
            ctx.mesh, int(qv.shape[-3]), split, head + tail, shard_text, u_eff
        )
        local_q = list(qv.shape)
        local_q[-2] = split[ctx.mesh.sp_rank]  # body rows (text rows are counted apart)
        for (op, axis), (calls, nbytes) in usp_comm_bytes(
            tuple(local_q),
            int(vv.shape[-1]),
            qv.element_size(),
            ctx.mesh,
            split,
            (head, tail),
            shard_text,
            q_cut,
            kv_split,
            u_eff,
        ).items():
            ctx.collectives.append(
                CollectiveSite(new.name, op, axis, calls, nbytes, "usp_attention")
            )
        changed = True
    return PassResult(gm, changed)


def _work_share(
    info: MeshInfo, heads: int, split: list[int], text: int, shard_text: bool, ulysses: int
) -> float:
    """This rank's share of the attention's FLOPs: its heads (dealt unevenly where the degree
    does not divide them) of its Ulysses group's query rows (with its text query rows), over
    all keys. The first ranks get the extra heads and rows: rank 0 is the slowest, and the cost
    model accounts it."""
    lo, hi = ulysses_heads(info, heads, ulysses)
    u = info.ulysses if ulysses <= 0 else ulysses
    first = (info.sp_rank // u) * u
    n = len(split)
    q_text = sum(even_split(text, n)[first : first + u]) if shard_text else text
    return (hi - lo) / heads * (sum(split[first : first + u]) + q_text) / (sum(split) + text)


def _distrifusion(
    gm: fx.GraphModule,
    node: fx.Node,
    ctx: PassContext,
    qkv: tuple,
    split: list[int],
    head: int,
    tail: int,
) -> None:
    """SDPA -> ``xdit::distrifusion_attention`` (text rows are whole on every rank here)."""
    if node.meta.get("xdit_shard_text"):
        raise RuntimeError(f"{node.name}: DistriFusion keeps text rows whole (shard_text_rows off)")
    state = ctx.facts.state_key
    kv_rows, kv_head, kv_tail = node.meta.get("xdit_kv", (split, head, tail))
    assert list(kv_rows) == split, (
        "the sharding rule keeps displaced K/V rows cut like the queries'"
    )
    new = replace_node(
        gm,
        node,
        torch.ops.xdit.distrifusion_attention.default,
        (*qkv, state, node.name, ctx.mesh.key, split, head, tail),
        {"kv_head": kv_head, "kv_tail": kv_tail} if "xdit_kv" in node.meta else {},
        xdit_displaced=node.name,
    )
    k, v = qkv[1].meta["val"], qkv[2].meta["val"]
    nbytes = distrifusion_comm_bytes(tuple(k.shape), int(v.shape[-1]), k.element_size(), split)
    ctx.collectives.append(
        CollectiveSite(new.name, "all_gather", "distrifusion", 1, nbytes, "displaced K/V")
    )
