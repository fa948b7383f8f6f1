"""Verifier: run the rewritten graph on fake tensors of this rank's local input shapes and
check that every node's local shape matches its placement (``XDIT_DEBUG=1`` and tests).

It catches a rule that forgot to rewrite a size or mis-tracked a dimension, without running
any collective: fake collectives only produce shapes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

from xdit_compile.driver import PassContext
from xdit_compile.passes.sharding.engine import redistribute
from xdit_compile.passes.sharding.placement import local_shape
from xdit_compile.specialize import FakeRun

__all__ = ["verify_local_shapes"]


class _Checker(FakeRun):
    def __init__(self, gm: fx.GraphModule, rank: int) -> None:
        super().__init__(gm)
        self.rank = rank
        self.errors: list[str] = []

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        p = n.meta.get("xdit_placement")
        glob = n.meta.get("xdit_shape")
        if isinstance(out, torch.Tensor) and glob is not None and not isinstance(p, tuple):
            want = local_shape(glob, p, self.rank)
            if list(out.shape) != want:
                self.errors.append(f"{n.format_node()}: local shape {list(out.shape)}, expected {want} ({p})")
        return out


def verify_local_shapes(gm: fx.GraphModule, ctx: PassContext, after: str = "") -> None:
    """Raise ``AssertionError`` listing nodes whose local shape disagrees with their placement."""
    if not any("xdit_placement" in n.meta for n in gm.graph.nodes):
        return
    if gm.graph.find_nodes(op="call_function", target=redistribute):
        return  # markers are not executable before lowering
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    inputs = []
    for ph in gm.graph.find_nodes(op="placeholder"):
        val = ph.meta.get("val")
        inputs.append(mode.from_tensor(val) if isinstance(val, torch.Tensor) else val)
    checker = _Checker(gm, ctx.axis_rank)
    with mode:
        checker.run(*inputs)
    if checker.errors:
        raise AssertionError(f"local shapes wrong after {after}:\n" + "\n".join(checker.errors[:20]))
