"""The op taxonomy (``xdit_compile.passes.ops``): FLOPs of every matmul-like op and attention
against counts done by hand (the arithmetic written out here), on exported graphs, and the
planner's classification agreeing with the FLOP counts on a whole zoo model."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

from xdit_compile.analysis import accounting
from xdit_compile.compiler.capture import capture
from xdit_compile.models import build_model, example_inputs
from xdit_compile.passes import ops
from xdit_compile.passes.ops import node_flops

aten = torch.ops.aten


class _Fn(torch.nn.Module):
    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.fn(*args)


def _node(fn: Callable[..., torch.Tensor], packet: Any, *shapes: tuple[int, ...]) -> fx.Node:
    """The one ``packet`` node of ``fn`` exported at ATen level on random inputs of ``shapes``."""
    ep = torch.export.export(_Fn(fn), tuple(torch.randn(s) for s in shapes)).run_decompositions({})
    found = [n for n in ep.graph.nodes if ops.packet(n.target) is packet]
    assert len(found) == 1, [n.target for n in ep.graph.nodes]
    return found[0]


def _conv(transposed: bool, stride: int, padding: int) -> Callable[..., torch.Tensor]:
    """``aten.convolution`` itself (what decompositions produce), 2-d, no bias."""
    s, p = [stride, stride], [padding, padding]
    return lambda x, w: aten.convolution(x, w, None, s, p, [1, 1], transposed, [0, 0], 1)


def _einsum(eq: str) -> Callable[..., torch.Tensor]:
    return lambda *xs: torch.einsum(eq, *xs)


# (name, fn, op, input shapes, hand count)
CASES = [
    # [3,4] @ [4,5]: M*N outputs of K=4 multiply-adds
    ("mm", torch.mm, aten.mm, [(3, 4), (4, 5)], 2 * 3 * 5 * 4),
    # batch 2 of [3,4] @ [4,5]
    ("bmm", torch.bmm, aten.bmm, [(2, 3, 4), (2, 4, 5)], 2 * 2 * 3 * 5 * 4),
    ("matmul", torch.matmul, aten.matmul, [(2, 3, 4), (4, 5)], 2 * 2 * 3 * 5 * 4),
    # bias [5] + [3,4] @ [4,5]: the bias adds are not counted (as for linear)
    ("addmm", torch.addmm, aten.addmm, [(5,), (3, 4), (4, 5)], 2 * 3 * 5 * 4),
    ("baddbmm", torch.baddbmm, aten.baddbmm, [(2, 3, 5), (2, 3, 4), (2, 4, 5)], 2 * 2 * 3 * 5 * 4),
    # x [2,3,4] through a weight [6,4]: 2*3 rows, 6 outputs each, K=4; bias not counted
    ("linear", F.linear, aten.linear, [(2, 3, 4), (6, 4), (6,)], 2 * (2 * 3 * 6) * 4),
    # Q K^T: b=2, h=3, q=4, k=6, d=5, every index once: 2 * b*h*q*k*d
    (
        "einsum_qk",
        _einsum("bhqd,bhkd->bhqk"),
        aten.einsum,
        [(2, 3, 4, 5), (2, 3, 6, 5)],
        2 * 2 * 3 * 4 * 6 * 5,
    ),
    (
        "einsum_ellipsis",
        _einsum("...qd,...kd->...qk"),
        aten.einsum,
        [(2, 3, 4, 5), (2, 3, 6, 5)],
        2 * 2 * 3 * 4 * 6 * 5,
    ),
    # a plain matmul written with 3 indices: i=3, j=4, k=5
    ("einsum_ij_jk", _einsum("ij,jk->ik"), aten.einsum, [(3, 4), (4, 5)], 2 * 3 * 4 * 5),
    # left to right: (ij,jk -> ik) = 2*2*3*4, then (ik,kl -> il) = 2*2*4*5
    (
        "einsum_three",
        _einsum("ij,jk,kl->il"),
        aten.einsum,
        [(2, 3), (3, 4), (4, 5)],
        2 * 2 * 3 * 4 + 2 * 2 * 4 * 5,
    ),
    # a permutation: no multiply-add
    ("einsum_permute", _einsum("nhwc->nchw"), aten.einsum, [(1, 2, 3, 4)], 0),
    # out [2,4,8,8] (padding 1 keeps 8x8); each output: C_in/groups * kh * kw = 3 * 3*3
    (
        "conv2d",
        lambda x, w: F.conv2d(x, w, padding=1),
        aten.conv2d,
        [(2, 3, 8, 8), (4, 3, 3, 3)],
        2 * 2 * 4 * (8 * 8) * 3 * (3 * 3),
    ),
    (
        "convolution",
        _conv(False, 1, 1),
        aten.convolution,
        [(2, 3, 8, 8), (4, 3, 3, 3)],
        2 * 2 * 4 * (8 * 8) * 3 * (3 * 3),
    ),
    # out [1,3,2,2,2] (kernel 2, stride 2 over 4^3), C_in=2, kernel 2^3
    (
        "conv3d",
        lambda x, w: F.conv3d(x, w, stride=2),
        aten.conv3d,
        [(1, 2, 4, 4, 4), (3, 2, 2, 2, 2)],
        2 * 1 * 3 * (2 * 2 * 2) * 2 * (2 * 2 * 2),
    ),
    # 2 groups: out [1,6,4,4], each output sees C_in/groups = 4/2 channels of a 3x3 window
    (
        "conv2d_grouped",
        lambda x, w: F.conv2d(x, w, groups=2),
        aten.conv2d,
        [(1, 4, 6, 6), (6, 2, 3, 3)],
        2 * 1 * 6 * (4 * 4) * (4 // 2) * (3 * 3),
    ),
    # transposed, weight [C_in=4, C_out=2, 2, 2], stride 2: out [1,2,6,6]; every input element
    # (1*4*3*3 of them) is scattered over C_out * kh * kw = 2 * 2*2 outputs
    (
        "conv_transpose2d",
        lambda x, w: F.conv_transpose2d(x, w, stride=2),
        aten.conv_transpose2d,
        [(1, 4, 3, 3), (4, 2, 2, 2)],
        2 * 1 * 4 * (3 * 3) * 2 * (2 * 2),
    ),
    (
        "convolution_transposed",
        _conv(True, 2, 0),
        aten.convolution,
        [(1, 4, 3, 3), (4, 2, 2, 2)],
        2 * 1 * 4 * (3 * 3) * 2 * (2 * 2),
    ),
    # Q K^T and P V: q [1,2,5,8] against 7 keys, 2 * 2 * (1*2*5*8) * 7
    (
        "sdpa",
        F.scaled_dot_product_attention,
        aten.scaled_dot_product_attention,
        [(1, 2, 5, 8), (1, 2, 7, 8), (1, 2, 7, 8)],
        4 * (1 * 2 * 5 * 8) * 7,
    ),
]


@pytest.mark.parametrize(
    ("fn", "packet", "shapes", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_flops_match_the_hand_count(fn, packet, shapes, expected) -> None:
    node = _node(fn, packet, *shapes)
    assert node_flops(node) == expected
    # what the planner counts as matmul work is exactly what has matmul FLOPs
    assert ops.is_matmul(node) == (packet in ops.MATMUL_LIKE and expected > 0)


def test_non_matmul_ops_have_no_flops() -> None:
    node = _node(lambda x: x.permute(1, 0) * 2, aten.mul, (3, 4))
    assert node_flops(node) == 0 and not ops.is_matmul(node) and not ops.is_attention(node)


@pytest.fixture(scope="module")
def pixart_graph() -> fx.GraphModule:
    model = build_model("pixart-sigma")
    return capture(model, (), example_inputs("pixart-sigma", model))


def test_planner_classification_agrees_with_flops(pixart_graph) -> None:
    """Every op the planner charges as matmul or attention work has FLOPs, and no other op has."""
    kinds: dict[str, set[str]] = {}
    for node in pixart_graph.graph.nodes:
        kind, flops = accounting._kind(node), node_flops(node)
        kinds.setdefault(kind, set()).add(str(ops.packet(node.target)))
        assert (kind in ("matmul", "attention")) == (flops > 0), (node.format_node(), kind, flops)
        assert (kind == "matmul") == ops.is_matmul(node)
    # the model has every family the check is about; its unpatchify einsum only permutes
    assert {"aten.linear", "aten.conv2d"} <= kinds["matmul"]
    assert "aten.scaled_dot_product_attention" in kinds["attention"]
    assert "aten.einsum" in kinds["pointwise"]
