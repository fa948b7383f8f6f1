"""Rule conformance: every op rule checked against the single-device op, as DTensor's op tests do.

For each ATen op with a rule in the registry, sample inputs come from PyTorch's OpInfo database
(``op_db``: the samples ``test/distributed/tensor/test_dtensor_ops.py`` uses) and from the
DiT-shaped samples below (joint text+image rows, attention, patch embeddings). Each sample is
captured with the real capture path (``torch.export``), every tensor input is given every placement
a rule may meet (sharded on each dim, even and uneven, a joint dim with replicated text head/tail
rows, evenly cut text rows), and the whole pass pipeline (propagation, attention rewrite, lowering
to collectives) compiles the graph for each rank of a simulated mesh. ``RankRun`` then executes
every rank's graph on its local pieces (all-gathers fed from the other ranks' pieces) and compares
every node with its rank's piece of the global value: a rule that treats a cross-token op as local,
or rewrites an integer argument that is not a size, gives a wrong piece and fails here.

A rule may always refuse (a sharding break): the inputs are gathered and the result stays exact,
which is checked the same way. ``python tests/conformance.py`` prints the per-op table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.utils._pytree as pytree

sys.path.insert(0, os.path.dirname(__file__))

from graph_harness import ALL_NO_SEED, Fn, RankRun, compile_for, reference  # noqa: E402

from xdit_compile.compiler.capture import capture  # noqa: E402
from xdit_compile.passes.sharding import propagate  # noqa: E402,F401  (registers the rules)
from xdit_compile.passes.sharding.engine import RULES, redistribute  # noqa: E402
from xdit_compile.placement import Shard, even_split  # noqa: E402
from xdit_compile.plan import Plan  # noqa: E402

__all__ = [
    "Sample",
    "Result",
    "rule_ops",
    "samples",
    "placements",
    "check_sample",
    "run_conformance",
]

aten = torch.ops.aten

# Ops whose values are undefined (uninitialized memory, random masks): only their placement
# logic is exercised through DiT samples where they are deterministic (dropout in eval).
UNDEFINED_VALUES = {
    "empty",
    "empty_like",
    "new_empty",
    "new_empty_strided",
    "dropout",
    "native_dropout",
}


# Registered ops the harness cannot check: export decomposes them (reshape, flatten, chunk,
# movedim, to ...), so no captured graph holds them; they take no tensor input (creation ops); or
# their values are undefined (``empty*``). Their rules stay for graphs captured other ways; the
# conformance test checks this list is exact.
UNCHECKED = {
    "_prelu_kernel",
    "arange",
    "chunk",
    "contiguous",
    "dropout",
    "empty",
    "gelu_",
    "unflatten",
    "empty_like",
    "flatten",
    "full",
    "movedim",
    "new_empty",
    "new_empty_strided",
    "norm",
    "ones",
    "reshape",
    "scalar_tensor",
    "silu_",
    "swapaxes",
    "tensor_split",
    "to",
    "zeros",
}


@dataclasses.dataclass
class Sample:
    """A call ``fn(*tensors)`` to capture; ``name`` says where it came from."""

    name: str
    fn: Callable[..., Any]
    tensors: tuple[torch.Tensor, ...]


@dataclasses.dataclass
class Result:
    op: str
    sample: str
    cases: int = 0
    kept: int = 0
    """Cases whose rule kept a shard (no break at the op)."""
    breaks: int = 0
    failures: list[str] = dataclasses.field(default_factory=list)
    skipped: str = ""


def rule_ops() -> dict[str, list[Any]]:
    """Registered rules by ATen packet name (other targets, e.g. ``operator.getitem``, and the
    rules of xdit_compile's own ops, tested beside them, skipped)."""
    out: dict[str, list[Any]] = {}
    for t in RULES:
        qualified = getattr(t, "_qualified_op_name", None) or getattr(t, "name", lambda: "")()
        if isinstance(t, torch._ops.OpOverloadPacket | torch._ops.OpOverload) and not str(
            qualified
        ).startswith("aten::"):
            continue
        if isinstance(t, torch._ops.OpOverloadPacket):
            out.setdefault(t.__name__, []).append(t)
        elif isinstance(t, torch._ops.OpOverload):
            out.setdefault(t.overloadpacket.__name__, []).append(t)
    return out


# --------------------------------------------------------------------------- samples


@functools.cache
def _opinfo_index() -> dict[str, list[Any]]:
    from torch.testing._internal.common_methods_invocations import op_db

    idx: dict[str, list[Any]] = {}
    for op in op_db:
        names = {op.aten_name, op.name, op.name.replace("nn.functional.", "")}
        for n in names:
            if n:
                idx.setdefault(n, []).append(op)
    return idx


def _opinfo_samples(name: str, ops: list[Any], per_op: int) -> Iterator[Sample]:
    for op in ops:
        dtype = next((d for d in (torch.float32, torch.int64, torch.bool) if d in op.dtypes), None)
        if dtype is None:
            continue
        tag = op.name + (f".{op.variant_test_name}" if op.variant_test_name else "")
        got = 0
        try:
            it = op.sample_inputs("cpu", dtype, requires_grad=False)
            for i, s in enumerate(it):
                if got >= per_op:
                    break
                leaves, spec = pytree.tree_flatten((s.input, s.args, s.kwargs))
                tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
                if not any(t.dim() >= 1 and t.numel() >= 2 for t in tensors):
                    continue
                if any(t.is_complex() or t.numel() > 4096 for t in tensors):
                    continue
                got += 1
                pos = [j for j, x in enumerate(leaves) if isinstance(x, torch.Tensor)]

                def fn(
                    *xs: torch.Tensor,
                    leaves: list = leaves,
                    pos: list = pos,
                    spec: Any = spec,
                    call: Callable = op.op,
                ) -> Any:
                    vals = list(leaves)
                    for j, x in zip(pos, xs, strict=True):
                        vals[j] = x
                    inp, args, kwargs = pytree.tree_unflatten(vals, spec)
                    if isinstance(inp, list | tuple):
                        return call(inp, *args, **kwargs)
                    return call(inp, *args, **kwargs)

                yield Sample(f"{tag}#{i}", fn, tuple(t.clone() for t in tensors))
        except Exception as e:  # noqa: BLE001  (a sample generator that fails on CPU)
            yield Sample(f"{tag}: sample error {type(e).__name__}", lambda: None, ())


def _g(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed + sum(shape)))


F = torch.nn.functional


def _heads(z: torch.Tensor) -> torch.Tensor:
    """[B, S, 8] rows -> [B, 2 heads, S, 4]."""
    return z.unflatten(-1, (2, 4)).transpose(1, 2)


# (Q, K, V) rows from image rows x and text rows t, in the joint layouts attention meets.
_LAYOUTS: dict[str, Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]] = {
    "image_q_joint_kv": lambda x, t: (x, torch.cat([x * 2, t], 1), torch.cat([x + 1, t * 3], 1)),
    "joint_q_image_kv": lambda x, t: (torch.cat([t, x], 1), x * 2, x + 1),
    "q_text_head_kv_text_tail": lambda x, t: (
        torch.cat([t, x], 1),
        torch.cat([x * 2, t * 2], 1),
        torch.cat([x + 1, t + 1], 1),
    ),
    "other_text_lengths": lambda x, t: (
        torch.cat([t[:, :1], x], 1),
        torch.cat([t, x * 2], 1),
        torch.cat([t + 1, x + 1], 1),
    ),
}

# DiT-shaped samples: the op with the argument forms diffusers models use.
DIT_SAMPLES: dict[str, list[Sample]] = {
    "linear": [
        Sample("dit.linear", lambda x, w, b: F.linear(x, w, b), (_g(2, 6, 4), _g(5, 4), _g(5)))
    ],
    "scaled_dot_product_attention": [
        Sample(
            "dit.sdpa",
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
            (_g(1, 2, 6, 4), _g(1, 2, 6, 4, seed=1), _g(1, 2, 6, 4, seed=2)),
        ),
        Sample(
            "dit.sdpa_cross",
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
            (_g(1, 2, 6, 4), _g(1, 2, 3, 4, seed=1), _g(1, 2, 3, 4, seed=2)),
        ),
        Sample(
            "dit.sdpa_frames_joint",
            lambda t, x: F.scaled_dot_product_attention(
                *[torch.cat([t, x.flatten(1, 2)], 1).unflatten(-1, (2, 2)).transpose(1, 2)] * 3
            ),
            (_g(1, 3, 4), _g(1, 2, 6, 4)),
        ),
        Sample(
            "dit.sdpa_mask",
            lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m),
            (
                _g(1, 2, 6, 4),
                _g(1, 2, 6, 4, seed=1),
                _g(1, 2, 6, 4, seed=2),
                _g(1, 1, 6, 6, seed=3),
            ),
        ),
        # Q and K/V in different joint layouts (image rows x, text rows t): text on K/V only
        # (image queries over image + text keys), on Q only, at the head of Q and the tail of
        # K/V, with other text lengths; and a key mask over image + text keys.
        *[
            Sample(
                f"dit.sdpa_layout_{name}",
                lambda x, t, f=f: F.scaled_dot_product_attention(*[_heads(z) for z in f(x, t)]),
                (_g(1, 6, 8), _g(1, 3, 8, seed=1)),
            )
            for name, f in _LAYOUTS.items()
        ],
        Sample(
            "dit.sdpa_layout_image_q_key_mask",
            lambda x, t, m: F.scaled_dot_product_attention(
                *[_heads(z) for z in _LAYOUTS["image_q_joint_kv"](x, t)], attn_mask=m
            ),
            (_g(1, 6, 8), _g(1, 3, 8, seed=1), _g(1, 1, 1, 9, seed=3)),
        ),
    ],
    "conv2d": [
        Sample(
            "dit.patch_embed",
            lambda x, w, b: F.conv2d(x, w, b, stride=2),
            (_g(1, 3, 8, 6), _g(4, 3, 2, 2), _g(4)),
        ),
        Sample(
            "dit.same_conv",
            lambda x, w: F.conv2d(x, w, padding=1),
            (_g(1, 3, 8, 6), _g(4, 3, 3, 3)),
        ),
        Sample(
            "vae.downsample",
            lambda x, w: F.conv2d(x, w, stride=2, padding=1),
            (_g(1, 3, 8, 6), _g(4, 3, 3, 3)),
        ),
        Sample(
            "vae.pad_then_downsample",
            lambda x, w: F.conv2d(F.pad(x, (0, 1, 0, 1)), w, stride=2),
            (_g(1, 3, 8, 6), _g(4, 3, 3, 3)),
        ),
    ],
    "upsample_nearest2d": [
        Sample(
            "vae.upsample2x",
            lambda x: F.interpolate(x, scale_factor=2.0, mode="nearest"),
            (_g(1, 3, 5, 4),),
        ),
        Sample(
            "vae.upsample_to_size",
            lambda x: F.interpolate(x, size=(15, 8), mode="nearest"),
            (_g(1, 3, 5, 4),),
        ),
    ],
    "upsample_nearest1d": [
        Sample(
            "vae.upsample1d",
            lambda x: F.interpolate(x, scale_factor=2.0, mode="nearest"),
            (_g(1, 3, 5),),
        )
    ],
    "upsample_nearest3d": [
        Sample(
            "vae.upsample3d",
            lambda x: F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest"),
            (_g(1, 2, 3, 4, 3),),
        )
    ],
    "_upsample_nearest_exact1d": [
        Sample(
            "vae.upsample_exact1d",
            lambda x: F.interpolate(x, scale_factor=2.0, mode="nearest-exact"),
            (_g(1, 3, 5),),
        )
    ],
    "_upsample_nearest_exact2d": [
        Sample(
            "vae.upsample_exact2d",
            lambda x: F.interpolate(x, scale_factor=2.0, mode="nearest-exact"),
            (_g(1, 3, 5, 4),),
        )
    ],
    "_upsample_nearest_exact3d": [
        Sample(
            "vae.upsample_exact3d",
            lambda x: F.interpolate(x, scale_factor=2.0, mode="nearest-exact"),
            (_g(1, 2, 3, 4, 3),),
        )
    ],
    "conv3d": [
        Sample(
            "dit.patch_embed3d",
            lambda x, w: F.conv3d(x, w, stride=(1, 2, 2)),
            (_g(1, 3, 4, 4, 4), _g(4, 3, 1, 2, 2)),
        )
    ],
    "layer_norm": [Sample("dit.layer_norm", lambda x: F.layer_norm(x, (6,)), (_g(2, 8, 6),))],
    "group_norm": [
        Sample("dit.group_norm", lambda x: F.group_norm(x, 2), (_g(2, 4, 6, 4),)),
        Sample(
            "vae.group_norm_affine",
            lambda x, w, b: F.group_norm(x, 2, w, b) * 1,
            (_g(1, 4, 6, 4) * 3 + 1, _g(4, seed=1), _g(4, seed=2)),
        ),
    ],
    "embedding": [
        Sample(
            "dit.embedding",
            lambda i, w: F.embedding(i, w),
            (torch.tensor([[0, 3, 1, 2], [2, 2, 0, 1]]), _g(4, 5)),
        )
    ],
    # Fewer frames than ranks: rows of every frame on each rank (a shard merged with the frame
    # dim), joined to text rows and attended over.
    "cat": [
        Sample("dit.cat_text_image", lambda t, x: torch.cat([t, x], 1), (_g(1, 3, 4), _g(1, 6, 4))),
        Sample(
            "dit.cat_text_frames",
            lambda t, x: torch.cat([t, x.flatten(1, 2)], 1),
            (_g(1, 3, 4), _g(1, 2, 6, 4)),
        ),
    ],
    "split_with_sizes": [
        Sample(
            "dit.split_text_frames",
            lambda t, x: torch.cat([t, x.flatten(1, 2)], 1).split([3, 12], 1)[1] * 2,
            (_g(1, 3, 4), _g(1, 2, 6, 4)),
        )
    ],
    "matmul": [
        Sample(
            "dit.matmul_qk",
            lambda q, k: q @ k.transpose(-1, -2),
            (_g(1, 2, 6, 4), _g(1, 2, 6, 4, seed=1)),
        )
    ],
    "bmm": [
        Sample(
            "dit.bmm_contract",
            lambda a, b: torch.bmm(a.transpose(1, 2), b),
            (_g(2, 6, 3), _g(2, 6, 4)),
        )
    ],
    "repeat_interleave": [
        Sample("dit.repeat_interleave", lambda x: x.repeat_interleave(2, dim=0), (_g(2, 6, 3),))
    ],
    "unflatten": [Sample("dit.unflatten_heads", lambda x: x.unflatten(-1, (2, 3)), (_g(2, 6, 6),))],
    "view_as_complex": [
        Sample(
            "dit.complex_rope",
            lambda x, f: torch.view_as_real(
                torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2)) * torch.view_as_complex(f)
            ).flatten(-2),
            (_g(1, 6, 2, 4), _g(6, 1, 2, 2, seed=1)),
        )
    ],
    "slice_scatter": [
        Sample(
            "dit.rope_on_image_part",
            lambda q: torch.slice_scatter(q, q[:, 2:] * 2, 1, 2),
            (_g(1, 8, 4),),
        ),
        Sample(
            "dit.update_frames_after_the_first",
            lambda x, p: torch.slice_scatter(x, x[:, 1:] + p, 1, 1),
            (_g(1, 7, 4), _g(1, 6, 4, seed=1)),
        ),
    ],
    # Slices that cut into the sharded body: each rank keeps its rows of the slice (uneven cuts).
    "slice": [
        Sample("dit.slice_cuts_body", lambda x: x[:, 1:] * 2, (_g(2, 7, 4),)),
        Sample("dit.slice_middle_of_body", lambda x: x[:, 2:5] + 1, (_g(2, 7, 4),)),
    ],
    "sum": [
        Sample("dit.sum_over_tokens", lambda x: x.sum(1) * 2, (_g(2, 6, 4),)),
        Sample(
            "dit.sum_over_tokens_and_channels",
            lambda x: x.sum((1, 2), keepdim=True),
            (_g(2, 6, 4),),
        ),
    ],
    "prelu": [
        Sample(
            "dit.prelu_channels_like_tokens", lambda x, w: F.prelu(x, w), (_g(2, 4, 4), _g(4) - 0.5)
        )
    ],
    "dropout": [
        Sample("dit.dropout_eval", lambda x: F.dropout(x, 0.1, training=False), (_g(2, 6, 3),))
    ],
    "pad_sequence": [
        Sample(
            "dit.pad_sequence_batch",
            lambda x, y: (
                torch.nn.utils.rnn.pad_sequence([x, y * 2], batch_first=True, padding_value=0.0) + 1
            ),
            (_g(6, 4), _g(6, 4, seed=1)),
        )
    ],
}

A = aten
_X = (_g(2, 6, 4),)
# Direct ATen calls for registered ops no OpInfo sample reaches (export keeps the call, or
# decomposes it: then the op cannot appear in a captured graph, which the table says).
for _name, _fn, _ts in [
    ("_softmax", lambda x: A._softmax(x, 1, False), _X),
    ("_log_softmax", lambda x: A._log_softmax(x, 2, False), _X),
    ("_safe_softmax", lambda x: A._safe_softmax(x, 1), _X),
    ("_to_copy", lambda x: A._to_copy(x, dtype=torch.float64), _X),
    ("alias", lambda x: A.alias(x) * 1, _X),
    ("copy", lambda x, y: A.copy(x, y), (_g(2, 6, 4), _g(2, 6, 4, seed=1))),
    ("detach", lambda x: A.detach(x) * 1, _X),
    ("_unsafe_view", lambda x: A._unsafe_view(x * 1, [2, 3, 8]), _X),
    (
        "convolution",
        lambda x, w: A.convolution(x, w, None, [2, 2], [0, 0], [1, 1], False, [0, 0], 1),
        (_g(1, 3, 8, 6), _g(4, 3, 2, 2)),
    ),
    ("_fused_rms_norm", lambda x, w: A._fused_rms_norm(x, [4], w, 1e-6)[0], (_g(2, 6, 4), _g(4))),
    ("view_as_real", lambda x: torch.view_as_real(torch.view_as_complex(x)) * 1, (_g(2, 6, 4, 2),)),
    ("norm", lambda x: torch.norm(x, 2, dim=2), _X),
    ("tensor_split", lambda x: torch.tensor_split(x, 2, dim=1), _X),
    ("chunk", lambda x: A.chunk(x, 2, 1), _X),
    ("flatten", lambda x: A.flatten(x, 1, 2), _X),
    ("movedim", lambda x: A.movedim(x, 1, 2), _X),
    ("swapaxes", lambda x: A.swapaxes(x, 0, 1), _X),
    ("reshape", lambda x: A.reshape(x, [2, 3, 8]), _X),
    ("type_as", lambda x, y: A.type_as(x, y), (_g(2, 6, 4), _g(2, 6, 4, seed=1).double())),
    ("concat", lambda x, y: A.concat([x, y], 1), (_g(2, 6, 4), _g(2, 2, 4))),
    ("concatenate", lambda x, y: A.concatenate([x, y], 1), (_g(2, 6, 4), _g(2, 2, 4))),
    ("to", lambda x: A.to(x, torch.float64), _X),
    ("contiguous", lambda x: A.contiguous(x.transpose(1, 2)), _X),
    ("gelu_", lambda x: A.gelu_(x * 1), _X),
    ("silu_", lambda x: A.silu_(x * 1), _X),
    ("_reshape_alias", lambda x: A._reshape_alias(x, [2, 24], [24, 1]) * 1, _X),
    ("native_dropout", lambda x: A.native_dropout(x, 0.0, False)[0], _X),
    ("dropout", lambda x: A.dropout(x, 0.5, False), _X),
]:
    DIT_SAMPLES.setdefault(_name, []).append(Sample(f"aten.{_name}", _fn, _ts))


def samples(
    name: str, opinfos: dict[str, list[Any]], per_op: int = 3, most: int = 12
) -> list[Sample]:
    """The DiT samples of op ``name``, then up to ``per_op`` samples of each of its OpInfos
    (variants included), ``most`` in all."""
    out = list(DIT_SAMPLES.get(name, []))
    if name not in UNDEFINED_VALUES:
        out.extend(_opinfo_samples(name, opinfos.get(name, []), per_op))
    return out[:most]


# --------------------------------------------------------------------------- placements


def placements(shape: tuple[int, ...], degree: int) -> list[Shard]:
    """Every placement a rule may meet on a tensor of ``shape``: sharded on each dim (even and
    uneven cuts), a joint dim (replicated head or tail rows around a sharded body), evenly cut
    text rows."""
    out: list[Shard] = []
    for d, n in enumerate(shape):
        if n < degree:
            continue
        out.append(Shard(d, even_split(n, degree)))
        if n % degree == 0 and n >= 2 * degree:
            out.append(Shard(d, (n // degree + 1, *[n // degree] * (degree - 2), n // degree - 1)))
        if n >= degree + 1:
            out.append(Shard(d, even_split(n - 1, degree), head=1))
            out.append(Shard(d, even_split(n - 1, degree), tail=1))
        if n >= 2 * degree:
            out.append(Shard(d, even_split(n - degree, degree), head=degree, text=True))
    return out


def _seedings(tensors: tuple[torch.Tensor, ...], degree: int, limit: int) -> list[dict[int, Shard]]:
    """One sharded input at a time (others whole), and same-shaped inputs cut the same way."""
    out: list[dict[int, Shard]] = []
    for i, t in enumerate(tensors):
        for p in placements(tuple(t.shape), degree):
            out.append({i: p})
    for i, t in enumerate(tensors):
        same = [j for j, u in enumerate(tensors) if u.shape == t.shape]
        if len(same) > 1 and same[0] == i:
            for p in placements(tuple(t.shape), degree):
                out.append(dict.fromkeys(same, p))
    if len(out) > limit:  # keep a spread over inputs and dims
        step = len(out) / limit
        out = [out[int(k * step)] for k in range(limit)]
    return out


# --------------------------------------------------------------------------- checking


def _breaks_at(ctx: Any, packet_name: str) -> bool:
    return any(b.op.split(".")[1] == packet_name for b in ctx.breaks if b.op.startswith("aten."))


def check_sample(
    packet: str, s: Sample, plans: list[Plan], limit: int = 24, first_failure: bool = False
) -> Result:
    """Every placement case of sample ``s`` on every plan (``first_failure``: stop at the first
    failing case)."""
    res = Result(packet, s.name)
    if not s.tensors:
        res.skipped = s.name.split(": ", 1)[-1] if ": " in s.name else "no tensor inputs"
        return res
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            gm = capture(Fn(s.fn).eval(), s.tensors, {})
            ref = reference(gm, *s.tensors)
            again = reference(gm, *s.tensors)["output"]
    except Exception as e:  # noqa: BLE001  (a sample the capture path cannot take)
        res.skipped = (
            f"capture: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        )
        return res
    for a, b in zip(pytree.tree_leaves(ref["output"]), pytree.tree_leaves(again), strict=True):
        if isinstance(a, torch.Tensor) and not torch.equal(a, b) and not a.isnan().any():
            res.skipped = "nondeterministic (random) values"
            return res
    if any(
        isinstance(v := n.meta.get("val"), torch.Tensor)
        and any(not isinstance(d, int) for d in v.shape)
        for n in gm.graph.nodes
    ):
        res.skipped = "data-dependent sizes (the specialize step makes them static first)"
        return res
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    if not any(getattr(t, "overloadpacket", None) is getattr(aten, packet, None) for t in targets):
        res.skipped = "the op is decomposed or absent in the captured graph"
        return res
    for plan in plans:
        for seeds in _seedings(s.tensors, plan.sp_degree, limit):
            if first_failure and res.failures:
                return res
            res.cases += 1
            broke = False
            partials: list[dict[str, torch.Tensor]] = []
            try:
                for rank in range(plan.sp_degree):
                    rgm, ctx = compile_for(gm, rank, ALL_NO_SEED, plan, seeds=seeds)
                    left = [n for n in rgm.graph.nodes if n.target is redistribute]
                    assert not left, f"redistribute left unlowered: {left}"
                    bad = [b for b in ctx.breaks if b.reason.startswith("rule failed")]
                    assert not bad, bad[0].reason
                    broke = broke or _breaks_at(ctx, packet)
                    run = RankRun(rgm, ref, rank, gm)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        outs = run.run(*s.tensors, enable_io_processing=False)
                    for got, want in zip(
                        pytree.tree_leaves(outs), pytree.tree_leaves(ref["output"]), strict=True
                    ):
                        if isinstance(want, torch.Tensor):
                            torch.testing.assert_close(got, want, equal_nan=True)
                    partials.append(run.partials)
                for name in partials[0]:  # pending sums: the ranks' pieces add up to the value
                    torch.testing.assert_close(
                        sum(p[name] for p in partials),
                        ref[name],
                        equal_nan=True,
                        msg=f"partial sums of {name}",
                    )
            except Exception as e:  # noqa: BLE001  (every failure is reported with its case)
                desc = ", ".join(f"in{i}={p}" for i, p in seeds.items())
                msg = str(e).strip().splitlines()
                res.failures.append(
                    f"{s.name} [{desc}] {plan.describe() if hasattr(plan, 'describe') else plan}: "
                    f"{type(e).__name__}: {' | '.join(msg[:3])[:300]}"
                )
                continue
            res.breaks += broke
            res.kept += not broke
    return res


def run_conformance(
    per_op: int = 3, limit: int = 24, only: set[str] | None = None, plans: list[Plan] | None = None
) -> dict[str, list[Result]]:
    plans = plans or [Plan(ulysses=2), Plan(ring=3)]
    opinfos = _opinfo_index()
    table: dict[str, list[Result]] = {}
    for name in sorted(rule_ops()):
        if only is not None and name not in only:
            continue
        table[name] = [check_sample(name, s, plans, limit) for s in samples(name, opinfos, per_op)]
    return table


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-op", type=int, default=3)
    ap.add_argument("--limit", type=int, default=24)
    ap.add_argument("ops", nargs="*")
    a = ap.parse_args()
    t0 = time.time()
    table = run_conformance(a.per_op, a.limit, set(a.ops) or None)
    n_cases = n_fail = 0
    for name, results in table.items():
        cases = sum(r.cases for r in results)
        kept = sum(r.kept for r in results)
        fails = [f for r in results for f in r.failures]
        n_cases += cases
        n_fail += len(fails)
        print(
            f"{name:32s} samples {sum(1 for r in results if r.cases):3d}  cases {cases:4d}  kept "
            f"{kept:4d}  failures {len(fails)}"
        )
        for f in fails[:5]:
            print("    FAIL", f)
        for r in results:
            if r.skipped:
                print("    skip", r.sample, "-", r.skipped)
    print(f"{len(table)} ops, {n_cases} cases, {n_fail} failures in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
