"""PipeFusion's patch round: the token sequence cut into patches on a virtual ``patch`` axis.

PipeFusion computes the patches of a step one after another on the same ranks, so a patch is a
shard of a time-multiplexed axis: the sharding engine that cuts the sequence over ranks cuts it
over patches too, one graph per patch (``ctx.virtual["patch"] = (M, j)`` gives patch ``j``'s
graph). The round is::

    seed_patch -> propagate_patch -> rewrite_patch_attention -> lower_patch
        -> mark_step_level -> restage

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
After::    %o = xdit.pipefusion_attention(%q, %k, %v, None, None, 'kv0',
                                          'scaled_dot_product_attention', [16, 16, 16, 16],
                                          1, 0, 0, False)
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.fx as fx

from xdit_compile.passes.attention import expand_gqa
from xdit_compile.passes.batch import restage_pass
from xdit_compile.passes.context import CollectiveSite, Pass, PassContext, PassFn, PassResult
from xdit_compile.passes.rewrite import replace_node
from xdit_compile.passes.sharding.engine import Break, Decision, RuleCtx, register_rule
from xdit_compile.placement import Placement, Replicate, Shard
from xdit_compile.runtime import displaced as _rt_displaced  # noqa: F401  (registers xdit ops)
from xdit_compile.runtime.attention import usp_comm_bytes
from xdit_compile.runtime.opargs import op_args

__all__ = [
    "mark_step_level_pass",
    "patch_round",
    "patch_sequence_round",
    "rewrite_patch_attention_pass",
    "ulysses_patch_attention_pass",
]

aten = torch.ops.aten


def _arg(node: fx.Node, i: int, name: str, default: object) -> object:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def rewrite_patch_attention_pass(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Sequence-sharded SDPA -> ``xdit::pipefusion_attention`` for this graph's patch."""
    _, patch = ctx.virtual["patch"]
    state = ctx.facts.state_key
    changed = False
    for node in list(gm.graph.nodes):
        if (
            node.target is not aten.scaled_dot_product_attention.default
            or node.meta.get("xdit_attention") != "usp"
        ):
            continue
        q = node.args[0]
        k, v = expand_gqa(gm, node)
        if _arg(node, 4, "dropout_p", 0.0):
            raise ValueError(
                f"{node.name}: attention dropout > 0 is not supported (inference only)"
            )
        head, tail = node.meta.get("xdit_joint", (0, 0))
        out = node.meta["xdit_placement"]
        assert isinstance(out, Shard)
        out_text = bool(head or tail) and out.text_rows(patch) != (0, 0)
        args = (
            q,
            k,
            v,
            _arg(node, 3, "attn_mask", None),
            _arg(node, 6, "scale", None),
            state,
            node.name,
            list(node.meta["xdit_split"]),
            patch,
            head,
            tail,
            out_text,
        )
        kwargs = {}
        if (
            "xdit_kv" in node.meta
        ):  # K/V text rows of their own (the rule keeps K/V rows cut like Q's)
            _, kv_head, kv_tail = node.meta["xdit_kv"]
            kwargs = {"kv_head": kv_head, "kv_tail": kv_tail}
        replace_node(
            gm,
            node,
            torch.ops.xdit.pipefusion_attention.default,
            args,
            kwargs,
            xdit_displaced=node.name,
        )
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
                isinstance(p, tuple) and all(isinstance(x, Replicate) for x in p)
            )
            step[n] = (
                replicated
                and all(step.get(a, False) for a in n.all_input_nodes)
                and n.meta.get("xdit_displaced") is None
            )
        n.meta["xdit_step_level"] = step[n]
    return PassResult(gm, False)


def patch_round(seed: PassFn, propagate: PassFn, lower: PassFn) -> list[Pass]:
    """The passes of the patch round (``ctx.virtual["patch"]`` says which patch)."""
    return [
        Pass("seed_patch", seed, "patch"),
        Pass("propagate_patch", propagate, "patch"),
        Pass("rewrite_patch_attention", rewrite_patch_attention_pass, "patch"),
        Pass("lower_patch", lower, "patch"),
        Pass("mark_step_level", mark_step_level_pass),
        Pass("restage_patch", restage_pass),
    ]


@register_rule(torch.ops.xdit.pipefusion_attention.default)
def _pipefusion_rule(node: fx.Node, rc: RuleCtx) -> Decision:
    """A patch's displaced attention with its rows cut over ``ulysses`` (the sequence round after
    the patch round): Q/K/V cut alike on the row dim, text rows whole; the output keeps the cut."""
    q, k, v, mask = node.args[:4]
    pq = rc.spec(q)
    nd = len(rc.shape(q))
    if not isinstance(pq, Shard) or pq.dim != nd - 2 or pq.outer != 1 or pq.inner != 1 or pq.text:
        raise Break("displaced attention with a sharded head or feature dim")
    wants: dict[fx.Node, Placement] = {}
    named = op_args(node)
    kv_head = named["kv_head"]
    for a in (k, v):
        pk = rc.spec(a)
        # K/V's text rows (whole) are Q's, or their own (kv_head/kv_tail); the body is cut like Q's.
        same_body = (
            isinstance(pk, Shard)
            and not pk.text
            and replace(pk, head=0, tail=0) == replace(pq, head=0, tail=0)
        )
        if not same_body or (kv_head < 0 and pk != pq):
            raise Break("displaced attention with K/V cut unlike Q")
    if isinstance(mask, fx.Node) and not isinstance(rc.spec(mask), Replicate):
        wants[mask] = Replicate()
    head, tail, out_text = named["head"], named["tail"], named["out_text"]
    out = Shard(pq.dim, pq.split, head=head if out_text else 0, tail=tail if out_text else 0)  # type: ignore[arg-type]
    return Decision(out=out, inputs=wants, meta={"xdit_patch_sp": pq.split})


def ulysses_patch_attention_pass(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Displaced attention whose patch rows the sequence round cut: add the ``ulysses`` cut."""
    changed = False
    for node in gm.graph.nodes:
        split = node.meta.pop("xdit_patch_sp", None)
        if node.target is not torch.ops.xdit.pipefusion_attention.default or split is None:
            continue
        node.kwargs = {
            **node.kwargs,
            "mesh_key": ctx.mesh.key,
            "sp_split": list(split),
            "sp_rank": ctx.mesh.ulysses_rank,
        }
        node.meta["xdit_pass"] = "ulysses_patch_attention"
        a = op_args(node)
        q, v = a["q"].meta["val"], a["v"].meta["val"]
        local = list(q.shape)
        local[-2] = split[ctx.mesh.ulysses_rank]
        for (op, axis), (calls, nbytes) in usp_comm_bytes(
            tuple(local), int(v.shape[-1]), q.element_size(), ctx.mesh, list(split)
        ).items():
            ctx.collectives.append(
                CollectiveSite(node.name, op, axis, calls, nbytes, "pipefusion_attention")
            )
        changed = True
    return PassResult(gm, changed)


def patch_sequence_round(
    seed: PassFn, propagate: PassFn, rewrite: PassFn, lower: PassFn
) -> list[Pass]:
    """After the patch round: each patch's rows cut over ``ulysses`` (text rows whole)."""
    return [
        Pass("seed", seed),
        Pass("propagate_sharding", propagate),
        Pass("rewrite_attention", rewrite),
        Pass("ulysses_patch_attention", ulysses_patch_attention_pass),
        Pass("lower_collectives", lower),
        Pass("restage", restage_pass),
    ]
