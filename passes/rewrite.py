"""Graph-editing helpers the rewriting passes share."""

from __future__ import annotations

from typing import Any

import torch.fx as fx

__all__ = ["replace_node"]


def replace_node(
    gm: fx.GraphModule,
    node: fx.Node,
    target: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any] | None = None,
    **meta: Any,
) -> fx.Node:
    """Replace ``node`` by a call of ``target(*args, **kwargs)`` in its place: the new node takes
    ``node``'s metadata (its value, placement, block, source line) updated with ``meta``, and
    every use of ``node``; ``node`` is erased. The driver stamps the pass that made it."""
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(target, args, kwargs or {})
    new.meta.update(node.meta)
    new.meta.pop("xdit_pass", None)
    new.meta.update(meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new
