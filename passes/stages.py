"""PipeFusion's stage split: cut a patch graph on block boundaries into pipeline stages.

The blocks (``meta["xdit_block"]``, in the order the graph runs them) are cut into ``N``
contiguous groups, balanced by FLOPs (:func:`balance`) or by the plan's block counts. Each node of
a patch graph then belongs to:

- a **block**: the stage of its block;
- **glue** after a block (Flux's text/image concatenation between its block kinds, the final
  norm and projection): the latest stage among its inputs, so post-processing lands on the last
  stage;
- **free** patch nodes before any block (patch embedding, this patch's slice of a position
  table): copied into every stage that uses them (cheap, and nothing needs to be sent);
- **step level** (``meta["xdit_step_level"]``: the same for every patch, e.g. timestep and
  modulation vectors): computed once per step by the stage's *prologue*.

:func:`extract_piece` builds, for one stage of one patch graph, a GraphModule that takes the
call's flat inputs it uses, the prologue's values and the values received from the previous
stage, and returns what the next stage needs (values computed on earlier stages are relayed) or,
on the last stage, the graph's outputs. The piece holds only the parameters its nodes use, so a
rank materializes only its stages' parameters (plus the shared modules its prologue and free
nodes use).

Before::  one graph: embed -> blocks.0 -> blocks.1 -> blocks.2 -> blocks.3 -> norm_out -> proj_out
After (N=2)::  stage 0: embed -> blocks.0 -> blocks.1 -> (send hidden)
               stage 1: (recv hidden) -> blocks.2 -> blocks.3 -> norm_out -> proj_out
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

__all__ = [
    "Piece",
    "StageCut",
    "balance",
    "block_order",
    "copy_graph_module",
    "extract_piece",
    "extract_prologue",
]


@dataclass(frozen=True, slots=True)
class StageCut:
    """Which blocks each pipeline stage runs (fixed for a model at its first compile)."""

    blocks: tuple[str, ...]
    counts: tuple[int, ...]

    def stage_of(self, block: str) -> int:
        i = self.blocks.index(block)
        edge = 0
        for s, c in enumerate(self.counts):
            edge += c
            if i < edge:
                return s
        raise AssertionError("unreachable")

    def stage_blocks(self, stage: int) -> tuple[str, ...]:
        start = sum(self.counts[:stage])
        return self.blocks[start : start + self.counts[stage]]

    @property
    def stages(self) -> int:
        return len(self.counts)


def block_order(gm: fx.GraphModule) -> list[str]:
    """Blocks in the order the graph first runs them."""
    seen: dict[str, None] = {}
    for n in gm.graph.nodes:
        blk = n.meta.get("xdit_block")
        if blk is not None:
            seen.setdefault(blk, None)
    return list(seen)


def balance(costs: list[int], parts: int) -> tuple[int, ...]:
    """Cut ``costs`` into ``parts`` contiguous non-empty groups minimizing the largest group's
    sum (ties: earlier groups smaller); returns the group sizes."""
    n = len(costs)
    if parts > n:
        raise ValueError(f"{parts} stages need at least {parts} blocks, the model has {n}")
    pre = [0]
    for c in costs:
        pre.append(pre[-1] + c)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0
    for p in range(1, parts + 1):
        for i in range(p, n + 1):
            for j in range(p - 1, i):
                v = max(best[p - 1][j], pre[i] - pre[j])
                if v < best[p][i]:
                    best[p][i], cut[p][i] = v, j
    sizes, i = [], n
    for p in range(parts, 0, -1):
        j = cut[p][i]
        sizes.append(i - j)
        i = j
    return tuple(reversed(sizes))


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over a copy of ``gm``'s graph (same names, shallow-copied node meta,
    shared parameters): passes on the copy leave ``gm`` untouched."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {}, return_output_node=True)
    assert isinstance(out, tuple)
    value, old_out = out
    new_out = graph.output(value)
    new_out.meta.update(old_out.meta)
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    new = fx.GraphModule(gm, graph)
    for key in ("_in_spec", "_out_spec"):
        if hasattr(gm, key):
            setattr(new, key, getattr(gm, key))
    return new


def _assign(gm: fx.GraphModule, cut: StageCut) -> dict[fx.Node, int | None]:
    """Stage of every patch-level node (None: free, before any block)."""
    stage: dict[fx.Node, int | None] = {}
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.meta.get("xdit_step_level", False):
            continue
        blk = n.meta.get("xdit_block")
        ins = [t for a in n.all_input_nodes if (t := stage.get(a)) is not None]
        if blk is not None:
            s = cut.stage_of(blk)
            if ins and max(ins) > s:
                raise ValueError(
                    f"{n.name} in block {blk} (stage {s}) uses a value of stage {max(ins)}: "
                    f"the graph does not run its blocks in order"
                )
            stage[n] = s
        else:
            stage[n] = max(ins) if ins else None
    return stage


@dataclass
class Piece:
    """One stage of one patch graph, as a runnable GraphModule."""

    gm: fx.GraphModule
    inputs: list[tuple[str, Any]]
    """Per placeholder: ("in", flat input index), ("pro", step-level node name) or ("recv", k)."""
    recv: list[tuple[str, torch.Size, torch.dtype]] = field(default_factory=list)
    """Received values (name, shape, dtype), in order."""
    sends: list[str] = field(default_factory=list)
    """Names of the values returned for the next stage (empty on the last stage)."""
    step_level: list[str] = field(default_factory=list)
    """Step-level values the piece reads from the prologue."""


def _users_stage(n: fx.Node, stage: dict[fx.Node, int | None], last: int) -> list[int]:
    out = []
    for u in n.users:
        if u.op == "output":
            out.append(last)
        elif stage.get(u) is not None:
            out.append(stage[u])  # type: ignore[arg-type]
    return out


def extract_piece(gm: fx.GraphModule, cut: StageCut, s: int) -> Piece:
    """Stage ``s`` of patch graph ``gm`` (see the module docstring)."""
    stage = _assign(gm, cut)
    last = cut.stages - 1
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    order = {n: i for i, n in enumerate(gm.graph.nodes)}

    def needs_later(n: fx.Node, after: int) -> bool:
        return any(t > after for t in _users_stage(n, stage, last))

    relay_in = [
        n
        for n in gm.graph.nodes
        if (t0 := stage.get(n)) is not None
        and t0 < s
        and any(t >= s for t in _users_stage(n, stage, last))
    ]
    members: set[fx.Node] = {n for n, t in stage.items() if t == s}
    roots: list[fx.Node] = list(members)
    if s == last:
        roots += [a for a in gm.graph.output_node().all_input_nodes]
    # Free patch nodes (no block before them) that this stage uses: copied in.
    stack = list(roots)
    while stack:
        n = stack.pop()
        for a in n.all_input_nodes:
            if a in stage and stage[a] is None and a not in members:
                members.add(a)
                stack.append(a)
    sends = (
        []
        if s == last
        else [
            n
            for n in gm.graph.nodes
            if (n in members or n in relay_in) and needs_later(n, s) and stage.get(n) is not None
        ]
    )
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    inputs: list[tuple[str, Any]] = []
    step_level: list[str] = []
    used = _used_inputs(members, gm.graph.output_node() if s == last else None)
    for i, ph in enumerate(placeholders):
        if ph in used:
            env[ph] = graph.placeholder(ph.name)
            env[ph].meta.update(ph.meta)
            inputs.append(("in", i))
    for n in sorted(used, key=order.__getitem__):
        if n.op == "call_function" and n.meta.get("xdit_step_level", False):
            env[n] = graph.placeholder(f"pro_{n.name}")
            env[n].meta.update(n.meta)
            inputs.append(("pro", n.name))
            step_level.append(n.name)
    recv = []
    for k, n in enumerate(relay_in):
        env[n] = graph.placeholder(f"recv_{n.name}")
        env[n].meta.update(n.meta)
        inputs.append(("recv", k))
        val = n.meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise ValueError(f"PipeFusion: {n.name} crosses a stage boundary but is not a tensor")
        recv.append((n.name, val.shape, val.dtype))
    for n in gm.graph.nodes:
        if n in members or (n.op == "get_attr" and n in used):
            env[n] = graph.node_copy(n, lambda a: env[a])
    if s == last:
        out = graph.output(fx.node.map_arg(gm.graph.output_node().args[0], lambda a: env[a]))
    else:
        out = graph.output(tuple(env[n] for n in sends))
    out.meta["xdit_stage"] = s
    piece = fx.GraphModule(gm, graph)
    return Piece(piece, inputs, recv, [n.name for n in sends], step_level)


def _used_inputs(members: set[fx.Node], output: fx.Node | None) -> set[fx.Node]:
    """Placeholders, get_attrs and step-level nodes the members (and the output) read directly."""
    used: set[fx.Node] = set()
    for n in list(members) + ([output] if output is not None else []):
        for a in n.all_input_nodes:
            if a in members:
                continue
            if a.op in ("placeholder", "get_attr") or a.meta.get("xdit_step_level", False):
                used.add(a)
    return used


def extract_prologue(gm: fx.GraphModule, names: list[str]) -> tuple[fx.GraphModule, list[int]]:
    """The step-level nodes ``names`` of ``gm`` and their step-level ancestors as one graph
    taking the flat inputs it uses (their indices are returned) and returning the values."""
    nodes = {n.name: n for n in gm.graph.nodes}
    want = [nodes[x] for x in names]
    needed: set[fx.Node] = set()
    stack = list(want)
    while stack:
        n = stack.pop()
        if n in needed:
            continue
        needed.add(n)
        stack.extend(n.all_input_nodes)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    args = []
    for i, ph in enumerate(gm.graph.find_nodes(op="placeholder")):
        if ph in needed:
            env[ph] = graph.placeholder(ph.name)
            env[ph].meta.update(ph.meta)
            args.append(i)
    for n in gm.graph.nodes:
        if n in needed and n.op != "placeholder":
            env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(tuple(env[n] for n in want))
    return fx.GraphModule(gm, graph), args
