"""propagate_sharding_pass: give every node a placement, starting from the seeded inputs.

Walks the graph in topological order. Nodes whose tensor inputs are all replicated stay
replicated (no rule needed: timestep MLPs, RoPE tables, text projections). For nodes touching
a shard, the op's rule decides; inputs are moved with ``redistribute`` markers where the rule
asks, concrete sizes in the op's arguments become this rank's local sizes, and ops without a
rule (or whose rule raises ``Break``) get their inputs gathered and are recorded as sharding
breaks. Graph outputs are gathered, so the module returns full tensors on every rank.

Before::

    %proj = conv2d(%hidden_states, %w, %b, [2, 2])            # [1, 32, 8, 8]
    %flat = view(%proj, [1, 32, 64])

After (rank 0 of 2)::

    %proj = conv2d(%hidden_states, %w, %b, [2, 2])            # S(2/2)
    %flat = reshape(%proj, [1, 32, 32])                       # S(2/2,inner=8)
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
import torch.fx as fx

from xdit_compile.passes.context import PassContext, PassResult, ShardingBreak
from xdit_compile.passes.sharding import rules_nn, rules_shape  # noqa: F401  (registers rules)
from xdit_compile.passes.sharding.engine import (
    Break,
    Decision,
    RuleCtx,
    lookup_rule,
    redistribute,
    tensor_args,
)
from xdit_compile.placement import Partial, Placement, Replicate, Shard

__all__ = ["propagate_sharding_pass", "source_line"]

logger = logging.getLogger(__name__)
R = Replicate()
aten = torch.ops.aten


def source_line(node: fx.Node) -> str:
    """The user-code line that produced ``node`` (last frame of its stack trace)."""
    trace = node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)', trace)
    if not frames:
        return "<unknown>"
    path, line, fn, code = frames[-1]
    short = path.split("site-packages/")[-1]
    where = f"{short}:{line} in {fn}: {code.strip()}"
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        fqn, cls = list(stack.values())[-1]
        name = getattr(cls, "__name__", str(cls).split(".")[-1].rstrip("'>"))
        where = f"{fqn} ({name}), {where}"
    return where


_LINEAR = (aten.linear.default,)
_STRIDED_VIEWS = (aten.view.default, aten._unsafe_view.default)


def attention_projections(gm: fx.GraphModule, limit: int = 200) -> set[fx.Node]:
    """The linears whose outputs become an attention's K or V (through views, norms, RoPE,
    concatenation: anything but another linear). Their text rows are gathered before them, so
    every rank computes the text K/V itself. Query projections are not in the set: their text
    rows may stay cut (Ulysses sends query rows like image rows; Ring keeps its own)."""
    found: set[fx.Node] = set()
    for sdpa in gm.graph.find_nodes(
        op="call_function", target=aten.scaled_dot_product_attention.default
    ):
        seen: set[fx.Node] = set()
        stack = [a for a in sdpa.args[1:3] if isinstance(a, fx.Node)]
        while stack and len(seen) < limit:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if n.op == "call_function" and n.target in _LINEAR:
                found.add(n)
            elif n.op == "call_function":
                stack.extend(n.all_input_nodes)
    return found


class _Propagator:
    def __init__(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        self.gm, self.ctx = gm, ctx
        self.placements: dict[fx.Node, Any] = {}
        patch = ctx.axis == "patch"
        # PipeFusion's patches: text rows stay with the first patch (computed once per step).
        disabled = tuple(
            p for p in ctx.plan.disable_passes if not (patch and p == "shard_text_rows")
        )
        if not patch and ctx.patch_seed is not None:  # a patch cut over ulysses: text rows whole
            disabled += ("shard_text_rows",)
        self.rc = RuleCtx(
            self.placements,
            ctx.degree,
            ctx.axis_rank,
            {
                "disabled": disabled,
                "ulysses": 1 if patch else ctx.mesh.ulysses,
                "attention_projections": attention_projections(gm),
                "text_owner": 0 if patch else -1,
                # displaced-K/V buffers hold K/V rows by the queries' cut
                "same_kv_rows": patch or ctx.mesh.distrifusion > 1,
            },
        )
        self._moved: dict[tuple[fx.Node, Placement], fx.Node] = {}

    def set(self, node: fx.Node, p: Any) -> None:
        self.placements[node] = p
        node.meta["xdit_placement"] = p

    def move(self, arg: fx.Node, dst: Placement, before: fx.Node) -> fx.Node:
        """A node holding ``arg`` in placement ``dst`` (a cached redistribute marker)."""
        src = self.rc.spec(arg)
        if src == dst:
            return arg
        key = (arg, dst)
        if key not in self._moved:
            with self.gm.graph.inserting_before(before):
                new = self.gm.graph.call_function(redistribute, (arg, str(src), str(dst)))
            new.meta.update(
                val=arg.meta.get("val"), xdit_pass="propagate_sharding", xdit_src=src, xdit_dst=dst
            )
            for k in ("stack_trace", "nn_module_stack", "xdit_block"):
                if k in arg.meta:
                    new.meta[k] = arg.meta[k]
            self.set(new, dst)
            self._moved[key] = new
        return self._moved[key]

    def visit(self, node: fx.Node) -> None:
        if node.op == "call_function":
            self._call(node)
        elif node.op == "output":
            self._output(node)
        else:
            self.set(node, R)
        if "xdit_seed" in node.meta:
            self._seed(node, node.meta["xdit_seed"])

    def _seed(self, node: fx.Node, shard: Shard) -> None:
        """Inputs arrive whole on every rank (in this round); a seeded one is cut to this rank's
        piece. Seeds are inputs, or an earlier batch round's pieces of them."""
        if not isinstance(self.rc.spec(node), Replicate):
            raise ValueError(f"seed {node.name} is not whole on every rank in this round")
        users = [n for n in self.gm.graph.nodes if n in node.users]
        if not users:
            return
        local = self.move(node, shard, users[0])
        for u in users:
            u.replace_input_with(node, local)

    def _call(self, node: fx.Node) -> None:
        if node.target is redistribute:
            return
        if node.target in _STRIDED_VIEWS:
            # A view needs strides it can reinterpret; a gathered or sliced input may have
            # others than the captured one, so every view becomes a reshape (the graph is
            # functional: copying where a view is impossible changes nothing).
            node.target = aten.reshape.default
        ins = tensor_args(node)
        for a in ins:
            if isinstance(self.rc.spec(a), Partial):  # consumers see the summed value
                node.replace_input_with(a, self.move(a, R, node))
        ins = tensor_args(node)
        if all(isinstance(self.rc.spec(a), Replicate) for a in ins) and not any(
            isinstance(self.placements.get(a), tuple) for a in node.all_input_nodes
        ):
            self.set(node, R)
            return
        rule = lookup_rule(node.target)
        try:
            if rule is None:
                raise Break("no sharding rule for this op")
            decision = rule(node, self.rc)
        except Break as b:
            self._break(node, ins, str(b))
            return
        except ValueError:  # a plan that does not fit the model: the message says the fix
            raise
        except Exception as e:  # noqa: BLE001  (a rule that trips on an unforeseen form gathers)
            logger.warning(
                "sharding rule for %s failed on %s", node.target, node.name, exc_info=True
            )
            self._break(node, ins, f"rule failed: {type(e).__name__}: {e}")
            return
        self._apply(node, decision)

    def _apply(self, node: fx.Node, d: Decision) -> None:
        misfit = _misfit(d, node)
        if misfit:  # a rule asked for a layout its tensor cannot have: gather, never guess
            logger.warning("sharding rule for %s at %s: %s", node.target, node.name, misfit)
            self._break(node, tensor_args(node), f"rule error: {misfit}")
            return
        if d.target is not None:
            node.target = d.target
        if d.args is not None:
            node.args = d.args
        if d.kwargs is not None:
            node.kwargs = d.kwargs
        for arg, want in d.inputs.items():
            node.replace_input_with(arg, self.move(arg, want, node))
        node.meta.update(d.meta)
        self.set(node, d.out)

    def _break(self, node: fx.Node, ins: list[fx.Node], reason: str) -> None:
        for a in ins:
            if isinstance(self.rc.spec(a), Shard):
                moved = self.move(a, R, node)
                # the breaks whose gather this is (one gather may serve several: moves are cached)
                moved.meta.setdefault("xdit_break", []).append(node.name)
                node.replace_input_with(a, moved)
        self.set(node, R)
        op = str(node.target)
        self.ctx.breaks.append(ShardingBreak(node.name, op, reason, source_line(node)))
        logger.info("sharding break at %s (%s): %s", node.name, op, reason)

    def _output(self, node: fx.Node) -> None:
        def gather(a: Any) -> Any:
            if isinstance(a, fx.Node) and isinstance(self.rc.spec(a), Shard | Partial):
                moved = self.move(a, R, node)
                moved.meta["xdit_output_gather"] = True
                return moved
            return a

        node.args = tuple(fx.node.map_aggregate(node.args, gather))
        self.set(node, R)


def _fits(p: Any, val: Any) -> bool:
    """Whether placement ``p`` describes a tensor like ``val`` (its global size on the cut dim)."""
    if isinstance(p, tuple):
        return (
            isinstance(val, tuple | list)
            and len(p) == len(val)
            and all(_fits(a, b) for a, b in zip(p, val, strict=True))
        )
    if isinstance(p, Shard):
        return isinstance(val, torch.Tensor) and p.dim < val.dim() and p.total == val.shape[p.dim]
    return True


def _misfit(d: Decision, node: fx.Node) -> str:
    """What of decision ``d`` does not fit the global shapes of ``node`` and its inputs, or ''."""
    for arg, want in d.inputs.items():
        if not _fits(want, arg.meta.get("val")):
            return f"input {arg.name} {tuple(arg.meta['val'].shape)} cannot be {want}"
    val = node.meta.get("val")
    if d.target is None and d.args is None and not _fits(d.out, val):
        return f"output {tuple(getattr(val, 'shape', ()))} cannot be {d.out}"
    return ""


def propagate_sharding_pass(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Assign placements to all nodes; insert redistribute markers; record sharding breaks."""
    if ctx.degree == 1 and ctx.axis not in ctx.virtual:
        for n in gm.graph.nodes:
            n.meta["xdit_placement"] = R
        return PassResult(gm, False)
    prop = _Propagator(gm, ctx)
    for node in list(gm.graph.nodes):
        prop.visit(node)
    return PassResult(gm, True)
