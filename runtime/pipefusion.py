"""PipeFusion's runtime: run this rank's stage of every patch by its action list.

A :class:`Variant` is one way to run a call: the main one with ``M`` patches, or the warmup one
with the whole sequence as one patch (exact: every token's K/V is fresh, and it fills the
displaced-K/V buffers). :class:`PipeRunner` picks the variant from the request's state, runs
the stage's prologue (step-level values, once per call) and then interprets the schedule
(:mod:`xdit_compile.runtime.schedule`): receives are posted before anything runs, patches run in
order, their activations go to the next stage with asynchronous point-to-point sends whose
handles and tensors stay alive until ``DRAIN``; the last stage joins the patches' outputs and
broadcasts them, so every rank returns the same output. Shapes of everything received are fixed
by the compiled graphs, so no shape handshake is needed. Every byte sent is counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.fx._pytree as fx_pytree
import torch.utils._pytree as pytree

from xdit_compile.placement import Shard
from xdit_compile.runtime.collectives import count
from xdit_compile.runtime.displaced import DisplacedState
from xdit_compile.runtime.mesh import ParallelMesh
from xdit_compile.runtime.schedule import Action, pipefusion_schedule

__all__ = ["PatchProgram", "PipeRunner", "Variant", "assemble"]


@dataclass
class PatchProgram:
    """This rank's stage of one patch graph."""

    gm: fx.GraphModule
    inputs: list[tuple[str, Any]]
    recv: list[tuple[str, torch.Size, torch.dtype]]
    comm: list[tuple[str, str, int, int]] = field(default_factory=list)
    """Graph-level collectives inside (op, axis, calls, bytes), e.g. CFG output gathers."""
    inner: list[tuple[str, str, int, int]] = field(default_factory=list)
    """Collectives inside ops that count themselves (Ulysses all-to-alls in attention)."""


@dataclass
class Variant:
    patches: int
    prologue: fx.GraphModule
    prologue_args: list[int]
    prologue_names: list[str]
    programs: list[PatchProgram]
    out_placements: list[Shard | None]
    """Per output leaf: how the patches' pieces join (None: the same in every patch)."""
    out_shapes: list[tuple[torch.Size, torch.dtype] | None]
    """Per output leaf: the whole output's shape (None for non-tensor leaves)."""


def assemble(pieces: list[torch.Tensor], p: Shard) -> torch.Tensor:
    """Join the patches' pieces of a tensor cut by ``p`` (the inverse of the local slices)."""
    dim = p.dim
    heads = [pc.narrow(dim, 0, p.text_rows(j)[0]) for j, pc in enumerate(pieces)]
    tails = [
        pc.narrow(dim, pc.shape[dim] - p.text_rows(j)[1], p.text_rows(j)[1])
        for j, pc in enumerate(pieces)
    ]
    bodies = [
        pc.narrow(dim, h.shape[dim], pc.shape[dim] - h.shape[dim] - t.shape[dim])
        for pc, h, t in zip(pieces, heads, tails, strict=True)
    ]
    if p.outer == 1 and p.inner == 1:
        body = torch.cat(bodies, dim)
    else:
        views = [
            b.reshape(*b.shape[:dim], p.outer, s, p.inner, *b.shape[dim + 1 :])
            for b, s in zip(bodies, p.split, strict=True)
        ]
        v = torch.cat(views, dim + 1)
        body = v.reshape(*v.shape[:dim], -1, *v.shape[dim + 3 :])
    return torch.cat([*heads, body, *tails], dim)


class PipeRunner:
    """Runs one input signature's PipeFusion program on this rank (see the module docstring)."""

    def __init__(
        self,
        warm: Variant,
        main: Variant,
        state: DisplacedState,
        mesh: ParallelMesh | None,
        stage: int,
        stages: int,
        in_spec: Any,
        out_spec: Any,
    ) -> None:
        self.variants = {1: warm, main.patches: main}
        self.main = main
        self.state, self.mesh = state, mesh
        self.stage, self.stages = stage, stages
        self.in_spec, self.out_spec = in_spec, out_spec
        self.schedules = {m: pipefusion_schedule(stages, m)[stage] for m in self.variants}

    def variant(self) -> Variant:
        return self.variants[1] if self.state.exact else self.main

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        flat = fx_pytree.tree_flatten_spec((args, kwargs), self.in_spec)
        var = self.variant()
        pro = var.prologue(*[flat[i] for i in var.prologue_args]) if var.prologue_names else ()
        values = dict(zip(var.prologue_names, pro, strict=True))
        outs = _Exec(self, var, flat, values).run(self.schedules[var.patches])
        return (
            pytree.tree_unflatten(outs, self.out_spec) if self.out_spec is not None else tuple(outs)
        )


class _Exec:
    """One call's interpretation of the schedule on this rank."""

    def __init__(
        self, runner: PipeRunner, var: Variant, flat: list[Any], pro: dict[str, Any]
    ) -> None:
        self.r, self.var, self.flat, self.pro = runner, var, flat, pro
        self.group = runner.mesh.group("pipefusion") if runner.stages > 1 and runner.mesh else None
        self.recv: dict[int, tuple[list[Any], list[torch.Tensor]]] = {}
        self.pending: list[tuple[Any, torch.Tensor]] = []
        self.outputs: dict[int, Any] = {}
        self.result: list[Any] = []
        self.device = next(
            (x.device for x in flat if isinstance(x, torch.Tensor)), torch.device("cpu")
        )

    def _tag(self, patch: int, k: int) -> int:
        return patch * 1024 + k

    def run(self, actions: list[Action]) -> list[Any]:
        for a in actions:
            getattr(self, f"_{a.kind.lower()}")(a.patch)
        if self.r.stages == 1:
            self._join()
        return self.result

    def _post(self, j: int) -> None:
        bufs = [
            torch.empty(shape, dtype=dtype, device=self.device)
            for _, shape, dtype in self.var.programs[j].recv
        ]
        works = [
            dist.irecv(b, group=self.group, group_src=self.r.stage - 1, tag=self._tag(j, k))
            for k, b in enumerate(bufs)
        ]
        self.recv[j] = (works, bufs)

    def _wait(self, j: int) -> None:
        for w in self.recv[j][0]:
            w.wait()

    def _run(self, j: int) -> None:
        prog = self.var.programs[j]
        got = self.recv.pop(j, ([], []))[1]
        args = [
            self.flat[key] if kind == "in" else self.pro[key] if kind == "pro" else got[key]
            for kind, key in prog.inputs
        ]
        self.outputs[j] = prog.gm(*args)
        for op, axis, calls, nbytes in prog.comm:
            count(op, axis, nbytes, calls)

    def _send(self, j: int) -> None:
        for k, t in enumerate(self.outputs.pop(j)):
            t = t.contiguous()
            count("send", "pipefusion", t.numel() * t.element_size())
            work = dist.isend(t, group=self.group, group_dst=self.r.stage + 1, tag=self._tag(j, k))
            self.pending.append((work, t))  # the tensor must live until the send completes

    def _drain(self, _: int) -> None:
        for work, _t in self.pending:
            work.wait()
        self.pending.clear()

    def _bcast(self, _: int) -> None:
        last = self.r.stages - 1
        if self.r.stage == last:
            self._join()
        else:
            self.result = [
                torch.empty(sd[0], dtype=sd[1], device=self.device) if sd is not None else None
                for sd in self.var.out_shapes
            ]
        assert self.group is not None
        src = dist.get_global_rank(self.group, last)
        for i, t in enumerate(self.result):
            if isinstance(t, torch.Tensor):
                if self.r.stage == last:
                    count("broadcast", "pipefusion", t.numel() * t.element_size() * last)
                t = t.contiguous()
                dist.broadcast(t, src=src, group=self.group)
                self.result[i] = t

    def _join(self) -> None:
        per_patch = [self.outputs[j] for j in range(self.var.patches)]
        leaves: list[Any] = []
        for i, p in enumerate(self.var.out_placements):
            pieces = [o[i] for o in per_patch]
            leaves.append(assemble(pieces, p) if p is not None else pieces[0])
        self.result = leaves
