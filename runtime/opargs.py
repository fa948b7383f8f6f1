"""Named arguments of a graph node that calls an op, by the op's own schema.

Passes, reports and the planner read the arguments of xdit_compile's custom ops
(``xdit::usp_attention``, ``xdit::pipefusion_attention``...) and of the runtime functions graphs
call (``gather_shard``...) by name through :func:`op_args`, never by position: an op may grow
optional arguments, passed as keywords, without breaking readers.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch.fx as fx

__all__ = ["op_args"]


def op_args(node: fx.Node) -> dict[str, Any]:
    """``{argument name: value}`` of ``node``'s call (positional, keyword or the default)."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        if not callable(node.target):
            raise TypeError(f"{node.name} does not call an op or a function ({node.target})")
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
        bound.apply_defaults()
        return dict(bound.arguments)
    out: dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
        else:
            raise TypeError(f"{node.name}: argument {arg.name!r} of {node.target} is missing")
    return out
