"""canonicalize_graph_pass: shrink the op set the sharding rules must know.

- drops export's input guards and runtime metadata checks (``_assert_tensor_metadata``, ``_assert_scalar``, ...), which
  would compare local shapes against global ones after sharding;
- turns single-operand einsums that only reorder axes (``"nhwpqc->nchpwq"``) into ``permute``;
- removes dead code.

Meaning is kept: asserts have no outputs, and a permuting einsum is exactly a permute.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from xdit_compile.driver import PassContext, PassResult

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
    changed |= gm.graph.eliminate_dead_code()
    return PassResult(gm, changed)
