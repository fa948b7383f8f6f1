"""``explain``: what xdit_compile did to a model, as data and as readable text.

The report covers the plan and mesh, the seed, the passes (node and op counts before/after),
every collective (axis, op, calls and bytes per rank per forward), sharding breaks with their
source lines, parameter bytes, peak activation bytes and estimated FLOPs per rank, and the rewritten
graph with a placement per node.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from xdit_compile.analysis.accounting import estimate_flops, peak_activation_bytes
from xdit_compile.compiler.pipefusion import PipeInfo, parameter_bytes
from xdit_compile.compiler.program import Program
from xdit_compile.passes.context import CollectiveSite, PassStat, ShardingBreak
from xdit_compile.passes.flops import node_flops
from xdit_compile.runtime.displaced import DisplacedBuffer

__all__ = ["Report", "build_report", "program_report"]

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
    pipefusion: PipeInfo | None = None
    """PipeFusion's stages, patches, buffers and schedule, if the plan has it."""
    displaced: list[DisplacedBuffer] = field(default_factory=list)
    """DistriFusion's displaced-K/V buffers on this rank."""
    regions: list[tuple[str, str]] = field(default_factory=list)
    """For a model that could not be captured whole: (region, how it runs) for every region."""
    region_error: str = ""
    activation_bytes: int = 0
    """Peak bytes of the rewritten graph's values alive at once on this rank (static liveness,
    :func:`xdit_compile.analysis.accounting.peak_activation_bytes`)."""
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
                f"{self.seed['dim']} in multiples of {self.seed['patch']}: "
                f"{list(self.seed['split'])}"
            )
        out.append("  passes:")
        for p in self.passes:
            delta = _op_delta(p.ops_before, p.ops_after)
            out.append(
                f"    {p.name:<20} {'changed' if p.modified else 'no-op  '} "
                f"nodes {p.nodes_before} -> {p.nodes_after}  {delta}".rstrip()
            )
        out.append(
            f"  collectives per forward (rank {self.rank}): {self.bytes_per_forward:,} bytes sent"
        )
        for (op, axis), (calls, nbytes) in self.comm_totals().items():
            out.append(f"    {op:<12} over {axis:<8} {calls:>4} calls  {nbytes:>14,} bytes")
        for c in self.collectives:
            out.append(
                f"      {c.node:<36} {c.op:<11} {c.axis:<8} x{c.calls:<3} "
                f"{c.bytes_per_forward:>12,} B  ({c.what})"
            )
        out.append(f"  sharding breaks: {len(self.breaks)}")
        for b in self.breaks:
            out.append(f"    {b.node} ({b.op}): {b.reason}\n      at {b.source}")
        if self.regions:
            out.append(
                f"  captured in {len(self.regions)} regions (the model is not one graph: "
                f"{self.region_error}); glue between regions runs eagerly:"
            )
            for name, how in self.regions:
                out.append(f"    {name:<40} {how}")
        if self.state_changes:
            out.append(
                f"  model state changed {len(self.state_changes)} time(s) after the first call "
                f"(graphs compiled for, or reused from, each state):"
            )
            out += [f"    {i + 1}. {c}" for i, c in enumerate(self.state_changes)]
        if self.pipefusion is not None:
            out += self.pipefusion.summary()
        if self.displaced:
            total = sum(b.nbytes for b in self.displaced)
            out.append(
                f"  DistriFusion displaced K/V buffers: {len(self.displaced)} layers, {total:,} "
                "bytes per CFG branch"
            )
            for b in self.displaced:
                out.append(f"      {b.layer:<40} K/V {list(b.shape)}  {b.nbytes:,} B")
        out.append(
            f"  parameters held by this rank: {self.param_bytes:,} bytes (distinct storages, "
            "measured)"
        )
        if self.activation_bytes:
            out.append(
                f"  peak activation bytes on this rank: {self.activation_bytes:,} (graph values "
                "alive at once, static; not counting buffers inside attention and collectives)"
            )
        ratio = self.flops / self.serial_flops if self.serial_flops else 1.0
        out.append(f"  estimated FLOPs per rank: {self.flops:,} ({ratio:.2f} of serial)")
        return "\n".join(out)

    def __str__(self) -> str:
        return (
            self.summary()
            + "\n  rewritten graph (placement per node, <pass that created it>):\n"
            + self.graph
        )


def _op_delta(before: dict[str, int], after: dict[str, int]) -> str:
    keys = sorted(set(before) | set(after))
    parts = []
    for k in keys:
        d = after.get(k, 0) - before.get(k, 0)
        if d:
            parts.append(f"{k.split('.')[-1] if k.startswith('aten.') else k}{d:+d}")
    return ", ".join(parts[:8]) + (" ..." if len(parts) > 8 else "")


def build_report(pm: Any) -> Report:
    """Report for ``pm`` (a ParallelModule) on its last compiled input signature."""
    if pm.regions is not None:
        return _region_report(pm)
    program = pm.last
    if program is None:
        raise RuntimeError("nothing compiled yet: call the module (or pm.prepare(**inputs)) first")
    return program_report(
        program,
        model=type(pm.model).__name__,
        plan=str(pm.plan),
        param_bytes=parameter_bytes(pm.pipeline_modules()),
        state_changes=list(pm.state_changes),
    )


def program_report(
    program: Program,
    *,
    model: str,
    plan: str,
    param_bytes: int,
    state_changes: list[str] | None = None,
) -> Report:
    """The report of one :class:`~xdit_compile.compiler.program.Program`."""
    mesh = program.mesh
    if program.pipefusion is not None:  # this rank's stage of every patch (local shapes)
        flops = sum(node_flops(n) for g in program.pieces for n in g.graph.nodes)
    else:
        flops, _ = estimate_flops(program.graph, mesh.sp_rank)
    return Report(
        model=model,
        plan=plan,
        mesh=program.plan.degrees(),
        rank=mesh.rank,
        seed=program.seed.as_dict() if program.seed is not None else {},
        passes=list(program.trace),
        collectives=list(program.collectives),
        breaks=list(program.breaks),
        param_bytes=param_bytes,
        flops=flops,
        serial_flops=program.serial_flops,
        graph=program.graphs.get(list(program.graphs)[-1], "") if program.graphs else "",
        graphs=dict(program.graphs),
        pipefusion=program.pipefusion,
        displaced=list(program.displaced),
        activation_bytes=0
        if program.pipefusion is not None
        else peak_activation_bytes(program.graph, mesh.sp_rank),
        state_changes=list(state_changes or []),
    )


def _region_report(pm: Any) -> Report:
    """A model run in regions: every region's breaks, collectives and FLOPs added up (a region
    that runs eagerly counts as replicated with the FLOPs of its captured graph, if any)."""
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
            n = len(entry.breaks)
            how = f"one graph, {n} sharding break{'s' if n != 1 else ''}"
            local, _ = estimate_flops(entry.graph, entry.mesh.sp_rank)
            flops, serial = flops + local, serial + entry.serial_flops
            breaks += [replace(b, node=f"{r.region}/{b.node}") for b in entry.breaks]
            collectives += [replace(c, node=f"{r.region}/{c.node}") for c in entry.collectives]
        regions.append((str(r.region), how))
    return Report(
        model=type(pm.model).__name__,
        plan=str(pm.plan),
        mesh=pm.plan.degrees(),
        rank=pm.mesh.info.rank,
        seed={},
        passes=[],
        collectives=collectives,
        breaks=breaks,
        param_bytes=parameter_bytes(pm.pipeline_modules()),
        flops=flops,
        serial_flops=serial,
        graph="",
        regions=regions,
        region_error=pm.region_error,
        state_changes=[f"{r.region}: {c}" for r in pm.all_regions() for c in r.state_changes],
    )
