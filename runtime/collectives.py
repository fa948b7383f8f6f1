"""Counted collectives: every byte a rank sends goes through here, for reports and benchmarks.

Bytes are counted as *sent by this rank to other ranks* (a message to each peer counts once;
the part a rank keeps for itself is free). Graph-level collectives (all-gathers lowered by the
``lower`` pass) are traceable functional collectives whose byte counts are known statically;
:class:`~xdit_compile.api.ParallelModule` adds them per forward. The attention ops count
themselves while they run.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc

__all__ = [
    "CommStats",
    "all_gather",
    "all_to_all",
    "comm_stats",
    "count",
    "counting",
    "reset_comm_stats",
    "send_recv",
]


class CommStats:
    """Totals per (op, axis): number of calls and bytes sent by this rank."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls: dict[tuple[str, str], int] = defaultdict(int)
        self.bytes: dict[tuple[str, str], int] = defaultdict(int)

    def add(self, op: str, axis: str, nbytes: int, calls: int = 1) -> None:
        with self._lock:
            self.calls[(op, axis)] += calls
            self.bytes[(op, axis)] += nbytes

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())

    def reset(self) -> None:
        with self._lock:
            self.calls.clear()
            self.bytes.clear()

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {
            f"{op}@{axis}": {"calls": self.calls[(op, axis)], "bytes": self.bytes[(op, axis)]}
            for op, axis in sorted(self.calls)
        }


_STATS = CommStats()


def comm_stats() -> CommStats:
    """The process-wide counter."""
    return _STATS


def reset_comm_stats() -> None:
    _STATS.reset()


def count(op: str, axis: str, nbytes: int, calls: int = 1) -> None:
    _STATS.add(op, axis, nbytes, calls)


@contextmanager
def counting() -> Iterator[CommStats]:
    """Reset the counter, run the block, and yield the counter (read it after the block)."""
    _STATS.reset()
    yield _STATS


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def all_to_all(
    x: torch.Tensor,
    out_splits: Sequence[int],
    in_splits: Sequence[int],
    group: dist.ProcessGroup,
    axis: str,
) -> torch.Tensor:
    """``all_to_all_single`` along dim 0 with per-peer split sizes (uneven shards allowed)."""
    me = dist.get_rank(group)
    sent = sum(in_splits) - in_splits[me]
    row = _nbytes(x) // max(x.shape[0], 1)
    count("all_to_all", axis, sent * row)
    n = len(in_splits)
    if len(set(in_splits)) == 1 and len(set(out_splits)) == 1 and in_splits[0] and out_splits[0]:
        # Equal pieces: the plain all-to-all, which backends run faster than the
        # split-size variant (gloo: about 2x on CPU for MB-sized pieces).
        flat = x.contiguous().reshape(n, -1)
        out = fc.wait_tensor(fc.all_to_all_single(flat, None, None, group))
        return out.reshape(n * out_splits[0], *x.shape[1:])
    out = fc.all_to_all_single(x.contiguous(), list(out_splits), list(in_splits), group)
    return fc.wait_tensor(out)


def all_gather(x: torch.Tensor, dim: int, group: dist.ProcessGroup, axis: str) -> torch.Tensor:
    """All-gather equal pieces along ``dim`` (functional collective), counted."""
    n = dist.get_world_size(group)
    count("all_gather", axis, _nbytes(x) * (n - 1))
    dim = dim % x.dim()
    return fc.wait_tensor(fc.all_gather_tensor(x.contiguous(), dim, group))


def send_recv(
    sends: Sequence[torch.Tensor],
    recv_shapes: Sequence[torch.Size],
    dst: int,
    src: int,
    group: dist.ProcessGroup,
    axis: str,
) -> tuple[list[dist.Work], list[torch.Tensor]]:
    """Start sending ``sends`` to ``dst`` and receiving tensors of ``recv_shapes`` from ``src``.

    ``dst``/``src`` are ranks inside ``group``. Returns ``(works, received)``; wait on every work
    before reading ``received``.
    """
    recvs = [
        torch.empty(s, dtype=t.dtype, device=t.device)
        for s, t in zip(recv_shapes, sends, strict=True)
    ]
    ops = [dist.P2POp(dist.isend, t.contiguous(), group=group, group_peer=dst) for t in sends]
    ops += [dist.P2POp(dist.irecv, r, group=group, group_peer=src) for r in recvs]
    count("send_recv", axis, sum(_nbytes(t) for t in sends))
    works = dist.batch_isend_irecv(ops)
    return works, recvs
