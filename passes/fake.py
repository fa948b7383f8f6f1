"""One fake-tensor re-propagation helper for every pass that re-derives shapes.

``fake_run`` executes a graph on fake tensors (no data, no compute), from example values or the
placeholders' recorded ``meta["val"]``. Ops whose output size fake tensors cannot know
(``nonzero``) get a fixed shape: the one given in ``static`` (the specialize step's probed
sizes) or the one a specialized graph recorded. ``write`` stores every node's new value in its
``meta["val"]`` (a batch round's local shapes, static shapes after specialization);
``on_node(node, value)`` sees each value (the debug check of local shapes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensorMode,
)

__all__ = ["fake_run"]


class _FakeRun(fx.Interpreter):
    def __init__(
        self,
        gm: fx.GraphModule,
        static: dict[fx.Node, list[int]],
        write: bool,
        on_node: Callable[[fx.Node, Any], None] | None,
    ) -> None:
        super().__init__(gm)
        self.static, self.write, self.on_node = static, write, on_node

    def run_node(self, n: fx.Node) -> Any:
        if n in self.static:
            val = n.meta["val"]
            out: Any = torch.empty(self.static[n], dtype=val.dtype, device=val.device)
        else:
            try:
                out = super().run_node(n)
            except (DynamicOutputShapeException, DataDependentOutputException):
                val = n.meta["val"]
                out = torch.empty(val.shape, dtype=val.dtype, device=val.device)
        if self.write and n.op != "output":
            n.meta["val"] = out
        if self.on_node is not None:
            self.on_node(n, out)
        return out


def fake_run(
    gm: fx.GraphModule,
    example: tuple[Any, ...] | None = None,
    *,
    static: dict[fx.Node, list[int]] | None = None,
    write: bool = False,
    on_node: Callable[[fx.Node, Any], None] | None = None,
) -> None:
    """Run ``gm`` on fake tensors made from ``example`` (default: the placeholders' values)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    if example is None:
        example = tuple(ph.meta.get("val") for ph in gm.graph.find_nodes(op="placeholder"))
    inputs = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example]
    with mode:
        _FakeRun(gm, static or {}, write, on_node).run(*inputs)
