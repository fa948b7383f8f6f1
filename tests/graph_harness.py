"""Graph harness shared by ``test_rules.py`` and ``test_passes.py``: compile and run without ranks.

No process group is needed. A captured graph is compiled for one rank of a mesh given as data
(``MeshInfo.of``) with the real pass pipeline, and the rewritten graph of each rank is executed in
this process by ``RankRun``: ``gather_shard`` runs for real with its all-gather fed from the other
ranks' pieces of the global value (``simulated_gather``); all-reduce, Ulysses attention and conv
halos are answered from the global reference values of the original graph (``reference``); every
other node runs on local tensors and is compared with this rank's ``piece`` of its global value.
Partial results are kept per node for the caller to sum over the ranks.

Also here: the pass lists the tests compile with and small queries on a graph's call nodes.
"""

from __future__ import annotations

import copy
from typing import Any
from unittest import mock

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from xdit_compile.driver import PassContext, PassFn, run_passes
from xdit_compile.passes.annotate import annotate_graph_pass
from xdit_compile.passes.attention import rewrite_attention_pass
from xdit_compile.passes.canonicalize import canonicalize_graph_pass
from xdit_compile.passes.lower import lower_collectives_pass
from xdit_compile.passes.seed import seed_inputs_pass
from xdit_compile.passes.sharding.propagate import propagate_sharding_pass
from xdit_compile.placement import Partial, Shard, fmt
from xdit_compile.plan import Plan
from xdit_compile.runtime import reshard
from xdit_compile.runtime.mesh import MeshInfo
from xdit_compile.runtime.reshard import (
    all_reduce_sum,
    gather_shard,
    gather_text,
    group_norm_sharded,
    slice_shard,
    slice_text,
)

USP = torch.ops.xdit.usp_attention.default
HALO = torch.ops.xdit.halo_pad.default

# --------------------------------------------------------------------------- pass lists

FRONT: list[tuple[str, PassFn]] = [
    ("canonicalize", canonicalize_graph_pass),
    ("annotate", annotate_graph_pass),
    ("seed", seed_inputs_pass),
    ("propagate_sharding", propagate_sharding_pass),
]
REWRITE = [*FRONT, ("rewrite_attention", rewrite_attention_pass)]
ALL = [*REWRITE, ("lower_collectives", lower_collectives_pass)]
# for graphs whose inputs the test seeds by hand (``xdit_seed`` on placeholders): no seed pass
FRONT_NO_SEED = [p for p in FRONT if p[0] != "seed"]
ALL_NO_SEED = [p for p in ALL if p[0] != "seed"]


class Fn(nn.Module):
    """A module calling ``fn(*xs)``: how tests capture a function."""

    def __init__(self, fn: Any) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *xs: Any) -> Any:
        return self.fn(*xs)


# --------------------------------------------------------------------------- graph queries


def calls(gm: fx.GraphModule, target: Any) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == target]


def count(gm: fx.GraphModule, target: Any) -> int:
    return len(calls(gm, target))


def one(gm: fx.GraphModule, target: Any) -> fx.Node:
    found = calls(gm, target)
    assert len(found) == 1, f"{len(found)} nodes of {target}"
    return found[0]


# --------------------------------------------------------------------------- compilation


def compile_for(
    gm0: fx.GraphModule,
    rank: int,
    passes: list[tuple[str, PassFn]],
    plan: Plan | None = None,
    seeds: dict[int, Shard] | None = None,
    **ctx_kw: Any,
) -> tuple[fx.GraphModule, PassContext]:
    """Run ``passes`` on a copy of ``gm0`` for ``rank`` of ``plan`` (default ``ulysses=2``).

    ``seeds`` places the copy's placeholders by position (``xdit_seed``), for pass lists
    without the seed pass; ``ctx_kw`` goes to the ``PassContext``.
    """
    plan = plan or Plan(ulysses=2)
    gm = fx.GraphModule(gm0, copy.deepcopy(gm0.graph))
    if seeds:
        placeholders = list(gm.graph.find_nodes(op="placeholder"))
        for i, sh in seeds.items():
            placeholders[i].meta["xdit_seed"] = sh
    ctx = PassContext(plan=plan, mesh=MeshInfo.of(plan, rank, key="k"), **ctx_kw)
    return run_passes(gm, passes, ctx), ctx


# --------------------------------------------------------------------------- evaluation


def piece(t: torch.Tensor, p: Any, rank: int) -> torch.Tensor:
    """Rank ``rank``'s part of the global tensor ``t`` under placement ``p``."""
    if isinstance(p, Shard):
        text = (rank, len(p.split)) if p.text else (-1, 0)
        return slice_shard(t, p.dim, p.outer, p.inner, p.offset(rank), p.split[rank], p.head,
                           p.tail, text)
    return t


def simulated_gather(fn: Any, x: torch.Tensor, glob: torch.Tensor, src: Shard, rank: int,
                     *args: Any) -> torch.Tensor:
    """The real ``fn`` (``gather_shard``, ``gather_text`` or ``group_norm_sharded``) on local
    ``x``, its all-gathers simulated: the i-th all-gather returns every rank's i-th send buffer,
    recorded by running ``fn`` on that rank's piece of the global value (with that rank's
    ``text_rank``)."""
    n = len(src.split)

    at = {gather_shard: 7, gather_text: 5}.get(fn)  # position of text_rank after x

    def for_rank(r: int) -> tuple[Any, ...]:
        return (*args[:at], r) if at is not None and len(args) > at and args[at] >= 0 else args

    ns = torch.ops._c10d_functional
    sent: list[list[torch.Tensor]] = []
    with mock.patch.object(reshard.fc, "wait_tensor", lambda t: t):
        for r in range(n):
            mine: list[torch.Tensor] = []
            sent.append(mine)

            def record(t: torch.Tensor, k: int, group: str, mine: list = mine) -> torch.Tensor:
                mine.append(t)
                return torch.cat([t] * k)

            with mock.patch.object(ns, "all_gather_into_tensor", record):
                fn(piece(glob, src, r), *for_rank(r))
        calls = iter(range(len(sent[0])))

        def feed(t: torch.Tensor, k: int, group: str) -> torch.Tensor:
            c = next(calls)
            return torch.cat([sent[r][c] for r in range(k)])

        with mock.patch.object(ns, "all_gather_into_tensor", feed):
            return fn(x, *args)


class Record(fx.Interpreter):
    """Runs a graph and keeps every node's value in ``values``, by node name."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.values[n.name] = out
        return out


def placeholder_values(gm: fx.GraphModule, kwargs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """``kwargs`` in the order of ``gm``'s placeholders (keyed by placeholder target)."""
    return [kwargs[str(p.target)] for p in gm.graph.find_nodes(op="placeholder")]


def reference(gm: fx.GraphModule, /, *args: Any, **kwargs: torch.Tensor) -> dict[str, Any]:
    """Every node's value in the captured (global) graph, by node name.

    Inputs come either positionally (run through the graph's input processing) or by
    placeholder name (fed to the placeholders directly, without it).
    """
    assert not (args and kwargs), "pass the inputs positionally or by name, not both"
    rec = Record(gm)
    if kwargs:
        rec.run(*placeholder_values(gm, kwargs), enable_io_processing=False)
    else:
        rec.run(*args)
    return rec.values


class RankRun(fx.Interpreter):
    """One rank's rewritten graph on local tensors, every node checked against its placement.

    ``ref`` holds the global value of every node of the original graph (``reference``). Nodes
    with a ``Partial`` placement are not checked but kept in ``partials``, for the caller to sum
    over the ranks; ``checked`` counts the nodes that were compared.
    """

    def __init__(self, gm: fx.GraphModule, ref: dict[str, Any], rank: int) -> None:
        super().__init__(gm)
        self.ref, self.rank = ref, rank
        self.glob: dict[str, Any] = {}
        self.partials: dict[str, torch.Tensor] = {}
        self.checked = 0

    def _g(self, a: Any) -> Any:
        return self.glob[a.name] if isinstance(a, fx.Node) else a

    def run_node(self, n: fx.Node) -> Any:
        t, p = n.target, n.meta.get("xdit_placement")
        if t in (slice_shard, slice_text, gather_shard, gather_text, all_reduce_sum, HALO):
            g = self._g(n.args[0])
        elif t is USP:
            q, k, v, mask, scale = (self._g(a) for a in n.args[:5])
            g = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        else:
            g = self.ref.get(n.name)
        self.glob[n.name] = g
        if t in (gather_shard, gather_text):
            src = n.args[0].meta["xdit_placement"]
            return simulated_gather(t, self.env[n.args[0]], g, src, self.rank, *n.args[1:])
        if t is all_reduce_sum:
            return g
        if t is group_norm_sharded:  # statistics of every rank's piece, then this rank's rows
            x, groups, w, b, eps = (self._g(a) for a in n.args[:5])
            self.glob[n.name] = g = F.group_norm(x, groups, w, b, eps)
            src = n.args[0].meta["xdit_placement"]
            local = [self.env[a] if isinstance(a, fx.Node) else a for a in n.args[1:]]
            out = simulated_gather(t, self.env[n.args[0]], x, src, self.rank, *local)
            torch.testing.assert_close(out, piece(g, p, self.rank), msg=f"rank {self.rank}: {n.name}")
            self.checked += 1
            return out
        if t is HALO:  # the rank's rows of the body, with top/bottom neighbour (or zero) rows
            _, dim, top, bottom, _, head, rows = (*n.args, 0, -1)[:7]
            if rows >= 0:  # cut the constant pad's zero rows away first
                g = g.narrow(dim, head, sum(p.split))
            full = F.pad(g.movedim(dim, -1), (top, bottom)).movedim(-1, dim)
            return full.narrow(dim, p.offset(self.rank), p.split[self.rank] + top + bottom)
        out = piece(g, p, self.rank) if t is USP else super().run_node(n)
        if isinstance(out, torch.Tensor) and isinstance(g, torch.Tensor):
            if isinstance(p, Partial):
                self.partials[n.name] = out
            else:
                want = piece(g, p, self.rank)
                where = f"rank {self.rank}: {n.format_node()} ({fmt(p)})"
                assert out.shape == want.shape, where
                torch.testing.assert_close(out, want, msg=where)
                self.checked += 1
        return out
