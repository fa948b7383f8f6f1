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

from xdit_compile.runtime.collectives import send_recv
from xdit_compile.runtime.mesh import get_mesh

__all__ = ["all_reduce_sum", "all_reduce_bytes", "gather_shard", "slice_shard", "halo_pad", "gather_bytes"]


def _factor_view(x: torch.Tensor, dim: int, outer: int, inner: int) -> torch.Tensor:
    n = x.shape[dim] // (outer * inner)
    return x.reshape(*x.shape[:dim], outer, n, inner, *x.shape[dim + 1:])


def gather_shard(
    x: torch.Tensor,
    dim: int,
    outer: int,
    inner: int,
    split: list[int],
    group_name: str,
    head: int = 0,
    tail: int = 0,
) -> torch.Tensor:
    """All-gather the sharded factor of ``dim`` over the sequence-parallel group (uneven ok).

    Pieces are padded to the largest one for the collective and cut back after it, so the
    result is exactly the global tensor. Replicated ``head``/``tail`` rows are not sent.
    """
    if head or tail:
        body = x.narrow(dim, head, x.shape[dim] - head - tail)
        full = gather_shard(body, dim, outer, inner, split, group_name)
        parts = [x.narrow(dim, 0, head), full, x.narrow(dim, x.shape[dim] - tail, tail)]
        return torch.cat(parts, dim=dim)
    n, m = len(split), max(split)
    v = _factor_view(x, dim, outer, inner).movedim(dim + 1, 0)  # [s_r, ..., outer, inner, ...]
    if v.shape[0] < m:
        v = torch.cat([v, v.new_zeros((m - v.shape[0], *v.shape[1:]))])
    g = fc.wait_tensor(
        torch.ops._c10d_functional.all_gather_into_tensor(v.contiguous(), n, group_name)
    )
    if len(set(split)) > 1:
        g = torch.cat([p[:s] for p, s in zip(g.split(m), split, strict=True)])
    g = g.movedim(0, dim + 1)
    # Contiguous like the tensor the original graph computed, so its view ops stay valid.
    return g.reshape(*x.shape[:dim], outer * sum(split) * inner, *x.shape[dim + 1:]).contiguous()


def all_reduce_sum(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """Sum of every rank's partial ``x`` (functional all-reduce)."""
    return fc.wait_tensor(torch.ops._c10d_functional.all_reduce(x.contiguous(), "sum", group_name))


def all_reduce_bytes(nbytes: int, n: int) -> int:
    """Bytes one rank sends in a ring all-reduce of ``nbytes``: 2 (n - 1) / n of it."""
    return 2 * (n - 1) * nbytes // n


def gather_bytes(local_numel: int, itemsize: int, split: list[int], sp_rank: int) -> int:
    """Bytes rank ``sp_rank`` sends in :func:`gather_shard` (its padded piece to every peer)."""
    padded = local_numel // split[sp_rank] * max(split)
    return padded * itemsize * (len(split) - 1)


def slice_shard(
    x: torch.Tensor,
    dim: int,
    outer: int,
    inner: int,
    start: int,
    length: int,
    head: int = 0,
    tail: int = 0,
) -> torch.Tensor:
    """This rank's piece of a replicated tensor (no communication): its body rows, with the
    replicated ``head``/``tail`` rows kept in front and behind."""
    if head or tail:
        body = x.narrow(dim, head, x.shape[dim] - head - tail)
        parts = [x.narrow(dim, 0, head), slice_shard(body, dim, outer, inner, start, length),
                 x.narrow(dim, x.shape[dim] - tail, tail)]
        return torch.cat(parts, dim=dim)
    if outer == 1 and inner == 1:
        return x.narrow(dim, start, length)
    v = _factor_view(x, dim, outer, inner).narrow(dim + 1, start, length)
    return v.reshape(*x.shape[:dim], outer * length * inner, *x.shape[dim + 1:])


@torch.library.custom_op("xdit::halo_pad", mutates_args=())
def halo_pad(x: torch.Tensor, dim: int, pad: int, mesh_key: str) -> torch.Tensor:
    """Pad ``dim`` by ``pad`` rows from each neighbouring rank (zeros at the global edges).

    A stride-1 convolution with padding ``pad`` on the sharded dim then sees exactly the rows
    it would see on one device, with its own padding set to 0 on that dim.
    """
    pm = get_mesh(mesh_key)
    group = pm.group("sp")
    me, n = dist.get_rank(group), dist.get_world_size(group)
    top = x.narrow(dim, 0, pad).contiguous()
    bottom = x.narrow(dim, x.shape[dim] - pad, pad).contiguous()
    zeros = torch.zeros_like(top)
    from_prev, from_next = zeros, zeros
    # Two shifts: bottom rows go down the ring, top rows go up; edges send nothing useful.
    works, recv = send_recv([bottom], [bottom.shape], (me + 1) % n, (me - 1) % n, group, "sp")
    for w in works:
        w.wait()
    if me > 0:
        from_prev = recv[0]
    works, recv = send_recv([top], [top.shape], (me - 1) % n, (me + 1) % n, group, "sp")
    for w in works:
        w.wait()
    if me < n - 1:
        from_next = recv[0]
    return torch.cat([from_prev, x, from_next], dim=dim)


@halo_pad.register_fake
def _(x, dim, pad, mesh_key):  # type: ignore[no-untyped-def]
    shape = list(x.shape)
    shape[dim] += 2 * pad
    return x.new_empty(shape)


def halo_bytes(local_numel: int, rows: int, pad: int, itemsize: int) -> int:
    """Bytes one ``halo_pad`` call sends: ``pad`` rows each way."""
    return 2 * (local_numel // rows) * pad * itemsize
