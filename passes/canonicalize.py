"""canonicalize_graph_pass: shrink the op set the sharding rules must know.

- drops export's input guards and runtime metadata checks (``_assert_tensor_metadata``,
  ``_assert_scalar``, ...), which would compare local shapes against global ones after sharding;
- turns single-operand einsums that only reorder axes (``"nhwpqc->nchpwq"``) into ``permute``;
- puts a ``placed_like(out, q)`` marker after flex attention's output, so that the head cut it
  computes in goes back to its queries' cut right there (not later, through the projections);
- removes dead code.

Meaning is kept: asserts have no outputs, and a permuting einsum is exactly a permute.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from xdit_compile.passes.context import PassContext, PassResult
from xdit_compile.runtime.reshard import placed_like

__all__ = ["canonicalize_graph_pass"]

aten = torch.ops.aten
_CHECKS = {
    "aten._assert_tensor_metadata.default",
    "aten._assert_scalar.default",
    "aten.sym_constrain_range_for_size.default",
    "aten.sym_constrain_range.default",
    "aten._assert_async.msg",
}


def _einsum_permutation(eq: str) -> list[int] | None:
    if "," in eq or "->" not in eq or "." in eq:
        return None
    lhs, rhs = (s.replace(" ", "") for s in eq.split("->"))
    if sorted(lhs) != sorted(rhs) or len(set(lhs)) != len(lhs):
        return None
    return [lhs.index(c) for c in rhs]


def canonicalize_graph_pass(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    changed = False
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards") and not node.users:
            gm.graph.erase_node(node)  # export's input guards check global shapes
            changed = True
            continue
        if node.op != "call_function":
            continue
        if str(node.target) in _CHECKS and not node.users:
            gm.graph.erase_node(node)
            changed = True
        elif node.target is aten.einsum.default:
            eq, operands = node.args[0], node.args[1]
            perm = _einsum_permutation(eq) if len(operands) == 1 else None
            if perm is not None:
                node.target = aten.permute.default
                node.args = (operands[0], perm)
                node.meta["xdit_pass"] = "canonicalize"
                changed = True
    changed |= _mark_flex_outputs(gm)
    changed |= gm.graph.eliminate_dead_code()
    return PassResult(gm, changed)


def _mark_flex_outputs(gm: fx.GraphModule) -> bool:
    changed = False
    for node in gm.graph.find_nodes(
        op="call_function", target=torch.ops.higher_order.flex_attention
    ):
        for use in list(node.users):
            if (
                use.target is operator.getitem
                and use.args[1] == 0
                and not any(u.target is placed_like for u in use.users)
            ):
                with gm.graph.inserting_after(use):
                    mark = gm.graph.call_function(placed_like, (use, node.args[0]))
                mark.meta.update(
                    {
                        k: v
                        for k, v in use.meta.items()
                        if k in ("val", "stack_trace", "nn_module_stack")
                    }
                )
                mark.meta["xdit_pass"] = "canonicalize"
                use.replace_all_uses_with(mark, delete_user_cb=lambda u, m=mark: u is not m)
                changed = True
    return changed
