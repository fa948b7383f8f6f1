"""Displaced K/V: attention that reads other patches' keys and values from the previous step.

Adjacent denoising steps see nearly the same activations, so attention may read the K/V of the
tokens it has not computed yet from the previous step (the *displaced* K/V) instead of waiting
for them. Two methods use it:

- **DistriFusion** (``xdit::distrifusion_attention``): each rank of the sequence axis keeps its
  patch through all layers. Attention uses this rank's fresh K/V and the other ranks' K/V of the
  previous step; this step's K/V pieces are all-gathered asynchronously (overlapping the rest of
  the step) and consumed one step later.
- **PipeFusion** (``xdit::pipefusion_attention``): patches of one step run one after another
  through the layers (pipelined over stages). While patch ``j`` runs a layer, it writes its fresh
  K/V into the layer's buffer and attends over the whole buffer: patches ``< j`` hold this
  step's K/V (computed before it), patch ``j`` its own, patches ``> j`` the previous step's.

Text rows of joint attention are never stale: DistriFusion has every rank compute all text K/V
each step; in PipeFusion the patch that holds the text rows (the first) writes them into the
buffer before any other patch of the step reads them. The first ``warmup_steps`` steps of a request
run exact (fresh K/V of every token; they fill the buffers). A request's state is its own:
:meth:`DisplacedState.reset` (a new ``pipe()`` call, or ``pm.reset()``) drops every buffer.

Steps and CFG branches: a call whose latent input is the very tensor of the previous call is the
next *branch* of the same step (pipelines that call the transformer for the conditional and the
unconditional branch with the same latents); each branch keeps buffers of its own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.fx as fx

from xdit_compile.runtime.collectives import count
from xdit_compile.runtime.mesh import get_mesh
from xdit_compile.runtime.opargs import op_args

__all__ = [
    "DisplacedBuffer",
    "DisplacedState",
    "displaced_buffer",
    "distrifusion_attention",
    "distrifusion_comm_bytes",
    "get_state",
    "new_state",
    "pipefusion_attention",
]

logger = logging.getLogger(__name__)


@dataclass
class DisplacedState:
    """The displaced K/V of one parallelized module on this rank, for the current request."""

    key: str
    warmup_steps: int = 1
    step: int = -1
    """Index of the current step in the request (-1 before the first call)."""
    branch: int = 0
    """Index of the current call among the calls of this step (CFG branches)."""
    buffers: dict[tuple[int, str], list[torch.Tensor]] = field(default_factory=dict)
    """(branch, layer) -> [K, V] of the whole sequence (DistriFusion: of the body rows)."""
    pending: dict[tuple[int, str], tuple[Any, torch.Tensor, list[int]]] = field(
        default_factory=dict
    )
    """(branch, layer) -> DistriFusion's in-flight all-gather: (work, output, split)."""
    poison: Any = None
    """Test hook: ``poison(when, layer, patch, k_buffer, v_buffer)`` runs on a PipeFusion buffer
    before the patch writes its fresh K/V (``when="write"``) and before attention reads it
    (``"read"``); tests corrupt slices there to show which ones are read."""
    _latent: torch.Tensor | None = None
    _latent_version: int = -1

    def begin_call(self, latent: torch.Tensor | None) -> None:
        """Count a transformer call: the next branch of this step if it got the same latent
        tensor as the previous call, else a new step."""
        same = (
            latent is not None
            and self._latent is not None
            and latent.data_ptr() == self._latent.data_ptr()
            and latent.shape == self._latent.shape
            and latent.stride() == self._latent.stride()
            and latent._version == self._latent_version
        )
        if same:
            self.branch += 1
        else:
            self.step += 1
            self.branch = 0
        # Holding the tensor keeps its memory from being reused by the next step's latents.
        self._latent = latent
        self._latent_version = latent._version if latent is not None else -1

    @property
    def exact(self) -> bool:
        """Whether this step runs with fresh K/V everywhere (warmup)."""
        return self.step < self.warmup_steps

    def slot(self, layer: str) -> tuple[int, str]:
        return (self.branch, layer)

    def reset(self) -> None:
        """A new request: finish in-flight gathers (every rank issued them) and drop all K/V."""
        for work, _, _ in self.pending.values():
            work.wait()
        self.pending.clear()
        self.buffers.clear()
        self.step, self.branch, self._latent = -1, 0, None


_STATES: dict[str, DisplacedState] = {}


def new_state(warmup_steps: int) -> DisplacedState:
    """A registered state with a fresh key (graph ops find it by the key)."""
    st = DisplacedState(key=f"kv{len(_STATES)}", warmup_steps=warmup_steps)
    _STATES[st.key] = st
    return st


def get_state(key: str) -> DisplacedState:
    try:
        return _STATES[key]
    except KeyError:
        raise RuntimeError(f"xdit_compile displaced-K/V state {key!r} is not registered") from None


def offsets(split: list[int]) -> list[int]:
    out = [0]
    for s in split:
        out.append(out[-1] + s)
    return out


def _sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None,
) -> torch.Tensor:
    if q.shape[-2] == 0:
        return q.new_empty((*q.shape[:-1], v.shape[-1]))
    # Contiguous, like the fake implementations (inductor checks strides of opaque ops).
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scale
    ).contiguous()


def _mask_rows(mask: torch.Tensor | None, q_pos: torch.Tensor) -> torch.Tensor | None:
    """The rows of a global (replicated) mask that these queries see (all key columns)."""
    if mask is None or mask.shape[-2] == 1:
        return mask
    return mask.index_select(-2, q_pos.to(mask.device))


def _arange(*ranges: tuple[int, int], device: torch.device) -> torch.Tensor:
    return torch.cat([torch.arange(a, b, device=device) for a, b in ranges])


# --------------------------------------------------------------------------------------------
# DistriFusion


def _pack(kb: torch.Tensor, vb: torch.Tensor, rows: int) -> torch.Tensor:
    """This rank's body K and V, padded to ``rows`` rows, in one tensor [2, ..., rows, D]."""
    pad = rows - kb.shape[-2]
    if pad:
        kb = torch.cat([kb, kb.new_zeros((*kb.shape[:-2], pad, kb.shape[-1]))], dim=-2)
        vb = torch.cat([vb, vb.new_zeros((*vb.shape[:-2], pad, vb.shape[-1]))], dim=-2)
    return torch.stack([kb, vb]).contiguous()


def _unpack(gathered: torch.Tensor, split: list[int]) -> list[torch.Tensor]:
    """[N, 2, ..., rows, D] gathered pieces -> [K, V] of the whole body."""
    parts = [gathered[i, :, ..., :s, :] for i, s in enumerate(split)]
    kv = torch.cat(parts, dim=-2)
    return [kv[0], kv[1]]


def _gather_kv(
    kb: torch.Tensor, vb: torch.Tensor, split: list[int], group: dist.ProcessGroup, async_op: bool
) -> tuple[Any, torch.Tensor]:
    packed = _pack(kb, vb, max(split))
    out = packed.new_empty((len(split) * 2, *packed.shape[1:]))
    count("all_gather", "distrifusion", packed.numel() * packed.element_size() * (len(split) - 1))
    work = dist.all_gather_into_tensor(out, packed, group=group, async_op=async_op)
    return work, out.view(len(split), *packed.shape)


def _distrifusion(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None,
    state_key: str,
    layer: str,
    mesh_key: str,
    split: list[int],
    head: int,
    tail: int,
    kv_head: int,
    kv_tail: int,
) -> torch.Tensor:
    pm = get_mesh(mesh_key)
    rank, group = pm.info.sp_rank, pm.group("sp")
    st = get_state(state_key)
    s_me, offs = split[rank], offsets(split)
    kb, vb = k[..., kv_head : kv_head + s_me, :], v[..., kv_head : kv_head + s_me, :]
    slot = st.slot(layer)
    if st.exact or (slot not in st.buffers and slot not in st.pending):
        # Warmup: this step's K/V of every rank, now (exact); they also fill the buffer.
        _, out = _gather_kv(kb, vb, split, group, async_op=False)
        body_k, body_v = _unpack(out, split)
        st.buffers[slot] = [body_k, body_v]
        st.pending.pop(slot, None)
    else:
        if slot in st.pending:  # the previous step's gather: consumed now, one step later
            work, out, _ = st.pending.pop(slot)
            work.wait()
            st.buffers[slot] = _unpack(out, split)
        old_k, old_v = st.buffers[slot]
        lo, hi = offs[rank], offs[rank + 1]
        body_k = torch.cat([old_k[..., :lo, :], kb, old_k[..., hi:, :]], dim=-2)
        body_v = torch.cat([old_v[..., :lo, :], vb, old_v[..., hi:, :]], dim=-2)
        work, out = _gather_kv(kb, vb, split, group, async_op=True)
        st.pending[slot] = (work, out, split)
    k_all = torch.cat([k[..., :kv_head, :], body_k, k[..., kv_head + s_me :, :]], dim=-2)
    v_all = torch.cat([v[..., :kv_head, :], body_v, v[..., kv_head + s_me :, :]], dim=-2)
    # Query rows: [text head, this rank's body rows, text tail] at their global positions.
    q_head = q.shape[-2] - s_me - tail
    body_at = head + offs[rank]
    q_pos = _arange(
        (0, q_head),
        (body_at, body_at + s_me),
        (head + sum(split), head + sum(split) + tail),
        device=q.device,
    )
    return _sdpa(q, k_all, v_all, _mask_rows(mask, q_pos), scale)


@torch.library.custom_op("xdit::distrifusion_attention", mutates_args=())
def distrifusion_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    scale: float | None,
    state_key: str,
    layer: str,
    mesh_key: str,
    split: list[int],
    head: int = 0,
    tail: int = 0,
    kv_head: int = -1,
    kv_tail: int = -1,
) -> torch.Tensor:
    """Attention of this rank's query rows over the whole sequence: its own body K/V fresh, the
    other ranks' from the previous step (after warmup). ``q``/``k``/``v`` hold all ``head``/``tail``
    text rows and this rank's body rows; the output has ``q``'s rows. ``kv_head``/``kv_tail``:
    K/V's own text rows where they differ from Q's (-1: Q's)."""
    kv_head, kv_tail = (head, tail) if kv_head < 0 else (kv_head, kv_tail)
    # Contiguous, as the fake says (compiled graphs assert the real strides against it).
    return _distrifusion(
        q, k, v, attn_mask, scale, state_key, layer, mesh_key, split, head, tail, kv_head, kv_tail
    ).contiguous()


@distrifusion_attention.register_fake
def _(
    q,
    k,
    v,
    attn_mask,
    scale,
    state_key,
    layer,
    mesh_key,
    split,
    head=0,
    tail=0,
    kv_head=-1,
    kv_tail=-1,
):  # type: ignore[no-untyped-def]
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def distrifusion_comm_bytes(
    k_shape: tuple[int, ...], v_dim: int, itemsize: int, split: list[int]
) -> int:
    """Bytes one rank sends per layer and step: its body K and V (padded to the largest piece)
    to every other rank (``k_shape``: this rank's local K)."""
    lead = 1
    for s in k_shape[:-2]:
        lead *= s
    return lead * max(split) * (k_shape[-1] + v_dim) * itemsize * (len(split) - 1)


# --------------------------------------------------------------------------------------------
# PipeFusion


def _pipefusion_ulysses(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None,
    state_key: str,
    layer: str,
    split: list[int],
    patch: int,
    head: int,
    tail: int,
    out_text: bool,
    mesh_key: str,
    sp_split: list[int],
    kv_head: int,
    kv_tail: int,
) -> torch.Tensor:
    """A patch cut further over the ``ulysses`` axis: an all-to-all gives every rank all of the
    patch's rows for its heads; its buffer holds those heads of the whole sequence (text rows are
    on every rank: each takes its heads, nothing is sent). The output goes back to row pieces."""
    from xdit_compile.runtime.attention import (
        _gather_heads,
        _Ulysses,
        _ulysses_in,
        _ulysses_out,
        head_groups,
    )

    pm = get_mesh(mesh_key)
    u, me = pm.info.ulysses, pm.info.ulysses_rank
    ux = _Ulysses(pm.group("ulysses"), u, 0, u, me)
    h = q.shape[-3]
    ho = offsets(list(head_groups(h, u)))  # this rank's heads (uneven where u does not divide them)
    lo, hi = ho[me], ho[me + 1]
    s_me = sp_split[me]

    def heads_of(t: torch.Tensor, head: int) -> torch.Tensor:
        text = t.shape[-2] - s_me  # 0, or the text rows (whole)
        th, body, tt = (
            t[..., : text and head, :],
            t[..., (text and head) : (text and head) + s_me, :],
            t[..., (text and head) + s_me :, :],
        )
        body = _ulysses_in(body, sp_split, ux)
        return torch.cat([th[..., lo:hi, :, :], body, tt[..., lo:hi, :, :]], dim=-2)

    if mask is not None and mask.dim() >= 3 and mask.shape[-3] > 1:
        mask = mask[..., lo:hi, :, :]
    res = _pipefusion(
        heads_of(q, head),
        heads_of(k, kv_head),
        heads_of(v, kv_head),
        mask,
        scale,
        state_key,
        layer,
        split,
        patch,
        head,
        tail,
        out_text,
        kv_head,
        kv_tail,
    )
    rows = split[patch]
    th = head if out_text else 0
    body = _ulysses_out(res[..., th : th + rows, :], sp_split, ux, h)
    if not out_text:
        return body
    text = _gather_heads(torch.cat([res[..., :th, :], res[..., th + rows :, :]], dim=-2), ux, h)
    return torch.cat([text[..., :head, :], body, text[..., head:, :]], dim=-2)


def _pipefusion(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None,
    state_key: str,
    layer: str,
    split: list[int],
    patch: int,
    head: int,
    tail: int,
    out_text: bool,
    kv_head: int,
    kv_tail: int,
) -> torch.Tensor:
    st = get_state(state_key)
    offs = offsets(split)
    total = kv_head + offs[-1] + kv_tail  # the buffer: K/V rows of the whole sequence
    lo, hi = kv_head + offs[patch], kv_head + offs[patch + 1]
    s_me = hi - lo
    slot = st.slot(layer)
    kv_text = k.shape[-2] - s_me  # 0, or kv_head + kv_tail: this patch holds the K/V text rows
    if slot not in st.buffers:
        if len(split) > 1 and patch != 0:
            raise RuntimeError(
                f"PipeFusion layer {layer}: patch {patch} runs before the buffer "
                f"was filled (the first step of a request must run whole)"
            )
        shape = (*k.shape[:-2], total, k.shape[-1])
        st.buffers[slot] = [k.new_zeros(shape), v.new_zeros((*shape[:-1], v.shape[-1]))]
    buf_k, buf_v = st.buffers[slot]
    if st.poison is not None:
        st.poison("write", layer, patch, buf_k, buf_v)
    if kv_text:  # fresh text K/V (the text rows' patch): written before any other patch reads
        buf_k[..., :kv_head, :] = k[..., :kv_head, :]
        buf_v[..., :kv_head, :] = v[..., :kv_head, :]
        buf_k[..., total - kv_tail :, :] = k[..., k.shape[-2] - kv_tail :, :]
        buf_v[..., total - kv_tail :, :] = v[..., v.shape[-2] - kv_tail :, :]
    kb0 = kv_head if kv_text else 0
    buf_k[..., lo:hi, :] = k[..., kb0 : kb0 + s_me, :]
    buf_v[..., lo:hi, :] = v[..., kb0 : kb0 + s_me, :]
    if st.poison is not None:
        st.poison("read", layer, patch, buf_k, buf_v)
    q_text = q.shape[-2] - s_me  # 0, or head + tail
    if q_text and not out_text:  # text queries whose output another patch keeps
        q = q[..., head : head + s_me, :]
        q_text = 0
    # Query rows at their positions in Q's global layout (the mask's rows).
    q_total, q_lo = head + offs[-1] + tail, head + offs[patch]
    q_pos = _arange(
        (0, head if q_text else 0),
        (q_lo, q_lo + s_me),
        (q_total - (tail if q_text else 0), q_total),
        device=q.device,
    )
    return _sdpa(q, buf_k, buf_v, _mask_rows(mask, q_pos), scale)


@torch.library.custom_op("xdit::pipefusion_attention", mutates_args=())
def pipefusion_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    scale: float | None,
    state_key: str,
    layer: str,
    split: list[int],
    patch: int,
    head: int = 0,
    tail: int = 0,
    out_text: bool = False,
    mesh_key: str | None = None,
    sp_split: list[int] | None = None,
    sp_rank: int = 0,
    kv_head: int = -1,
    kv_tail: int = -1,
) -> torch.Tensor:
    """Attention of patch ``patch``'s query rows over the layer's displaced-K/V buffer, after
    writing this patch's fresh K/V into it (see the module docstring).

    ``q``/``k``/``v`` hold patch ``patch``'s body rows, with all ``head``/``tail`` text rows
    before/after them when this patch holds the text; ``out_text``: whether the output keeps
    text rows (else only the body rows). With ``mesh_key`` the body rows are this rank's piece
    ``sp_split`` of the patch over the ``ulysses`` axis (and so are the output's).
    ``kv_head``/``kv_tail``: K/V's own text rows where they differ from Q's (-1: Q's)."""
    kv_head, kv_tail = (head, tail) if kv_head < 0 else (kv_head, kv_tail)
    if mesh_key:
        assert sp_split is not None
        out = _pipefusion_ulysses(
            q,
            k,
            v,
            attn_mask,
            scale,
            state_key,
            layer,
            split,
            patch,
            head,
            tail,
            out_text,
            mesh_key,
            list(sp_split),
            kv_head,
            kv_tail,
        )
    else:
        out = _pipefusion(
            q,
            k,
            v,
            attn_mask,
            scale,
            state_key,
            layer,
            split,
            patch,
            head,
            tail,
            out_text,
            kv_head,
            kv_tail,
        )
    return out.contiguous()  # as the fake says (compiled graphs assert the real strides against it)


@pipefusion_attention.register_fake
def _(
    q,
    k,
    v,
    attn_mask,
    scale,
    state_key,
    layer,
    split,
    patch,
    head=0,
    tail=0,
    out_text=False,  # type: ignore[no-untyped-def]
    mesh_key=None,
    sp_split=None,
    sp_rank=0,
    kv_head=-1,
    kv_tail=-1,
):
    rows = (split[patch] if not mesh_key else sp_split[sp_rank]) + (head + tail if out_text else 0)
    return q.new_empty((*q.shape[:-2], rows, v.shape[-1]))


@dataclass(frozen=True, slots=True)
class DisplacedBuffer:
    """The displaced-K/V buffer one attention layer keeps on this rank, per CFG branch."""

    layer: str
    shape: tuple[int, ...]
    """K's buffer shape (V's has V's last dim)."""
    nbytes: int
    """Bytes of the K and V buffers together."""


def displaced_buffer(node: fx.Node) -> DisplacedBuffer | None:
    """The buffer a graph node calling ``xdit::pipefusion_attention`` or
    ``xdit::distrifusion_attention`` keeps (the rows the ops above allocate: PipeFusion's hold
    the K/V text rows and every patch's body, DistriFusion's every rank's body); None for any
    other node. The shapes are the node's (local) K/V shapes."""
    if node.target is torch.ops.xdit.pipefusion_attention.default:
        a = op_args(node)
        kv_head, kv_tail = (
            (a["head"], a["tail"]) if a["kv_head"] < 0 else (a["kv_head"], a["kv_tail"])
        )
        rows = kv_head + sum(a["split"]) + kv_tail
    elif node.target is torch.ops.xdit.distrifusion_attention.default:
        a = op_args(node)
        rows = sum(a["split"])
    else:
        return None
    k, v = a["k"].meta["val"], a["v"].meta["val"]
    shape = (*(int(s) for s in k.shape[:-2]), int(rows), int(k.shape[-1]))
    numel = torch.Size(shape).numel()
    nbytes = (
        numel * k.element_size() + numel // int(k.shape[-1]) * int(v.shape[-1]) * v.element_size()
    )
    return DisplacedBuffer(str(a["layer"]), shape, int(nbytes))
