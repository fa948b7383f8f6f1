"""Op rules for elementwise, view/reshape, permute, cat/stack, slice/select/split and reductions.

Each rule keeps the shard when the op treats the sharded dimension's entries independently,
and says how the dimension moves. Reshapes are handled by one general rule: the sharded factor
is followed through the flattened index space (see :func:`reshape_shard`).
"""

from __future__ import annotations

import operator
from dataclasses import replace
from typing import Any

import torch
import torch.fx as fx

from xdit_compile.passes.ops import COMPLEX_VIEWS, POINTWISE, REDUCTIONS, RESHAPES, packet
from xdit_compile.passes.sharding.engine import (
    Break,
    Decision,
    RuleCtx,
    norm_dim,
    ops,
    prod,
    register_rule,
    tensor_args,
)
from xdit_compile.placement import Partial, Placement, Replicate, Shard, text_split
from xdit_compile.runtime.reshard import gather_shard, slice_shard

aten = torch.ops.aten
R = Replicate()

__all__ = ["align_inputs", "joint_range", "reshape_shard", "schema_arg"]


def align_inputs(node: fx.Node, rc: RuleCtx, out_shape: tuple[int, ...]) -> Decision:
    """Broadcasting elementwise semantics: all sharded inputs must agree (right-aligned dims);
    replicated inputs that are full-size on the sharded dim get sliced to this rank's piece."""
    target: Shard | None = None
    args = tensor_args(node)
    for a in args:
        p = rc.spec(a)
        if isinstance(p, Shard):
            shp = rc.shape(a)
            od = p.dim + len(out_shape) - len(shp)
            if od < 0 or out_shape[od] != shp[p.dim]:
                raise Break(f"sharded input {a.name} is broadcast along its sharded dim")
            cand = p.with_dim(od)
            if target is not None and cand != target:
                if replace(cand, text=False) != replace(target, text=False):
                    raise Break(f"inputs sharded differently ({target} vs {cand})")
                # Text rows cut: cut the other input's too (the same way).
                cand = replace(
                    cand, text=True, text_to=target.text_to if target.text else cand.text_to
                )
            target = cand
    assert target is not None
    wants: dict[fx.Node, Placement] = {}
    for a in args:
        p = rc.spec(a)
        if isinstance(p, Shard) and p.joint and p.text != target.text:
            wants[a] = replace(p, text=True, text_to=target.text_to)
        elif isinstance(p, Replicate):
            shp = rc.shape(a)
            ad = target.dim - (len(out_shape) - len(shp))
            if ad >= 0 and shp[ad] == out_shape[target.dim] and shp[ad] > 1:
                wants[a] = target.with_dim(ad)
    return Decision(out=target, inputs=wants)


@register_rule(*POINTWISE)
def _pointwise(node: fx.Node, rc: RuleCtx) -> Decision:
    val = node.meta.get("val")
    out = val[0] if isinstance(val, tuple | list) else val  # native_dropout: (out, mask)
    if not isinstance(out, torch.Tensor):
        raise Break("no tensor output")
    shapes = [rc.shape(a) for a in tensor_args(node)]
    if tuple(out.shape) != tuple(torch.broadcast_shapes(*shapes)):
        # Not elementwise in this form (``where(cond)`` lists indices): no rule for it.
        raise Break("output is not the broadcast of the inputs")
    d = align_inputs(node, rc, tuple(out.shape))
    if isinstance(val, tuple | list):
        d.out = tuple(d.out for _ in val)
    return d


@register_rule(*ops("prelu", "_prelu_kernel"))
def _prelu(node: fx.Node, rc: RuleCtx) -> Decision:
    """``prelu(x, w)``: one slope per channel, the channels on dim 1 (not right-aligned)."""
    x, w = node.args[0], node.args[1]
    sh = rc.spec(x)
    if not isinstance(sh, Shard) or not isinstance(rc.spec(w), Replicate):
        raise Break("prelu slope is sharded")
    if sh.dim == 1 and rc.shape(w)[0] > 1:
        raise Break("prelu over sharded channels")
    return Decision(out=sh)


def reshape_shard(in_shape: tuple[int, ...], sh: Shard, out_shape: tuple[int, ...]) -> Shard | None:
    """Where the sharded factor of ``sh`` lands after reshaping ``in_shape`` to ``out_shape``.

    The factor N (with its cut ``split``) occupies a contiguous stride range of the flattened
    tensor. If one output dim holds that range, the shard moves there (with new outer/inner).
    If the range straddles output dims, its low part must consist of whole units of every
    rank's piece (e.g. token rows of width W): the shard keeps the high part. Otherwise None.
    """
    if sh.joint:
        return _reshape_keeping_dim(in_shape, sh, out_shape)
    if sh.text:  # rows of text only: the same cut, remembered as text
        got = reshape_shard(in_shape, replace(sh, text=False), out_shape)
        return replace(got, text=True) if got is not None else None
    s = sh.inner * prod(in_shape[sh.dim + 1 :])
    n, split = sum(sh.split), sh.split
    strides = [prod(out_shape[e + 1 :]) for e in range(len(out_shape))]
    while True:
        e = next(
            (
                e
                for e, size in enumerate(out_shape)
                if size > 1 and strides[e] <= s < strides[e] * size
            ),
            None,
        )
        if e is None or s % strides[e] or out_shape[e] % (s // strides[e]):
            return None
        inner = s // strides[e]
        cap = out_shape[e] // inner
        if n <= cap:
            return Shard(e, split, outer=cap // n, inner=inner) if cap % n == 0 else None
        if n % cap or any(x % cap for x in split):
            return None
        split, n, s = tuple(x // cap for x in split), n // cap, s * cap


def _reshape_keeping_dim(
    in_shape: tuple[int, ...], sh: Shard, out_shape: tuple[int, ...]
) -> Shard | None:
    """A joint shard (replicated head/tail rows) survives only reshapes that leave its dim
    whole: same extent, same number of elements before it."""
    before = prod(in_shape[: sh.dim])
    for e, size in enumerate(out_shape):
        if size == in_shape[sh.dim] and prod(out_shape[:e]) == before:
            return sh.with_dim(e)
    return None


def joint_range(sh: Shard, start: int, end: int, rank: int) -> tuple[Placement, int, int] | None:
    """Placement and local [start, end) of the global slice [start, end) of a shard's dim.

    The dim is [head rows | body (sharded) | tail rows]. A slice inside the head or the tail is
    replicated (with ``text``, only the whole head or tail, which stays cut evenly); one from a
    boundary to a boundary keeps the body sharded; one that cuts into the body keeps each rank's
    rows of it that the slice covers (an uneven cut: ``x[:, 1:]`` of rows cut 4 + 4 is 3 + 4),
    with the head and tail rows it covers replicated around them.
    """
    unit = sh.outer * sh.inner  # a merged body (rows of every frame) is cut only as a whole
    body, mine = unit * sum(sh.split), unit * sh.split[rank]
    head_end, tail_start = sh.head, sh.head + body
    my_head, my_tail = sh.text_rows(rank)
    n = len(sh.split)
    if end <= head_end:
        if not sh.text:
            return R, start, end
        if (start, end) != (0, head_end):
            return None
        return (
            Shard(sh.dim, text_split(sh.head, n, sh.text_to), text=True, text_to=sh.text_to),
            0,
            my_head,
        )
    if start >= tail_start:
        if not sh.text:
            return R, start - body + mine, end - body + mine
        if (start, end) != (tail_start, sh.total):
            return None
        return (
            Shard(sh.dim, text_split(sh.tail, n, sh.text_to), text=True, text_to=sh.text_to),
            my_head + mine,
            my_head + mine + my_tail,
        )
    if start in (0, head_end) and end in (tail_start, sh.total):
        head = sh.head if start == 0 else 0
        tail = sh.tail if end == sh.total else 0
        local_start = 0 if start == 0 else my_head
        local_end = my_head + mine + (my_tail if end == sh.total else 0)
        text = sh.text and bool(head or tail)
        return (
            replace(sh, head=head, tail=tail, text=text, text_to=sh.text_to if text else -1),
            local_start,
            local_end,
        )
    if (
        sh.text or unit != 1
    ):  # cut text pieces, or rows of every frame: no contiguous piece per rank
        return None
    off = sum(sh.split[:rank])

    def local(pos: int) -> int:  # a global position of the dim -> this rank's local one
        if pos <= head_end:
            return pos
        if pos <= tail_start:
            return head_end + max(0, min(pos - head_end - off, mine))
        return head_end + mine + pos - tail_start

    b0, b1 = max(start, head_end) - head_end, min(end, tail_start) - head_end  # body rows kept
    split = tuple(
        max(0, min(b1, o + n) - max(b0, o))
        for o, n in zip(_offsets(sh.split), sh.split, strict=True)
    )
    head = max(0, min(end, head_end) - start)
    tail = max(0, end - max(start, tail_start))
    return replace(sh, split=split, head=head, tail=tail), local(start), local(end)


def _offsets(split: tuple[int, ...]) -> list[int]:
    out, acc = [], 0
    for n in split:
        out.append(acc)
        acc += n
    return out


@register_rule(*RESHAPES)
def _view(node: fx.Node, rc: RuleCtx) -> Decision:
    x = node.args[0]
    assert isinstance(x, fx.Node)
    sh = rc.spec(x)
    assert isinstance(sh, Shard)
    out_shape = rc.shape(node)
    new = reshape_shard(rc.shape(x), sh, out_shape)
    if new is None:
        raise Break(f"reshape {list(rc.shape(x))} -> {list(out_shape)} splits the sharded dim {sh}")
    # Every view becomes a reshape to this rank's local sizes: size arguments are global, and
    # size-dependent forms are wrong on a piece (``squeeze()`` would drop a sharded dim whose
    # local size is 1).
    return Decision(
        out=new, target=aten.reshape.default, args=(x, rc.local(out_shape, new)), kwargs={}
    )


@register_rule(*ops("expand"))
def _expand(node: fx.Node, rc: RuleCtx) -> Decision:
    x = node.args[0]
    assert isinstance(x, fx.Node)
    sh = rc.spec(x)
    assert isinstance(sh, Shard)
    out_shape = rc.shape(node)
    od = sh.dim + len(out_shape) - len(rc.shape(x))
    new = sh.with_dim(od)
    return Decision(out=new, args=(x, rc.local(out_shape, new)), kwargs={})


@register_rule(*ops("permute"))
def _permute(node: fx.Node, rc: RuleCtx) -> Decision:
    x, dims = node.args[0], node.args[1]
    sh = rc.spec(x)
    assert isinstance(sh, Shard) and isinstance(dims, list | tuple)
    nd = len(dims)
    return Decision(out=sh.with_dim([norm_dim(int(d), nd) for d in dims].index(sh.dim)))  # type: ignore[arg-type]


@register_rule(*ops("transpose", "t", "swapaxes", "movedim"))
def _transpose(node: fx.Node, rc: RuleCtx) -> Decision:
    x = node.args[0]
    sh = rc.spec(x)
    assert isinstance(sh, Shard) and isinstance(x, fx.Node)
    nd = len(rc.shape(x))
    if packet(node.target) is aten.t:
        a, b = 0, nd - 1
    else:
        a, b = (norm_dim(int(d), nd) for d in node.args[1:3])  # type: ignore[arg-type]
    if packet(node.target) is aten.movedim:
        order = [d for d in range(nd) if d != a]
        order.insert(b, a)
        return Decision(out=sh.with_dim(order.index(sh.dim)))
    dim = b if sh.dim == a else a if sh.dim == b else sh.dim
    return Decision(out=sh.with_dim(dim))


def _cat_dim(node: fx.Node, ndim: int) -> int:
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return norm_dim(int(dim), ndim)  # type: ignore[arg-type]


@register_rule(*ops("cat", "concat", "concatenate"))
def _cat(node: fx.Node, rc: RuleCtx) -> Decision:
    """Concatenation along another dim keeps the shard; replicated inputs get sliced."""
    out_shape = rc.shape(node)
    dim = _cat_dim(node, len(out_shape))
    if any(isinstance(p := rc.spec(t), Shard) and p.dim == dim for t in tensor_args(node)):
        return _cat_sharded_dim(node, rc, dim)
    return align_inputs(node, rc, out_shape)


def _cat_sharded_dim(node: fx.Node, rc: RuleCtx, dim: int) -> Decision:
    """Text pieces joined to one sharded body piece (text + image tokens) become the head/tail
    of a joint shard: replicated text rows as they are, or one evenly cut text piece on each
    side (``text=True``); each rank concatenates what it holds."""
    tensors = [t for t in node.args[0] if isinstance(t, fx.Node)]  # type: ignore[union-attr]
    specs = [rc.spec(t) for t in tensors]
    # The body: the one sharded piece that is not only text rows.
    bodies = [
        i for i, p in enumerate(specs) if isinstance(p, Shard) and not (p.text and not p.joint)
    ]
    if len(bodies) != 1 or any(not isinstance(p, Shard | Replicate) for p in specs):
        raise Break("concatenation of several sharded pieces along the sharded dim")
    i = bodies[0]
    sh = specs[i]
    assert isinstance(sh, Shard)
    before = sum(rc.shape(t)[dim] for t in tensors[:i])
    after = sum(rc.shape(t)[dim] for t in tensors[i + 1 :])
    texts = [j for j, p in enumerate(specs) if j != i and isinstance(p, Shard)]
    n, owner = len(sh.split), rc.options.get("text_owner", -1)
    if (
        texts
        and not sh.joint
        and not sh.text
        and len(tensors[:i]) <= 1
        and len(tensors[i + 1 :]) <= 1
        and all(
            isinstance(p, Shard)
            and p.text
            and not p.joint
            and p.dim == dim
            and p.split == text_split(rc.shape(t)[dim], n, owner)
            for j, (t, p) in enumerate(zip(tensors, specs, strict=True))
            if j != i
        )
    ):
        return Decision(out=replace(sh, dim=dim, head=before, tail=after, text=True, text_to=owner))
    # Mixed or several text pieces: gather the sharded text rows, keep the text replicated.
    wants: dict[fx.Node, Placement] = {tensors[j]: R for j in texts}
    if sh.text:
        wants[tensors[i]] = replace(sh, text=False)
    return Decision(
        out=replace(
            sh, dim=dim, head=sh.head + before, tail=sh.tail + after, text=False, text_to=-1
        ),
        inputs=wants,
    )


@register_rule(*ops("pad_sequence"))
def _pad_sequence(node: fx.Node, rc: RuleCtx) -> Decision:
    """``pad_sequence(items)`` of items of one length cut alike: a stack (no padding), each rank
    stacks its pieces; items of different lengths pad past each one's end, which needs them
    whole."""
    items = [t for t in node.args[0] if isinstance(t, fx.Node)]  # type: ignore[union-attr]
    specs = {rc.spec(t) for t in items}
    shapes = {tuple(rc.shape(t)) for t in items}
    sh = next(iter(specs))
    if len(specs) != 1 or len(shapes) != 1 or not isinstance(sh, Shard):
        raise Break("pad_sequence of items cut differently or of different lengths")
    batch_first = bool(schema_arg(node, "batch_first", False))
    return Decision(out=sh.with_dim(sh.dim + 1 if batch_first or sh.dim > 0 else 0))


@register_rule(*ops("stack"))
def _stack(node: fx.Node, rc: RuleCtx) -> Decision:
    tensors = node.args[0]
    assert isinstance(tensors, list | tuple)
    dim = _cat_dim(node, len(rc.shape(node)))
    shards = {rc.spec(t) for t in tensors if isinstance(rc.spec(t), Shard)}
    if len(shards) != 1:
        raise Break("stacked inputs sharded differently")
    sh = next(iter(shards))
    assert isinstance(sh, Shard)
    wants: dict[fx.Node, Placement] = {
        t: sh for t in tensors if isinstance(t, fx.Node) and isinstance(rc.spec(t), Replicate)
    }
    return Decision(out=sh.with_dim(sh.dim if sh.dim < dim else sh.dim + 1), inputs=wants)


def _only_input(node: fx.Node, rc: RuleCtx) -> tuple[fx.Node, Shard, int]:
    x = node.args[0]
    assert isinstance(x, fx.Node)
    sh = rc.spec(x)
    assert isinstance(sh, Shard)
    return x, sh, len(rc.shape(x))


@register_rule(*ops("slice"))
def _slice(node: fx.Node, rc: RuleCtx) -> Decision:
    x, sh, nd = _only_input(node, rc)
    args = list(node.args) + [0, None, None, 1][len(node.args) - 1 :]
    dim, start, end, step = norm_dim(int(args[1]), nd), args[2], args[3], args[4]  # type: ignore[arg-type]
    if dim != sh.dim:
        return Decision(out=sh)
    size = rc.shape(x)[dim]
    if step not in (None, 1):
        raise Break("strided slice of the sharded dim")
    lo, hi = _bounds(start, end, size)
    got = joint_range(sh, lo, hi, rc.rank)
    if got is None:
        raise Break("slice cuts through the sharded part of the dim")
    out, lo_local, hi_local = got
    return Decision(out=out, args=(x, dim, lo_local, hi_local, 1), kwargs={})


def _bounds(start: Any, end: Any, size: int) -> tuple[int, int]:
    lo = 0 if start is None else int(start)
    hi = size if end is None else int(end)
    lo, hi = (lo + size if lo < 0 else lo), (hi + size if hi < 0 else hi)
    return max(0, min(lo, size)), max(0, min(hi, size))


@register_rule(*ops("select"))
def _select(node: fx.Node, rc: RuleCtx) -> Decision:
    x, sh, nd = _only_input(node, rc)
    dim = norm_dim(int(node.args[1]), nd)  # type: ignore[arg-type]
    if dim == sh.dim:
        raise Break("select on the sharded dim")
    return Decision(out=sh.with_dim(sh.dim - (1 if dim < sh.dim else 0)))


@register_rule(*ops("split", "split_with_sizes", "chunk", "unbind", "tensor_split"))
def _split(node: fx.Node, rc: RuleCtx) -> Decision:
    x, sh, nd = _only_input(node, rc)
    pk = packet(node.target)
    if pk is aten.unbind:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    else:
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    dim = norm_dim(int(dim), nd)  # type: ignore[arg-type]
    if dim == sh.dim:
        return _split_sharded_dim(node, rc, x, sh, dim)
    n_out = len(node.meta["val"])
    out = sh.with_dim(sh.dim - (1 if dim < sh.dim else 0)) if pk is aten.unbind else sh
    return Decision(out=tuple(out for _ in range(n_out)))


def _split_sharded_dim(node: fx.Node, rc: RuleCtx, x: fx.Node, sh: Shard, dim: int) -> Decision:
    """Splitting a joint dim at its head/body/tail boundaries: e.g. text and image tokens."""
    if packet(node.target) in (aten.unbind, aten.tensor_split):
        raise Break("unbind/tensor_split along the sharded dim")
    sizes = [int(v.shape[dim]) for v in node.meta["val"]]
    outs, local_sizes, start = [], [], 0
    for size in sizes:
        got = joint_range(sh, start, start + size, rc.rank)
        if got is None:
            raise Break("split cuts through the sharded part of the dim")
        outs.append(got[0])
        local_sizes.append(got[2] - got[1])
        start += size
    return Decision(
        out=tuple(outs), target=aten.split_with_sizes.default, args=(x, local_sizes, dim), kwargs={}
    )


@register_rule(operator.getitem)
def _getitem(node: fx.Node, rc: RuleCtx) -> Decision:
    parent, idx = node.args
    p = rc.placements.get(parent)  # type: ignore[arg-type]
    out = p[idx] if isinstance(p, tuple | list) else p  # type: ignore[index]
    return Decision(out=out if out is not None else R)


def _reduced(node: fx.Node, rc: RuleCtx, dims: Any, keepdim: bool) -> Decision:
    x, sh, nd = _only_input(node, rc)
    if dims is None or (isinstance(dims, list | tuple) and len(dims) == 0):
        raise Break("reduction over all dims")
    dims = [dims] if isinstance(dims, int) else list(dims)
    dims = [norm_dim(int(d), nd) for d in dims]
    if sh.dim in dims:
        if packet(node.target) is aten.sum and not sh.joint and not sh.text:
            # Each rank sums its own rows: the sum over all rows is the sum of the ranks'
            # results, a pending all-reduce (linear attention's sum over tokens).
            return Decision(out=Partial())
        raise Break("reduction over the sharded dim")
    out = sh if keepdim else sh.with_dim(sh.dim - sum(1 for d in dims if d < sh.dim))
    val = node.meta.get("val")
    return Decision(out=(out, out) if isinstance(val, tuple | list) else out)


def schema_arg(node: fx.Node, name: str, default: Any = None) -> Any:
    """Argument ``name`` of an ATen call, positional or keyword, by the overload's schema."""
    if name in node.kwargs:
        return node.kwargs[name]
    schema = getattr(node.target, "_schema", None)
    names = [a.name for a in schema.arguments] if schema is not None else []
    if name in names and names.index(name) < len(node.args):
        return node.args[names.index(name)]
    return default


@register_rule(*REDUCTIONS)
def _reduction(node: fx.Node, rc: RuleCtx) -> Decision:
    if isinstance(schema_arg(node, "other"), fx.Node):  # max.other / min.other: elementwise
        return align_inputs(node, rc, rc.shape(node))
    dims = schema_arg(node, "dim")
    return _reduced(node, rc, dims, bool(schema_arg(node, "keepdim", False)))


@register_rule(
    *ops("softmax", "_softmax", "log_softmax", "_log_softmax", "cumsum", "cumprod", "_safe_softmax")
)
def _along_dim(node: fx.Node, rc: RuleCtx) -> Decision:
    x, sh, nd = _only_input(node, rc)
    if norm_dim(int(node.args[1]), nd) == sh.dim:  # type: ignore[arg-type]
        raise Break("normalization along the sharded dim")
    return Decision(out=sh)


@register_rule(*ops("constant_pad_nd", "pad"))
def _pad(node: fx.Node, rc: RuleCtx) -> Decision:
    """Constant padding of the sharded dim adds replicated rows before (head) or after (tail)
    it: each rank pads its local piece the same way (Mochi pads attention outputs back to the
    full text length)."""
    x, sh, nd = _only_input(node, rc)
    pad = list(node.args[1])  # type: ignore[arg-type]
    mode = schema_arg(node, "mode", "constant")
    wants: dict[fx.Node, Placement] = {}
    args = None
    for i in range(0, len(pad), 2):
        before, after = pad[i], pad[i + 1]
        if nd - 1 - i // 2 == sh.dim and (before or after):
            if mode != "constant" or sh.outer != 1 or sh.head + before < 0 or sh.tail + after < 0:
                raise Break("padding of the sharded dim")
            if sh.text and sh.joint and sh.text_to >= 0:
                # Text rows all on one rank: it pads them; the others hold no text rows.
                if rc.rank != sh.text_to:
                    pad[i], pad[i + 1] = 0, 0
                    args = (x, pad, *node.args[2:])
            elif sh.text:  # evenly cut text rows: pad them whole (gather the text rows first)
                if not sh.joint:
                    raise Break("padding of sharded text rows")
                sh = replace(sh, text=False)
                wants[x] = sh
            sh = replace(sh, head=sh.head + before, tail=sh.tail + after)
    return Decision(out=sh, inputs=wants, args=args)


@register_rule(*ops("type_as"))
def _type_as(node: fx.Node, rc: RuleCtx) -> Decision:
    """``x.type_as(other)``: ``other`` only gives the dtype."""
    return Decision(out=rc.spec(node.args[0]))


@register_rule(*COMPLEX_VIEWS)
def _complex_view(node: fx.Node, rc: RuleCtx) -> Decision:
    """Complex RoPE: the last dim pairs up into complex numbers (or back); others unchanged."""
    x, sh, nd = _only_input(node, rc)
    if packet(node.target) is aten.view_as_complex and sh.dim == nd - 1:
        raise Break("view_as_complex of the sharded dim")
    return Decision(out=sh)


@register_rule(*ops("slice_scatter", "copy"))
def _scatter_into(node: fx.Node, rc: RuleCtx) -> Decision:
    """``out = self`` with ``src`` written into a slice (functionalized ``x[..., a:b] = y``):
    elementwise in every dim but the sliced one, which must not be the sharded dim."""
    out_shape = rc.shape(node)
    if packet(node.target) is aten.slice_scatter:
        dim = norm_dim(int(schema_arg(node, "dim", 0)), len(out_shape))
        base = rc.spec(node.args[0])
        if isinstance(base, Shard) and base.dim == dim:
            return _scatter_joint(node, rc, base, dim)
        for t in tensor_args(node):
            if (
                isinstance(p := rc.spec(t), Shard)
                and p.dim + len(out_shape) - len(rc.shape(t)) == dim
            ):
                raise Break("slice_scatter along the sharded dim")
    # src is narrower only along the scattered dim, which alignment does not look at.
    return align_inputs(node, rc, out_shape)


def _scatter_joint(node: fx.Node, rc: RuleCtx, base: Shard, dim: int) -> Decision:
    """Writing the text or the image part of a joint dim (``q[:, :, T:] = rope(q[:, :, T:])``):
    the written range is a head/body/tail range, so each rank writes its local rows of it."""
    size = rc.shape(node)[dim]
    if schema_arg(node, "step", 1) != 1:
        raise Break("strided slice_scatter along the sharded dim")
    lo, hi = _bounds(schema_arg(node, "start"), schema_arg(node, "end"), size)
    got = joint_range(base, lo, hi, rc.rank)
    if got is None:
        raise Break("slice_scatter cuts through the sharded part of the dim")
    want, lo_local, hi_local = got
    src = node.args[1]
    assert isinstance(src, fx.Node)
    args = (node.args[0], src, dim, lo_local, hi_local, 1)
    return Decision(
        out=base,
        inputs={src: want.with_dim(dim) if isinstance(want, Shard) else want},
        target=aten.slice_scatter.default,
        args=args,
        kwargs={},
    )


@register_rule(*ops("repeat_interleave"))
def _repeat_interleave(node: fx.Node, rc: RuleCtx) -> Decision:
    """``x.repeat_interleave(r, dim)``: along the sharded dim each row becomes ``r`` rows in
    place (e.g. a per-sample mask repeated per head into ``[B * heads, ...]``), so the cut stays
    between the same samples."""
    x, sh, nd = _only_input(node, rc)
    repeats, dim = schema_arg(node, "repeats"), schema_arg(node, "dim")
    if not isinstance(repeats, int) or dim is None:
        raise Break("repeat_interleave with tensor repeats or without a dim")
    if norm_dim(int(dim), nd) != sh.dim:
        return Decision(out=sh)
    if sh.joint or sh.outer != 1:
        raise Break("repeat_interleave along a joint or merged sharded dim")
    return Decision(
        out=replace(sh, split=tuple(s * repeats for s in sh.split)),
        kwargs={**node.kwargs, "output_size": None} if "output_size" in node.kwargs else None,
    )


@register_rule(*ops("repeat"))
def _repeat(node: fx.Node, rc: RuleCtx) -> Decision:
    x, sh, nd = _only_input(node, rc)
    reps = list(node.args[1])  # type: ignore[arg-type]
    od = sh.dim + len(reps) - nd
    if reps[od] != 1:
        raise Break("repeat along the sharded dim")
    return Decision(out=sh.with_dim(od))


@register_rule(
    *ops(
        "new_zeros",
        "new_ones",
        "new_empty",
        "new_full",
        "new_empty_strided",
        "new_tensor",
        "scalar_tensor",
        "zeros",
        "ones",
        "full",
        "arange",
        "empty",
    )
)
def _creation(node: fx.Node, rc: RuleCtx) -> Decision:
    """The input only gives dtype/device: the (global-size) result is replicated."""
    return Decision(out=R)


@register_rule(gather_shard, slice_shard)
def _earlier_round_move(node: fx.Node, rc: RuleCtx) -> Decision:
    """A gather or slice an earlier sharding round put in (CFG / data parallel, on the batch
    dim) keeps this round's shard on another dim: it reads its sizes off the tensor it gets."""
    x, sh, nd = _only_input(node, rc)
    if norm_dim(int(node.args[1]), nd) != sh.dim:  # type: ignore[arg-type]
        return Decision(out=sh)
    if node.target is gather_shard and len(node.args) <= 8:
        # Gathering equal pieces of a dim this round cuts inside each piece (the CFG halves of
        # a batch that data parallelism cuts too): each piece keeps this rank's part.
        _, dim, outer, inner, split, group, *joint = node.args
        sizes = [int(v) for v in split] if isinstance(split, list | tuple) else []  # type: ignore[arg-type]
        if (
            (outer, inner) == (1, 1)
            and not any(joint)
            and len(set(sizes)) == 1
            and sum(sh.split) == sizes[0]
            and sh.outer == 1
            and not sh.joint
        ):
            pieces = [sh.split[rc.rank]] * len(sizes)
            return Decision(
                out=replace(sh, outer=len(sizes)), args=(x, dim, 1, 1, pieces, group), kwargs={}
            )
    raise Break("an earlier round's gather/slice on this round's sharded dim")


def _op_dim(node: fx.Node, nd: int, default: int | None = -1) -> int | None:
    d = schema_arg(node, "dim", default)
    return None if d is None else norm_dim(int(d), nd)


@register_rule(*ops("topk", "sort", "argsort", "kthvalue", "cummax", "cummin", "msort"))
def _select_along(node: fx.Node, rc: RuleCtx) -> Decision:
    """Selection, sorting and scans read every entry along their dim: exact on a shard only
    when that dim is another one (a token-choice router's top-k over experts)."""
    x, sh, nd = _only_input(node, rc)
    pk = packet(node.target)
    dim = 0 if pk is aten.msort else _op_dim(node, nd)
    if dim == sh.dim:
        raise Break(f"{pk.__name__} along the sharded dim")
    out = sh
    if pk is aten.kthvalue and not schema_arg(node, "keepdim", False):
        out = sh.with_dim(sh.dim - (1 if dim is not None and dim < sh.dim else 0))
    val = node.meta.get("val")
    return Decision(out=tuple(out for _ in val) if isinstance(val, tuple | list) else out)


@register_rule(*ops("gather", "scatter", "scatter_add", "scatter_reduce"))
def _indexed(node: fx.Node, rc: RuleCtx) -> Decision:
    """``gather``/``scatter`` along ``dim`` pair the entries of data, index and source row by
    row in every other dim: exact when all of them are cut the same way on a dim that is not
    ``dim`` (a whole-size replicated operand is cut to match). An operand left whole would be
    read at local row numbers, so it breaks."""
    out_shape = rc.shape(node)
    d = align_inputs(node, rc, out_shape)
    sh = d.out
    assert isinstance(sh, Shard)
    if _op_dim(node, len(out_shape), None) == sh.dim:
        raise Break(f"{packet(node.target).__name__} along the sharded dim")
    for a in tensor_args(node):
        if len(rc.shape(a)) != len(out_shape):
            raise Break("index or source of another rank")
        if isinstance(rc.spec(a), Replicate) and a not in d.inputs:
            raise Break("an index or source is not cut like the data")
        if isinstance(rc.spec(a), Shard) and (rc.spec(a).outer, rc.spec(a).inner) != (
            sh.outer,
            sh.inner,
        ):  # type: ignore[union-attr]
            raise Break("index or source cut differently")
    return d


@register_rule(*ops("index_select"))
def _index_select(node: fx.Node, rc: RuleCtx) -> Decision:
    """Rows picked along another dim than the sharded one; the (1-D) index whole."""
    x, idx = node.args[0], node.args[2]
    sh = rc.spec(x)
    if not isinstance(sh, Shard) or not isinstance(rc.spec(idx), Replicate):
        raise Break("index_select with a sharded index")
    if norm_dim(int(node.args[1]), len(rc.shape(x))) == sh.dim:  # type: ignore[arg-type]
        raise Break("index_select along the sharded dim")
    return Decision(out=sh)
