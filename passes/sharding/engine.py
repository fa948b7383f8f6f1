"""The sharding-propagation engine: rule registry, decisions, and redistribution markers.

A rule is a function ``rule(node, rc) -> Decision`` registered for ATen ops. It is only called
when at least one tensor input of the node is sharded (all-replicated nodes stay replicated
with no rule). It returns the output placement and, if needed, the placements it wants its
inputs in (the engine inserts ``redistribute`` markers that the ``lower`` pass turns into
collectives or local slices), replacement args (local sizes) or a replacement op. A rule that
cannot keep the shard raises :class:`Break`: the engine gathers the inputs and records a
sharding break with the source line - slower, never wrong.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from xdit_compile.placement import (
    Partial,
    Placement,
    Replicate,
    Shard,
    local_shape,
)

__all__ = [
    "Break",
    "Decision",
    "RuleCtx",
    "RULES",
    "register_rule",
    "redistribute",
    "lookup_rule",
    "ops",
    "tensor_args",
]

R = Replicate()


class Break(Exception):
    """Raised by a rule that cannot keep its inputs sharded; the message is the reason."""


@dataclass(slots=True)
class Decision:
    out: Any
    """Output placement (a tuple of placements for multi-output ops)."""
    inputs: dict[fx.Node, Placement] = field(default_factory=dict)
    """Input node -> placement the op needs it in (missing: as it is)."""
    args: tuple[Any, ...] | None = None
    kwargs: dict[str, Any] | None = None
    target: Any = None
    meta: dict[str, Any] = field(default_factory=dict)
    """Extra node meta (e.g. the attention kind for the attention pass)."""


@dataclass(slots=True)
class RuleCtx:
    """What a rule may read: placements so far, the mesh degree and this rank."""

    placements: dict[fx.Node, Any]
    degree: int
    rank: int
    options: dict[str, Any]

    def spec(self, a: Any) -> Placement:
        p = self.placements.get(a, R) if isinstance(a, fx.Node) else R
        return p if isinstance(p, Replicate | Shard | Partial) else R

    @staticmethod
    def shape(a: Any) -> tuple[int, ...]:
        """The global shape of the tensor node ``a`` (any other argument is a break)."""
        val = a.meta.get("val") if isinstance(a, fx.Node) else None
        if not isinstance(val, torch.Tensor):
            raise Break(f"{getattr(a, 'name', a)} has no tensor metadata")
        return tuple(int(s) for s in val.shape)

    def local(self, shape: Iterable[int], p: Placement) -> list[int]:
        return local_shape(tuple(shape), p, self.rank)


Rule = Callable[[fx.Node, RuleCtx], Decision]
RULES: dict[Any, Rule] = {}


def register_rule(*targets: Any) -> Callable[[Rule], Rule]:
    """Register ``fn`` for ATen op packets or overloads (``aten.add`` or ``aten.add.Tensor``)."""

    def deco(fn: Rule) -> Rule:
        for t in targets:
            RULES[t] = fn
        return fn

    return deco


def ops(*names: str) -> list[Any]:
    """ATen op packets by name, skipping names this torch build does not have."""
    return [getattr(torch.ops.aten, n) for n in names if hasattr(torch.ops.aten, n)]


def lookup_rule(target: Any) -> Rule | None:
    if target in RULES:
        return RULES[target]
    packet = getattr(target, "overloadpacket", None)
    return RULES.get(packet) if packet is not None else None


def redistribute(x: torch.Tensor, src: str, dst: str) -> torch.Tensor:
    """Marker for a placement change; the ``lower`` pass replaces every call."""
    raise RuntimeError(f"redistribute {src} -> {dst} was not lowered")


def tensor_args(node: fx.Node) -> list[fx.Node]:
    """Input nodes of ``node`` that carry tensors, in argument order, without repeats."""
    seen: list[fx.Node] = []
    for a in node.all_input_nodes:
        if isinstance(a.meta.get("val"), torch.Tensor) and a not in seen:
            seen.append(a)
    return seen


def prod(xs: Iterable[int]) -> int:
    return math.prod(xs)


def norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d
