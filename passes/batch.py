"""Batch axes (CFG parallel, data parallel): the same sharding engine, on the batch dimension.

A plan with ``cfg`` or ``dp`` > 1 runs one sharding round per batch axis before the sequence
round: ``seed_batch`` marks dim 0 of every batched input (the latent's batch size: latents,
timesteps, text embeddings, masks...) as sharded over that axis, ``propagate_sharding`` and
``lower_collectives`` run as for the sequence (so the graph's baked batch sizes become local
ones, and an op that mixes samples would show up as a sharding break, gathered, never wrong),
and ``restage`` re-derives every node's shapes from the now-local graph. The sequence round
then works on a graph whose batch is already this rank's.

CFG parallel is batch sharding of pipelines that run both branches in one call (PixArt, SD3,
CogVideoX: ``[uncond, cond]`` in dim 0): ``cfg`` rank ``i`` gets half ``i``. Data parallel cuts
the (remaining) batch into ``dp`` pieces. Outputs are gathered over the axis.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from xdit_compile.latent import SeedError
from xdit_compile.passes.context import BatchSeed, Pass, PassContext, PassFn, PassResult
from xdit_compile.passes.fake import fake_run
from xdit_compile.passes.seed import graph_latent
from xdit_compile.placement import Shard, even_split
from xdit_compile.runtime.reshard import slice_shard

__all__ = ["batch_round", "restage_pass", "seed_batch_pass"]


def _entry(ph: fx.Node) -> fx.Node:
    """The value the graph computes with: an input, or an earlier batch round's piece of it."""
    users = list(ph.users)
    return users[0] if len(users) == 1 and users[0].target is slice_shard else ph


def _batch_inputs(gm: fx.GraphModule, name: str | None = None) -> tuple[int, list[fx.Node]]:
    """The latent's batch size and every input (or earlier round's piece) of that batch."""
    entries = [_entry(n) for n in gm.graph.find_nodes(op="placeholder")]
    found = graph_latent(gm, name)
    if found is None:
        raise SeedError(
            "no latent input found: batch parallelism splits dim 0 of hidden_states "
            "(name it with Plan(seed='name'))"
        )
    latent = _entry(found)
    batch = int(latent.meta["val"].shape[0])
    nodes = [
        n
        for n in entries
        if isinstance(v := n.meta.get("val"), torch.Tensor)
        and v.dim() >= 1
        and int(v.shape[0]) == batch
    ]
    return batch, nodes


def seed_batch_pass(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    degree = ctx.degree
    if degree == 1:
        return PassResult(gm, False)
    batch, nodes = _batch_inputs(gm, ctx.plan.seed)
    if batch < degree:
        what = (
            "CFG parallel needs both branches in one call (batch 2: [uncond, cond])"
            if ctx.axis == "cfg"
            else "data parallel needs a batch of at least dp"
        )
        raise SeedError(f"the latent batch is {batch}, {ctx.axis}={degree} cannot split it: {what}")
    split = even_split(batch, degree)
    for n in nodes:
        n.meta["xdit_seed"] = Shard(0, split)
    ctx.batch_seeds[ctx.axis] = BatchSeed(
        inputs=[n.name for n in nodes], batch=batch, split=tuple(split)
    )
    return PassResult(gm, True)


def restage_pass(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """After a batch round: shapes become this rank's; placements and seeds are cleared, so
    the next round starts from a graph whose shapes are its "global" ones."""
    fake_run(gm, write=True)
    for n in gm.graph.nodes:
        for key in ("xdit_seed", "xdit_placement", "xdit_src", "xdit_dst"):
            n.meta.pop(key, None)
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor):
            n.meta["xdit_shape"] = tuple(int(s) for s in val.shape)
    return PassResult(gm, True)


def batch_round(axis: str, propagate: PassFn, lower: PassFn) -> list[Pass]:
    """The passes of one batch axis's sharding round (they work on ``axis``; restaging
    re-derives the shapes for the rounds after it)."""
    return [
        Pass(f"seed_{axis}", seed_batch_pass, axis),
        Pass(f"propagate_{axis}", propagate, axis),
        Pass(f"lower_{axis}", lower, axis),
        Pass(f"restage_{axis}", restage_pass),
    ]
