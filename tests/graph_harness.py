"""Graph harness shared by ``test_rules_*.py`` and ``test_passes.py``: compile and run without
ranks.

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

from xdit_compile.compiler.driver import run_passes
from xdit_compile.passes.annotate import annotate_graph_pass
from xdit_compile.passes.attention import rewrite_attention_pass
from xdit_compile.passes.canonicalize import canonicalize_graph_pass
from xdit_compile.passes.context import PassContext, PassFn
from xdit_compile.passes.lower import lower_collectives_pass
from xdit_compile.passes.seed import seed_inputs_pass
from xdit_compile.passes.sharding.propagate import propagate_sharding_pass
from xdit_compile.placement import Partial, Shard, fmt
from xdit_compile.plan import Plan
from xdit_compile.runtime import reshard
from xdit_compile.runtime.mesh import MeshInfo
from xdit_compile.runtime.opargs import op_args
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
    """Rank ``rank``'s part of the global tensor ``t`` under placement ``p`` (which must describe
    all of ``t``'s rows: a layout of another length is an error, not a slice)."""
    if isinstance(p, Shard):
        assert p.total == t.shape[p.dim], (
            f"placement {p} ({p.total} rows) on a tensor of {tuple(t.shape)}"
        )
        text = (rank, len(p.split)) if p.text else (-1, 0)
        return slice_shard(
            t, p.dim, p.outer, p.inner, p.offset(rank), p.split[rank], p.head, p.tail, text
        )
    return t


def simulated_gather(
    fn: Any, x: torch.Tensor, glob: torch.Tensor, src: Shard, rank: int, *args: Any
) -> torch.Tensor:
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


def usp_layouts(n: fx.Node) -> tuple[Shard, Shard, Shard]:
    """The layouts an ``xdit::usp_attention`` call says its Q, K/V and output have, from its
    arguments alone (the op's contract), on the row dim of its inputs."""
    a = op_args(n)
    q = a["q"].meta["val"]
    dim = q.dim() - 2
    n_ranks = len(a["split"])
    q_text = a["q_cut"]
    kv_split = a["kv_split"] if a["kv_split"] is not None else a["split"]
    kv_head, kv_tail = (
        (a["kv_head"], a["kv_tail"]) if a["kv_split"] is not None else (a["head"], a["tail"])
    )
    pq = Shard(
        dim,
        tuple(a["split"]),
        head=a["head"],
        tail=a["tail"],
        text=bool(q_text and (a["head"] or a["tail"])),
    )
    pk = Shard(dim, tuple(kv_split), head=kv_head, tail=kv_tail)
    out_text = a["text_rank"] >= 0 and bool(a["head"] or a["tail"])
    po = Shard(dim, tuple(a["split"]), head=a["head"], tail=a["tail"], text=out_text)
    assert len(kv_split) == n_ranks
    return pq, pk, po


class RankRun(fx.Interpreter):
    """One rank's rewritten graph on local tensors, every node checked against its placement.

    ``ref`` holds the global value of every node of the original graph (``reference``). Nodes
    with a ``Partial`` placement are not checked but kept in ``partials``, for the caller to sum
    over the ranks; ``checked`` counts the nodes that were compared.

    Parallel attention (``xdit::usp_attention``) is checked against the unrewritten graph: its
    local Q, K and V must be this rank's pieces, in the layouts its arguments name, of the
    captured SDPA's inputs (``orig``: the captured graph, whose node the op's
    ``meta["xdit_origin"]`` names), and its output is that SDPA's value in the output layout. The
    op itself is tested on real process groups (``tests/test_attention_layouts.py``).
    """

    def __init__(
        self, gm: fx.GraphModule, ref: dict[str, Any], rank: int, orig: fx.GraphModule | None = None
    ) -> None:
        super().__init__(gm)
        self.ref, self.rank = ref, rank
        self.orig = {n.name: n for n in orig.graph.nodes} if orig is not None else {}
        self.glob: dict[str, Any] = {}
        self.partials: dict[str, torch.Tensor] = {}
        self.checked = 0

    def _g(self, a: Any) -> Any:
        return self.glob[a.name] if isinstance(a, fx.Node) else a

    def _origin(self, n: fx.Node) -> fx.Node | None:
        return self.orig.get(n.meta.get("xdit_origin", ""))

    def _usp_global(self, n: fx.Node) -> torch.Tensor:
        sdpa = self._origin(n)
        if sdpa is not None:  # the captured SDPA's own value
            return self.ref[sdpa.name]
        q, k, v, mask, scale = (self._g(a) for a in n.args[:5])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

    def _check_usp_inputs(self, n: fx.Node) -> None:
        """Local Q/K/V are this rank's pieces, in the layouts the op's arguments name, of the
        captured SDPA's inputs (GQA K/V repeated to Q's heads, as the rewrite does)."""
        sdpa = self._origin(n)
        if sdpa is None:
            return
        layouts = usp_layouts(n)
        for i, (a, lay) in enumerate(zip(n.args[:3], layouts[:2] + layouts[1:2], strict=True)):
            want = self.ref[sdpa.args[i].name]  # type: ignore[union-attr]
            got = self.env[a]
            if i and want.shape[-3] != got.shape[-3] and want.dim() >= 3:  # GQA: K/V heads repeated
                want = want.repeat_interleave(got.shape[-3] // want.shape[-3], dim=-3)
            p = a.meta.get("xdit_placement")
            if isinstance(p, Shard) and (p.outer, p.inner) != (1, 1):
                lay = p  # rows merged with another dim: the op takes the rows as they come
            where = (
                f"rank {self.rank}: {n.name} input {'qkv'[i]} against {sdpa.name} in layout {lay}"
            )
            exp = piece(want, lay, self.rank)
            assert got.shape == exp.shape, (
                f"{where}: shape {tuple(got.shape)} != {tuple(exp.shape)}"
            )
            torch.testing.assert_close(got, exp, msg=where)
        p, po = n.meta.get("xdit_placement"), layouts[2]
        if isinstance(p, Shard) and (p.outer, p.inner) == (
            1,
            1,
        ):  # consumers read the op's output by p
            assert (p.split, p.head, p.tail, p.text) == (po.split, po.head, po.tail, po.text), (
                f"rank {self.rank}: {n.name} returns {po} by its arguments, placed as {p}"
            )

    def run_node(self, n: fx.Node) -> Any:
        t, p = n.target, n.meta.get("xdit_placement")
        if t in (slice_shard, slice_text, gather_shard, gather_text, all_reduce_sum, HALO):
            g = self._g(n.args[0])
        elif t is USP:
            g = self._usp_global(n)
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
            torch.testing.assert_close(
                out, piece(g, p, self.rank), msg=f"rank {self.rank}: {n.name}"
            )
            self.checked += 1
            return out
        if t is HALO:  # the rank's rows of the body, with top/bottom neighbour (or zero) rows
            _, dim, top, bottom, _, head, rows = (*n.args, 0, -1)[:7]
            if rows >= 0:  # cut the constant pad's zero rows away first
                g = g.narrow(dim, head, sum(p.split))
            full = F.pad(g.movedim(dim, -1), (top, bottom)).movedim(-1, dim)
            return full.narrow(dim, p.offset(self.rank), p.split[self.rank] + top + bottom)
        if t is USP:
            self._check_usp_inputs(n)
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
