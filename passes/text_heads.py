"""text_heads_pass: under Ulysses, project only this rank's heads of joint attention's text K/V.

Joint attention (text rows replicated on every rank, image rows sharded) keeps text K/V on every
rank and never sends them: each rank's Ulysses attention reads the text rows of K and V for its
own heads only (``runtime/attention.py``). A separate text projection (``add_k_proj`` /
``add_v_proj`` of Flux, SD3, HunyuanVideo, Qwen-Image...) still computes every head, so each
rank does ``(U - 1) / U`` of that matmul for nothing.

This pass finds, for the K and V inputs of every ``usp_attention`` with text rows and
``ulysses > 1`` (and Q, where its text rows are on every rank), a replicated ``linear`` whose
output reaches the attention only as those text rows, through ops that keep rows and heads in
place: the view that splits features into ``(heads, head_dim)``, norms over the head dim,
pointwise ops (RoPE's multiply-adds, casts), permutes and transposes, ``unbind``/``stack`` of
the last dims, and the one ``cat`` along the sequence that puts the text in front of (or
behind) the image rows. Every value derived from that linear
must flow only there (checked forwards). The linear then multiplies only this rank's rows of
the weight (``W[h0*D:h1*D]``, a view) and the other heads' features are zeros
(``constant_pad_nd``): values the attention never reads. Exact: the heads it reads are computed
as before, with the same weights and inputs.

The joint projections of single-stream blocks (text and image rows through one linear) are left
alone: there the image rows need every head.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from xdit_compile.passes.context import PassContext, PassResult
from xdit_compile.passes.ops import COMPLEX_VIEWS, NORMS, POINTWISE, REDUCTIONS, RESHAPES, packet
from xdit_compile.passes.sharding.rules_shape import schema_arg
from xdit_compile.placement import Replicate
from xdit_compile.runtime import attention as _attention  # noqa: F401  (registers xdit::usp_attention)
from xdit_compile.runtime.attention import ulysses_heads
from xdit_compile.runtime.opargs import op_args

__all__ = ["text_heads_pass"]

aten = torch.ops.aten
_USP = torch.ops.xdit.usp_attention.default
#: Pointwise ops, and ``type_as`` (a cast to another tensor's dtype): elements stay in place.
_POINTWISE = POINTWISE | {aten.type_as}


class _Abort(Exception):
    pass


def _shape(n: Any) -> tuple[int, ...]:
    val = n.meta.get("val") if isinstance(n, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        raise _Abort
    return tuple(int(s) for s in val.shape)


class _Walk:
    """Backwards from an attention input: the nodes between it and the text linears."""

    def __init__(self, head: int, tail: int) -> None:
        self.head, self.tail = head, tail
        self.nodes: set[fx.Node] = set()
        self.linears: dict[fx.Node, int] = {}  # linear -> head_dim
        self.cats = 0
        self.edges: set[tuple[fx.Node, fx.Node]] = set()
        """(input, user) pairs the walk went through: the only ways the linears' values may flow."""
        self._seen: set[tuple[fx.Node, Any, Any]] = set()

    def visit(self, n: fx.Node, hd: int | None, sd: int, head_dim: int | None = None) -> None:
        """``hd``: the head dim of ``n`` (None: features not yet split, ``head_dim`` wide);
        ``sd``: its sequence dim."""
        key = (n, hd, sd)
        if key in self._seen:
            return
        self._seen.add(key)
        self.nodes.add(n)
        if n.op != "call_function":
            raise _Abort
        out = _shape(n)
        pk = packet(n.target)
        args: Any = n.args
        if hd is None:  # features [..., S, H*D]: only the linear that makes them
            if (
                pk is aten.linear
                and isinstance(n.meta.get("xdit_placement"), Replicate)
                and head_dim
                and sd == len(out) - 2
            ):
                self.linears[n] = head_dim
                return
            raise _Abort
        if pk is aten.permute:
            perm = [p % len(out) for p in args[1]]  # type: ignore[union-attr]
            self._in(n, args[0], perm[hd], perm[sd])  # type: ignore[arg-type]
        elif pk is aten.transpose:
            a, b = (int(d) % len(out) for d in args[1:3])  # type: ignore[arg-type]
            swap = {a: b, b: a}
            self._in(n, args[0], swap.get(hd, hd), swap.get(sd, sd))
        elif pk in RESHAPES or pk in COMPLEX_VIEWS:  # (complex RoPE's views reshape the last dim)
            src = _shape(args[0])
            if src[: hd + 1] == out[: hd + 1]:  # only dims after the heads change
                self._in(n, args[0], hd, sd)  # type: ignore[arg-type]
            elif hd == len(out) - 2 and src[:-1] == out[:-2] and src[-1] == out[-2] * out[-1]:
                self._in(n, args[0], None, sd, out[-1])  # type: ignore[arg-type]  # features -> (H, D)
            else:
                raise _Abort
        elif pk in NORMS:
            if len(args[1]) > len(out) - hd - 1:  # type: ignore[arg-type]
                raise _Abort  # normalizes across heads
            self._in(n, args[0], hd, sd)  # type: ignore[arg-type]
        elif pk is aten.cat:
            dim = (args[1] if len(args) > 1 else 0) % len(out)  # type: ignore[operator]
            parts = list(args[0])  # type: ignore[arg-type]
            if dim != sd or self.cats:
                raise _Abort
            self.cats += 1
            if self.head and _shape(parts[0])[sd] == self.head:
                self._in(n, parts[0], hd, sd)
            if self.tail and _shape(parts[-1])[sd] == self.tail:
                self._in(n, parts[-1], hd, sd)
        elif n.target is operator.getitem:
            src = args[0]
            if not (isinstance(src, fx.Node) and packet(src.target) is aten.unbind):
                raise _Abort
            self.nodes.add(src)
            self.edges.add((src, n))
            udim = (src.args[1] if len(src.args) > 1 else 0) % (len(out) + 1)  # type: ignore[operator]
            if udim <= hd:
                raise _Abort
            self._in(src, src.args[0], hd, sd)  # type: ignore[arg-type]
        elif pk is aten.stack:
            sdim = (args[1] if len(args) > 1 else 0) % len(out)  # type: ignore[operator]
            if sdim <= hd:
                raise _Abort
            for a in args[0]:  # type: ignore[union-attr]
                self._in(n, a, hd, sd)
        elif pk in REDUCTIONS:
            dims, keep = schema_arg(n, "dim"), bool(schema_arg(n, "keepdim", False))
            if (
                not keep
                or not isinstance(dims, list | tuple)
                or any(int(d) % len(out) <= hd for d in dims)
            ):
                raise _Abort
            self._in(n, args[0], hd, sd)
        elif pk in _POINTWISE:
            for a in args:
                if not isinstance(a, fx.Node):
                    continue
                sa, lead = _shape(a), len(out) - len(_shape(a))
                covers = [d - lead >= 0 and sa[d - lead] == out[d] for d in (hd, sd)]
                if all(covers):  # carries rows and heads: on the path
                    self._in(n, a, hd - lead, sd - lead)
                # else a table broadcast over rows or heads (RoPE's cos/sin, eps): off the path;
                # should it derive from the linears after all, _closed refuses the walk
        else:
            raise _Abort

    def _in(
        self, user: fx.Node, a: Any, hd: int | None, sd: int, head_dim: int | None = None
    ) -> None:
        if not isinstance(a, fx.Node):
            raise _Abort
        self.edges.add((a, user))
        self.visit(a, hd, sd, head_dim)


def _closed(walk: _Walk, root: fx.Node, usp: fx.Node) -> bool:
    """Every value derived from the linears flows only through the walked nodes into ``usp``
    as ``root`` (its K or V), the cat's other pieces aside."""
    reach: set[fx.Node] = set()
    todo = list(walk.linears)
    while todo:
        n = todo.pop()
        if n in reach:
            continue
        reach.add(n)
        for u in n.users:
            if u is usp:
                if n is not root or sum(a is root for a in usp.args) != 1:
                    return False
            elif (n, u) not in walk.edges:  # e.g. the image piece of the cat, a broadcast operand
                return False
            else:
                todo.append(u)
    return root in reach


def _localize(gm: fx.GraphModule, lin: fx.Node, head_dim: int, h_rng: tuple[int, int]) -> None:
    x, w = lin.args[0], lin.args[1]
    b = lin.args[2] if len(lin.args) > 2 else None
    out = lin.meta["val"]
    width = int(out.shape[-1])
    s, e = h_rng[0] * head_dim, h_rng[1] * head_dim
    with gm.graph.inserting_before(lin):
        w_loc = gm.graph.call_function(aten.slice.Tensor, (w, 0, s, e))
        b_loc = (
            gm.graph.call_function(aten.slice.Tensor, (b, 0, s, e))
            if isinstance(b, fx.Node)
            else None
        )
        new = gm.graph.call_function(aten.linear.default, (x, w_loc, b_loc))
        pad = gm.graph.call_function(aten.constant_pad_nd.default, (new, [s, width - e], 0.0))
    wv = w.meta["val"]  # type: ignore[union-attr]
    vals = {
        w_loc: wv.new_empty((e - s, *wv.shape[1:])),
        new: out.new_empty((*out.shape[:-1], e - s)),
        pad: out,
    }
    if b_loc is not None:
        vals[b_loc] = b.meta["val"].new_empty((e - s,))  # type: ignore[union-attr]
    for n, v in vals.items():
        n.meta.update(
            {
                k: lin.meta[k]
                for k in ("stack_trace", "nn_module_stack", "xdit_block")
                if k in lin.meta
            }
        )
        n.meta["val"] = v
        n.meta["xdit_placement"] = Replicate()
        n.meta["xdit_pass"] = "text_heads"
    pad.meta["xdit_local_heads"] = h_rng  # the other heads' features are zeros
    lin.replace_all_uses_with(pad)
    gm.graph.erase_node(lin)


def text_heads_pass(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    u = ctx.mesh.ulysses
    done = 0
    if u > 1:
        for usp in list(gm.graph.find_nodes(op="call_function", target=_USP)):
            a = op_args(usp)
            q_text = (int(a["head"]), int(a["tail"]))
            kv_text = (
                (int(a["kv_head"]), int(a["kv_tail"])) if a["kv_split"] is not None else q_text
            )
            heads = int(a["q"].meta["val"].shape[-3])
            h_rng = ulysses_heads(ctx.mesh, heads, int(a["ulysses"]))  # as the op deals them
            if h_rng == (0, heads):  # Ring only (one head, say): every rank reads every head
                continue
            # Q's text rows too, where they are on every rank (not cut: then they travel with the
            # image rows and need every head).
            roots = [(a["k"], kv_text), (a["v"], kv_text)] + (
                [] if a["q_cut"] else [(a["q"], q_text)]
            )
            for root, (head, tail) in roots:
                if not (head or tail):
                    continue
                walk = _Walk(head, tail)
                try:
                    if not isinstance(root, fx.Node) or _shape(root)[-3] != heads:
                        continue  # GQA K/V (fewer heads): left as they are
                    nd = len(_shape(root))
                    walk.visit(root, nd - 3, nd - 2)
                except _Abort:
                    continue
                if walk.cats != 1 or not walk.linears or not _closed(walk, root, usp):
                    continue
                for lin, head_dim in walk.linears.items():
                    _localize(gm, lin, head_dim, h_rng)
                    done += 1
    if done:
        gm.graph.lint()
        gm.recompile()
    ctx.text_heads_localized = done
    return PassResult(gm, bool(done))
