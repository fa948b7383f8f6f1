"""PipeFusion's patch round: the token sequence cut into patches on a virtual ``patch`` axis.

PipeFusion computes the patches of a step one after another on the same ranks, so a patch is a
shard of a time-multiplexed axis: the sharding engine that cuts the sequence over ranks cuts it
over patches too, one graph per patch (``ctx.virtual["patch"] = (M, j)`` gives patch ``j``'s
graph). The round is::

    seed_patch -> propagate_patch -> rewrite_patch_attention -> lower_patch -> mark_step_level -> restage

- the latent input is seeded along the same token-grid dim and in the same whole patch units as
  the sequence seed (uneven sizes allowed);
- text rows of joint attention stay with the first patch (``Shard(text=True, text_to=0)``): they
  are computed once per step, and the other patches read their K/V from the buffer;
- every sequence-sharded attention becomes ``xdit::pipefusion_attention`` (displaced K/V, see
  :mod:`xdit_compile.runtime.displaced`): the meaning changes exactly that way after warmup;
- lowering keeps local slices only: a collective across patches refuses the plan
  (:class:`~xdit_compile.passes.lower.PatchRefusal`), the output's gathers are left to the
  pipeline runtime, which joins the patches' outputs;
- ``meta["xdit_step_level"]`` marks nodes whose value is the same for every patch (replicated,
  from replicated inputs: timestep embeddings, modulation vectors, position tables): the
  pipeline computes them once per step instead of once per patch.

Before::   %o = scaled_dot_product_attention(%q, %k, %v)                    # S(2/4)
After::    %o = xdit.pipefusion_attention(%q, %k, %v, None, None, 'kv0', 'scaled_dot_product_attention', [16, 16, 16, 16], 1, 0, 0, False)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx as fx

from xdit_compile.driver import PassContext, PassFn, PassResult
from xdit_compile.passes.batch import on_axis, restage_pass
from xdit_compile.passes.sharding.placement import Replicate, Shard
from xdit_compile.runtime import displaced as _rt_displaced  # noqa: F401  (registers xdit ops)

__all__ = ["mark_step_level_pass", "patch_round", "rewrite_patch_attention_pass"]

aten = torch.ops.aten


def _arg(node: fx.Node, i: int, name: str, default: object) -> object:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def rewrite_patch_attention_pass(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Sequence-sharded SDPA -> ``xdit::pipefusion_attention`` for this graph's patch."""
    _, patch = ctx.virtual["patch"]
    state = ctx.hints.get("state_key", "")
    changed = False
    for node in list(gm.graph.nodes):
        if node.target is not aten.scaled_dot_product_attention.default or node.meta.get("xdit_attention") != "usp":
            continue
        q, k, v = node.args[:3]
        if _arg(node, 4, "dropout_p", 0.0):
            raise ValueError(f"{node.name}: attention dropout > 0 is not supported (inference only)")
        head, tail = node.meta.get("xdit_joint", (0, 0))
        out = node.meta["xdit_placement"]
        assert isinstance(out, Shard)
        out_text = bool(head or tail) and out.text_rows(patch) != (0, 0)
        args = (q, k, v, _arg(node, 3, "attn_mask", None), _arg(node, 6, "scale", None), state, node.name,
                list(node.meta["xdit_split"]), patch, head, tail, out_text)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(torch.ops.xdit.pipefusion_attention.default, args)  # type: ignore[arg-type]
        new.meta.update(node.meta)
        new.meta["xdit_pass"] = "rewrite_patch_attention"
        new.meta["xdit_displaced"] = node.name
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        changed = True
    return PassResult(gm, changed)


def mark_step_level_pass(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """``meta["xdit_step_level"]``: the node's value is the same for every patch of a step."""
    step: dict[fx.Node, bool] = {}
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "get_attr"):
            step[n] = True
        elif n.op == "output":
            continue
        else:
            p = n.meta.get("xdit_placement")
            replicated = isinstance(p, Replicate) or (
                isinstance(p, tuple) and all(isinstance(x, Replicate) for x in p))
            step[n] = replicated and all(step.get(a, False) for a in n.all_input_nodes) \
                and n.meta.get("xdit_displaced") is None
        n.meta["xdit_step_level"] = step[n]
    return PassResult(gm, False)


def patch_round(seed: PassFn, propagate: PassFn, lower: PassFn) -> list[tuple[str, Callable[..., PassResult]]]:
    """The passes of the patch round (``ctx.virtual["patch"]`` says which patch)."""
    return [
        ("seed_patch", on_axis("patch", seed)),
        ("propagate_patch", on_axis("patch", propagate)),
        ("rewrite_patch_attention", on_axis("patch", rewrite_patch_attention_pass)),
        ("lower_patch", on_axis("patch", lower)),
        ("mark_step_level", mark_step_level_pass),
        ("restage_patch", restage_pass),
    ]
