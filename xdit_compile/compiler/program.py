"""What compiling produces: :func:`compile` turns a captured graph into a :class:`Program`.

``compile(graph, plan, mesh, facts) -> Program`` runs the plan's pass list (and, for PipeFusion,
the patch rounds and the stage cut) on a captured graph and returns everything the rewrite
decided, typed: the rewritten graph and the runner that executes it, the pass trace and the
graph after each pass, the seed choices, the sharding breaks, the collective sites, the
PipeFusion / DistriFusion pieces, the output shapes and the modules whose parameters it runs
with. It touches no model and no process group (capture runs before it; the parallel module
frees other stages' parameters after it), so the planner compiles Programs for plans it only
accounts, and ``explain`` renders one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from xdit_compile.compiler.driver import run_passes
from xdit_compile.compiler.pass_list import build_passes
from xdit_compile.compiler.pipefusion import PipeInfo, compile_pipefusion
from xdit_compile.passes.context import (
    BatchSeed,
    CollectiveSite,
    Facts,
    PassContext,
    PassStat,
    SeedChoice,
    ShardingBreak,
)
from xdit_compile.passes.stages import StageCut
from xdit_compile.plan import Plan
from xdit_compile.runtime.collectives import count
from xdit_compile.runtime.displaced import DisplacedBuffer, DisplacedState, displaced_buffer
from xdit_compile.runtime.mesh import MeshInfo, ParallelMesh

__all__ = ["Program", "compile"]

logger = logging.getLogger(__name__)

OutShape = tuple[torch.Size, torch.dtype] | None


@dataclass(kw_only=True, eq=False)
class Program:
    """One input signature's compiled program for one rank: what runs and what the rewrite
    decided."""

    plan: Plan
    """The plan compiled (with what compiling implies, e.g. DistriFusion's whole text rows)."""
    mesh: MeshInfo
    graph: fx.GraphModule
    """The rewritten graph (PipeFusion: the first patch graph of a step, before the stage cut)."""
    runner: Callable[..., Any]
    """What a call runs: the graph, its ``torch.compile`` module, or PipeFusion's runner."""
    trace: list[PassStat]
    """Each pass: changed or not, node and op counts before/after, seconds."""
    graphs: dict[str, str]
    """Pass name -> the printed graph after it (``capture``: the input), what
    ``explain --graph-after`` prints."""
    seed: SeedChoice | None
    batch_seeds: dict[str, BatchSeed]
    breaks: list[ShardingBreak]
    collectives: list[CollectiveSite]
    counted: list[CollectiveSite]
    """Graph-level collectives :meth:`run` counts per call (ops inside attention and PipeFusion's
    runner count their own)."""
    serial_flops: int
    """The serial model's FLOPs at this input (before any cut)."""
    text_heads_localized: int = 0
    out_shapes: list[OutShape] | None = None
    """Whole output shapes and dtypes per output leaf when ``graph`` computes a piece
    (PipeFusion)."""
    pipefusion: PipeInfo | None = None
    pieces: list[fx.GraphModule] = field(default_factory=list)
    """PipeFusion: this rank's stage of every patch of a step (what it runs per step)."""
    kept: list[torch.nn.Module] = field(default_factory=list)
    """The modules whose parameters the program runs with (PipeFusion: its stage's pieces and
    prologues); empty when it runs with the whole model's."""
    displaced: list[DisplacedBuffer] = field(default_factory=list)
    """DistriFusion's displaced-K/V buffers on this rank (PipeFusion's are in ``pipefusion``)."""
    stage_cut: StageCut | None = None

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """Run one call (no autograd) and count the graph's own collectives."""
        with torch.no_grad():
            out = self.runner(*args, **kwargs)
        for c in self.counted:
            count(c.op, c.axis, c.bytes_per_forward, c.calls)
        return out

    def empty_outputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Uninitialized outputs of the call's shapes, dtypes and structure, without running it
        (CFG call pairing: the placeholders of the branch another rank computes)."""
        device = next(
            (x.device for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)),
            None,
        )
        leaves = pytree.tree_leaves(self.graph.graph.output_node().args[0])
        if self.out_shapes is not None:
            outs = [
                torch.empty(sd[0], dtype=sd[1], device=device) if sd is not None else n
                for n, sd in zip(leaves, self.out_shapes, strict=True)
            ]
        else:
            outs = [
                torch.empty(n.meta["val"].shape, dtype=n.meta["val"].dtype, device=device)
                if isinstance(n, fx.Node) and isinstance(n.meta.get("val"), torch.Tensor)
                else n
                for n in leaves
            ]
        spec = getattr(self.graph, "_out_spec", None)
        return pytree.tree_unflatten(outs, spec) if spec is not None else tuple(outs)

    @property
    def bytes_per_forward(self) -> int:
        return sum(c.bytes_per_forward for c in self.collectives)

    def __str__(self) -> str:
        lines = [
            f"Program({self.plan}, rank {self.mesh.rank}): {len(self.trace)} passes, "
            f"{len(self.breaks)} sharding breaks, {len(self.collectives)} collective sites "
            f"({self.bytes_per_forward:,} bytes per forward)"
        ]
        if self.seed is not None:
            lines.append(
                f"  seed: '{self.seed.input}' dim {self.seed.dim} in units of {self.seed.patch}: "
                f"{self.seed.split}"
            )
        lines += [
            f"  {axis} batch: {s.inputs} split {s.split}" for axis, s in self.batch_seeds.items()
        ]
        lines += [
            f"  pass {p.name:<24} {'changed' if p.modified else 'no-op'} {p.nodes_before} -> "
            f"{p.nodes_after}"
            for p in self.trace
        ]
        if self.pipefusion is not None:
            lines += self.pipefusion.summary()
        return "\n".join(lines)


def compile(  # noqa: A001  (the design's name: compile a graph into a Program)
    graph: fx.GraphModule,
    plan: Plan,
    mesh: ParallelMesh | MeshInfo,
    facts: Facts | None = None,
    *,
    state: DisplacedState | None = None,
    stage_cut: StageCut | None = None,
    verify: bool = True,
    keep_graphs: bool = True,
) -> Program:
    """Compile a captured ``graph`` (rewritten in place) for ``plan`` on this rank of ``mesh``.

    ``mesh``: the process groups (:class:`ParallelMesh`), or only the mesh's arithmetic
    (:class:`MeshInfo`: a program to inspect or account, not to run with collectives).
    ``state``: the displaced-K/V state PipeFusion / DistriFusion programs read and write.
    ``stage_cut``: PipeFusion's blocks per stage, fixed by the first compile (None: balanced).
    ``verify=False`` skips ``XDIT_DEBUG``'s shape verifier and ``keep_graphs=False`` the printed
    graphs (the planner's programs never run)."""
    info = mesh.info if isinstance(mesh, ParallelMesh) else mesh
    groups = {
        axis: mesh.group_name(axis)
        for axis in ("sp", "cfg", "dp")
        if isinstance(mesh, ParallelMesh) and info.degree(axis) > 1
    }
    if plan.distrifusion > 1 and "shard_text_rows" not in plan.disable_passes:
        # Every rank computes all text rows from its own view (fresh text K/V, no gathers).
        plan = replace(plan, disable_passes=(*plan.disable_passes, "shard_text_rows"))
    facts = facts or Facts()
    if state is not None:
        facts = replace(facts, state_key=state.key)
    ctx = PassContext(plan=plan, mesh=info, group_names=groups, facts=facts)
    if plan.displaced_patches > 1:
        if state is None:
            raise ValueError("a PipeFusion program needs the displaced-K/V state: pass state=")
        return _pipefusion_program(graph, ctx, mesh, state, stage_cut, verify)
    gm = run_passes(graph, build_passes(plan), ctx, verify=verify, keep_graphs=keep_graphs)
    runner: Callable[..., Any] = gm
    if plan.compile == "inductor":
        runner = torch.compile(gm, backend="inductor", dynamic=False)
    logger.info("compiled for a new input signature (%d sharding breaks)", len(ctx.breaks))
    displaced = [b for n in gm.graph.nodes if (b := displaced_buffer(n)) is not None]
    return _program(
        ctx, gm, runner, counted=[c for c in ctx.collectives if c.graph_level], displaced=displaced
    )


def _program(
    ctx: PassContext, gm: fx.GraphModule, runner: Callable[..., Any], **extra: Any
) -> Program:
    assert ctx.serial_flops is not None  # the driver counts them before the first pass
    return Program(
        plan=ctx.plan,
        mesh=ctx.mesh,
        graph=gm,
        runner=runner,
        trace=list(ctx.stats),
        graphs=dict(ctx.graphs),
        seed=ctx.seed,
        batch_seeds=dict(ctx.batch_seeds),
        breaks=list(ctx.breaks),
        collectives=list(ctx.collectives),
        serial_flops=ctx.serial_flops,
        text_heads_localized=ctx.text_heads_localized,
        **extra,
    )


def _pipefusion_program(
    graph: fx.GraphModule,
    ctx: PassContext,
    mesh: ParallelMesh | MeshInfo,
    state: DisplacedState,
    cut: StageCut | None,
    verify: bool,
) -> Program:
    plan = ctx.plan
    built = compile_pipefusion(
        graph,
        ctx,
        build_passes(plan, "common"),
        build_passes(plan, "patch"),
        cut,
        mesh if isinstance(mesh, ParallelMesh) and mesh.mesh is not None else None,
        state,
        verify=verify,
    )
    runner = built.runner
    pieces = [p.gm for p in runner.main.programs]
    if plan.compile == "inductor":
        for var in runner.variants.values():
            for prog in var.programs:
                prog.gm = torch.compile(prog.gm, backend="inductor", dynamic=False)  # type: ignore[assignment]
    kept: list[torch.nn.Module] = [p.gm for v in runner.variants.values() for p in v.programs]
    kept += [v.prologue for v in runner.variants.values()]
    return _program(
        built.ctx,
        built.graph,
        runner,
        counted=[],
        out_shapes=runner.main.out_shapes,
        pipefusion=built.info,
        pieces=pieces,
        kept=kept,
        stage_cut=built.cut,
    )
