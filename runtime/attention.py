"""Exact sequence-parallel attention ops: Ulysses, Ring and USP (both), as ``torch.library`` ops.

Layout: q, k, v are ``[..., H, head + S_local + tail, D]``: optional replicated rows (text)
and this rank's contiguous slice of the sharded sequence; ``split`` lists every sequence-parallel rank's slice length (ring-major,
ulysses-minor, so a Ulysses group holds one contiguous block). Uneven splits are exact.

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

from collections.abc import Sequence

import torch
import torch.distributed as dist

from xdit_compile.kernels.attention import attention_with_lse, merge_partial
from xdit_compile.placement import even_split
from xdit_compile.runtime.collectives import all_gather, all_to_all, send_recv
from xdit_compile.runtime.mesh import MeshInfo, ParallelMesh, get_mesh

__all__ = ["usp_attention", "usp_comm_bytes"]

#: Q, K and V travel in one all-to-all (True), or one each (False: the earlier path, kept so
#: ``benchmarks/profile_breakdown.py`` can measure both in one run; the byte counts are equal).
FUSE_QKV = True


def _offsets(split: Sequence[int]) -> list[int]:
    out = [0]
    for s in split:
        out.append(out[-1] + s)
    return out


def _ulysses_in(x: torch.Tensor, group_split: list[int], me: int, group: dist.ProcessGroup) -> torch.Tensor:
    """[..., H, s_me, D] sequence shard -> [..., H/U, sum(group_split), D] head shard."""
    u = len(group_split)
    *lead, h, s, d = x.shape
    chunks = x.reshape(*lead, u, h // u, s, d).movedim(-4, 0).contiguous()  # [U, ..., H/U, s, D]
    per_seq = chunks[0].numel() // s
    flat = all_to_all(chunks.reshape(-1), [per_seq * n for n in group_split], [per_seq * s] * u,
                      group, "ulysses")
    parts = flat.split([per_seq * n for n in group_split])
    return torch.cat([p.reshape(*lead, h // u, n, d) for p, n in zip(parts, group_split, strict=True)], dim=-2)


def _ulysses_in_fused(xs: Sequence[torch.Tensor], group_split: list[int], me: int,
                      group: dist.ProcessGroup) -> list[torch.Tensor]:
    """:func:`_ulysses_in` of several ``[..., H, s_me, D_i]`` tensors (same rows and heads) in
    one all-to-all: each peer's heads of every tensor are packed side by side on the last dim
    (one copy, as for one tensor), sent together, and split again."""
    if len(xs) == 1:
        return [_ulysses_in(xs[0], group_split, me, group)]
    u = len(group_split)
    *lead, h, s, _ = xs[0].shape
    dims = [int(x.shape[-1]) for x in xs]
    # [U, ..., H/U, s, sum(D_i)]: peer-major, every tensor's heads for that peer side by side.
    chunks = torch.cat([x.reshape(*lead, u, h // u, s, x.shape[-1]).movedim(-4, 0) for x in xs], dim=-1)
    per_seq = chunks[0].numel() // s
    flat = all_to_all(chunks.reshape(-1), [per_seq * n for n in group_split], [per_seq * s] * u,
                      group, "ulysses")
    parts = flat.split([per_seq * n for n in group_split])
    rows = torch.cat([p.reshape(*lead, h // u, n, sum(dims)) for p, n in zip(parts, group_split, strict=True)],
                     dim=-2)
    return list(rows.split(dims, dim=-1))


def _ulysses_out(x: torch.Tensor, group_split: list[int], me: int, group: dist.ProcessGroup) -> torch.Tensor:
    """[..., H/U, sum(group_split), D] head shard -> [..., H, s_me, D] sequence shard."""
    u = len(group_split)
    *lead, hu, _, d = x.shape
    parts = [p.contiguous().reshape(-1) for p in x.split(group_split, dim=-2)]
    per_seq = parts[0].numel() // group_split[0]
    s_me = group_split[me]
    flat = all_to_all(torch.cat(parts), [per_seq * s_me] * u, [per_seq * n for n in group_split],
                      group, "ulysses")
    heads = flat.reshape(u, *lead, hu, s_me, d).movedim(0, -4)
    return heads.reshape(*lead, u * hu, s_me, d)


def _ulysses_in_text(qh: torch.Tensor, qb: torch.Tensor, qt: torch.Tensor, group: list[int], hs: Sequence[int],
                     ts: Sequence[int], me: int, ug: dist.ProcessGroup) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_ulysses_in` of rows ``[text head piece, body, text tail piece]``: returns this
    rank's heads of the group's head pieces, body block and tail pieces, each in rank order."""
    sizes = [a + b + c for a, b, c in zip(hs, group, ts, strict=True)]
    rows = _ulysses_in(torch.cat([qh, qb, qt], dim=-2), sizes, me, ug)
    parts = [p.split([a, b, c], dim=-2) for p, a, b, c in zip(rows.split(sizes, dim=-2), hs, group, ts, strict=True)]
    return tuple(torch.cat([p[i] for p in parts], dim=-2) for i in range(3))  # type: ignore[return-value]


def _positions(*ranges: tuple[int, int], device: torch.device) -> torch.Tensor:
    return torch.cat([torch.arange(a, b, device=device) for a, b in ranges])


def _mask_for(mask: torch.Tensor | None, q_pos: torch.Tensor, k_pos: torch.Tensor,
              h_rng: tuple[int, int]) -> torch.Tensor | None:
    """The rows/columns/heads of a global (replicated) mask that these q/k rows see."""
    if mask is None:
        return None
    if mask.dim() >= 3 and mask.shape[-3] > 1:
        mask = mask[..., h_rng[0]:h_rng[1], :, :]
    if mask.shape[-2] > 1:
        mask = mask.index_select(-2, q_pos.to(mask.device))
    if mask.shape[-1] > 1:
        mask = mask.index_select(-1, k_pos.to(mask.device))
    return mask


def _ring(q, k, v, mask, scale, info: MeshInfo, blocks: list[int], q_pos, key_base: int,  # type: ignore[no-untyped-def]
          h_rng, group, extra=None):
    """Attention of the local queries over every ring block of body K/V, merged by the
    log-sum-exp. ``extra = (k, v, positions)``: keys every rank holds (text), attended together
    with the local block and never sent."""
    r, me = info.ring, info.ring_rank
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
            pending = send_recv([cur_k, cur_v], [torch.Size(shape), torch.Size(vshape)],
                                (me + 1) % r, (me - 1) % r, group, "ring")
        k_pos = _positions((key_base + offs[src], key_base + offs[src + 1]), device=q.device)
        kk, vv = cur_k, cur_v
        if step == 0 and extra is not None:
            kk, vv = torch.cat([extra[0], cur_k], dim=-2), torch.cat([extra[1], cur_v], dim=-2)
            k_pos = torch.cat([extra[2], k_pos])
        blk_out, blk_lse = attention_with_lse(q, kk, vv, _mask_for(mask, q_pos, k_pos, h_rng), scale)
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


def _split3(t: torch.Tensor, head: int, body: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return t[..., :head, :], t[..., head:head + body, :], t[..., head + body:, :]


def _usp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
         scale: float | None, mesh_key: str, split: list[int], head: int, tail: int,
         shard_text: bool = False, q_cut: bool = False, kv_split: list[int] | None = None,
         kv_head: int = 0, kv_tail: int = 0) -> torch.Tensor:
    pm = get_mesh(mesh_key)
    info = pm.info
    u, h = info.ulysses, q.shape[-3]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if kv_split is None:  # K/V in Q's layout (self-attention, joint attention)
        kv_split, kv_head, kv_tail = split, head, tail
    # Per ring block: the Ulysses group's slice lengths and the block's range in the body; Q's
    # rows and K/V's rows each by their own layout.
    groups = [split[i * u:(i + 1) * u] for i in range(info.ring)]
    kgroups = [kv_split[i * u:(i + 1) * u] for i in range(info.ring)]
    blocks, kblocks = [sum(g) for g in groups], [sum(g) for g in kgroups]
    offs, body_total, kv_total = _offsets(blocks), sum(split), sum(kv_split)
    me = info.ring_rank
    s_me, ks_me = split[info.sp_rank], kv_split[info.sp_rank]
    n, first = len(split), me * u
    hs, ts = even_split(head, n), even_split(tail, n)
    (kh, kb, kt), (vh, vb, vt) = (_split3(t, kv_head, ks_me) for t in (k, v))
    # Query text rows: whole on every rank, or (q_cut) only this rank's even piece of them.
    qh, qb, qt = _split3(q, hs[info.sp_rank] if q_cut else head, s_me)
    h_rng = (0, h)
    if u > 1:
        ug, ur = pm.group("ulysses"), info.ulysses_rank
        if q_cut:  # the text query pieces travel with the image rows (other rows than K/V's)
            kb, vb = (_ulysses_in_fused([kb, vb], kgroups[me], ur, ug) if FUSE_QKV else
                      [_ulysses_in(t, kgroups[me], ur, ug) for t in (kb, vb)])
            qh, qb, qt = _ulysses_in_text(qh, qb, qt, groups[me], hs[first:first + u], ts[first:first + u],
                                          ur, ug)
        elif FUSE_QKV and kgroups[me] == groups[me]:  # Q, K and V in one all-to-all
            qb, kb, vb = _ulysses_in_fused([qb, kb, vb], groups[me], ur, ug)
        elif FUSE_QKV:  # K/V rows cut otherwise than Q's: Q alone, K and V together
            qb = _ulysses_in(qb, groups[me], ur, ug)
            kb, vb = _ulysses_in_fused([kb, vb], kgroups[me], ur, ug)
        else:
            qb = _ulysses_in(qb, groups[me], ur, ug)
            kb, vb = (_ulysses_in(t, kgroups[me], ur, ug) for t in (kb, vb))
        h_rng = (ur * (h // u), (ur + 1) * (h // u))
        # Text rows are on every rank: each takes its heads' slice, nothing is sent.
        kh, kt, vh, vt = (t[..., h_rng[0]:h_rng[1], :, :] for t in (kh, kt, vh, vt))
        if not q_cut:
            qh, qt = (t[..., h_rng[0]:h_rng[1], :, :] for t in (qh, qt))
    q_text = ((0, head), (head + body_total, head + body_total + tail))
    kv_text = ((0, kv_head), (kv_head + kv_total, kv_head + kv_total + kv_tail))
    if shard_text and (head or tail):
        # Only the text query rows whose outputs this Ulysses group keeps: its ranks' pieces.
        ho, to = _offsets(hs), _offsets(ts)
        if not q_cut:
            qh, qt = qh[..., ho[first]:ho[first + u], :], qt[..., to[first]:to[first + u], :]
        tail_at = head + body_total
        q_text = ((ho[first], ho[first + u]), (tail_at + to[first], tail_at + to[first + u]))
    q_all = _join(qh, qb, qt)
    q_pos = _positions(q_text[0], (head + offs[me], head + offs[me + 1]), q_text[1], device=q.device)
    if info.ring > 1:
        # Text K/V are on every rank: attended once, with the local block (never sent).
        extra = (_join(kh, kt), _join(vh, vt), _positions(*kv_text, device=q.device)) \
            if kv_head or kv_tail else None
        res = _ring(q_all, kb, vb, mask, scale, info, kblocks, q_pos, kv_head, h_rng, pm.group("ring"), extra)
    else:
        k_pos = torch.arange(kv_head + kv_total + kv_tail, device=q.device)
        res = torch.nn.functional.scaled_dot_product_attention(
            q_all, _join(kh, kb, kt), _join(vh, vb, vt),
            attn_mask=_mask_for(mask, q_pos, k_pos, h_rng), scale=scale)
    if not (head or tail):
        return _ulysses_out(res, groups[me], info.ulysses_rank, pm.group("ulysses")) if u > 1 else res
    oh, ob, ot = _split3(res, qh.shape[-2], blocks[me] if u > 1 else s_me)
    if shard_text:
        return _text_rows_out(oh, ob, ot, head, tail, groups[me], info, pm, len(split))
    if u > 1:
        ob = _ulysses_out(ob, groups[me], info.ulysses_rank, pm.group("ulysses"))
        # Text outputs: every rank needs all heads of them.
        txt = all_gather(torch.cat([oh, ot], -2), -3, pm.group("ulysses"), "ulysses")
        oh, ot = txt[..., :head, :], txt[..., head:, :]
    return torch.cat([oh, ob, ot], dim=-2)


def _text_rows_out(oh: torch.Tensor, ob: torch.Tensor, ot: torch.Tensor, head: int, tail: int,
                   group: list[int], info: MeshInfo, pm: ParallelMesh, n: int) -> torch.Tensor:
    """Output rows ``[head piece, body, tail piece]``: the text rows cut evenly over all ranks.

    ``oh``/``ot`` hold the text rows of this Ulysses group's pieces (all heads of them with Ring
    only: the rank's own piece). With Ulysses, one all-to-all sends every peer of the group its
    body rows and its text pieces together.
    """
    if info.ulysses == 1:
        return torch.cat([oh, ob, ot], dim=-2)
    hs, ts = even_split(head, n), even_split(tail, n)
    first = info.ring_rank * info.ulysses
    ho, to = _offsets(hs[first:first + info.ulysses]), _offsets(ts[first:first + info.ulysses])
    bo = _offsets(group)
    pieces, sizes = [], []
    for k in range(info.ulysses):
        pieces += [oh[..., ho[k]:ho[k + 1], :], ob[..., bo[k]:bo[k + 1], :], ot[..., to[k]:to[k + 1], :]]
        sizes.append(ho[k + 1] - ho[k] + group[k] + to[k + 1] - to[k])
    return _ulysses_out(torch.cat(pieces, dim=-2), sizes, info.ulysses_rank, pm.group("ulysses"))


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
) -> torch.Tensor:
    """Exact attention over the whole (sharded) sequence; returns this rank's output rows.

    ``head``/``tail``: replicated rows (text) joined before/after the sharded body. With
    ``text_rank`` (this rank's sequence-parallel index) the output holds only this rank's
    even piece of them; with ``q_cut`` too, so does ``q`` (K/V always hold all text rows).
    ``kv_split``/``kv_head``/``kv_tail``: K and V's own layout where it differs from Q's (image
    queries over image + text keys; None: Q's).
    """
    # Contiguous, as the fake says: compiled graphs assert the real strides against the fake's
    # (Ring without text rows would return the attention kernel's [B, S, H, D]-ordered output).
    return _usp(q, k, v, attn_mask, scale, mesh_key, split, head, tail, text_rank >= 0, q_cut,
                None if kv_split is None else list(kv_split), kv_head, kv_tail).contiguous()


@usp_attention.register_fake
def _(q, k, v, attn_mask, scale, mesh_key, split, head=0, tail=0, text_rank=-1, q_cut=False,  # type: ignore[no-untyped-def]
      kv_split=None, kv_head=0, kv_tail=0):
    rows = q.shape[-2]
    if text_rank >= 0:
        n = len(split)
        rows = even_split(head, n)[text_rank] + split[text_rank] + even_split(tail, n)[text_rank]
    return q.new_empty((*q.shape[:-2], rows, v.shape[-1]))


def usp_comm_bytes(
    q_shape: tuple[int, ...], v_dim: int, itemsize: int, info: MeshInfo, split: list[int],
    text: tuple[int, int] = (0, 0), shard_text: bool = False, q_cut: bool = False,
    kv_split: list[int] | None = None,
) -> dict[tuple[str, str], tuple[int, int]]:
    """Static (calls, bytes sent by ``info.rank``) per (op, axis) of one ``usp_attention`` call
    (``kv_split``: K/V's body rows where they are cut otherwise than Q's).

    Mirrors the algorithm above; tests check it against the runtime counter.
    """
    *lead, h, _, d = q_shape
    lead_n = 1
    for n in lead:
        lead_n *= n
    u, r = info.ulysses, info.ring
    kv_split = split if kv_split is None else kv_split
    groups = [split[i * u:(i + 1) * u] for i in range(r)]
    kgroups = [kv_split[i * u:(i + 1) * u] for i in range(r)]
    mine, kmine = groups[info.ring_rank], kgroups[info.ring_rank]
    s_me, ks_me = mine[info.ulysses_rank], kmine[info.ulysses_rank]
    out: dict[tuple[str, str], tuple[int, int]] = {}
    if u > 1:
        per_tok = lead_n * (h // u) * itemsize
        send_in = per_tok * (u - 1) * (s_me * d + ks_me * (d + v_dim))
        send_out = per_tok * v_dim * (sum(mine) - s_me)
        if q_cut:  # this rank's text query piece goes out with its image query rows
            n = len(split)
            piece = even_split(text[0], n)[info.sp_rank] + even_split(text[1], n)[info.sp_rank]
            send_in += per_tok * piece * (u - 1) * d
        if shard_text:  # peers' text pieces travel with their body rows
            n, first = len(split), info.ring_rank * u
            hs, ts = even_split(text[0], n), even_split(text[1], n)
            send_out += per_tok * v_dim * sum(hs[first + k] + ts[first + k]
                                              for k in range(u) if k != info.ulysses_rank)
        # Q, K, V fused in one all-to-all (K, V only, where Q's rows travel apart), then the output.
        calls = (3 if q_cut or kmine != mine else 2) if FUSE_QKV else 4
        out[("all_to_all", "ulysses")] = (calls, send_in + send_out)
        if sum(text) and not shard_text:  # text outputs gathered over heads; text K/V never sent
            out[("all_gather", "ulysses")] = (1, per_tok * v_dim * sum(text) * (u - 1))
    if r > 1:
        blocks = [sum(g) for g in kgroups]
        per_tok = lead_n * (h // u) * itemsize * (d + v_dim)
        sent = sum(blocks[(info.ring_rank - s) % r] for s in range(r - 1)) * per_tok
        out[("send_recv", "ring")] = (r - 1, sent)
    return out
