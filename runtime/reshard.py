"""Graph-level placement changes used by the ``lower`` pass: all-gather and local slicing.

These are plain Python functions of traceable ops (functional collectives, reshapes), so the
GraphModule runs them eagerly and torch.compile traces through them. Their bytes are known
statically and counted per forward by the module that runs the graph. ``halo_pad`` (the
neighbour-row exchange of stride-1 convolutions) is an opaque op that counts itself.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc

from xdit_compile.placement import even_split, text_split
from xdit_compile.runtime.collectives import send_recv
from xdit_compile.runtime.mesh import get_mesh

__all__ = [
    "SPLIT",
    "all_reduce_bytes",
    "all_reduce_finish",
    "all_reduce_start",
    "all_reduce_sum",
    "gather_bytes",
    "gather_shard",
    "gather_shard_finish",
    "gather_shard_start",
    "gather_text",
    "gather_text_finish",
    "gather_text_start",
    "group_norm_bytes",
    "group_norm_sharded",
    "halo_pad",
    "slice_shard",
    "slice_text",
]


def _factor_view(x: torch.Tensor, dim: int, outer: int, inner: int) -> torch.Tensor:
    n = x.shape[dim] // (outer * inner)
    return x.reshape(*x.shape[:dim], outer, n, inner, *x.shape[dim + 1 :])


def _text_rows(head: int, tail: int, n: int, text_rank: int) -> tuple[int, int]:
    """Head/tail rows a rank holds: all of them, or with ``text_rank >= 0`` its even piece."""
    if text_rank < 0:
        return head, tail
    return even_split(head, n)[text_rank], even_split(tail, n)[text_rank]


def _three(
    x: torch.Tensor, dim: int, h: int, t: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        x.narrow(dim, 0, h),
        x.narrow(dim, h, x.shape[dim] - h - t),
        x.narrow(dim, x.shape[dim] - t, t),
    )


def gather_text(
    x: torch.Tensor, dim: int, head: int, tail: int, n: int, group_name: str, text_rank: int
) -> torch.Tensor:
    """Joint rows ``[head piece, body, tail piece]`` -> ``[head, body, tail]``: one all-gather of
    every rank's text pieces (evenly cut head and tail rows); the body stays as it is."""
    return gather_text_finish(
        gather_text_start(x, dim, head, tail, n, group_name, text_rank),
        x,
        dim,
        head,
        tail,
        n,
        group_name,
        text_rank,
    )


def gather_text_start(
    x: torch.Tensor, dim: int, head: int, tail: int, n: int, group_name: str, text_rank: int
) -> torch.Tensor:
    """The first half of :func:`gather_text`: starts the all-gather of the text pieces and
    returns its (not yet waited for) result."""
    h, t = _text_rows(head, tail, n, text_rank)
    hp, _, tp = _three(x, dim, h, t)
    hs, ts = even_split(head, n), even_split(tail, n)
    return gather_shard_start(
        torch.cat([hp, tp], dim),
        dim,
        1,
        1,
        [a + b for a, b in zip(hs, ts, strict=True)],
        group_name,
    )


def gather_text_finish(
    g: torch.Tensor,
    x: torch.Tensor,
    dim: int,
    head: int,
    tail: int,
    n: int,
    group_name: str,
    text_rank: int,
) -> torch.Tensor:
    """The second half of :func:`gather_text`: waits for ``g`` and joins the text to ``x``'s
    body."""
    h, t = _text_rows(head, tail, n, text_rank)
    hp, body, tp = _three(x, dim, h, t)
    hs, ts = even_split(head, n), even_split(tail, n)
    sizes = [a + b for a, b in zip(hs, ts, strict=True)]
    text = gather_shard_finish(g, hp, dim, 1, 1, sizes, group_name)  # hp: for the other dims' sizes
    pieces = text.split(sizes, dim)
    heads = [p.narrow(dim, 0, a) for p, a in zip(pieces, hs, strict=True)]
    tails = [p.narrow(dim, a, b) for p, a, b in zip(pieces, hs, ts, strict=True)]
    return torch.cat([*heads, body, *tails], dim)


def placed_like(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Identity: marks that ``x`` is to be cut like ``ref`` (the sharding pass moves it there;
    lowering drops the marker). Canonicalization puts one after ops that return a cut their users
    would not want (flex attention's head cut, back to its queries' sequence cut)."""
    return x


def gather_shard(
    x: torch.Tensor,
    dim: int,
    outer: int,
    inner: int,
    split: list[int],
    group_name: str,
    head: int = 0,
    tail: int = 0,
    text_rank: int = -1,
) -> torch.Tensor:
    """All-gather the sharded factor of ``dim`` over the sequence-parallel group (uneven ok).

    Pieces are padded to the largest one for the collective and cut back after it, so the
    result is exactly the global tensor. Replicated ``head``/``tail`` rows are not sent; with
    ``text_rank >= 0`` they are cut evenly (this rank's index) and gathered too.
    """
    if head or tail:
        if text_rank >= 0:
            x = gather_text(x, dim, head, tail, len(split), group_name, text_rank)
        hp, body, tp = _three(x, dim, head, tail)
        return torch.cat(
            [hp, gather_shard(body, dim, outer, inner, split, group_name), tp], dim=dim
        )
    return gather_shard_finish(
        gather_shard_start(x, dim, outer, inner, split, group_name),
        x,
        dim,
        outer,
        inner,
        split,
        group_name,
    )


def gather_shard_start(
    x: torch.Tensor, dim: int, outer: int, inner: int, split: list[int], group_name: str
) -> torch.Tensor:
    """The first half of :func:`gather_shard` (no text rows): pads this rank's piece and starts
    the all-gather; returns its (not yet waited for) result, ``[n * max(split), ...]``."""
    n, m = len(split), max(split)
    v = _factor_view(x, dim, outer, inner).movedim(dim + 1, 0)  # [s_r, ..., outer, inner, ...]
    if v.shape[0] < m:
        v = torch.cat([v, v.new_zeros((m - v.shape[0], *v.shape[1:]))])
    return torch.ops._c10d_functional.all_gather_into_tensor(v.contiguous(), n, group_name)


def gather_shard_finish(
    g: torch.Tensor,
    x: torch.Tensor,
    dim: int,
    outer: int,
    inner: int,
    split: list[int],
    group_name: str,
) -> torch.Tensor:
    """The second half of :func:`gather_shard`: waits for ``g`` and cuts it to the global tensor
    (``x``: this rank's piece, or any tensor with its sizes in the dims other than ``dim``)."""
    m = max(split)
    g = fc.wait_tensor(g)
    if len(set(split)) > 1:
        g = torch.cat([p[:s] for p, s in zip(g.split(m), split, strict=True)])
    g = g.movedim(0, dim + 1)
    # Contiguous like the tensor the original graph computed, so its view ops stay valid.
    return g.reshape(*x.shape[:dim], outer * sum(split) * inner, *x.shape[dim + 1 :]).contiguous()


def all_reduce_sum(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """Sum of every rank's partial ``x`` (functional all-reduce)."""
    return all_reduce_finish(all_reduce_start(x, group_name))


def all_reduce_start(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """Starts :func:`all_reduce_sum`; returns its (not yet waited for) result."""
    return torch.ops._c10d_functional.all_reduce(x.contiguous(), "sum", group_name)


def all_reduce_finish(g: torch.Tensor) -> torch.Tensor:
    """Waits for an :func:`all_reduce_start`."""
    return fc.wait_tensor(g)


def group_norm_sharded(
    x: torch.Tensor,
    groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    group_name: str,
    n: int,
) -> torch.Tensor:
    """``group_norm`` of ``x`` ``[B, C, *spatial]`` whose spatial rows are cut over the ``n``
    ranks of ``group_name`` (uneven pieces, even empty ones, allowed).

    Each rank computes its count, mean and sum of squared deviations per (batch, group) in
    float32; one all-gather of those ``3 * B * groups`` numbers; Chan's pairwise combination
    gives the global mean and variance (no ``E[x^2] - E[x]^2`` cancellation), and each rank
    normalizes its own rows: the serial result up to rounding, with no rows sent.
    """
    b, c = x.shape[0], x.shape[1]
    xs = x.reshape(b, groups, -1).float()
    cnt = xs.shape[-1]
    mean = xs.sum(-1) / max(cnt, 1)
    m2 = (xs - mean.unsqueeze(-1)).square().sum(-1)
    stats = torch.stack([torch.full_like(mean, float(cnt)), mean, m2])  # [3, B, G]
    g = fc.wait_tensor(
        torch.ops._c10d_functional.all_gather_into_tensor(stats.contiguous(), n, group_name)
    )
    counts, means, m2s = g.reshape(n, 3, b, groups).unbind(1)
    total = counts.sum(0)
    mu = (counts * means).sum(0) / total
    var = (m2s + counts * (means - mu).square()).sum(0) / total
    y = (xs - mu.unsqueeze(-1)) * torch.rsqrt(var + eps).unsqueeze(-1)
    y = y.reshape(x.shape)
    per_channel = (1, c) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.float().reshape(per_channel)
    if bias is not None:
        y = y + bias.float().reshape(per_channel)
    return y.to(x.dtype)


def group_norm_bytes(batch: int, groups: int, n: int) -> int:
    """Bytes one rank sends in :func:`group_norm_sharded`: its float32 statistics to every peer."""
    return 3 * batch * groups * 4 * (n - 1)


def all_reduce_bytes(nbytes: int, n: int) -> int:
    """Bytes one rank sends in a ring all-reduce of ``nbytes``: 2 (n - 1) / n of it."""
    return 2 * (n - 1) * nbytes // n


def gather_bytes(unit_numel: int, itemsize: int, split: list[int]) -> int:
    """Bytes a rank sends in :func:`gather_shard`: its piece padded to ``max(split)`` units of
    ``unit_numel`` elements, to every peer (the same for every rank, an empty piece too)."""
    return unit_numel * max(split) * itemsize * (len(split) - 1)


def slice_text(
    x: torch.Tensor, dim: int, head: int, tail: int, n: int, text_rank: int, owner: int = -1
) -> torch.Tensor:
    """Joint rows ``[head, body, tail]`` -> ``[head piece, body, tail piece]`` (no communication):
    even pieces, or with ``owner >= 0`` all text rows on rank ``owner`` and none elsewhere."""
    hp, body, tp = _three(x, dim, head, tail)
    hs, ts = text_split(head, n, owner), text_split(tail, n, owner)
    ho, to = sum(hs[:text_rank]), sum(ts[:text_rank])
    return torch.cat(
        [hp.narrow(dim, ho, hs[text_rank]), body, tp.narrow(dim, to, ts[text_rank])], dim
    )


def slice_shard(
    x: torch.Tensor,
    dim: int,
    outer: int,
    inner: int,
    start: int,
    length: int,
    head: int = 0,
    tail: int = 0,
    text: tuple[int, ...] = (-1, 0),
) -> torch.Tensor:
    """This rank's piece of a replicated tensor (no communication): its body rows, with the
    replicated ``head``/``tail`` rows kept in front and behind (with ``text = (rank, n)``,
    this rank's even piece of them; ``(rank, n, owner)``: all of them on rank ``owner``)."""
    if head or tail:
        body = x.narrow(dim, head, x.shape[dim] - head - tail)
        parts = [
            x.narrow(dim, 0, head),
            slice_shard(body, dim, outer, inner, start, length),
            x.narrow(dim, x.shape[dim] - tail, tail),
        ]
        out = torch.cat(parts, dim=dim)
        return (
            slice_text(out, dim, head, tail, text[1], text[0], *text[2:]) if text[0] >= 0 else out
        )
    if outer == 1 and inner == 1:
        return x.narrow(dim, start, length)
    v = _factor_view(x, dim, outer, inner).narrow(dim + 1, start, length)
    return v.reshape(*x.shape[:dim], outer * length * inner, *x.shape[dim + 1 :])


@torch.library.custom_op("xdit::halo_pad", mutates_args=())
def halo_pad(
    x: torch.Tensor, dim: int, top: int, bottom: int, mesh_key: str, head: int = 0, rows: int = -1
) -> torch.Tensor:
    """This rank's rows of ``dim`` with ``top`` rows of the previous rank before them and
    ``bottom`` rows of the next rank after them (zeros past the global edges).

    A convolution with its padding on that dim set to 0 then computes exactly this rank's output
    rows: stride 1 "same" convolutions take ``top == bottom == padding``; strided ones (a VAE
    encoder's downsampling) take ``top = padding``, ``bottom = kernel - stride - padding``.
    ``rows >= 0``: ``x`` is ``[head rows, this rank's rows, ...]`` (zero rows a constant pad
    added at the global edges, which every rank holds): those ``rows`` after ``head`` are used.
    """
    if rows >= 0:
        x = x.narrow(dim, head, rows)
    pm = get_mesh(mesh_key)
    group = pm.group("sp")
    me, n = dist.get_rank(group), dist.get_world_size(group)
    parts = [x]
    # Two shifts: my last `top` rows go down the ring (the next rank's top halo), my first
    # `bottom` rows go up (the previous rank's bottom halo); the edges receive nothing useful.
    if top:
        last = x.narrow(dim, x.shape[dim] - top, top).contiguous()
        works, recv = send_recv([last], [last.shape], (me + 1) % n, (me - 1) % n, group, "sp")
        for w in works:
            w.wait()
        parts.insert(0, recv[0] if me > 0 else torch.zeros_like(last))
    if bottom:
        first = x.narrow(dim, 0, bottom).contiguous()
        works, recv = send_recv([first], [first.shape], (me - 1) % n, (me + 1) % n, group, "sp")
        for w in works:
            w.wait()
        parts.append(recv[0] if me < n - 1 else torch.zeros_like(first))
    # Contiguous, as the fake says (cat keeps a channels-last input's layout).
    return torch.cat(parts, dim=dim).contiguous()


@halo_pad.register_fake
def _(x, dim, top, bottom, mesh_key, head=0, rows=-1):  # type: ignore[no-untyped-def]
    shape = list(x.shape)
    shape[dim] = (rows if rows >= 0 else shape[dim]) + top + bottom
    return x.new_empty(shape)


def halo_bytes(row_numel: int, top: int, bottom: int, itemsize: int) -> int:
    """Bytes one ``halo_pad`` call sends: ``top`` rows one way, ``bottom`` rows the other
    (``row_numel``: elements of one row of the sharded dim)."""
    return row_numel * (top + bottom) * itemsize


#: Graph-level collectives the ``overlap_collectives`` pass splits into a start (as early as its
#: input allows) and a finish (just before the first use): collective -> (start, finish, number
#: of leading arguments the start takes, whether the finish takes those arguments too, after
#: the started result).
SPLIT: dict[object, tuple[object, object, int, bool]] = {
    gather_shard: (gather_shard_start, gather_shard_finish, 6, True),
    gather_text: (gather_text_start, gather_text_finish, 7, True),
    all_reduce_sum: (all_reduce_start, all_reduce_finish, 2, False),
}
