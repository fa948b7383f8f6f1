"""Exact sequence-parallel attention ops: Ulysses, Ring and USP (both), as ``torch.library`` ops.

Layout: q, k, v are ``[..., H, head + S_local + tail, D]``: optional replicated rows (text)
and this rank's contiguous slice of the sharded sequence; ``split`` lists every sequence-parallel
rank's slice length (ring-major, ulysses-minor, so a Ulysses group holds one contiguous block).
Uneven splits are exact.

- Ulysses: one all-to-all over the ``ulysses`` axis trades the sequence split of Q, K and V
  (packed together) for a head split, so each rank attends over its Ulysses group's whole block
  for H/U heads; a second all-to-all returns the output to the sequence split. Same arithmetic
  as one device.
- Ring: each rank keeps its queries and passes its K/V block around the ``ring`` axis; each
  step's partial result is merged with the log-sum-exp in fp32 (exact up to fp32 rounding).
- USP: Ulysses inside, Ring across Ulysses groups.

- Joint sequences: text K/V are on every rank and are never sent. Ulysses slices their heads
  locally, Ring attends to them once, with the local block. Text output rows come back either
  whole on every rank (gathered over heads) or, with ``text_rank``, cut evenly over the ranks
  (each rank's piece rides in Ulysses' output all-to-all); query text rows may arrive cut the
  same way (``q_cut``: they ride in the input all-to-all).

The ops have fake implementations, so export and inductor treat them as opaque calls.
An optional replicated mask (broadcastable to ``[B, H, S, S]`` global) is sliced per block.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from xdit_compile.kernels.attention import attention_with_lse, merge_partial
from xdit_compile.placement import even_split
from xdit_compile.runtime.collectives import all_gather, all_to_all, send_recv
from xdit_compile.runtime.mesh import MeshInfo, ParallelMesh, get_mesh

__all__ = ["head_groups", "ulysses_degree", "ulysses_heads", "usp_attention", "usp_comm_bytes"]

#: Q, K and V travel in one all-to-all (True), or one each (False: the earlier path, kept so
#: ``benchmarks/profile_breakdown.py`` can measure both in one run; the byte counts are equal).
FUSE_QKV = True


def _offsets(split: Sequence[int]) -> list[int]:
    out = [0]
    for s in split:
        out.append(out[-1] + s)
    return out


def head_groups(heads: int, u: int) -> tuple[int, ...]:
    """How Ulysses deals ``heads`` over ``u`` ranks: as evenly as they go, the first ranks one more
    (a rank may hold none where heads < u)."""
    return even_split(heads, u)


def ulysses_degree(heads: int, u: int) -> int:
    """The Ulysses degree attention with ``heads`` heads runs at on a ``u``-rank ulysses axis:
    ``u``, or, where there are fewer heads than ranks, the largest divisor of ``u`` not above
    ``heads`` (the rest of the axis joins the ring)."""
    return u if heads >= u else max(d for d in range(1, heads + 1) if u % d == 0)


@dataclass(frozen=True)
class _Ulysses:
    """This rank's Ulysses exchange: among ``n`` ranks of the ``ulysses`` group (``size`` ranks),
    from group index ``base`` (a sub-block of it when the rest of the axis runs as Ring)."""

    group: Any
    size: int
    base: int
    n: int
    me: int

    def a2a(self, flat: torch.Tensor, recv: list[int], send: list[int]) -> torch.Tensor:
        if self.n != self.size:  # nothing to or from the ranks outside the sub-block
            pad = [0] * self.size
            recv = pad[: self.base] + recv + pad[self.base + self.n :]
            send = pad[: self.base] + send + pad[self.base + self.n :]
        return all_to_all(flat, recv, send, self.group, "ulysses")


def _ulysses_in(x: torch.Tensor, rows: list[int], ux: _Ulysses) -> torch.Tensor:
    """[..., H, s_me, D] sequence shard -> [..., H_me, sum(rows), D] head shard (``rows``: the
    sub-block ranks' row counts; heads dealt by :func:`head_groups`)."""
    return _ulysses_in_fused([x], rows, ux)[0]


def _ulysses_in_fused(
    xs: Sequence[torch.Tensor], rows: list[int], ux: _Ulysses
) -> list[torch.Tensor]:
    """:func:`_ulysses_in` of several ``[..., H, s_me, D_i]`` tensors (same rows and heads) in
    one all-to-all: each peer's heads of every tensor are packed side by side on the last dim
    (one copy, as for one tensor), sent together, and split again."""
    n = len(rows)
    *lead, h, s, _ = xs[0].shape
    dims = [int(x.shape[-1]) for x in xs]
    hs, lead_n = head_groups(h, n), math.prod(lead)
    if (
        len(set(hs)) == 1
    ):  # [n, ..., H/n, s, sum(D_i)]: peer-major, every tensor's heads side by side
        chunks = torch.cat(
            [x.reshape(*lead, n, h // n, s, x.shape[-1]).movedim(-4, 0) for x in xs], dim=-1
        )
        flat = chunks.reshape(-1)
    else:
        pieces = [x.split(hs, dim=-3) for x in xs]
        flat = torch.cat([torch.cat([p[j] for p in pieces], dim=-1).reshape(-1) for j in range(n)])
    mine, width = hs[ux.me], sum(dims)
    recv = [lead_n * mine * r * width for r in rows]
    out = ux.a2a(flat, recv, [lead_n * hj * s * width for hj in hs])
    block = torch.cat(
        [p.reshape(*lead, mine, r, width) for p, r in zip(out.split(recv), rows, strict=True)],
        dim=-2,
    )
    return list(block.split(dims, dim=-1)) if len(xs) > 1 else [block]


def _ulysses_out(x: torch.Tensor, rows: list[int], ux: _Ulysses, h: int) -> torch.Tensor:
    """[..., H_me, sum(rows), D] head shard -> [..., H, s_me, D] sequence shard (``h``: all
    heads)."""
    n = len(rows)
    *lead, hm, _, d = x.shape
    hs, lead_n, s_me = head_groups(h, n), math.prod(lead), rows[ux.me]
    flat = torch.cat([p.contiguous().reshape(-1) for p in x.split(rows, dim=-2)])
    recv = [lead_n * hj * s_me * d for hj in hs]
    out = ux.a2a(flat, recv, [lead_n * hm * r * d for r in rows])
    if len(set(hs)) == 1:
        return out.reshape(n, *lead, hm, s_me, d).movedim(0, -4).reshape(*lead, n * hm, s_me, d)
    return torch.cat(
        [p.reshape(*lead, hj, s_me, d) for p, hj in zip(out.split(recv), hs, strict=True)], dim=-3
    )


def _gather_heads(x: torch.Tensor, ux: _Ulysses, h: int) -> torch.Tensor:
    """[..., H_me, rows, D] -> [..., H, rows, D]: every rank of the sub-block gets all heads."""
    hs = head_groups(h, ux.n)
    if len(set(hs)) == 1 and ux.n == ux.size:
        return all_gather(x, -3, ux.group, "ulysses")
    *lead, _, rows, d = x.shape
    piece = x.contiguous().reshape(-1)
    recv = [math.prod(lead) * hj * rows * d for hj in hs]
    out = ux.a2a(torch.cat([piece] * ux.n), recv, [piece.numel()] * ux.n)
    return torch.cat(
        [p.reshape(*lead, hj, rows, d) for p, hj in zip(out.split(recv), hs, strict=True)], dim=-3
    )


def _ulysses_in_text(
    qh: torch.Tensor,
    qb: torch.Tensor,
    qt: torch.Tensor,
    group: list[int],
    hs: Sequence[int],
    ts: Sequence[int],
    ux: _Ulysses,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_ulysses_in` of rows ``[text head piece, body, text tail piece]``: returns this
    rank's heads of the group's head pieces, body block and tail pieces, each in rank order."""
    sizes = [a + b + c for a, b, c in zip(hs, group, ts, strict=True)]
    rows = _ulysses_in(torch.cat([qh, qb, qt], dim=-2), sizes, ux)
    parts = [
        p.split([a, b, c], dim=-2)
        for p, a, b, c in zip(rows.split(sizes, dim=-2), hs, group, ts, strict=True)
    ]
    return tuple(torch.cat([p[i] for p in parts], dim=-2) for i in range(3))  # type: ignore[return-value]


def _positions(*ranges: tuple[int, int], device: torch.device) -> torch.Tensor:
    return torch.cat([torch.arange(a, b, device=device) for a, b in ranges])


def _mask_for(
    mask: torch.Tensor | None, q_pos: torch.Tensor, k_pos: torch.Tensor, h_rng: tuple[int, int]
) -> torch.Tensor | None:
    """The rows/columns/heads of a global (replicated) mask that these q/k rows see."""
    if mask is None:
        return None
    if mask.dim() >= 3 and mask.shape[-3] > 1:
        mask = mask[..., h_rng[0] : h_rng[1], :, :]
    if mask.shape[-2] > 1:
        mask = mask.index_select(-2, q_pos.to(mask.device))
    if mask.shape[-1] > 1:
        mask = mask.index_select(-1, k_pos.to(mask.device))
    return mask


@dataclass(frozen=True)
class _RingPeers:
    """The ring this rank passes K/V blocks around: ``r`` ranks, this one ``me``-th, over
    ``group``, sending to group index ``dst`` and receiving from ``src``."""

    group: Any
    r: int
    me: int
    dst: int
    src: int


def _ring(
    q,
    k,
    v,
    mask,
    scale,
    ring: _RingPeers,
    blocks: list[int],
    q_pos,
    key_base: int,  # type: ignore[no-untyped-def]
    h_rng,
    extra=None,
):
    """Attention of the local queries over every ring block of body K/V, merged by the
    log-sum-exp. ``extra = (k, v, positions)``: keys every rank holds (text), attended together
    with the local block and never sent."""
    r, me = ring.r, ring.me
    offs = _offsets(blocks)
    cur_k, cur_v = k, v
    out = lse = None
    for step in range(r):
        src = (me - step) % r
        pending = None
        if step < r - 1:
            nxt = (me - step - 1) % r
            shape = (*k.shape[:-2], blocks[nxt], k.shape[-1])
            vshape = (*v.shape[:-2], blocks[nxt], v.shape[-1])
            pending = send_recv(
                [cur_k, cur_v],
                [torch.Size(shape), torch.Size(vshape)],
                ring.dst,
                ring.src,
                ring.group,
                "ring",
            )
        k_pos = _positions((key_base + offs[src], key_base + offs[src + 1]), device=q.device)
        kk, vv = cur_k, cur_v
        if step == 0 and extra is not None:
            kk, vv = torch.cat([extra[0], cur_k], dim=-2), torch.cat([extra[1], cur_v], dim=-2)
            k_pos = torch.cat([extra[2], k_pos])
        blk_out, blk_lse = attention_with_lse(
            q, kk, vv, _mask_for(mask, q_pos, k_pos, h_rng), scale
        )
        out, lse = merge_partial(out, lse, blk_out, blk_lse)
        if pending is not None:
            for w in pending[0]:
                w.wait()
            cur_k, cur_v = pending[1]
    assert out is not None
    return out.to(q.dtype)


def _join(*parts: torch.Tensor) -> torch.Tensor:
    """Concatenate along the sequence, without a copy when only one part is non-empty (the
    common case: no text rows)."""
    nonempty = [p for p in parts if p.shape[-2]]
    return nonempty[0] if len(nonempty) == 1 else torch.cat(parts, dim=-2)


def _split3(
    t: torch.Tensor, head: int, body: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return t[..., :head, :], t[..., head : head + body, :], t[..., head + body :, :]


@dataclass(frozen=True)
class _Axes:
    """The sequence-parallel ranks as one attention runs on them: ``u`` Ulysses ranks inside
    ``r`` ring blocks. ``u`` is the mesh's ulysses degree, or a divisor of it where the heads are
    fewer (:func:`ulysses_degree`): then the ulysses axis splits into sub-blocks that join the ring.
    Either way the sequence-parallel order is ring-major, ulysses-minor (``sp = me * u + me_u``)."""

    u: int
    r: int
    me_u: int
    me: int
    sub: int
    """Sub-blocks per ulysses group (1: the mesh's axes as they are)."""

    @classmethod
    def of(cls, info: MeshInfo, ulysses: int = -1) -> _Axes:
        u = info.ulysses if ulysses <= 0 else ulysses
        if info.ulysses % u:
            raise ValueError(
                f"Ulysses degree {u} does not divide the ulysses axis ({info.ulysses})"
            )
        sub = info.ulysses // u
        return cls(
            u,
            info.ring * sub,
            info.ulysses_rank % u,
            info.ring_rank * sub + info.ulysses_rank // u,
            sub,
        )

    def ulysses(self, pm: ParallelMesh) -> _Ulysses:
        return _Ulysses(
            pm.group("ulysses"),
            pm.info.ulysses,
            (pm.info.ulysses_rank // self.u) * self.u,
            self.u,
            self.me_u,
        )

    def ring(self, pm: ParallelMesh) -> _RingPeers:
        if self.sub == 1:
            return _RingPeers(
                pm.group("ring"), self.r, self.me, (self.me + 1) % self.r, (self.me - 1) % self.r
            )
        # Sub-blocks of the ulysses axis join the ring: peers by sequence-parallel index.
        assert pm.info.distrifusion == 1
        return _RingPeers(
            pm.group("sp"),
            self.r,
            self.me,
            ((self.me + 1) % self.r) * self.u + self.me_u,
            ((self.me - 1) % self.r) * self.u + self.me_u,
        )


def ulysses_heads(info: MeshInfo, heads: int, ulysses: int = -1) -> tuple[int, int]:
    """The heads ``[lo, hi)`` this rank attends for, in a ``usp_attention`` call of ``heads``
    heads at Ulysses degree ``ulysses`` (the op's argument; -1: the mesh's)."""
    ax = _Axes.of(info, ulysses)
    off = _offsets(head_groups(heads, ax.u))
    return off[ax.me_u], off[ax.me_u + 1]


def _usp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None,
    mesh_key: str,
    split: list[int],
    head: int,
    tail: int,
    shard_text: bool = False,
    q_cut: bool = False,
    kv_split: list[int] | None = None,
    kv_head: int = 0,
    kv_tail: int = 0,
    ulysses: int = -1,
) -> torch.Tensor:
    pm = get_mesh(mesh_key)
    ax = _Axes.of(pm.info, ulysses)
    u, h = ax.u, q.shape[-3]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if kv_split is None:  # K/V in Q's layout (self-attention, joint attention)
        kv_split, kv_head, kv_tail = split, head, tail
    # Per ring block: the Ulysses group's slice lengths and the block's range in the body; Q's
    # rows and K/V's rows each by their own layout.
    groups = [split[i * u : (i + 1) * u] for i in range(ax.r)]
    kgroups = [kv_split[i * u : (i + 1) * u] for i in range(ax.r)]
    blocks, kblocks = [sum(g) for g in groups], [sum(g) for g in kgroups]
    offs, body_total, kv_total = _offsets(blocks), sum(split), sum(kv_split)
    me, sp_rank = ax.me, ax.me * u + ax.me_u
    s_me, ks_me = split[sp_rank], kv_split[sp_rank]
    n, first = len(split), me * u
    hs, ts = even_split(head, n), even_split(tail, n)
    (kh, kb, kt), (vh, vb, vt) = (_split3(t, kv_head, ks_me) for t in (k, v))
    # Query text rows: whole on every rank, or (q_cut) only this rank's even piece of them.
    qh, qb, qt = _split3(q, hs[sp_rank] if q_cut else head, s_me)
    h_rng = (0, h)
    ux = ax.ulysses(pm) if u > 1 else None
    if ux is not None:
        if q_cut:  # the text query pieces travel with the image rows (other rows than K/V's)
            kb, vb = (
                _ulysses_in_fused([kb, vb], kgroups[me], ux)
                if FUSE_QKV
                else [_ulysses_in(t, kgroups[me], ux) for t in (kb, vb)]
            )
            qh, qb, qt = _ulysses_in_text(
                qh, qb, qt, groups[me], hs[first : first + u], ts[first : first + u], ux
            )
        elif FUSE_QKV and kgroups[me] == groups[me]:  # Q, K and V in one all-to-all
            qb, kb, vb = _ulysses_in_fused([qb, kb, vb], groups[me], ux)
        elif FUSE_QKV:  # K/V rows cut otherwise than Q's: Q alone, K and V together
            qb = _ulysses_in(qb, groups[me], ux)
            kb, vb = _ulysses_in_fused([kb, vb], kgroups[me], ux)
        else:
            qb = _ulysses_in(qb, groups[me], ux)
            kb, vb = (_ulysses_in(t, kgroups[me], ux) for t in (kb, vb))
        h_rng = ulysses_heads(pm.info, h, u)
        # Text rows are on every rank: each takes its heads' slice, nothing is sent.
        kh, kt, vh, vt = (t[..., h_rng[0] : h_rng[1], :, :] for t in (kh, kt, vh, vt))
        if not q_cut:
            qh, qt = (t[..., h_rng[0] : h_rng[1], :, :] for t in (qh, qt))
    q_text = ((0, head), (head + body_total, head + body_total + tail))
    kv_text = ((0, kv_head), (kv_head + kv_total, kv_head + kv_total + kv_tail))
    if shard_text and (head or tail):
        # Only the text query rows whose outputs this Ulysses group keeps: its ranks' pieces.
        ho, to = _offsets(hs), _offsets(ts)
        if not q_cut:
            qh, qt = qh[..., ho[first] : ho[first + u], :], qt[..., to[first] : to[first + u], :]
        tail_at = head + body_total
        q_text = ((ho[first], ho[first + u]), (tail_at + to[first], tail_at + to[first + u]))
    q_all = _join(qh, qb, qt)
    q_pos = _positions(
        q_text[0], (head + offs[me], head + offs[me + 1]), q_text[1], device=q.device
    )
    if ax.r > 1:
        # Text K/V are on every rank: attended once, with the local block (never sent).
        extra = (
            (_join(kh, kt), _join(vh, vt), _positions(*kv_text, device=q.device))
            if kv_head or kv_tail
            else None
        )
        res = _ring(q_all, kb, vb, mask, scale, ax.ring(pm), kblocks, q_pos, kv_head, h_rng, extra)
    else:
        k_pos = torch.arange(kv_head + kv_total + kv_tail, device=q.device)
        res = torch.nn.functional.scaled_dot_product_attention(
            q_all,
            _join(kh, kb, kt),
            _join(vh, vb, vt),
            attn_mask=_mask_for(mask, q_pos, k_pos, h_rng),
            scale=scale,
        )
    if not (head or tail):
        return _ulysses_out(res, groups[me], ux, h) if ux is not None else res
    oh, ob, ot = _split3(res, qh.shape[-2], blocks[me] if ux is not None else s_me)
    if shard_text:
        return _text_rows_out(oh, ob, ot, head, tail, groups[me], ux, first, h, len(split))
    if ux is not None:
        ob = _ulysses_out(ob, groups[me], ux, h)
        # Text outputs: every rank needs all heads of them.
        txt = _gather_heads(torch.cat([oh, ot], -2), ux, h)
        oh, ot = txt[..., :head, :], txt[..., head:, :]
    return torch.cat([oh, ob, ot], dim=-2)


def _text_rows_out(
    oh: torch.Tensor,
    ob: torch.Tensor,
    ot: torch.Tensor,
    head: int,
    tail: int,
    group: list[int],
    ux: _Ulysses | None,
    first: int,
    h: int,
    n: int,
) -> torch.Tensor:
    """Output rows ``[head piece, body, tail piece]``: the text rows cut evenly over all ranks.

    ``oh``/``ot`` hold the text rows of this Ulysses group's pieces (all heads of them with Ring
    only: the rank's own piece). With Ulysses, one all-to-all sends every peer of the group its
    body rows and its text pieces together (``first``: the group's first sequence-parallel index).
    """
    if ux is None:
        return torch.cat([oh, ob, ot], dim=-2)
    hs, ts = even_split(head, n), even_split(tail, n)
    ho, to = _offsets(hs[first : first + ux.n]), _offsets(ts[first : first + ux.n])
    bo = _offsets(group)
    pieces, sizes = [], []
    for k in range(ux.n):
        pieces += [
            oh[..., ho[k] : ho[k + 1], :],
            ob[..., bo[k] : bo[k + 1], :],
            ot[..., to[k] : to[k + 1], :],
        ]
        sizes.append(ho[k + 1] - ho[k] + group[k] + to[k + 1] - to[k])
    return _ulysses_out(torch.cat(pieces, dim=-2), sizes, ux, h)


@torch.library.custom_op("xdit::usp_attention", mutates_args=())
def usp_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    scale: float | None,
    mesh_key: str,
    split: list[int],
    head: int = 0,
    tail: int = 0,
    text_rank: int = -1,
    q_cut: bool = False,
    kv_split: list[int] | None = None,
    kv_head: int = 0,
    kv_tail: int = 0,
    ulysses: int = -1,
) -> torch.Tensor:
    """Exact attention over the whole (sharded) sequence; returns this rank's output rows.

    ``head``/``tail``: replicated rows (text) joined before/after the sharded body. With
    ``text_rank`` (this rank's sequence-parallel index) the output holds only this rank's
    even piece of them; with ``q_cut`` too, so does ``q`` (K/V always hold all text rows).
    ``kv_split``/``kv_head``/``kv_tail``: K and V's own layout where it differs from Q's (image
    queries over image + text keys; None: Q's). ``ulysses``: the Ulysses degree (-1: the mesh's;
    a divisor of it where there are fewer heads than ranks, the rest of the axis joining the ring).
    Heads are dealt as :func:`head_groups` says, unevenly where the degree does not divide them.
    """
    # Contiguous, as the fake says: compiled graphs assert the real strides against the fake's
    # (Ring without text rows would return the attention kernel's [B, S, H, D]-ordered output).
    return _usp(
        q,
        k,
        v,
        attn_mask,
        scale,
        mesh_key,
        split,
        head,
        tail,
        text_rank >= 0,
        q_cut,
        None if kv_split is None else list(kv_split),
        kv_head,
        kv_tail,
        ulysses,
    ).contiguous()


@usp_attention.register_fake
def _(
    q,
    k,
    v,
    attn_mask,
    scale,
    mesh_key,
    split,
    head=0,
    tail=0,
    text_rank=-1,
    q_cut=False,  # type: ignore[no-untyped-def]
    kv_split=None,
    kv_head=0,
    kv_tail=0,
    ulysses=-1,
):
    rows = q.shape[-2]
    if text_rank >= 0:
        n = len(split)
        rows = even_split(head, n)[text_rank] + split[text_rank] + even_split(tail, n)[text_rank]
    return q.new_empty((*q.shape[:-2], rows, v.shape[-1]))


def usp_comm_bytes(
    q_shape: tuple[int, ...],
    v_dim: int,
    itemsize: int,
    info: MeshInfo,
    split: list[int],
    text: tuple[int, int] = (0, 0),
    shard_text: bool = False,
    q_cut: bool = False,
    kv_split: list[int] | None = None,
    ulysses: int = -1,
) -> dict[tuple[str, str], tuple[int, int]]:
    """Static (calls, bytes sent by ``info.rank``) per (op, axis) of one ``usp_attention`` call
    (``kv_split``: K/V's body rows where they are cut otherwise than Q's; ``ulysses``: the
    call's Ulysses degree, as the op's argument).

    Mirrors the algorithm above; tests check it against the runtime counter.
    """
    *lead, h, _, d = q_shape
    lead_n = math.prod(lead)
    ax = _Axes.of(info, ulysses)
    u, r = ax.u, ax.r
    kv_split = split if kv_split is None else kv_split
    groups = [split[i * u : (i + 1) * u] for i in range(r)]
    kgroups = [kv_split[i * u : (i + 1) * u] for i in range(r)]
    mine, kmine = groups[ax.me], kgroups[ax.me]
    s_me, ks_me = mine[ax.me_u], kmine[ax.me_u]
    hs = head_groups(h, u)
    h_me, h_others = hs[ax.me_u], h - hs[ax.me_u]
    sp_rank, n, first = ax.me * u + ax.me_u, len(split), ax.me * u
    out: dict[tuple[str, str], tuple[int, int]] = {}
    if u > 1:
        tok = lead_n * itemsize  # bytes of one (row, head, feature)
        send_in = tok * h_others * (s_me * d + ks_me * (d + v_dim))
        send_out = tok * h_me * v_dim * (sum(mine) - s_me)
        if q_cut:  # this rank's text query piece goes out with its image query rows
            piece = even_split(text[0], n)[sp_rank] + even_split(text[1], n)[sp_rank]
            send_in += tok * h_others * piece * d
        if shard_text:  # peers' text pieces travel with their body rows
            ths, tts = even_split(text[0], n), even_split(text[1], n)
            send_out += (
                tok
                * h_me
                * v_dim
                * sum(ths[first + k] + tts[first + k] for k in range(u) if k != ax.me_u)
            )
        # Q, K, V fused in one all-to-all (K, V only, where Q's rows travel apart), then the output.
        calls = (3 if q_cut or kmine != mine else 2) if FUSE_QKV else 4
        gathered = (
            sum(text) and not shard_text
        )  # text outputs shared over heads; text K/V never sent
        if gathered and (
            len(set(hs)) > 1 or ax.sub > 1
        ):  # uneven heads or a sub-block: an all-to-all
            calls += 1
            send_out += tok * h_me * v_dim * sum(text) * (u - 1)
        elif gathered:
            out[("all_gather", "ulysses")] = (1, tok * h_me * v_dim * sum(text) * (u - 1))
        out[("all_to_all", "ulysses")] = (calls, send_in + send_out)
    if r > 1:
        blocks = [sum(g) for g in kgroups]
        per_tok = lead_n * h_me * itemsize * (d + v_dim)
        sent = sum(blocks[(ax.me - s) % r] for s in range(r - 1)) * per_tok
        out[("send_recv", "ring")] = (r - 1, sent)
    return out
