"""Data-dependent sizes: specialize them to the values of the actual inputs.

Some DiTs size tensors from data: Mochi keeps only the valid text tokens of each prompt with
``torch.nonzero(mask)``, so its attention length depends on the mask's values. ``torch.export``
represents such sizes as unbacked symbols (``u0``), which no sharding rule can reason about.

Sizes like these come from small replicated inputs (masks, lengths), so xdit_compile treats
them like shapes: :func:`find_data_dependence` cuts, from the captured graph, the small
subgraph that computes them (the *probe*, e.g. ``select -> view -> nonzero`` on the mask);
the probe's results join the input signature, so a prompt with another number of valid
tokens compiles again (and is cached) just like another resolution would.
:func:`specialize_graph` then rewrites the graph for the probed values: every symbolic size
becomes a constant, fake tensors get static shapes, and each op that produced a
data-dependent size is followed by an ``xdit::specialized`` check that fails loudly if the
values ever differ from the ones compiled for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sympy
import torch
import torch.fx as fx
import torch.fx._pytree as fx_pytree
import torch.utils._pytree as pytree

from xdit_compile.passes.fake import fake_run
from xdit_compile.passes.sharding.engine import Decision, RuleCtx, register_rule
from xdit_compile.placement import local_shape

__all__ = ["Probe", "SpecializationMismatch", "find_data_dependence", "specialize_graph"]


class SpecializationMismatch(RuntimeError):
    """A data-dependent size differs from the value the graph was specialized for."""


@torch.library.custom_op("xdit::specialized", mutates_args=())
def specialized(x: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """``x`` (a copy), after checking that its data-dependent shape is ``shape``."""
    if list(x.shape) != list(shape):
        raise SpecializationMismatch(
            f"data-dependent shape {list(x.shape)} differs from the {list(shape)} this graph was "
            f"compiled for"
        )
    return x.clone()


@specialized.register_fake
def _(x: torch.Tensor, shape: list[int]) -> torch.Tensor:
    return x.new_empty(shape)


@register_rule(torch.ops.xdit.specialized.default)
def _specialized_rule(node: fx.Node, rc: RuleCtx) -> Decision:
    """The check is an identity: it keeps its input's cut, and checks this rank's piece against
    the piece of the compiled shape."""
    x = node.args[0]
    p = rc.spec(x)
    return Decision(out=p, args=(x, local_shape(list(node.args[1]), p, rc.rank)))  # type: ignore[arg-type]


@dataclass
class Probe:
    """The subgraph computing a graph's data-dependent sizes, runnable on real inputs."""

    gm: fx.GraphModule
    in_spec: Any
    binders: list[str]
    """Names of the nodes that introduce unbacked sizes (``nonzero``, ``item``, ``split`` with
    data-dependent sizes...)."""
    bindings: list[dict[sympy.Symbol, Any]]
    """Per binder: each symbol it binds and where in its output the value sits (a pytree key
    path, as ``meta["unbacked_bindings"]`` records it: a size, an element, a scalar)."""

    @property
    def symbols(self) -> list[sympy.Symbol]:
        return [s for b in self.bindings for s in b]

    def __call__(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[str, int], ...]:
        """``((symbol, value), ...)`` for these inputs, sorted by symbol name."""
        flat = fx_pytree.tree_flatten_spec((args, kwargs), self.in_spec)
        with torch.no_grad():
            outs = self.gm(*flat)
        values: dict[str, int] = {}
        for out, bind in zip(outs, self.bindings, strict=True):
            for s, path in bind.items():
                values[str(s)] = int(pytree.key_get(out, path))
        return tuple(sorted(values.items()))


def find_data_dependence(gm: fx.GraphModule) -> Probe | None:
    """The probe for ``gm``'s unbacked sizes, or None if every shape is static."""
    binders = [n for n in gm.graph.nodes if n.meta.get("unbacked_bindings")]
    if not binders:
        return None
    needed: set[fx.Node] = set()
    stack = list(binders)
    while stack:
        n = stack.pop()
        if n not in needed:
            needed.add(n)
            stack.extend(n.all_input_nodes)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in gm.graph.nodes:
        if n.op == "placeholder" or n in needed:
            env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(tuple(env[b] for b in binders))
    bindings = [
        {s: path for s, path in b.meta["unbacked_bindings"].items() if isinstance(s, sympy.Symbol)}
        for b in binders
    ]
    probe_gm = fx.GraphModule(gm, graph)
    return Probe(probe_gm, gm._in_spec, [b.name for b in binders], bindings)


def _concrete(val: Any, subs: dict[sympy.Symbol, int]) -> Any:
    if isinstance(val, torch.SymInt | torch.SymBool | torch.SymFloat):
        expr = val.node.expr.xreplace({k: sympy.Integer(v) for k, v in subs.items()})
        if expr.free_symbols:
            raise ValueError(f"size {val.node.expr} still symbolic after specialization ({expr})")
        return (
            bool(expr)
            if isinstance(val, torch.SymBool)
            else (float(expr) if isinstance(val, torch.SymFloat) else int(expr))
        )
    return val


def specialize_graph(
    gm: fx.GraphModule, probe: Probe, values: tuple[tuple[str, int], ...], example: tuple[Any, ...]
) -> None:
    """Rewrite ``gm`` in place for the probed ``values``; ``example`` is the real flat inputs
    (for static fake tensors)."""
    by_name = dict(values)
    subs = {s: by_name[str(s)] for s in probe.symbols}
    graph = gm.graph
    static: dict[fx.Node, list[int]] = {}
    for n in list(graph.nodes):
        val = n.meta.get("val")
        if n.name in probe.binders and isinstance(
            val, torch.SymInt | torch.SymBool | torch.SymFloat
        ):
            # A scalar (``.item()``): its uses get the probed value; the key holds it, so a call
            # with another value compiles again.
            n.replace_all_uses_with(_concrete(val, subs))  # type: ignore[arg-type]
            graph.erase_node(n)
        elif n.name in probe.binders:
            shape = [
                int(_concrete(d, subs))
                for d in (val.shape if isinstance(val, torch.Tensor) else [])
            ]
            if isinstance(val, torch.Tensor):
                with graph.inserting_after(n):
                    check = graph.call_function(torch.ops.xdit.specialized.default, (n, shape))
                n.replace_all_uses_with(check, delete_user_cb=lambda u, c=check: u is not c)
                check.meta.update(
                    {k: v for k, v in n.meta.items() if k in ("stack_trace", "nn_module_stack")}
                )
                static[n] = shape
        elif isinstance(val, torch.SymInt | torch.SymBool | torch.SymFloat):
            n.replace_all_uses_with(_concrete(val, subs))  # type: ignore[arg-type]
            graph.erase_node(n)
        elif n.op == "call_function" and n.target is torch.ops.aten._assert_scalar.default:
            if n.args[0] is False:
                raise ValueError(
                    f"runtime assertion fails for the probed sizes {values}: {n.args[1]}"
                )
            graph.erase_node(n)
    fake_run(gm, example, static=static, write=True)
    gm.recompile()
