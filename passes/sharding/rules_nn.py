"""Op rules for linear/matmul, normalization, convolution and attention.

- linear / matmul keep a shard on any non-contracted dim of the sharded operand.
- norms keep a shard on any dim they do not normalize over; group_norm over a sharded spatial
  dim keeps it too, by combining per-rank statistics (``group_norm_sharded``).
- convolution: a patch embedding (kernel == stride, no padding) divides the shard by the
  stride; other convolutions whose output rows are 1/stride of the input's ("same" stride 1,
  a VAE's stride-2 downsampling) keep it through a halo exchange of the neighbouring rows
  (``xdit::halo_pad``), so no gather is needed.
- scaled_dot_product_attention: Q/K/V sharded on the sequence -> exact parallel attention
  (replaced by the ``rewrite_attention`` pass); K/V replicated (cross-attention) or a shard
  on a batch dim (e.g. Latte's temporal attention) -> plain local attention.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.fx as fx

from xdit_compile.passes.ops import GROUP_NORMS, NORMS, packet
from xdit_compile.passes.sharding.engine import (
    Break,
    Decision,
    RuleCtx,
    ops,
    register_rule,
    tensor_args,
)
from xdit_compile.passes.sharding.rules_shape import align_inputs
from xdit_compile.placement import Partial, Placement, Replicate, Shard
from xdit_compile.runtime.attention import head_groups, ulysses_degree
from xdit_compile.runtime.reshard import placed_like

aten = torch.ops.aten
R = Replicate()

__all__ = ["conv_params"]


@register_rule(*ops("linear"))
def _linear(node: fx.Node, rc: RuleCtx) -> Decision:
    x, w = node.args[0], node.args[1]
    sh = rc.spec(x)
    if not isinstance(sh, Shard) or not isinstance(rc.spec(w), Replicate):
        raise Break("weight is sharded")
    if sh.dim == len(rc.shape(x)) - 1:
        raise Break("linear contracts the sharded dim")
    if len(node.args) > 2 and not isinstance(rc.spec(node.args[2]), Replicate):
        raise Break("bias is sharded")
    if sh.text and sh.text_to < 0 and node in rc.options.get("attention_projections", ()):
        # This linear makes an attention's K/V: gather its text rows first, so the text K/V
        # are computed on every rank and attention never sends them.
        want: Placement = replace(sh, text=False) if sh.joint else R
        return Decision(out=want, inputs={x: want})  # type: ignore[dict-item]
    return Decision(out=sh)


@register_rule(*ops("embedding"))
def _embedding(node: fx.Node, rc: RuleCtx) -> Decision:
    """``embedding(weight, indices)``: a lookup per index, so the output keeps the indices'
    shard (class labels or style ids cut with the batch)."""
    w, idx = node.args[0], node.args[1]
    p = rc.spec(idx)
    if not isinstance(rc.spec(w), Replicate) or not isinstance(p, Shard):
        raise Break("embedding table is sharded")
    return Decision(out=p)


@register_rule(*ops("matmul", "bmm", "mm", "baddbmm", "addmm"))
def _matmul(node: fx.Node, rc: RuleCtx) -> Decision:
    pk = packet(node.target)
    if pk not in (aten.baddbmm, aten.addmm):
        return _matmul_product(node, rc, 0)
    # ``bias + a @ b``: the product's rule, then the bias (broadcast to the output) cut like
    # the output where it is full-size on the sharded dim.
    bias = node.args[0]
    if not isinstance(rc.spec(bias), Replicate):
        raise Break("matmul bias is sharded")
    d = _matmul_product(node, rc, 1)
    if isinstance(d.out, Partial):
        raise Break("contracting the sharded dim under a bias (addmm/baddbmm)")
    out_shape = rc.shape(node)
    if isinstance(d.out, Shard) and isinstance(bias, fx.Node):
        bshape = rc.shape(bias)
        bd = d.out.dim - (len(out_shape) - len(bshape))
        if bd >= 0 and bshape[bd] == out_shape[d.out.dim] and bshape[bd] > 1:
            d.inputs[bias] = d.out.with_dim(bd)
    return d


def _matmul_product(node: fx.Node, rc: RuleCtx, off: int) -> Decision:
    a, b = node.args[off], node.args[off + 1]
    pa, pb = rc.spec(a), rc.spec(b)
    na, nb = len(rc.shape(a)), len(rc.shape(b))
    out_nd = len(rc.shape(node))
    if isinstance(pa, Shard) and isinstance(pb, Replicate):
        if pa.dim == na - 1 or (na == 1):
            raise Break("matmul contracts the sharded dim")
        if pa.dim < na - 2 and nb > 2:
            raise Break("batch dim sharded on one operand only")
        # [..., n, k] @ [k] drops the last dim; otherwise batch dims broadcast from the left.
        return Decision(out=pa.with_dim(pa.dim if nb == 1 else pa.dim + out_nd - na))
    if isinstance(pb, Shard) and isinstance(pa, Replicate):
        if pb.dim == nb - 1 and nb >= 2:
            return Decision(out=pb.with_dim(out_nd - 1))
        raise Break("matmul shards the contracted or batch dim of the right operand")
    if isinstance(pa, Shard) and isinstance(pb, Shard):
        if pa.dim < na - 2 and na == nb and pa == pb:
            return Decision(out=pa)
        if pa.joint:
            raise Break("contracting a joint dim (replicated rows would be summed per rank)")
        if pa.dim == na - 1 and nb >= 2 and pb.dim == nb - 2 and pa.with_dim(0) == pb.with_dim(0):
            return Decision(out=Partial())  # contracts the sharded dim: partial sums
        raise Break("both matmul operands sharded on different dims")
    raise Break("unsupported matmul sharding")


@register_rule(*NORMS)
def _norm(node: fx.Node, rc: RuleCtx) -> Decision:
    x = node.args[0]
    sh = rc.spec(x)
    if not isinstance(sh, Shard) or not isinstance(x, fx.Node):
        raise Break("norm weight is sharded")
    nd = len(rc.shape(x))
    normalized = node.args[1]
    assert isinstance(normalized, list | tuple)
    if sh.dim >= nd - len(normalized):
        raise Break("normalization over the sharded dim")
    for a in node.args[2:]:
        if isinstance(a, fx.Node) and not isinstance(rc.spec(a), Replicate):
            raise Break("norm weight is sharded")
    val = node.meta.get("val")
    return Decision(out=tuple(sh for _ in val) if isinstance(val, tuple | list) else sh)


@register_rule(*GROUP_NORMS)
def _group_norm(node: fx.Node, rc: RuleCtx) -> Decision:
    """A batch shard stays local. A shard of a spatial dim (a VAE's rows) keeps its shard:
    the ``lower`` pass replaces ``group_norm`` with ``group_norm_sharded``, which combines the
    ranks' per-group statistics (one small all-gather) instead of gathering the rows."""
    sh = rc.spec(node.args[0])
    if any(not isinstance(rc.spec(a), Replicate) for a in node.args[1:4] if isinstance(a, fx.Node)):
        raise Break("group_norm weight is sharded")
    val = node.meta.get("val")
    if isinstance(sh, Shard) and sh.dim == 0:
        return Decision(out=tuple(sh for _ in val) if isinstance(val, tuple | list) else sh)
    if not isinstance(sh, Shard) or sh.dim == 1:
        raise Break("group_norm normalizes over the sharded channel dim")
    if node.target is not aten.group_norm.default:
        raise Break(
            "native_group_norm over a sharded spatial dim (its mean/rstd outputs are global)"
        )
    if sh.joint or sh.text or sh.outer != 1 or sh.inner != 1:
        raise Break("group_norm over a merged or joint sharded dim")
    return Decision(out=sh, meta={"xdit_group_norm": True})


def conv_params(node: fx.Node) -> tuple[list[int], list[int], list[int], int]:
    """(stride, padding, dilation, groups) of conv{1,2,3}d / convolution, as lists per spatial
    dim."""
    args = list(node.args)
    w = node.args[1]
    assert isinstance(w, fx.Node)
    nsp = len(w.meta["val"].shape) - 2

    def lst(v: object, default: int) -> list[int]:
        if v is None:
            return [default] * nsp
        if isinstance(v, int):
            return [v] * nsp
        vals = list(v)  # type: ignore[call-overload]
        return vals * nsp if len(vals) == 1 else vals

    if packet(node.target) is aten.convolution:
        if args[6]:
            raise Break("transposed convolution on the sharded dim")
        return lst(args[3], 1), lst(args[4], 0), lst(args[5], 1), int(args[8])  # type: ignore[arg-type]
    kw = node.kwargs
    get = lambda i, k, d: args[i] if len(args) > i else kw.get(k, d)  # noqa: E731
    padding = get(4, "padding", 0)
    if isinstance(padding, str):
        raise Break("string padding")
    return (
        lst(get(3, "stride", 1), 1),
        lst(padding, 0),
        lst(get(5, "dilation", 1), 1),
        int(get(6, "groups", 1)),  # type: ignore[arg-type]
    )


@register_rule(*ops("conv1d", "conv2d", "conv3d", "convolution"))
def _conv(node: fx.Node, rc: RuleCtx) -> Decision:
    """Output row ``o`` of a convolution (kernel ``k``, stride ``s``, dilation ``d``, padding
    ``p`` on the sharded dim) reads input rows ``o*s - p`` to ``o*s - p + d*(k-1)``. When the
    output has ``1/s`` of the input's rows and every piece is a multiple of ``s``, rank ``r``
    computes the outputs of its own rows from them plus ``p`` rows of the previous rank and
    ``d*(k-1) + 1 - s - p`` of the next (zeros past the edges, the padding): a halo exchange,
    no gather. Zero rows that a constant pad added at the edges just before (a VAE encoder's
    asymmetric ``F.pad(x, (0, 1, 0, 1))``) count as padding."""
    x, w = node.args[0], node.args[1]
    sh = rc.spec(x)
    if (
        not isinstance(sh, Shard)
        or not isinstance(w, fx.Node)
        or not isinstance(x, fx.Node)
        or not all(
            isinstance(rc.spec(a), Replicate) for a in node.args[1:3] if isinstance(a, fx.Node)
        )
    ):
        raise Break("conv weight or bias is sharded")
    if len(rc.shape(x)) != len(rc.shape(w)):
        raise Break("unbatched convolution")
    if sh.dim == 0:
        return Decision(out=sh)
    if sh.dim == 1:
        raise Break("conv contracts the sharded channel dim")
    if sh.outer != 1 or sh.inner != 1 or sh.text or (sh.joint and not _zero_pad_rows(x, sh, rc)):
        raise Break("conv on a merged or joint sharded dim")
    stride, padding, dilation, _ = conv_params(node)
    i = sh.dim - 2
    k, s, d = int(w.meta["val"].shape[sh.dim]), stride[i], dilation[i]
    body = sh.body()
    if k == s and padding[i] == 0 and not sh.joint and sh.divisible(s):  # patch embedding: no halo
        return Decision(out=sh.scaled(s))
    rows_in, rows_out = sum(body.split), rc.shape(node)[sh.dim]
    if rows_out * s != rows_in or not body.divisible(s):
        raise Break(f"conv kernel {k} stride {s} padding {padding[i]} on the sharded dim")
    if packet(node.target) is aten.convolution:
        raise Break("aten.convolution with a halo (its padding argument is not rewritten)")
    top = padding[i] + sh.head
    bottom = max(d * (k - 1) + 1 - s - top, 0)
    if max(top, bottom) > min(body.split):
        raise Break("shard thinner than the conv halo")
    if top == bottom == 0 and not sh.joint:  # e.g. a 1x1 stride-2 conv: its rows are all local
        return Decision(out=body.scaled(s))
    rows = body.split[rc.rank] if sh.joint else -1
    return Decision(
        out=body.scaled(s), meta={"xdit_halo": (sh.dim, top, bottom, sh.head, rows, body)}
    )


def _zero_pad_rows(x: fx.Node, sh: Shard, rc: RuleCtx) -> bool:
    """Whether the replicated head/tail rows of ``x`` (placement ``sh``) are exactly the zero
    rows a constant pad added to an unjoined shard (so a convolution may treat them as padding)."""
    if x.target not in (aten.constant_pad_nd.default, aten.pad.default) or not isinstance(
        x.args[0], fx.Node
    ):
        return False
    if x.target is aten.pad.default:
        mode = x.args[2] if len(x.args) > 2 else x.kwargs.get("mode", "constant")
        value = x.args[3] if len(x.args) > 3 else x.kwargs.get("value")
        if mode != "constant":
            return False
    else:
        value = x.args[2] if len(x.args) > 2 else x.kwargs.get("value", 0)
    return not value and rc.spec(x.args[0]) == sh.body()


_NEAREST = ops(
    "upsample_nearest1d",
    "upsample_nearest2d",
    "upsample_nearest3d",
    "_upsample_nearest_exact1d",
    "_upsample_nearest_exact2d",
    "_upsample_nearest_exact3d",
)


@register_rule(*_NEAREST)
def _upsample_nearest(node: fx.Node, rc: RuleCtx) -> Decision:
    """Nearest upsampling by an integer factor ``s`` of a sharded spatial dim: output row ``j``
    copies input row ``j // s``, so each rank upsamples its own rows (split times ``s``). A
    global output size baked into the call is rewritten to this rank's."""
    x = node.args[0]
    sh = rc.spec(x)
    if not isinstance(sh, Shard) or not isinstance(x, fx.Node):
        raise Break("unsupported upsample sharding")
    if sh.dim < 2:  # batch (or channel) shard: every row is local
        if sh.dim == 1:
            raise Break("upsample with a sharded channel dim")
        return Decision(out=sh)
    if sh.joint or sh.text or sh.outer != 1 or sh.inner != 1:
        raise Break("upsample of a merged or joint sharded dim")
    n_in, n_out = rc.shape(x)[sh.dim], rc.shape(node)[sh.dim]
    if n_out % n_in:
        raise Break(f"nearest resize {n_in} -> {n_out} rows is not an integer upsampling")
    factor = n_out // n_in
    out = replace(sh, split=tuple(p * factor for p in sh.split))
    args = None
    size = node.args[1] if len(node.args) > 1 else None
    if isinstance(size, list | tuple) and size:
        local = list(size)
        local[sh.dim - 2] = out.local_size(rc.rank)
        args = (x, local, *node.args[2:])
    # The kernel maps rows by the scale when one is given (``.vec``: a list; the other
    # overloads: one float per spatial dim after the size), else by the sizes' ratio.
    scales = node.args[2] if len(node.args) > 2 else None
    if not isinstance(scales, list | tuple):
        scales = list(node.args[2:])
    scale = scales[sh.dim - 2] if len(scales) > sh.dim - 2 else None
    if scale is not None and float(scale) != factor:  # type: ignore[arg-type]
        raise Break("nearest upsampling with a scale that differs from its size ratio")
    return Decision(out=out, args=args)


def _kv_layout(k: Any, pq: Shard, rc: RuleCtx) -> Shard:
    """The layout K and V attend in: K's own sequence shard with whole text rows, or, where K is
    not cut on its sequence dim, Q's body layout (when the lengths agree)."""
    nd = len(rc.shape(k))
    pk = rc.spec(k) if isinstance(k, fx.Node) else R
    if isinstance(pk, Shard) and pk.dim == nd - 2 and not (pk.text and not pk.joint):
        return replace(pk, text=False, text_to=-1)
    cand = replace(pq, text=False, text_to=-1).with_dim(nd - 2)
    if cand.total != rc.shape(k)[nd - 2]:
        raise Break(
            f"K/V placement {pk} over {rc.shape(k)[nd - 2]} keys does not fit the queries' {pq}"
        )
    return cand


@register_rule(*ops("scaled_dot_product_attention"))
def _sdpa(node: fx.Node, rc: RuleCtx) -> Decision:
    q, k, v = node.args[:3]
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    pq, pk, pv = rc.spec(q), rc.spec(k), rc.spec(v)
    nd = len(rc.shape(q))
    is_causal = node.args[5] if len(node.args) > 5 else node.kwargs.get("is_causal", False)
    if isinstance(pq, Shard) and pq.dim < nd - 2:
        # A batch-like dim: every (batch, head) row attends within the rank. Q/K/V (and a
        # mask with that dim) must agree, elementwise-style.
        d = align_inputs(node, rc, rc.shape(node))
        return Decision(out=d.out, inputs=d.inputs, meta={"xdit_attention": "local"})
    wants: dict[fx.Node, Placement] = {}
    if isinstance(mask, fx.Node) and not isinstance(rc.spec(mask), Replicate):
        wants[mask] = R
    if not isinstance(pq, Shard) or pq.dim != nd - 2:
        raise Break("attention with a sharded head or feature dim")
    merged = (pq.outer, pq.inner) != (1, 1)  # e.g. rows of every frame: [F, rows/N, W] per rank
    if isinstance(pk, Replicate) and isinstance(pv, Replicate):
        if is_causal:  # the causal mask depends on each query row's global position
            raise Break("causal attention with sharded query rows")
        if isinstance(mask, fx.Node) and rc.shape(mask)[-2] > 1:
            wants[mask] = pq.with_dim(len(rc.shape(mask)) - 2)
        return Decision(out=pq, inputs=wants, meta={"xdit_attention": "local"})
    if is_causal:
        raise Break("causal sequence-parallel attention is not supported")
    if "rewrite_attention" in rc.options.get("disabled", ()):
        raise Break("rewrite_attention is disabled")
    heads = rc.shape(q)[-3] if nd >= 3 else 1
    u = rc.options.get("ulysses", 1)
    # Any head count: dealt unevenly where u does not divide it; fewer heads than u: the largest
    # divisor of u not above them is the Ulysses degree, the rest of the axis joins the ring.
    u_eff = ulysses_degree(heads, u)
    if pq.text and not pq.joint:
        raise Break("attention over text rows only")
    if merged and mask is not None:
        # Without a mask, attention does not depend on the order of the keys, so a rank's rows
        # need not be contiguous in the sequence; a mask addresses keys by position.
        raise Break("attention mask with a sequence shard merged with another dim")
    # Query text rows may come cut (``text=True``: Ulysses sends them with the image rows, Ring
    # keeps its own); K/V text rows must be whole on every rank: text K/V are never sent.
    # With text rows owned by one rank (``text_to``, PipeFusion's patches), K/V may hold them
    # that way too: the other patches read the owner's text K/V from the displaced buffer.
    # K/V keep their own layout: their text rows may differ from Q's (image queries over image
    # + text keys), and so may their body's cut.
    whole = replace(pq, text=False, text_to=-1)
    owner = rc.options.get("text_owner", -1)
    kv = _kv_layout(k, pq, rc)
    if (kv.outer, kv.inner) != (1, 1) and mask is not None:
        raise Break("attention mask with a K/V sequence shard merged with another dim")
    kv_rows = tuple(s * kv.outer * kv.inner for s in kv.split)
    rows = tuple(s * pq.outer * pq.inner for s in pq.split)  # each rank's local rows
    if rc.options.get("same_kv_rows") and kv_rows != rows:
        raise Break("displaced-K/V attention with K/V rows cut otherwise than the queries'")
    for a in (k, v):
        if not isinstance(a, fx.Node):
            continue
        nd_a = len(rc.shape(a))
        target = kv.with_dim(nd_a - 2)
        owned = replace(target, text=True, text_to=owner) if owner >= 0 and target.joint else target
        if rc.spec(a) not in (target, owned):
            wants[a] = target
    # Text output rows come back cut over the ranks (``text=True``) unless disabled.
    shard_text = pq.joint and "shard_text_rows" not in rc.options.get("disabled", ())
    if pq.text and not shard_text:
        wants[q] = whole  # type: ignore[index]
    meta = {
        "xdit_attention": "usp",
        "xdit_split": rows,
        "xdit_joint": (pq.head, pq.tail),
        "xdit_shard_text": shard_text,
        "xdit_q_text_cut": pq.text and shard_text,
    }
    if (kv_rows, kv.head, kv.tail) != (rows, pq.head, pq.tail):
        meta["xdit_kv"] = (kv_rows, kv.head, kv.tail)
    if u_eff != u:
        meta["xdit_ulysses"] = u_eff
    out = replace(pq, text=shard_text, text_to=owner if shard_text else -1)
    return Decision(out=out, inputs=wants, meta=meta)


def _reads_head_index(node: fx.Node, arg: Any, at: int) -> bool:
    """Whether a flex-attention ``score_mod`` (``score, b, h, q, kv``: ``at=2``) or ``mask_mod``
    (``b, h, q, kv``: ``at=1``), a submodule of the graph, reads its head-index argument."""
    if not isinstance(arg, fx.Node) or arg.op != "get_attr":
        return arg is not None
    fn = getattr(node.graph.owning_module, str(arg.target), None)
    if not isinstance(fn, fx.GraphModule):
        return True
    phs = list(fn.graph.find_nodes(op="placeholder"))
    return len(phs) > at and bool(phs[at].users)


@register_rule(torch.ops.higher_order.flex_attention)
def _flex_attention(node: fx.Node, rc: RuleCtx) -> Decision:
    """``flex_attention`` (a block mask, a score function): cut over the heads. The mask and score
    functions see global query and key positions, so each rank attends whole sequences for its
    heads (Q, K and V regrouped from the sequence cut to a head cut; the output regrouped back by
    its users): exact, the attention's work split. Functions that read the head index, fewer
    heads than ranks, or K/V with other head counts break."""
    q, k, v = node.args[:3]
    nd = len(rc.shape(q))
    heads, n = rc.shape(q)[nd - 3], rc.degree
    if heads < n:
        raise Break("flex attention with fewer heads than ranks")
    if any(rc.shape(a)[-3] != heads for a in (k, v)):
        raise Break("flex attention with K/V of other head counts (GQA)")
    block_mask = node.args[4]
    if _reads_head_index(node, node.args[3], 2) or _reads_head_index(node, block_mask[-1], 1):  # type: ignore[index]
        raise Break("flex attention whose score or mask function reads the head index")
    cut = Shard(nd - 3, head_groups(heads, n))
    wants: dict[fx.Node, Placement] = {a: cut for a in (q, k, v) if isinstance(a, fx.Node)}  # type: ignore[misc]
    for t in tensor_args(node):
        if t in wants:
            continue
        shape = rc.shape(t)
        # Block-mask tables per head are cut like the heads; everything else comes whole.
        wants[t] = Shard(1, cut.split) if len(shape) == 4 and shape[1] == heads and heads > 1 else R
    outs = node.meta["val"]
    return Decision(
        out=tuple(Shard(len(o.shape) - (3 if o.dim() == nd else 2), cut.split) for o in outs),
        inputs={a: p for a, p in wants.items() if rc.spec(a) != p},
    )


@register_rule(placed_like)
def _placed_like(node: fx.Node, rc: RuleCtx) -> Decision:
    """``placed_like(x, ref)``: ``x`` moved to ``ref``'s cut (same shape), where it fits."""
    x, ref = node.args
    want = rc.spec(ref)
    if not isinstance(x, fx.Node) or rc.shape(x) != rc.shape(ref):
        return Decision(out=rc.spec(x))  # type: ignore[arg-type]
    return Decision(out=want, inputs={x: want} if rc.spec(x) != want else {})
