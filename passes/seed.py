"""seed_inputs_pass: choose what sequence parallelism splits.

The main latent input (the first floating-point input with >= 3 dims: ``hidden_states`` of a
diffusers DiT) is split along its outermost token-grid dimension: ``H`` of ``[B,C,H,W]``,
``F`` of ``[B,C,F,H,W]`` (or ``[B,F,C,H,W]``, told apart by the config's ``in_channels``) when
there are at least as many frames (in patches) as ranks, else ``H``, ``S`` of packed
``[B,S,C]`` and ``L`` of a 1-D sequence ``[B,C,L]``. Where the config's channel count does not
tell the layout, or the token dims have too few rows (several images side by side in a 6-D
latent), every other dim but the batch is tried by propagation on a copy of the graph, and the
cut that leaves this rank the smallest share of the forward's FLOPs wins. Pieces are whole multiples
of the patch size, the largest product of convolution strides on a path from the input (a DiT's
patch embedding; a VAE encoder's downsamplings), so every strided convolution keeps the shard.
Uneven sizes are split as evenly as whole patches allow. Nothing else is seeded: position tables and
masks are computed replicated and sliced where they meet sharded data.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from xdit_compile.latent import SeedError, find_latent
from xdit_compile.passes.context import PassContext, PassResult, SeedChoice
from xdit_compile.passes.ops import CONVOLUTIONS, TRANSPOSED_CONVOLUTIONS, node_flops, packet
from xdit_compile.passes.sharding.engine import Break
from xdit_compile.passes.sharding.rules_nn import conv_params
from xdit_compile.placement import Shard, even_split
from xdit_compile.runtime.reshard import slice_shard

__all__ = ["graph_latent", "seed_inputs_pass", "patch_stride"]

#: A fallback cut (past the token dims) must leave a rank at most this share of the FLOPs.
_WORTH = 0.95

#: Convolutions that may downsample (a transposed one upsamples: nothing to align to).
_STRIDED = CONVOLUTIONS - TRANSPOSED_CONVOLUTIONS


def graph_latent(gm: fx.GraphModule, name: str | None = None) -> fx.Node | None:
    """The latent input placeholder (:func:`xdit_compile.latent.find_latent`: the input the
    output's shape follows; ``name`` is ``Plan.seed``)."""
    phs = list(gm.graph.find_nodes(op="placeholder"))
    outs = [
        a
        for a in pytree.tree_leaves(next(iter(gm.graph.find_nodes(op="output"))).args)
        if isinstance(a, fx.Node) and isinstance(a.meta.get("val"), torch.Tensor)
    ]
    out_shape = tuple(int(s) for s in outs[0].meta["val"].shape) if outs else None
    i = find_latent([(str(p.target), p.meta.get("val")) for p in phs], out_shape, name)
    return phs[i] if i is not None else None


def _latent_input(gm: fx.GraphModule, name: str | None, piece: bool = False) -> fx.Node | None:
    """The latent input; with ``piece``, the last of the local pieces earlier rounds cut of it
    (PipeFusion's patch, a CFG half), which the sequence axes cut further."""
    node = graph_latent(gm, name)
    while (
        node is not None
        and piece
        and len(node.users) == 1
        and next(iter(node.users)).target is slice_shard
    ):
        node = next(iter(node.users))
    return node


def patch_stride(node: fx.Node, dim_from_end: int) -> int:
    """The largest product of convolution strides along ``dim_from_end`` on any path from
    ``node``: a DiT's patch size (its patch embedding), a VAE encoder's total downsampling.
    Pieces cut in multiples of it keep every strided convolution's rows aligned to its stride."""
    scale = {node: 1}
    best = 1
    started = False
    for n in node.graph.nodes:  # topological order
        if n is node:
            started = True
            continue
        if not started:
            continue
        ins = [scale[a] for a in n.all_input_nodes if a in scale]
        if not ins:
            continue
        s = max(ins)
        if packet(n.target) in _STRIDED and n.args[0] in scale:
            try:
                stride = conv_params(n)[0]
            except Break:  # transposed or string-padded: no downsampling to align to
                stride = []
            s = scale[n.args[0]] * (
                int(stride[-dim_from_end]) if dim_from_end <= len(stride) else 1
            )  # type: ignore[index]
        scale[n] = s
        best = max(best, s)
    return best


def _token_dims(shape: tuple[int, ...], channels: int | None) -> tuple[list[int], bool]:
    """The latent's token-grid dims, outermost first, and whether its layout is ambiguous (the
    config's channel count does not tell which dim is the channels)."""
    nd = len(shape)
    if nd == 3:  # packed [B, S, C], or a 1-D sequence [B, C, L] (audio)
        if channels is not None and shape[1] == channels != shape[2]:
            return [2], False
        if channels is not None and shape[2] == channels != shape[1]:
            return [1], False
        return [1, 2], True
    if nd == 4:
        return [2, 3], False
    if nd == 5:
        if channels is not None and shape[1] != channels and shape[2] == channels:
            return [1, 3, 4], False  # frames first: [B, F, C, H, W]
        if _ambiguous_video(shape, channels):
            return [2, 1, 3, 4], True  # [B, C, F, H, W] or [B, F, C, H, W]: trial decides
        return [2, 3, 4], False
    # more dims (several latent frames or images side by side): every dim but the batch and the
    # channels
    return [d for d in range(1, nd) if channels is None or shape[d] != channels], True


def _unit(node: fx.Node, shape: tuple[int, ...], dim: int) -> int:
    """The patch size along ``dim`` (whole units a cut must keep), 1 where it does not divide."""
    g = patch_stride(node, len(shape) - dim)
    return g if shape[dim] % g == 0 else 1


def _choose_dim(
    shape: tuple[int, ...],
    node: fx.Node,
    degree: int,
    channels: int | None,
    dim: int | None = None,
    outermost: bool = False,
) -> tuple[int, int]:
    """The token-grid dim to cut (outermost first, the next one where it has fewer token rows
    than ``degree``; ``dim`` forces one) and its patch size."""
    nd = len(shape)
    if dim is not None:
        if not -nd <= dim < nd:
            raise ValueError(f"Plan(seed_dim={dim}): the latent input has {nd} dims {list(shape)}")
        dim %= nd
        return dim, _unit(node, shape, dim)
    candidates = _token_dims(shape, channels)[0]
    if outermost:  # PipeFusion's patches: rows (frames, then rows of a video) only
        candidates = candidates[:2] if nd == 5 else candidates[:1]
    for dim in candidates:
        g = _unit(node, shape, dim)
        if shape[dim] // g >= degree or dim == candidates[-1]:
            return dim, g
    raise AssertionError("unreachable")


def _ambiguous_video(shape: tuple[int, ...], channels: int | None) -> bool:
    """``[B, C, F, H, W]`` or ``[B, F, C, H, W]``: the config's channel count does not tell
    (both dims have that size, or neither does)."""
    return len(shape) == 5 and (
        channels is None or (shape[1] == channels) == (shape[2] == channels)
    )


def _trial(gm: fx.GraphModule, ctx: PassContext, name: str, shard: Shard) -> tuple[float, int]:
    """(the busiest rank's share of the forward's FLOPs, sharding breaks) of propagating
    ``shard`` of input ``name``, on a copy of the graph. The same on every rank (every rank must
    choose the same cut), whatever rank propagates it."""
    import copy
    from dataclasses import replace as dc_replace

    from xdit_compile.passes.sharding.propagate import propagate_sharding_pass

    trial = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    node = next(n for n in trial.graph.nodes if n.name == name)
    node.meta["xdit_seed"] = shard
    tctx = dc_replace(
        ctx,
        breaks=[],
        collectives=[],
        stats=[],
        graphs={},
        seed=None,
        patch_outputs=dict(ctx.patch_outputs),
        batch_seeds=dict(ctx.batch_seeds),
    )
    try:
        propagate_sharding_pass(trial, tctx)
    except (ValueError, RuntimeError):  # a cut the rules refuse outright: the worst trial
        return 1.0, 1 << 30
    local, total = [0.0] * ctx.degree, 0.0
    for n in trial.graph.nodes:
        f = node_flops(n)
        p = n.meta.get("xdit_placement")
        total += f
        for r in range(ctx.degree):
            local[r] += f * (p.local_size(r) / p.total if isinstance(p, Shard) else 1.0)
    return (max(local) / total if total else 1.0), len(tctx.breaks)


def _tried_dim(
    gm: fx.GraphModule,
    ctx: PassContext,
    node: fx.Node,
    shape: tuple[int, ...],
    degree: int,
    dims: list[int],
) -> tuple[int, int, float] | None:
    """Of ``dims`` with enough token rows, the one whose cut leaves this rank the least of the
    forward's FLOPs (then: the fewest breaks; then: the first), with its share; None if none has
    enough rows."""
    best: tuple[float, int, int, int] | None = None
    for i, dim in enumerate(dims):
        g = _unit(node, shape, dim)
        if shape[dim] // g < degree:
            continue
        share, breaks = _trial(
            gm, ctx, node.name, Shard(dim, even_split(shape[dim] // g, degree, g))
        )
        key = (round(share, 6), breaks, i, dim)
        if best is None or key < best:
            best = key
        if breaks == 0 and share <= 1.0 / degree + 1e-6:
            break  # as parallel as a cut gets
    return (best[3], _unit(node, shape, best[3]), best[0]) if best is not None else None


def seed_inputs_pass(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Seed the latent on the current axis: the sequence axes, or PipeFusion's virtual ``patch``
    axis (which seeds even with one patch: the warmup graph runs the whole sequence as one)."""
    degree = ctx.degree
    if degree == 1 and ctx.axis not in ctx.virtual:
        return PassResult(gm, False)
    node = _latent_input(gm, ctx.plan.seed, piece=ctx.axis == "sp" and ctx.patch_seed is not None)
    if node is None:
        raise SeedError(
            "no latent input found: sequence parallelism splits the latent being denoised (a "
            "floating-point input with >= 3 dims, hidden_states); pass it as a tensor, or name it "
            "with Plan(seed='name')"
        )
    shape = tuple(int(s) for s in node.meta["val"].shape)
    channels = ctx.facts.channels
    patches = ctx.axis == "patch"
    dims, ambiguous = _token_dims(shape, channels)
    dim, g = _choose_dim(shape, node, degree, channels, ctx.plan.seed_dim, outermost=patches)
    if (
        ctx.plan.seed_dim is None
        and node.op == "placeholder"
        and not patches
        and (ambiguous or shape[dim] // g < degree)
    ):
        # The layout does not tell, or its token dims have too few rows: try every dim but the
        # batch (the known channels too) and keep the cut that parallelizes the most.
        few = shape[dim] // g < degree
        others = [
            d
            for d in range(1, len(shape))
            if d not in dims and (channels is None or shape[d] != channels)
        ]
        tried = _tried_dim(gm, ctx, node, shape, degree, dims + (others if few else []))
        # Past the token dims, only a cut that really parallelizes (not one that breaks at the
        # first op and runs the rest whole) is taken; else the refusal below says why.
        if tried is not None and (not few or tried[2] <= _WORTH):
            dim, g = tried[:2]
    units = shape[dim] // g
    if units < degree:
        what = (
            f"{degree} PipeFusion patches need at least {degree}: use fewer patches"
            if ctx.axis == "patch"
            else f"sequence parallel degree {degree} needs at least {degree}: use a larger "
            f"resolution or a smaller ulysses x ring"
        )
        raise SeedError(
            f"input {node.name} has {units} token rows along dim {dim} (size {shape[dim]}, patch "
            f"{g}); {what}"
        )
    split = even_split(units, degree, g)
    node.meta["xdit_seed"] = Shard(dim, split)
    arg = graph_latent(gm, ctx.plan.seed)
    seed = SeedChoice(
        input=node.name,
        arg=str(arg.target) if arg is not None else node.name,
        dim=dim,
        patch=g,
        split=tuple(split),
        shape=shape,
    )
    if ctx.axis == "patch":
        ctx.patch_seed = seed
    else:
        ctx.seed = seed
    return PassResult(gm, True)
