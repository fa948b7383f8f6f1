"""The op taxonomy: which family an ATen op belongs to, and the FLOPs of the ops that have them.

One place says what a matmul, an attention, a pointwise op, a view or a reduction is; the
planner's accounting, the FLOP estimates, the sharding rules, the seed choice and the text-head
pass classify with these sets. Families are frozensets of ATen overload packets (a node matches
by ``node.target.overloadpacket``; higher-order ops such as ``flex_attention`` by the op itself).
An op may belong to two families that ask different questions (``alias`` is pointwise: element
``i`` comes from element ``i``; and free: it launches no kernel).

FLOPs (:func:`node_flops`) count a multiply-add as 2 and nothing else: the bias of ``linear``,
``addmm``, ``baddbmm`` and convolutions is not counted (one add per output element, negligible
next to ``K`` multiply-adds), nor are ``alpha`` / ``beta`` scalings.

- ``mm`` / ``bmm`` / ``matmul`` / ``addmm`` / ``baddbmm`` / ``linear``: ``2 * out.numel() * K``,
  ``K`` the contracted size (the first operand's last dim; ``linear``'s weight's).
- ``einsum``: operands contracted left to right; each pairwise contraction costs
  ``2 * prod(size of every distinct index of the two operands)``. One operand: 0 (a permute or a
  sum, no multiply-add), and then it is no matmul.
- convolution: ``2 * N * C_out * prod(out spatial) * (C_in / groups) * prod(kernel)``; a
  transposed one scatters every input element instead: ``2 * N * C_in * prod(in spatial) *
  (C_out / groups) * prod(kernel)``.
- attention (SDPA, flex attention, the project's attention ops): ``4 * q.numel() * S_kv``
  (``Q K^T`` and ``P V``; softmax not counted).
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx as fx

# (importing them registers xdit::usp_attention and the displaced attentions)
from xdit_compile.runtime import attention as _attention  # noqa: F401
from xdit_compile.runtime import displaced as _displaced  # noqa: F401

__all__ = [
    "ATTENTION",
    "COMPLEX_VIEWS",
    "CONVOLUTIONS",
    "FREE",
    "GROUP_NORMS",
    "MATMULS",
    "MATMUL_LIKE",
    "NORMS",
    "POINTWISE",
    "REDUCTIONS",
    "RESHAPES",
    "SDPA",
    "TRANSCENDENTAL",
    "TRANSPOSED_CONVOLUTIONS",
    "VIEWS",
    "is_attention",
    "is_free",
    "is_matmul",
    "node_flops",
    "packet",
    "reshape_copies",
]

aten = torch.ops.aten


def _aten(*names: str) -> frozenset[Any]:
    """ATen overload packets by name, skipping names this torch build does not have."""
    return frozenset(getattr(aten, n) for n in names if hasattr(aten, n))


#: Products of two operands (a contraction over ``K``), bias or not.
MATMULS = _aten("mm", "bmm", "addmm", "baddbmm", "matmul", "linear", "einsum")
#: Transposed convolutions (an upsampling: each input element scattered over a kernel window).
TRANSPOSED_CONVOLUTIONS = _aten("conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
#: Every convolution; ``aten.convolution`` is transposed where its ``transposed`` argument says so.
CONVOLUTIONS = _aten("convolution", "conv1d", "conv2d", "conv3d") | TRANSPOSED_CONVOLUTIONS
#: What the cost model runs at the matmul rate.
MATMUL_LIKE = MATMULS | CONVOLUTIONS
#: Scaled dot-product attention and the fused kernels it dispatches to.
SDPA = _aten(
    "scaled_dot_product_attention",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
)
#: Every attention: SDPA, flex attention and the project's parallel attention ops (their first
#: two arguments are ``q`` and ``k``).
ATTENTION = SDPA | frozenset(
    {
        torch.ops.higher_order.flex_attention,
        torch.ops.xdit.usp_attention,
        torch.ops.xdit.distrifusion_attention,
        torch.ops.xdit.pipefusion_attention,
    }
)

#: Element ``i`` of the output comes from element ``i`` of every (broadcast) input.
POINTWISE = _aten(
    "add",
    "sub",
    "mul",
    "div",
    "rsub",
    "pow",
    "neg",
    "exp",
    "log",
    "sqrt",
    "rsqrt",
    "reciprocal",
    "sigmoid",
    "tanh",
    "silu",
    "gelu",
    "relu",
    "leaky_relu",
    "erf",
    "sin",
    "cos",
    "abs",
    "clamp",
    "clamp_min",
    "clamp_max",
    "maximum",
    "minimum",
    "where",
    "masked_fill",
    "eq",
    "ne",
    "lt",
    "le",
    "gt",
    "ge",
    "logical_and",
    "logical_or",
    "logical_not",
    "bitwise_not",
    "_to_copy",
    "to",
    "clone",
    "contiguous",
    "alias",
    "detach",
    "dropout",
    "lerp",
    "addcmul",
    "addcdiv",
    "square",
    "floor",
    "ceil",
    "round",
    "sign",
    "mish",
    "hardswish",
    "hardsigmoid",
    "softplus",
    "elu",
    "zeros_like",
    "ones_like",
    "empty_like",
    "full_like",
    "fill",
    "nan_to_num",
    "fmod",
    "remainder",
    "isnan",
    "logaddexp",
    "exp2",
    "log1p",
    "expm1",
    "bitwise_and",
    "bitwise_or",
    "float_power",
    "gelu_",
    "silu_",
    "native_dropout",
    "sgn",
    "trunc",
    "frac",
    "atan2",
    "log2",
    "tan",
    "asin",
    "acos",
    "atan",
    "sinh",
    "cosh",
    "relu6",
    "hardtanh",
    "selu",
    "celu",
)
#: Pointwise ops whose arithmetic (transcendentals) can outlast their memory traffic on a CPU
#: core: the cost model times each (``xdit_compile.analysis.cost.ELEMENTWISE``).
TRANSCENDENTAL = _aten("gelu", "silu", "tanh", "sigmoid", "exp", "sin", "cos", "erf")
assert TRANSCENDENTAL <= POINTWISE

#: New shapes over the same elements in the same (row-major) order.
RESHAPES = _aten(
    "view",
    "_unsafe_view",
    "reshape",
    "flatten",
    "unflatten",
    "squeeze",
    "unsqueeze",
    "view_copy",
    "_reshape_alias",
)
#: Reshapes that copy where their input's strides admit no view of the new shape.
_MAY_COPY = _aten("reshape", "flatten", "unflatten")
#: Real <-> complex views: the last dim of 2 (real, imaginary) becomes one complex element.
COMPLEX_VIEWS = _aten("view_as_real", "view_as_complex")
#: Views that move, pick or alias elements without copying them.
VIEWS = COMPLEX_VIEWS | _aten(
    "permute",
    "transpose",
    "t",
    "expand",
    "slice",
    "select",
    "split",
    "split_with_sizes",
    "unbind",
    "chunk",
    "narrow",
    "as_strided",
    "movedim",
    "alias",
    "detach",
)
#: Shape queries and checks: no data.
_METADATA = _aten("sym_size", "sym_numel", "_assert_tensor_metadata", "lift_fresh_copy")
#: Ops that launch no kernel: views, metadata, tuple indexing (:func:`is_free`; a reshape may
#: still copy, :func:`reshape_copies`). ``xdit::specialized`` (a shape check) is defined above
#: the passes, so it is known by name.
FREE = (RESHAPES - _aten("view_copy")) | VIEWS | _METADATA | frozenset({operator.getitem})
_FREE_CUSTOM = frozenset({"xdit::specialized"})

#: Reductions over dims (``dim`` / ``keepdim`` schema arguments).
REDUCTIONS = _aten(
    "sum",
    "mean",
    "amax",
    "amin",
    "var",
    "std",
    "max",
    "min",
    "argmax",
    "argmin",
    "prod",
    "logsumexp",
    "norm",
    "var_mean",
    "std_mean",
    "all",
    "any",
    "linalg_vector_norm",
)
#: Normalizations over the trailing dims (``normalized_shape`` is the second argument).
NORMS = _aten("layer_norm", "rms_norm", "native_layer_norm", "_fused_rms_norm")
#: Normalizations over channel groups.
GROUP_NORMS = _aten("group_norm", "native_group_norm")


def packet(target: Any) -> Any:
    """The overload packet of an op (``aten.mm`` for ``aten.mm.default``); other callables as
    they are (``flex_attention``, ``operator.getitem``)."""
    return getattr(target, "overloadpacket", target)


def is_matmul(node: fx.Node) -> bool:
    """A product the cost model runs at the matmul rate (an einsum of one operand is not)."""
    pk = packet(node.target)
    return pk in MATMUL_LIKE and not (pk is aten.einsum and len(_einsum_operands(node)) < 2)


def is_attention(node: fx.Node) -> bool:
    return packet(node.target) in ATTENTION


def is_free(node: fx.Node) -> bool:
    """No kernel: a view, a metadata op, a tuple index, a shape check (a reshape may still copy:
    :func:`reshape_copies`)."""
    schema = getattr(node.target, "_schema", None)
    return packet(node.target) in FREE or getattr(schema, "name", None) in _FREE_CUSTOM


def reshape_copies(node: fx.Node) -> bool:
    """Whether a reshape-like node copies: its input's strides admit no view of the new shape
    (e.g. a reshape after a permute), so it runs as a copy kernel."""
    x = node.args[0] if node.args else None
    if packet(node.target) not in _MAY_COPY or not isinstance(x, fx.Node):
        return False
    inp, out = x.meta.get("val"), node.meta.get("val")
    if not isinstance(inp, torch.Tensor) or not isinstance(out, torch.Tensor):
        return False
    if inp.is_contiguous():
        return False
    try:
        meta = torch.empty_strided(tuple(inp.shape), tuple(inp.stride()), device="meta")
        meta.view(tuple(out.shape))
    except (RuntimeError, TypeError):
        return True
    return False


def _val(a: Any) -> torch.Tensor:
    v = a.meta.get("val") if isinstance(a, fx.Node) else None
    if not isinstance(v, torch.Tensor):
        raise _NoFlops
    return v


class _NoFlops(Exception):
    pass


def node_flops(node: fx.Node) -> int:
    """Global FLOPs of one node (multiply-add = 2; formulas in the module docstring); 0 for
    every op outside :data:`MATMUL_LIKE` and :data:`ATTENTION`."""
    if node.op != "call_function":
        return 0
    pk = packet(node.target)
    try:
        if pk in ATTENTION:
            q, k = _val(node.args[0]), _val(node.args[1])
            return 4 * int(q.numel()) * int(k.shape[-2])
        if pk not in MATMUL_LIKE:
            return 0
        if pk is aten.einsum:
            return _einsum_flops(node)
        out = _val(node)
        if pk in CONVOLUTIONS:
            return _conv_flops(node, pk, out)
        first = node.args[1] if pk in (aten.addmm, aten.baddbmm) else node.args[0]
        k_size = _val(node.args[1]).shape[-1] if pk is aten.linear else _val(first).shape[-1]
        return 2 * int(out.numel()) * int(k_size)
    except _NoFlops:
        return 0


def _conv_flops(node: fx.Node, pk: Any, out: torch.Tensor) -> int:
    w = _val(node.args[1])  # [C_out, C_in / groups, *k]; transposed: [C_in, C_out / groups, *k]
    transposed = pk in TRANSPOSED_CONVOLUTIONS or (pk is aten.convolution and bool(node.args[6]))
    per_element = int(w[0].numel())
    return 2 * int((_val(node.args[0]) if transposed else out).numel()) * per_element


def _einsum_operands(node: fx.Node) -> list[Any]:
    ops_ = node.args[1] if len(node.args) > 1 else node.kwargs.get("tensors", ())
    return list(ops_) if isinstance(ops_, list | tuple) else []


def _einsum_flops(node: fx.Node) -> int:
    operands = _einsum_operands(node)
    eq = str(node.args[0]).replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    terms = lhs.split(",")
    shapes = [tuple(int(s) for s in _val(a).shape) for a in operands]
    if len(operands) < 2 or len(terms) != len(shapes):
        return 0
    letters = [_einsum_letters(t, len(s)) for t, s in zip(terms, shapes, strict=True)]
    sizes: dict[str, int] = {}
    for idx, shape in zip(letters, shapes, strict=True):
        for c, n in zip(idx, shape, strict=True):
            sizes[c] = max(sizes.get(c, 1), n)  # broadcast dims of size 1
    dots = {c for c in sizes if c.startswith(".")}
    if arrow:
        out = set(rhs.replace("...", "")) | (dots if "..." in rhs else set())
    else:  # implicit output: the indices seen once, and the broadcast dims
        out = {c for c in sizes if sum(t.count(c) for t in letters) == 1} | dots
    flops, acc = 0, set(letters[0])
    for i, nxt in enumerate(letters[1:], start=1):
        both = acc | set(nxt)
        flops += 2 * math.prod(sizes[c] for c in both)
        later = out.union(*(set(t) for t in letters[i + 1 :]))
        acc = both & later
    return flops


def _einsum_letters(term: str, ndim: int) -> list[str]:
    """The index of every dim of an operand; the dims under ``...`` are ``.0`` (the last),
    ``.1``, ... (never an einsum letter), aligned from the right like broadcasting."""
    if "..." not in term:
        return list(term)
    head, tail = term.split("...")
    width = ndim - len(head) - len(tail)
    return list(head) + [f".{width - 1 - i}" for i in range(width)] + list(tail)
