"""Compile a model for PipeFusion: patch graphs, stages, prologues and the runner.

For one input signature: the common passes run once (canonicalize, annotate, CFG / data
parallel batch rounds); then the patch round (:mod:`xdit_compile.passes.patches`) runs on a copy
of that graph for every patch ``j`` of the main variant (``M`` patches) and for the warmup
variant (the whole sequence as one patch), and :mod:`xdit_compile.passes.stages` cuts each patch
graph into this rank's stage. :class:`~xdit_compile.runtime.pipefusion.PipeRunner` runs them.
The stage cut (which blocks each rank runs) is fixed at the first compile, so every later input
signature keeps the same parameters on the same ranks; :func:`release_parameters` then frees,
in the model, the parameters this rank's stages never read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from xdit_compile.compiler.driver import run_passes
from xdit_compile.passes.context import CollectiveSite, Pass, PassContext, SeedChoice
from xdit_compile.passes.flops import block_flops, node_flops
from xdit_compile.passes.stages import (
    Piece,
    StageCut,
    balance,
    block_order,
    copy_graph_module,
    extract_piece,
    extract_prologue,
)
from xdit_compile.placement import Shard
from xdit_compile.plan import Plan
from xdit_compile.runtime.displaced import DisplacedBuffer, DisplacedState, displaced_buffer
from xdit_compile.runtime.mesh import ParallelMesh
from xdit_compile.runtime.pipefusion import PatchProgram, PipeRunner, Variant
from xdit_compile.runtime.schedule import grid, pipefusion_schedule, speedup_bound

__all__ = [
    "PipeFusionBuild",
    "PipeInfo",
    "compile_pipefusion",
    "parameter_bytes",
    "release_parameters",
    "stage_cut",
]

logger = logging.getLogger(__name__)


@dataclass
class PipeInfo:
    """What ``explain`` shows about a PipeFusion program (this rank's view)."""

    stages: int
    patches: int
    stage: int
    cut: StageCut
    stage_param_bytes: list[int]
    patch_seed: SeedChoice
    buffers: list[DisplacedBuffer] = field(default_factory=list)
    """This rank's displaced-K/V buffers per CFG branch."""
    sends_per_step: int = 0
    """Bytes this rank sends to the next stage per step (all patches)."""
    schedule: str = ""
    warm_schedule: str = ""

    @property
    def bound(self) -> float:
        return speedup_bound(self.stages, self.patches)

    def summary(self) -> list[str]:
        out = [
            f"  PipeFusion: {self.stages} stages x {self.patches} patches (this rank: stage "
            f"{self.stage}); best speedup N*M/(M+N-1) = {self.bound:.2f}"
        ]
        seed = self.patch_seed
        out.append(
            f"    patches: input '{seed.input}' dim {seed.dim} in units of {seed.patch}: "
            f"{list(seed.split)}"
        )
        for s in range(self.stages):
            blocks = self.cut.stage_blocks(s)
            out.append(
                f"    stage {s}: {len(blocks)} blocks ({blocks[0]} .. {blocks[-1]}), "
                f"{self.stage_param_bytes[s]:,} parameter bytes"
            )
        total = sum(b.nbytes for b in self.buffers)
        out.append(
            f"    displaced K/V buffers on this rank: {len(self.buffers)} layers, {total:,} bytes "
            "per CFG branch"
        )
        for b in self.buffers:
            out.append(f"      {b.layer:<40} K/V {list(b.shape)}  {b.nbytes:,} B")
        out.append(f"    sends to the next stage per step: {self.sends_per_step:,} bytes")
        out.append("    schedule of a step (time slot x stage, patch run):")
        out += ["      " + ln for ln in self.schedule.splitlines()]
        out.append("    warmup steps run the whole sequence as one patch:")
        out += ["      " + ln for ln in self.warm_schedule.splitlines()]
        return out


def stage_cut(gm: fx.GraphModule, plan: Plan) -> StageCut:
    """Blocks per stage: the plan's counts, or balanced by FLOPs."""
    blocks = block_order(gm)
    n = plan.pipefusion
    if not blocks:
        raise ValueError(
            "PipeFusion cuts a model on its blocks (numbered submodules such as "
            "transformer_blocks.0), and this model has none"
        )
    if n > len(blocks):
        raise ValueError(
            f"Plan(pipefusion={n}): more stages than the model's {len(blocks)} blocks; "
            f"use pipefusion <= {len(blocks)}"
        )
    if plan.stage_blocks:
        if sum(plan.stage_blocks) != len(blocks):
            raise ValueError(
                f"Plan.stage_blocks={plan.stage_blocks} sums to {sum(plan.stage_blocks)}, "
                f"but the model has {len(blocks)} blocks"
            )
        return StageCut(tuple(blocks), tuple(plan.stage_blocks))
    flops = block_flops(gm)
    return StageCut(tuple(blocks), balance([flops[b] for b in blocks], n))


def _child(ctx: PassContext, m: int, j: int) -> PassContext:
    """Patch ``j`` of ``m``'s context: what the common passes recorded, copied."""
    return replace(
        ctx,
        virtual={"patch": (m, j)},
        breaks=list(ctx.breaks),
        collectives=list(ctx.collectives),
        stats=list(ctx.stats),
        graphs=dict(ctx.graphs),
        batch_seeds=dict(ctx.batch_seeds),
        patch_outputs=dict(ctx.patch_outputs),
        axis="sp",
    )


def _program(piece: Piece, ctx: PassContext) -> PatchProgram:
    names = {n.name for n in piece.gm.graph.nodes}
    sites = [c for c in ctx.collectives if c.node in names]
    comm = [(c.op, c.axis, c.calls, c.bytes_per_forward) for c in sites if c.graph_level]
    inner = [(c.op, c.axis, c.calls, c.bytes_per_forward) for c in sites if not c.graph_level]
    return PatchProgram(piece.gm, piece.inputs, piece.recv, comm, inner)


def _outputs(g: fx.GraphModule, ctx: PassContext) -> tuple[list[Shard | None], list[Any]]:
    placements = ctx.patch_outputs
    outs: list[Shard | None] = []
    shapes: list[tuple[torch.Size, torch.dtype] | None] = []
    for leaf in pytree.tree_leaves(g.graph.output_node().args[0]):
        p = placements.get(leaf.name) if isinstance(leaf, fx.Node) else None
        outs.append(p)
        val = leaf.meta.get("val") if isinstance(leaf, fx.Node) else None
        if isinstance(val, torch.Tensor):
            shape = list(val.shape)
            if p is not None:
                shape[p.dim] = p.total
            shapes.append((torch.Size(shape), val.dtype))
        else:
            shapes.append(None)
    return outs, shapes


def _variant(
    base: fx.GraphModule,
    ctx: PassContext,
    passes: list[Pass],
    cut: StageCut,
    stage: int,
    m: int,
    verify: bool,
) -> tuple[Variant, list[fx.GraphModule], PassContext]:
    programs, graphs, names, first_ctx = [], [], [], None
    for j in range(m):
        cj = _child(ctx, m, j)
        g = run_passes(copy_graph_module(base), passes, cj, verify=verify)
        piece = extract_piece(g, cut, stage)
        programs.append(_program(piece, cj))
        graphs.append(g)
        names += [x for x in piece.step_level if x not in names]
        first_ctx = first_ctx or cj
    assert first_ctx is not None
    order = {n.name: i for i, n in enumerate(graphs[0].graph.nodes)}
    names.sort(key=order.__getitem__)
    prologue, pro_args = extract_prologue(graphs[0], names)
    placements, shapes = _outputs(graphs[0], first_ctx)
    return Variant(m, prologue, pro_args, names, programs, placements, shapes), graphs, first_ctx


@dataclass(frozen=True, slots=True)
class PipeFusionBuild:
    """What :func:`compile_pipefusion` built: the main variant's first patch graph and its
    context (for the program's report), the runner, the stage cut and what ``explain`` shows."""

    graph: fx.GraphModule
    ctx: PassContext
    runner: PipeRunner
    cut: StageCut
    info: PipeInfo


def compile_pipefusion(
    gm: fx.GraphModule,
    ctx: PassContext,
    common: list[Pass],
    patch_passes: list[Pass],
    cut: StageCut | None,
    mesh: ParallelMesh | None,
    state: DisplacedState,
    *,
    verify: bool = True,
) -> PipeFusionBuild:
    """Compile ``gm`` for ``ctx.plan``'s PipeFusion."""
    plan = ctx.plan
    in_spec, out_spec = getattr(gm, "_in_spec", None), getattr(gm, "_out_spec", None)
    ctx.serial_flops = sum(node_flops(n) for n in gm.graph.nodes)
    base = run_passes(gm, common, ctx, verify=verify)
    cut = cut or stage_cut(base, plan)
    stage, n = ctx.mesh.pipefusion_rank, plan.pipefusion
    warm, _, _ = _variant(base, ctx, patch_passes, cut, stage, 1, verify)
    main, graphs, cj = _variant(base, ctx, patch_passes, cut, stage, plan.displaced_patches, verify)
    runner = PipeRunner(warm, main, state, mesh, stage, n, in_spec, out_spec)
    info = _info(graphs[0], cj, cut, stage, main)
    cj.collectives = _step_collectives(main, info)
    return PipeFusionBuild(graphs[0], cj, runner, cut, info)


def _step_collectives(main: Variant, info: PipeInfo) -> list[CollectiveSite]:
    """What this rank sends per step (all patches): graph-level collectives inside its pieces,
    activations to the next stage, and (last stage) the output broadcast."""
    sites: dict[tuple[str, str], list[int]] = {}
    for prog in main.programs:
        for op, axis, calls, nbytes in prog.comm + prog.inner:
            tot = sites.setdefault((op, axis), [0, 0])
            tot[0], tot[1] = tot[0] + calls, tot[1] + nbytes
    out = [
        CollectiveSite(f"patches:{op}", op, axis, c, b, "inside the stage", graph_level=True)
        for (op, axis), (c, b) in sites.items()
    ]
    n = info.stages
    if info.stage < n - 1:
        calls = sum(len(p.gm.graph.output_node().args[0]) for p in main.programs)  # type: ignore[arg-type]
        out.append(
            CollectiveSite(
                "stage_output",
                "send",
                "pipefusion",
                calls,
                info.sends_per_step,
                "patch activations to the next stage",
                graph_level=True,
            )
        )
    elif n > 1:
        nbytes = sum(
            int(sd[0].numel()) * sd[1].itemsize for sd in main.out_shapes if sd is not None
        )
        calls = sum(1 for sd in main.out_shapes if sd is not None)
        out.append(
            CollectiveSite(
                "output",
                "broadcast",
                "pipefusion",
                calls,
                nbytes * (n - 1),
                "output to every stage",
                graph_level=True,
            )
        )
    return out


def _info(
    g: fx.GraphModule, ctx: PassContext, cut: StageCut, stage: int, main: Variant
) -> PipeInfo:
    n, m = cut.stages, main.patches
    params = []
    for s in range(n):
        piece = extract_piece(g, cut, s)
        params.append(sum(t.numel() * t.element_size() for t in _tensors(piece.gm)))
    buffers = [
        b for node in main.programs[0].gm.graph.nodes if (b := displaced_buffer(node)) is not None
    ]
    sends = 0
    if stage < n - 1:
        for prog in main.programs:
            for a in prog.gm.graph.output_node().args[0]:  # type: ignore[union-attr]
                val = a.meta.get("val") if isinstance(a, fx.Node) else None
                sends += val.numel() * val.element_size() if isinstance(val, torch.Tensor) else 0
    assert ctx.patch_seed is not None  # the patch round's seed pass always cuts
    return PipeInfo(
        n,
        m,
        stage,
        cut,
        params,
        ctx.patch_seed,
        buffers,
        sends,
        grid(pipefusion_schedule(n, m)),
        grid(pipefusion_schedule(n, 1)),
    )


def _tensors(gm: torch.nn.Module) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    for t in list(gm.parameters()) + list(gm.buffers()):
        seen.setdefault(id(t), t)
    return list(seen.values())


def parameter_bytes(modules: list[torch.nn.Module]) -> int:
    """Bytes of the distinct storages behind the parameters and buffers of ``modules``
    (what this rank really holds: freed parameters count a few bytes)."""
    storages: dict[int, int] = {}
    for mod in modules:
        for t in _tensors(mod):
            st = t.untyped_storage()
            storages[st.data_ptr()] = max(storages.get(st.data_ptr(), 0), st.nbytes())
    return sum(storages.values())


def release_parameters(model: torch.nn.Module, keep: list[torch.nn.Module]) -> int:
    """Free (in place) every parameter of ``model`` that no module of ``keep`` uses; returns the
    bytes freed. A freed parameter keeps its shape and dtype (a zero-stride view of one element),
    so the model can still be captured for a new input signature."""
    used = {t.untyped_storage().data_ptr() for mod in keep for t in _tensors(mod)}
    freed = 0
    for p in model.parameters():
        if (
            p.untyped_storage().data_ptr() not in used
            and p.numel() > 1
            and p.stride() != (0,) * p.dim()
        ):
            freed += p.numel() * p.element_size()
            p.data = torch.zeros((), dtype=p.dtype, device=p.device).expand(p.shape)
    return freed
