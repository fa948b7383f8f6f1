"""``explain``: what xdit_compile did to a model, as data and as readable text.

The report covers the plan and mesh, the seed, the passes (node and op counts before/after),
every collective (axis, op, calls and bytes per rank per forward), sharding breaks with their
source lines, parameter bytes, peak activation bytes and estimated FLOPs per rank, and the rewritten graph with a
placement per node.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from xdit_compile.compiler.driver import CollectiveSite, PassStat, ShardingBreak
from xdit_compile.passes.flops import node_flops
from xdit_compile.placement import Shard

__all__ = ["Report", "build_report", "estimate_flops", "local_fraction"]

aten = torch.ops.aten


@dataclass
class Report:
    model: str
    plan: str
    mesh: dict[str, int]
    rank: int
    seed: dict[str, Any]
    passes: list[PassStat]
    collectives: list[CollectiveSite]
    breaks: list[ShardingBreak]
    param_bytes: int
    flops: int
    serial_flops: int
    graph: str = field(repr=False)
    graphs: dict[str, str] = field(repr=False, default_factory=dict)
    pipefusion: Any = None
    """PipeFusion's stages, patches, buffers and schedule (``PipeInfo``), if the plan has it."""
    displaced: list[tuple[str, tuple[int, ...], int]] = field(default_factory=list)
    """DistriFusion's displaced-K/V buffers on this rank: (layer, K shape, bytes of K and V)."""
    regions: list[tuple[str, str]] = field(default_factory=list)
    """For a model that could not be captured whole: (region, how it runs) for every region."""
    region_error: str = ""
    activation_bytes: int = 0
    """Peak bytes of the rewritten graph's values alive at once on this rank (static liveness,
    :func:`xdit_compile.analysis.planner.peak_activation_bytes`)."""
    state_changes: list[str] = field(default_factory=list)
    """What changed in the model's Python-side state (LoRA adapters, processors, hooks, replaced
    parameters...) each time it changed after the first call; the calls after each recompiled,
    or reused an earlier state's graphs."""

    @property
    def bytes_per_forward(self) -> int:
        return sum(c.bytes_per_forward for c in self.collectives)

    def comm_totals(self) -> dict[tuple[str, str], tuple[int, int]]:
        """(op, axis) -> (calls, bytes) per forward for this rank."""
        tot: dict[tuple[str, str], list[int]] = collections.defaultdict(lambda: [0, 0])
        for c in self.collectives:
            tot[(c.op, c.axis)][0] += c.calls
            tot[(c.op, c.axis)][1] += c.bytes_per_forward
        return {k: (v[0], v[1]) for k, v in sorted(tot.items())}

    def summary(self) -> str:
        out = [f"xdit_compile explain: {self.model}", f"  plan: {self.plan}"]
        mesh = ", ".join(f"{k}={v}" for k, v in self.mesh.items())
        out.append(f"  mesh: {mesh} (this report: rank {self.rank})")
        if self.seed:
            out.append(
                f"  seed: input '{self.seed['input']}' {list(self.seed['shape'])} split on dim "
                f"{self.seed['dim']} in multiples of {self.seed['patch']}: {list(self.seed['split'])}"
            )
        out.append("  passes:")
        for p in self.passes:
            delta = _op_delta(p.ops_before, p.ops_after)
            out.append(
                f"    {p.name:<20} {'changed' if p.modified else 'no-op  '} nodes {p.nodes_before} -> "
                f"{p.nodes_after}  {delta}".rstrip()
            )
        out.append(f"  collectives per forward (rank {self.rank}): {self.bytes_per_forward:,} bytes sent")
        for (op, axis), (calls, nbytes) in self.comm_totals().items():
            out.append(f"    {op:<12} over {axis:<8} {calls:>4} calls  {nbytes:>14,} bytes")
        for c in self.collectives:
            out.append(
                f"      {c.node:<36} {c.op:<11} {c.axis:<8} x{c.calls:<3} {c.bytes_per_forward:>12,} B  ({c.what})"
            )
        out.append(f"  sharding breaks: {len(self.breaks)}")
        for b in self.breaks:
            out.append(f"    {b.node} ({b.op}): {b.reason}\n      at {b.source}")
        if self.regions:
            out.append(f"  captured in {len(self.regions)} regions (the model is not one graph: "
                       f"{self.region_error}); glue between regions runs eagerly:")
            for name, how in self.regions:
                out.append(f"    {name:<40} {how}")
        if self.state_changes:
            out.append(f"  model state changed {len(self.state_changes)} time(s) after the first call "
                       f"(graphs compiled for, or reused from, each state):")
            out += [f"    {i + 1}. {c}" for i, c in enumerate(self.state_changes)]
        if self.pipefusion is not None:
            out += self.pipefusion.summary()
        if self.displaced:
            total = sum(b for _, _, b in self.displaced)
            out.append(f"  DistriFusion displaced K/V buffers: {len(self.displaced)} layers, {total:,} bytes per CFG branch")
            for layer, shape, nbytes in self.displaced:
                out.append(f"      {layer:<40} K/V {list(shape)}  {nbytes:,} B")
        out.append(f"  parameters held by this rank: {self.param_bytes:,} bytes (distinct storages, measured)")
        if self.activation_bytes:
            out.append(f"  peak activation bytes on this rank: {self.activation_bytes:,} (graph values alive at "
                       f"once, static; not counting buffers inside attention and collectives)")
        ratio = self.flops / self.serial_flops if self.serial_flops else 1.0
        out.append(f"  estimated FLOPs per rank: {self.flops:,} ({ratio:.2f} of serial)")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.summary() + "\n  rewritten graph (placement per node, <pass that created it>):\n" + self.graph


def _op_delta(before: dict[str, int], after: dict[str, int]) -> str:
    keys = sorted(set(before) | set(after))
    parts = []
    for k in keys:
        d = after.get(k, 0) - before.get(k, 0)
        if d:
            parts.append(f"{k.split('.')[-1] if k.startswith('aten.') else k}{d:+d}")
    return ", ".join(parts[:8]) + (" ..." if len(parts) > 8 else "")


def local_fraction(node: fx.Node, rank: int) -> float:
    """The share of ``node``'s (global) value that ``rank`` holds under its placement (for
    parallel attention, of its work: ``meta["xdit_work"]``, set for the graph's own rank)."""
    if "xdit_work" in node.meta:
        return float(node.meta["xdit_work"])
    p = node.meta.get("xdit_placement")
    if isinstance(p, tuple) and p:  # several outputs (flex attention: its output first)
        p = p[0]
    if isinstance(p, Shard):
        return p.local_size(rank) / p.total
    return 1.0


def estimate_flops(gm: fx.GraphModule, rank: int) -> tuple[int, int]:
    """(FLOPs on ``rank``, serial FLOPs) estimated from global shapes and placements."""
    local = serial = 0
    for node in gm.graph.nodes:
        f = node_flops(node)
        serial += f
        local += int(f * local_fraction(node, rank))
    return local, serial


def build_report(pm: Any) -> Report:
    """Report for ``pm`` (a ParallelModule) on its last compiled input signature."""
    if pm.regions is not None:
        return _region_report(pm)
    entry = pm.last
    if entry is None:
        raise RuntimeError("nothing compiled yet: call the module (or pm.prepare(**inputs)) first")
    from xdit_compile.analysis.planner import peak_activation_bytes
    from xdit_compile.compiler.pipefusion import parameter_bytes

    ctx = entry.ctx
    flops, serial = estimate_flops(entry.gm, ctx.mesh.sp_rank)
    serial = ctx.hints.get("serial_flops", serial)  # before the CFG / data-parallel rounds
    info = ctx.hints.get("pipefusion")
    if info is not None:  # this rank's stage of every patch (local shapes)
        progs = entry.runner.main.programs
        flops = sum(node_flops(n) for p in progs for n in p.gm.graph.nodes)
        serial = ctx.hints.get("serial_flops", serial)
    params = parameter_bytes(pm.pipeline_modules())
    return Report(
        model=type(pm.model).__name__,
        plan=str(pm.plan),
        mesh=pm.plan.degrees(),
        rank=ctx.mesh.rank,
        seed=dict(ctx.seed),
        passes=list(ctx.stats),
        collectives=list(ctx.collectives),
        breaks=list(ctx.breaks),
        param_bytes=params,
        flops=flops,
        serial_flops=serial,
        graph=ctx.graphs.get(list(ctx.graphs)[-1], ""),
        graphs=dict(ctx.graphs),
        pipefusion=info,
        displaced=_distrifusion_buffers(entry.gm),
        activation_bytes=0 if info is not None else peak_activation_bytes(entry.gm, ctx.mesh.sp_rank),
        state_changes=list(pm.state_changes),
    )


def _distrifusion_buffers(gm: fx.GraphModule) -> list[tuple[str, tuple[int, ...], int]]:
    out = []
    for n in gm.graph.nodes:
        if n.target is torch.ops.xdit.distrifusion_attention.default:
            k, v, split = n.args[1].meta["val"], n.args[2].meta["val"], n.args[8]
            shape = (*k.shape[:-2], sum(split), k.shape[-1])
            numel = torch.Size(shape).numel()
            out.append((str(n.args[6]), tuple(int(x) for x in shape),
                        int(numel * k.element_size() * (1 + v.shape[-1] / k.shape[-1]))))
    return out


def _region_report(pm: Any) -> Report:
    """A model run in regions: every region's breaks, collectives and FLOPs added up (a region
    that runs eagerly counts as replicated with the FLOPs of its captured graph, if any)."""
    from dataclasses import replace as dc_replace

    from xdit_compile.compiler.pipefusion import parameter_bytes

    regions: list[tuple[str, str]] = []
    breaks: list[ShardingBreak] = []
    collectives: list[CollectiveSite] = []
    flops = serial = 0
    for r in pm.all_regions():
        entry = r.last
        if r.regions is not None:
            how = f"split into {len(r.regions)} regions ({r.region_error})"
        elif r.eager:
            how = "eager on every rank (no latent input to cut)"
            f = r.eager_flops
            flops, serial = flops + f, serial + f
        elif entry is None:
            how = "not called yet"
        else:
            n = len(entry.ctx.breaks)
            how = f"one graph, {n} sharding break{'s' if n != 1 else ''}"
            local, ser = estimate_flops(entry.gm, entry.ctx.mesh.sp_rank)
            ser = entry.ctx.hints.get("serial_flops", ser)
            flops, serial = flops + local, serial + ser
            breaks += [dc_replace(b, node=f"{r.region}/{b.node}") for b in entry.ctx.breaks]
            collectives += [dc_replace(c, node=f"{r.region}/{c.node}") for c in entry.ctx.collectives]
        regions.append((str(r.region), how))
    return Report(
        model=type(pm.model).__name__, plan=str(pm.plan), mesh=pm.plan.degrees(), rank=pm.mesh.info.rank,
        seed={}, passes=[], collectives=collectives, breaks=breaks,
        param_bytes=parameter_bytes(pm.pipeline_modules()), flops=flops, serial_flops=serial, graph="",
        regions=regions, region_error=pm.region_error,
        state_changes=[f"{r.region}: {c}" for r in pm.all_regions() for c in r.state_changes],
    )
