"""Sharding rules, one family at a time, checked for structure and for numerics.

Every graph test captures a tiny function once, seeds chosen inputs with a placement, runs the
real pass pipeline for rank 0 and rank 1 of a ulysses=2 mesh, and then executes each rank's
rewritten graph in this process. Collectives cannot run without other processes: the real
``gather_shard`` runs with its all-gather fed from the other rank's piece of the global value, and
all-reduce, Ulysses attention and conv halos are answered from the global reference values of
the original graph. Every other node runs for real on local tensors and its value is compared
with this rank's piece of the reference value (``slice_shard`` of it by the node's placement).
Partial results are checked by summing the two ranks.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from graph_harness import (
    ALL_NO_SEED,
    FRONT_NO_SEED,
    HALO,
    USP,
    Fn,
    RankRun,
    calls,
    compile_for,
    one,
    piece,
    reference,
)

from xdit_compile.compiler.capture import capture
from xdit_compile.compiler.driver import PassContext, PassFn, run_passes
from xdit_compile.kernels.attention import attention_with_lse, backends, merge_partial
from xdit_compile.passes.sharding.engine import redistribute
from xdit_compile.passes.sharding.rules_shape import reshape_shard
from xdit_compile.placement import (
    Partial,
    Placement,
    Replicate,
    Shard,
    even_split,
    local_shape,
)
from xdit_compile.plan import Plan
from xdit_compile.runtime import reshard
from xdit_compile.runtime.mesh import MeshInfo
from xdit_compile.runtime.opargs import op_args
from xdit_compile.runtime.reshard import all_reduce_sum, gather_shard, slice_shard

aten = torch.ops.aten
R = Replicate()

# --------------------------------------------------------------------------- harness


class Case:
    """A captured function, its reference values, and compilation for each rank."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self.args = args
        self.gm = capture(Fn(fn).eval(), args, {})
        self.ref = reference(self.gm, *args)

    def compile(
        self,
        seeds: dict[int, Shard],
        rank: int = 0,
        plan: Plan | None = None,
        passes: list[tuple[str, PassFn]] | None = None,
    ) -> tuple[fx.GraphModule, PassContext]:
        passes = ALL_NO_SEED if passes is None else passes
        return compile_for(self.gm, rank, passes, plan, seeds=seeds)

    def check(self, seeds: dict[int, Shard], plan: Plan | None = None) -> list[Any]:
        """Compile and run every rank; returns [(gm, ctx)] per rank."""
        plan = plan or Plan(ulysses=2)
        done, partials = [], []
        for rank in range(plan.sp_degree):
            gm, ctx = self.compile(seeds, rank, plan)
            assert not [n for n in gm.graph.nodes if n.target is redistribute]
            run = RankRun(gm, self.ref, rank, self.gm)
            outs = run.run(*self.args, enable_io_processing=False)
            assert run.checked > 0
            for got, want in zip(outs, self.ref["output"], strict=True):
                torch.testing.assert_close(got, want)
            partials.append(run.partials)
            done.append((gm, ctx))
        for name in partials[0]:
            total = sum(p[name] for p in partials)
            torch.testing.assert_close(total, self.ref[name], msg=f"partial sums of {name}")
        return done


def slices_of(gm: fx.GraphModule, name: str) -> list[fx.Node]:
    return [n for n in calls(gm, slice_shard) if n.args[0].name == name]


def reasons(ctx: PassContext) -> list[str]:
    return [b.reason for b in ctx.breaks]


S1 = Shard(1, (4, 4))  # the middle dim of an [A, 8, C] tensor, cut in two
X = torch.randn(4, 8, 6, generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def _seed_rng() -> None:
    torch.manual_seed(0)


# --------------------------------------------------------------------------- placements


def test_shard_normalization_folds_inner_only_without_outer() -> None:
    assert Shard(1, (2, 2), outer=1, inner=4) == Shard(1, (8, 8))
    assert Shard(1, (2, 2), inner=4).inner == 1
    kept = Shard(0, (3, 1), outer=2, inner=4)
    assert (kept.split, kept.outer, kept.inner) == ((3, 1), 2, 4)
    assert kept != Shard(0, (12, 4), outer=2)
    assert kept.total == 2 * 4 * 4
    assert [kept.local_size(r) for r in (0, 1)] == [24, 8]
    assert [kept.offset(r) for r in (0, 1)] == [0, 3]
    assert str(kept) == "S(0[3, 1],outer=2,inner=4)"
    assert str(Shard(2, (4, 4))) == "S(2/2)"
    assert Shard(2, (4, 6)).scaled(2) == Shard(2, (2, 3))
    assert Shard(2, (4, 6)).divisible(2) and not Shard(2, (4, 6)).divisible(4)
    assert Shard(2, (4, 6)).with_dim(0) == Shard(0, (4, 6))
    assert local_shape((2, 10, 3), Shard(1, (6, 4)), 1) == [2, 4, 3]
    assert local_shape((2, 10, 3), R, 1) == [2, 10, 3]


@pytest.mark.parametrize(
    ("n", "parts", "unit", "want"),
    [
        (8, 2, 1, (4, 4)),
        (5, 2, 1, (3, 2)),
        (10, 3, 1, (4, 3, 3)),
        (5, 2, 2, (6, 4)),
        (7, 4, 3, (6, 6, 6, 3)),
    ],
)
def test_even_split(n: int, parts: int, unit: int, want: tuple[int, ...]) -> None:
    got = even_split(n, parts, unit)
    assert got == want
    assert sum(got) == n * unit and max(got) - min(got) <= unit
    # torch.tensor_split order: the first pieces get the extra unit
    sizes = [len(c) * unit for c in torch.arange(n).tensor_split(parts)]
    assert list(got) == sizes


@pytest.mark.parametrize(
    ("shape", "dim", "outer", "inner", "split"),
    [
        ((3, 10, 2), 1, 1, 1, (6, 4)),
        ((3, 24, 2), 1, 2, 2, (4, 2)),
        ((24, 5), 0, 4, 3, (1, 1)),
        ((2, 3, 30), 2, 3, 1, (5, 3, 2)),
    ],
)
def test_slice_shard_matches_manual_indexing(
    shape: tuple[int, ...], dim: int, outer: int, inner: int, split: tuple[int, ...]
) -> None:
    x = torch.randn(shape)
    n = sum(split)
    assert shape[dim] == outer * n * inner
    start = 0
    for length in split:
        idx = [
            o * n * inner + j * inner + i
            for o in range(outer)
            for j in range(start, start + length)
            for i in range(inner)
        ]
        want = x.index_select(dim, torch.tensor(idx))
        got = slice_shard(x, dim, outer, inner, start, length)
        assert torch.equal(got, want)
        start += length


def test_gather_shard_inverts_slice_shard_uneven(monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulated all-gather: each rank's padded send buffer is recorded, then concatenated."""
    x = torch.randn(3, 2 * 5 * 3, 4)
    sh = Shard(1, (3, 2), outer=2, inner=3)
    pieces = [piece(x, sh, r) for r in range(2)]
    sent: list[torch.Tensor] = []
    gathered: list[torch.Tensor] = []

    def fake_all_gather(t: torch.Tensor, n: int, group: str) -> torch.Tensor:
        assert n == 2 and group == "g"
        sent.append(t.clone())
        return torch.cat(gathered) if gathered else torch.cat([t, t])

    monkeypatch.setattr(reshard.fc, "wait_tensor", lambda t: t)
    monkeypatch.setattr(torch.ops._c10d_functional, "all_gather_into_tensor", fake_all_gather)
    for r in range(2):
        gather_shard(pieces[r], 1, 2, 3, [3, 2], "g")
    assert [s.shape[0] for s in sent] == [3, 3]  # padded to the largest piece
    gathered.extend(sent)
    for r in range(2):
        assert torch.equal(gather_shard(pieces[r], 1, 2, 3, [3, 2], "g"), x)


# --------------------------------------------------------------------------- pointwise


def test_pointwise_broadcast_slices_full_size_replicated_operand_only() -> None:
    case = Case(lambda x, y, z: x * y + z, X, torch.randn(8, 6), torch.randn(1, 6))
    for gm, ctx in case.check({0: S1}):
        assert ctx.breaks == []
        ys, zs = slices_of(gm, "xs_1"), slices_of(gm, "xs_2")
        assert len(ys) == 1 and zs == []
        assert ys[0].meta["xdit_placement"] == Shard(0, (4, 4))  # right-aligned dim of y
        assert one(gm, aten.mul.Tensor).meta["xdit_placement"] == S1
        assert one(gm, aten.add.Tensor).meta["xdit_placement"] == S1
        assert len(calls(gm, gather_shard)) == 1


def test_pointwise_inputs_sharded_differently_break() -> None:
    case = Case(lambda x, y: x + y, X, X * 2)
    for gm, ctx in case.check({0: S1, 1: Shard(1, (5, 3))}):
        assert len(ctx.breaks) == 1 and "sharded differently" in ctx.breaks[0].reason
        assert one(gm, aten.add.Tensor).meta["xdit_placement"] == R


# --------------------------------------------------------------------------- reshapes


@pytest.mark.parametrize(
    ("in_shape", "sh", "out_shape", "want"),
    [
        # merge the shard with the dim after it: rows of 4 fold into the split
        ((2, 8, 4), Shard(1, (4, 4)), (2, 32), Shard(1, (16, 16))),
        # merge with the dim before it: interleaved, outer > 1 keeps inner
        ((2, 8, 4), Shard(1, (4, 4)), (64,), Shard(0, (4, 4), outer=2, inner=4)),
        ((4, 6), Shard(1, (3, 3)), (8, 3), Shard(0, (1, 1), outer=4)),
        # split a token dim into rows of an inner factor
        ((1, 64, 3), Shard(1, (32, 32)), (1, 8, 8, 3), Shard(1, (4, 4))),
        ((1, 32, 4), Shard(1, (16, 16)), (1, 8, 16), Shard(1, (4, 4))),
        # uneven splits stay exact
        ((1, 12, 4), Shard(1, (8, 4)), (1, 48), Shard(1, (32, 16))),
        ((1, 12, 4), Shard(1, (8, 4)), (1, 3, 16), Shard(1, (2, 1))),
        # a piece that is not a whole number of output rows cannot be kept
        ((1, 12, 4), Shard(1, (6, 6)), (1, 3, 16), None),
        ((6, 4), Shard(0, (3, 3)), (3, 8), None),
        ((2, 6, 4), Shard(1, (3, 3)), (2, 3, 8), None),
        # back out of an interleaved layout
        ((64,), Shard(0, (4, 4), outer=2, inner=4), (2, 8, 4), Shard(1, (4, 4))),
        ((64,), Shard(0, (4, 4), outer=2, inner=4), (4, 16), Shard(0, (1, 1), outer=2)),
    ],
)
def test_reshape_shard(
    in_shape: tuple[int, ...], sh: Shard, out_shape: tuple[int, ...], want: Shard | None
) -> None:
    got = reshape_shard(in_shape, sh, out_shape)
    assert got == want
    if got is None:
        return
    x = torch.arange(math.prod(in_shape)).reshape(in_shape)
    for r in range(len(sh.split)):
        local = piece(x, sh, r)
        assert torch.equal(
            local.reshape(local_shape(out_shape, got, r)), piece(x.reshape(out_shape), got, r)
        )


def _factorizations(n: int, k: int) -> list[tuple[int, ...]]:
    if k == 1:
        return [(n,)]
    return [
        (d, *rest) for d in range(1, n + 1) if n % d == 0 for rest in _factorizations(n // d, k - 1)
    ]


@pytest.mark.parametrize("in_shape", [(2, 8, 4), (2, 3, 4, 2), (12, 4)])
def test_reshape_shard_sweep_local_reshape_equals_sliced_global(in_shape: tuple[int, ...]) -> None:
    """Whenever reshape_shard keeps a shard, reshaping each local piece gives exactly its piece."""
    n = math.prod(in_shape)
    x = torch.arange(n).reshape(in_shape)
    kept = 0
    for dim, size in enumerate(in_shape):
        for split in {even_split(size, 2), (size - 1, 1)}:
            sh = Shard(dim, split)
            for out in _factorizations(n, 2) + _factorizations(n, 3):
                new = reshape_shard(in_shape, sh, out)
                if new is None:
                    continue
                kept += 1
                for r in range(2):
                    local = piece(x, sh, r).reshape(local_shape(out, new, r))
                    assert torch.equal(local, piece(x.reshape(out), new, r)), (
                        in_shape,
                        sh,
                        out,
                        new,
                    )
    assert kept > 20


def test_view_rule_rewrites_sizes_to_local_and_keeps_shard() -> None:
    case = Case(lambda x: (x.reshape(4, 4, 12) * 2, x.flatten(0, 1) * 2), X)
    for gm, ctx in case.check({0: S1}):
        assert ctx.breaks == []
        views = calls(gm, aten.reshape.default)
        assert len(views) == 2 and calls(gm, aten.view.default) == []
        rows = next(v for v in views if v.meta["xdit_shape"] == (4, 4, 12))
        assert rows.args[1] == [4, 2, 12] and rows.meta["xdit_placement"] == Shard(1, (2, 2))
        merged = next(v for v in views if v.meta["xdit_shape"] == (32, 6))
        assert merged.args[1] == [16, 6]
        assert merged.meta["xdit_placement"] == Shard(0, (4, 4), outer=4)


def test_view_that_splits_a_piece_breaks() -> None:
    case = Case(lambda x: x.reshape(4, 6, 8) * 2, X)
    for rank in (0, 1):
        gm, ctx = case.compile({0: Shard(1, (5, 3))}, rank, passes=FRONT_NO_SEED)
        (brk,) = ctx.breaks
        # every view becomes a reshape (inputs moved by the passes may have other strides)
        assert brk.op == "aten.reshape.default" and "splits the sharded dim" in brk.reason
        view = one(gm, aten.reshape.default)
        assert view.meta["xdit_placement"] == R
        assert view.args[0].target is redistribute and view.args[0].meta["xdit_dst"] == R


def test_view_that_splits_a_piece_runs_after_the_gather() -> None:
    Case(lambda x: x.reshape(4, 6, 8) * 2, X).check({0: Shard(1, (5, 3))})


# --------------------------------------------------------------------------- permute / transpose


@pytest.mark.parametrize(
    ("fn", "want"),
    [
        (lambda x: x.permute(2, 0, 1) * 1, Shard(2, (4, 4))),
        (lambda x: x.permute(-1, -2, -3) * 1, Shard(1, (4, 4))),
        (lambda x: x.transpose(0, 1) * 1, Shard(0, (4, 4))),
        (lambda x: x.transpose(0, 2) * 1, S1),
        (lambda x: torch.movedim(x, 1, 2) * 1, Shard(2, (4, 4))),
        (lambda x: x.mT * 1, Shard(2, (4, 4))),
    ],
)
def test_permute_and_transpose_move_the_shard(fn: Callable[..., Any], want: Shard) -> None:
    case = Case(fn, X)
    for gm, ctx in case.check({0: S1}):
        assert ctx.breaks == []
        assert one(gm, aten.mul.Tensor).meta["xdit_placement"] == want


# --------------------------------------------------------------------------- linear / matmul


def test_linear_keeps_a_token_shard() -> None:
    case = Case(lambda x, w, b: F.linear(x, w, b), X, torch.randn(3, 6), torch.randn(3))
    for gm, ctx in case.check({0: S1}):
        assert ctx.breaks == []
        assert one(gm, aten.linear.default).meta["xdit_placement"] == S1
        assert len(calls(gm, gather_shard)) == 1  # the output only


def test_linear_contracting_the_shard_breaks() -> None:
    case = Case(lambda x, w: F.linear(x, w), X, torch.randn(3, 6))
    for gm, ctx in case.check({0: Shard(2, (3, 3))}):
        assert reasons(ctx) == ["linear contracts the sharded dim"]
        lin = one(gm, aten.linear.default)
        assert lin.meta["xdit_placement"] == R
        assert lin.args[0].target is gather_shard


@pytest.mark.parametrize(
    ("a", "b", "seeds", "want"),
    [
        ((4, 8, 6), (4, 6, 3), {0: S1}, S1),  # rows of a batched matmul
        ((8, 6), (4, 6, 3), {0: Shard(0, (4, 4))}, S1),  # 2-D rows broadcast over a batch
        ((5, 6), (4, 6, 8), {1: Shard(2, (4, 4))}, Shard(2, (4, 4))),  # columns of b
        ((4, 8, 6), (4, 6, 3), {0: Shard(0, (2, 2)), 1: Shard(0, (2, 2))}, Shard(0, (2, 2))),
    ],
)
def test_matmul_keeps_non_contracted_shards(
    a: tuple[int, ...], b: tuple[int, ...], seeds: dict[int, Shard], want: Shard
) -> None:
    case = Case(lambda a, b: a @ b, torch.randn(a), torch.randn(b))
    for gm, ctx in case.check(seeds):
        assert ctx.breaks == []
        assert one(gm, aten.matmul.default).meta["xdit_placement"] == want


def test_matmul_of_two_contracted_shards_is_partial_and_all_reduced() -> None:
    case = Case(
        lambda a, b, c: (a @ b) * 1 + c,
        torch.randn(2, 4, 8),
        torch.randn(2, 8, 3),
        torch.randn(4, 3),
    )
    for gm, ctx in case.check({0: Shard(2, (4, 4)), 1: Shard(1, (4, 4))}):
        assert ctx.breaks == []
        mm = one(gm, aten.matmul.default)
        assert mm.meta["xdit_placement"] == Partial()
        ar = one(gm, all_reduce_sum)
        assert ar.args[0] is mm
        assert [c.op for c in ctx.collectives] == ["all_reduce"]
        assert one(gm, aten.mul.Tensor).meta["xdit_placement"] == R


def test_matmul_contracting_one_sharded_operand_breaks() -> None:
    case = Case(lambda a, b: a @ b, X, torch.randn(6, 3))
    for _, ctx in case.check({0: Shard(2, (3, 3))}):
        assert reasons(ctx) == ["matmul contracts the sharded dim"]


def test_matmul_with_vector_keeps_rows() -> None:
    case = Case(lambda a, v: a @ v, X, torch.randn(6))
    gm, ctx = case.compile({0: S1}, passes=FRONT_NO_SEED)
    assert one(gm, aten.matmul.default).meta["xdit_placement"] == S1  # [4, 8] keeps dim 1
    case.check({0: S1})


def test_addmm_partial_counts_bias_once() -> None:
    case = Case(
        lambda a, b, c: torch.addmm(c, a, b), torch.randn(4, 8), torch.randn(8, 3), torch.randn(3)
    )
    case.check({0: Shard(1, (4, 4)), 1: Shard(0, (4, 4))})


# --------------------------------------------------------------------------- norms


@pytest.mark.parametrize(
    "fn",
    [
        lambda x, w, b: F.layer_norm(x, (6,), w, b),
        lambda x, w, b: F.rms_norm(x, (6,), w) + b,
    ],
)
def test_norm_over_unsharded_dims_keeps_shard(fn: Callable[..., Any]) -> None:
    case = Case(fn, X, torch.randn(6), torch.randn(6))
    for gm, ctx in case.check({0: S1}):
        assert ctx.breaks == []
        norm = next(n for n in gm.graph.nodes if "norm" in str(n.target))
        assert norm.meta["xdit_placement"] == S1
        assert all(n.args[0].name == "xs_0" for n in calls(gm, slice_shard))


def test_norm_over_the_sharded_dim_breaks() -> None:
    case = Case(lambda x: F.layer_norm(x, (8, 6)), X)
    for gm, ctx in case.check({0: S1}):
        assert reasons(ctx) == ["normalization over the sharded dim"]
        assert one(gm, aten.layer_norm.default).meta["xdit_placement"] == R


# --------------------------------------------------------------------------- convolution


IMG = torch.randn(1, 3, 8, 6, generator=torch.Generator().manual_seed(1))


def test_conv_patch_embed_divides_the_split_by_the_stride() -> None:
    case = Case(lambda x, w: F.conv2d(x, w, stride=2), IMG, torch.randn(5, 3, 2, 2))
    for rank, (gm, ctx) in enumerate(case.check({0: Shard(2, (4, 4))})):
        assert ctx.breaks == []
        conv = one(gm, aten.conv2d.default)
        assert conv.meta["xdit_placement"] == Shard(2, (2, 2))
        assert "xdit_halo" not in conv.meta and calls(gm, HALO) == []
        assert one(gm, slice_shard).args[1:] == (2, 1, 1, 4 * rank, 4, 0, 0)  # rank's rows


def test_conv_patch_embed_with_split_not_divisible_by_stride_breaks() -> None:
    case = Case(lambda x, w: F.conv2d(x, w, stride=2), IMG, torch.randn(5, 3, 2, 2))
    for _, ctx in case.check({0: Shard(2, (5, 3))}):
        assert reasons(ctx) == ["conv kernel 2 stride 2 padding 0 on the sharded dim"]


@pytest.mark.parametrize(("split", "pad"), [((4, 4), 1), ((5, 3), 1)])
def test_same_conv_keeps_shard_with_a_halo(split: tuple[int, int], pad: int) -> None:
    case = Case(lambda x, w: F.conv2d(x, w, padding=pad), IMG, torch.randn(5, 3, 3, 3))
    gm, _ = case.compile({0: Shard(2, split)}, passes=FRONT_NO_SEED)
    conv = one(gm, aten.conv2d.default)
    assert conv.meta["xdit_halo"] == (2, 1, 1, 0, -1, Shard(2, split))  # dim, top, bottom, no pad rows
    assert conv.meta["xdit_placement"] == Shard(2, split)
    for gm, ctx in case.check({0: Shard(2, split)}):
        assert ctx.breaks == []
        conv = one(gm, aten.conv2d.default)
        halo = one(gm, HALO)
        assert conv.args[0] is halo and halo.args[1:4] == (2, 1, 1)
        assert list(conv.args[4]) == [0, 1]  # H padding comes from the neighbours now
        assert "xdit_halo" not in conv.meta
        site = next(c for c in ctx.collectives if c.op == "send_recv")
        assert site.what == "conv halo" and site.calls == 2
        assert site.bytes_per_forward == 2 * 3 * 6 * 1 * 4  # pad row of C*W floats, both ways


def test_conv1d_same_conv_halo() -> None:
    case = Case(lambda x, w: F.conv1d(x, w, padding=2), torch.randn(2, 3, 10), torch.randn(4, 3, 5))
    for gm, ctx in case.check({0: Shard(2, (5, 5))}):
        assert ctx.breaks == []
        assert one(gm, HALO).args[1:4] == (2, 2, 2)


@pytest.mark.parametrize(("k", "stride", "pad", "split", "halo", "dil"), [
    (3, 2, 1, (4, 4), (1, 0), 1),    # a symmetric stride-2 downsampling: one row from above
    (3, 2, 1, (6, 2), (1, 0), 1),    # uneven (even pieces)
    (4, 2, 1, (4, 4), (1, 1), 1),    # kernel 4: one row each way
    (1, 2, 0, (4, 4), (0, 0), 1),    # every other row: no halo, just the stride
    (5, 1, 2, (3, 5), (2, 2), 1),    # "same" kernel 5
    (3, 1, 2, (4, 4), (2, 2), 2),    # dilated "same": the kernel spans 5 rows
])
def test_strided_conv_keeps_the_row_shard_with_a_halo(k, stride, pad, split, halo, dil) -> None:
    """Output rows 1/stride of the input's, pieces multiples of the stride: each rank computes
    its own output rows from its rows plus `padding` rows of the previous rank and
    `kernel span - stride - padding` of the next."""
    case = Case(lambda x, w: F.conv2d(x, w, stride=stride, padding=pad, dilation=dil), IMG, torch.randn(4, 3, k, k))
    for gm, ctx in case.check({0: Shard(2, split)}):
        assert ctx.breaks == []
        conv = one(gm, aten.conv2d.default)
        assert conv.meta["xdit_placement"] == Shard(2, tuple(p // stride for p in split))
        if halo == (0, 0):
            assert calls(gm, HALO) == [] and ctx.collectives[:-1] == []  # only the output's gather
        else:
            assert one(gm, HALO).args[1:4] == (2, *halo)
            site = next(c for c in ctx.collectives if c.what == "conv halo")
            assert site.calls == sum(1 for h in halo if h) and site.bytes_per_forward == 3 * 6 * sum(halo) * 4


def test_conv_after_a_zero_pad_of_the_rows_takes_the_pad_as_halo_padding() -> None:
    """A VAE encoder's downsampling: F.pad(x, (0, 1, 0, 1)) then a stride-2 kernel-3 conv with
    no padding. The pad's zero row after the last row is the conv's bottom padding: each rank
    cuts it off again, takes one row from the next rank (zeros on the last), and no rows are
    gathered. The W padding stays in the pad."""
    case = Case(lambda x, w: F.conv2d(F.pad(x, (0, 1, 0, 1)), w, stride=2), IMG, torch.randn(4, 3, 3, 3))
    for gm, ctx in case.check({0: Shard(2, (4, 4))}):
        assert ctx.breaks == []
        halo = one(gm, HALO)
        assert halo.args[1:4] == (2, 0, 1) and halo.args[5:] == (0, 4)  # no head rows; this rank's 4 rows
        assert one(gm, aten.conv2d.default).meta["xdit_placement"] == Shard(2, (2, 2))


def test_conv_after_a_nonzero_pad_of_the_rows_breaks() -> None:
    case = Case(lambda x, w: F.conv2d(F.pad(x, (0, 1, 0, 1), value=1.0), w, stride=2), IMG,
                torch.randn(4, 3, 3, 3))
    for _, ctx in case.check({0: Shard(2, (4, 4))}):
        assert reasons(ctx) == ["conv on a merged or joint sharded dim"]


def test_strided_conv_with_odd_pieces_breaks() -> None:
    case = Case(lambda x, w: F.conv2d(x, w, stride=2, padding=1), IMG, torch.randn(4, 3, 3, 3))
    for _, ctx in case.check({0: Shard(2, (5, 3))}):
        assert reasons(ctx) == ["conv kernel 3 stride 2 padding 1 on the sharded dim"]


def test_conv_shard_thinner_than_the_halo_breaks() -> None:
    case = Case(
        lambda x, w: F.conv2d(x, w, padding=2), torch.randn(1, 3, 5, 6), torch.randn(2, 3, 5, 5)
    )
    for _, ctx in case.check({0: Shard(2, (4, 1))}):
        assert reasons(ctx) == ["shard thinner than the conv halo"]


def test_conv_over_sharded_channels_breaks() -> None:
    case = Case(lambda x, w: F.conv2d(x, w), torch.randn(1, 4, 8, 6), torch.randn(5, 4, 1, 1))
    for _, ctx in case.check({0: Shard(1, (2, 2))}):
        assert reasons(ctx) == ["conv contracts the sharded channel dim"]


# --------------------------------------------------------------------------- VAE decoder ops


@pytest.mark.parametrize("split", [(4, 4), (5, 3), (8, 0)])
def test_group_norm_over_sharded_rows_combines_statistics(split: tuple[int, int]) -> None:
    """A VAE's GroupNorm over rows cut across the ranks: each rank sends only its per-group
    statistics (count, mean, squared deviations) and normalizes its own rows; every rank's
    output equals its rows of the serial group_norm (an empty piece too)."""
    x = torch.randn(2, 6, 8, 5) * 3 + 1.5  # an offset mean: a sum-of-squares shortcut would drift
    case = Case(lambda x, w, b: F.group_norm(x, 3, w, b, eps=1e-6), x, torch.randn(6), torch.randn(6))
    for gm, ctx in case.check({0: Shard(2, split)}):
        assert ctx.breaks == []
        assert calls(gm, aten.group_norm.default) == []
        gn = one(gm, reshard.group_norm_sharded)
        assert gn.args[1] == 3 and gn.args[4] == 1e-6 and gn.meta["xdit_placement"] == Shard(2, split)
        site = next(c for c in ctx.collectives if c.what == "group_norm statistics")
        assert (site.op, site.bytes_per_forward) == ("all_gather", 3 * 2 * 3 * 4)  # B*G floats x3, 1 peer


def test_group_norm_over_sharded_channels_breaks() -> None:
    case = Case(lambda x: F.group_norm(x, 2), torch.randn(1, 4, 6, 6))
    for _, ctx in case.check({0: Shard(1, (2, 2))}):
        assert reasons(ctx) == ["group_norm normalizes over the sharded channel dim"]


@pytest.mark.parametrize("how", ["scale", "size", "exact"])
def test_nearest_upsampling_keeps_the_row_shard(how: str) -> None:
    """Output row j copies input row j // 2: each rank upsamples its own rows, and a global
    output size in the call becomes this rank's."""
    fns = {"scale": lambda x: F.interpolate(x, scale_factor=2.0, mode="nearest"),
           "size": lambda x: F.interpolate(x, size=(14, 12), mode="nearest"),
           "exact": lambda x: F.interpolate(x, scale_factor=2.0, mode="nearest-exact")}
    case = Case(fns[how], torch.randn(1, 3, 7, 6))
    for gm, ctx in case.check({0: Shard(2, (4, 3))}):
        assert ctx.breaks == [] and [c.op for c in ctx.collectives] == ["all_gather"]  # the output only
        up = next(n for n in gm.graph.nodes if "upsample" in str(n.target))
        assert up.meta["xdit_placement"] == Shard(2, (8, 6))
        if how == "size":
            assert up.args[1] == [8 if ctx.mesh.sp_rank == 0 else 6, 12]


def test_nearest_upsampling_by_a_scale_other_than_the_size_ratio_breaks() -> None:
    """Output 4 rows from 2 with scale 2.4: the kernel reads row floor(j / 2.4), not j // 2."""
    case = Case(lambda x: torch.ops.aten.upsample_nearest2d.default(x, [4, 12], 2.4, 2.0), torch.randn(1, 3, 2, 6))
    for _, ctx in case.check({0: Shard(2, (1, 1))}):
        assert reasons(ctx) == ["nearest upsampling with a scale that differs from its size ratio"]


def test_nearest_resize_by_a_fraction_breaks() -> None:
    case = Case(lambda x: F.interpolate(x, size=(10, 6), mode="nearest"), torch.randn(1, 3, 8, 6))
    for _, ctx in case.check({0: Shard(2, (4, 4))}):
        assert reasons(ctx) == ["nearest resize 8 -> 10 rows is not an integer upsampling"]


def test_aten_convolution_same_padding_compiles() -> None:
    case = Case(
        lambda x, w: torch.convolution(x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1),
        IMG,
        torch.randn(5, 3, 3, 3),
    )
    case.check({0: Shard(2, (4, 4))})


# --------------------------------------------------------------------------- cat / stack


def test_cat_along_an_unsharded_dim_slices_the_replicated_input() -> None:
    case = Case(lambda x, y: torch.cat([x, y], -1), X, torch.randn(4, 8, 3))
    for gm, ctx in case.check({0: S1}):
        assert ctx.breaks == []
        assert [n.meta["xdit_placement"] for n in slices_of(gm, "xs_1")] == [S1]
        assert one(gm, aten.cat.default).meta["xdit_placement"] == S1


def test_cat_along_the_sharded_dim_makes_a_joint_shard() -> None:
    # Replicated rows (text) joined after sharded rows (image): every rank holds all text rows.
    case = Case(lambda x, y: torch.cat([x, y], 1) * 2, X, torch.randn(4, 3, 6))
    for gm, ctx in case.check({0: S1}):
        assert ctx.breaks == []
        assert one(gm, aten.cat.default).meta["xdit_placement"] == Shard(1, (4, 4), tail=3)


def test_cat_of_two_sharded_pieces_along_the_sharded_dim_breaks() -> None:
    case = Case(lambda x: torch.cat([x, x * 2], 1), X)
    for gm, ctx in case.check({0: S1}):
        assert reasons(ctx) == ["concatenation of several sharded pieces along the sharded dim"]
        assert one(gm, aten.cat.default).meta["xdit_placement"] == R


TXT = torch.randn(4, 3, 6, generator=torch.Generator().manual_seed(5))
TABLE = torch.randn(11, 6, generator=torch.Generator().manual_seed(6))  # e.g. RoPE rows


def _joint_then(fn: Callable[..., Any]) -> Case:
    """Text rows joined before the sharded image rows, then ``fn`` of the joint tensor."""
    return Case(lambda t, x, tab: fn(torch.cat([t, x], 1), tab), TXT, X, TABLE)


@pytest.mark.parametrize(
    "fn,want",
    [
        (lambda j, tab: j * tab, Shard(1, (4, 4), head=3)),  # table sliced: head rows + body piece
        (lambda j, tab: torch.nn.functional.layer_norm(j, (6,)), Shard(1, (4, 4), head=3)),
        (lambda j, tab: j.reshape(4, 11, 2, 3).transpose(1, 2), Shard(2, (4, 4), head=3)),
        (lambda j, tab: j[:, :3] + 1, R),  # the text rows alone are replicated
        (lambda j, tab: j[:, 3:] + 1, Shard(1, (4, 4))),  # the image rows alone are the body
        (lambda j, tab: j[:, -8:] + 1, Shard(1, (4, 4))),
    ],
)
def test_joint_shard_through_ops(fn: Callable[..., Any], want: Placement) -> None:
    case = _joint_then(fn)
    for gm, ctx in case.check({1: S1}):
        assert ctx.breaks == []
        out = [n for n in gm.graph.nodes if n.op == "output"][0].args[0][0]
        src = out.args[0] if out.target is gather_shard else out
        assert src.meta["xdit_placement"] == want


def test_joint_split_into_text_and_image() -> None:
    case = _joint_then(lambda j, tab: tuple(t * 2 for t in j.split([3, 8], dim=1)))
    for gm, ctx in case.check({1: S1}):
        assert ctx.breaks == []
        split = one(gm, aten.split_with_sizes.default)
        assert split.meta["xdit_placement"] == (R, Shard(1, (4, 4)))
        assert split.args[1] == [3, 4]  # local sizes


def test_joint_slice_through_the_body_keeps_an_uneven_cut() -> None:
    """``j[:, 2:5]`` of [3 text rows | 8 image rows cut 4 + 4]: the last text row, replicated,
    then rank 0's first two image rows and none of rank 1's (checked against the global value)."""
    case = _joint_then(lambda j, tab: j[:, 2:5] + 1)
    for gm, ctx in case.check({1: S1}):
        assert ctx.breaks == []
        sl = one(gm, aten.slice.Tensor)
        assert sl.meta["xdit_placement"] == Shard(1, (2, 0), head=1)


def test_joint_reshape_merging_the_dim_breaks() -> None:
    case = _joint_then(lambda j, tab: j.reshape(4, 66) + 1)
    for _, ctx in case.check({1: S1}):
        assert len(ctx.breaks) == 1 and "reshape" in ctx.breaks[0].reason


def test_joint_self_attention_is_usp_with_head() -> None:
    def attn(j: torch.Tensor, tab: torch.Tensor) -> torch.Tensor:
        q = j.reshape(4, 11, 2, 3).transpose(1, 2)
        return F.scaled_dot_product_attention(q, q * 2, q + 1)

    case = _joint_then(attn)
    for gm, ctx in case.check({1: S1}):
        assert ctx.breaks == []
        (usp,) = calls(gm, USP)
        # split, head, tail; the output's 3 text rows come back cut over the ranks (2 + 1)
        a = op_args(usp)
        assert (a["split"], a["head"], a["tail"], a["text_rank"]) == ([4, 4], 3, 0, ctx.mesh.sp_rank)
        assert usp.meta["xdit_placement"] == Shard(2, (4, 4), head=3, text=True)
        sites = [c for c in ctx.collectives if c.what == "usp_attention"]
        assert {c.op for c in sites} == {"all_to_all"}  # text output pieces ride with the body


def test_joint_attention_text_rows_stay_whole_when_disabled() -> None:
    def attn(j: torch.Tensor, tab: torch.Tensor) -> torch.Tensor:
        q = j.reshape(4, 11, 2, 3).transpose(1, 2)
        return F.scaled_dot_product_attention(q, q * 2, q + 1)

    case = _joint_then(attn)
    for gm, ctx in case.check({1: S1}, plan=Plan(ulysses=2, disable_passes=("shard_text_rows",))):
        (usp,) = calls(gm, USP)
        a = op_args(usp)
        assert (a["split"], a["head"], a["tail"], a["text_rank"], a["kv_split"]) == ([4, 4], 3, 0, -1, None)
        assert usp.meta["xdit_placement"] == Shard(2, (4, 4), head=3)
        sites = [c for c in ctx.collectives if c.what == "usp_attention"]
        assert {c.op for c in sites} == {"all_to_all", "all_gather"}  # text outputs over heads


@pytest.mark.parametrize(("dim", "want"), [(1, Shard(2, (4, 4))), (-1, S1), (0, Shard(2, (4, 4)))])
def test_stack_shifts_the_shard(dim: int, want: Shard) -> None:
    case = Case(lambda x, y: torch.stack([x, y], dim), X, X * 2)
    for gm, ctx in case.check({0: S1}):
        assert ctx.breaks == []
        assert one(gm, aten.stack.default).meta["xdit_placement"] == want
        assert len(slices_of(gm, "xs_1")) == 1


# --------------------------------------------------------------------------- slice / select / split


def test_full_range_slice_of_the_sharded_dim_becomes_local() -> None:
    case = Case(lambda x: aten.slice.Tensor(x, 1, 0, 8) * 2, X)
    for gm, ctx in case.check({0: S1}):
        assert ctx.breaks == []
        sl = one(gm, aten.slice.Tensor)
        assert sl.args[1:] == (1, 0, 4, 1) and sl.meta["xdit_placement"] == S1


def test_partial_slice_of_the_sharded_dim_keeps_each_ranks_rows() -> None:
    """``x[:, 2:6]`` of rows cut 4 + 4: rows 2-3 of rank 0, 4-5 of rank 1 (2 + 2)."""
    case = Case(lambda x: x[:, 2:6] * 2, X)
    for gm, ctx in case.check({0: S1}):
        assert ctx.breaks == []
        assert one(gm, aten.slice.Tensor).meta["xdit_placement"] == Shard(1, (2, 2))


def test_slice_of_another_dim_keeps_shard() -> None:
    case = Case(lambda x: x[..., 1:4] * 2, X)
    for gm, ctx in case.check({0: S1}):
        assert ctx.breaks == []
        assert one(gm, aten.slice.Tensor).args[1:] == (2, 1, 4)


@pytest.mark.parametrize(
    ("fn", "want"), [(lambda x: x[1] * 2, Shard(0, (4, 4))), (lambda x: x[..., 1] * 2, S1)]
)
def test_select_drops_a_dim(fn: Callable[..., Any], want: Shard) -> None:
    for gm, ctx in Case(fn, X).check({0: S1}):
        assert ctx.breaks == []
        assert one(gm, aten.select.int).meta["xdit_placement"] == want


@pytest.mark.parametrize(
    ("fn", "target", "want"),
    [
        (lambda x: x.chunk(2, -1)[1] * 2, aten.split.Tensor, (S1, S1)),
        (lambda x: x.split([2, 4], 2)[0] * 2, aten.split_with_sizes.default, (S1, S1)),
        (lambda x: x.unbind(0)[1] * 2, aten.unbind.int, (Shard(0, (4, 4)),) * 4),
    ],
)
def test_split_and_chunk_keep_shard(
    fn: Callable[..., Any], target: Any, want: tuple[Shard, ...]
) -> None:
    for gm, ctx in Case(fn, X).check({0: S1}):
        assert ctx.breaks == []
        assert one(gm, target).meta["xdit_placement"] == want
        assert one(gm, aten.mul.Tensor).meta["xdit_placement"] == want[0]


def test_split_along_the_sharded_dim_keeps_uneven_cuts() -> None:
    """``x.split([3, 5], 1)`` of rows cut 4 + 4: pieces cut 3 + 0 and 1 + 4."""
    for gm, ctx in Case(lambda x: x.split([3, 5], 1)[1] * 2, X).check({0: S1}):
        assert ctx.breaks == []
        assert one(gm, aten.mul.Tensor).meta["xdit_placement"] == Shard(1, (1, 4))


# --------------------------------------------------------------------------- reductions


@pytest.mark.parametrize(
    ("fn", "want"),
    [
        (lambda x: x.sum(-1), S1),
        (lambda x: x.amax(0), Shard(0, (4, 4))),
        (lambda x: x.sum(0, keepdim=True), S1),
        (lambda x: x.mean([0, 2]), Shard(0, (4, 4))),
        (lambda x: torch.logsumexp(x, 0), Shard(0, (4, 4))),
        (lambda x: x.var(-1, keepdim=True), S1),
        (lambda x: x.max(0)[0] + x.max(0)[1], Shard(0, (4, 4))),
    ],
)
def test_reduction_over_other_dims_keeps_shard(fn: Callable[..., Any], want: Shard) -> None:
    for gm, ctx in Case(fn, X).check({0: S1}):
        assert ctx.breaks == []
        out = gm.graph.find_nodes(op="output")[0].args[0][0]
        assert out.target is gather_shard and out.args[0].meta["xdit_placement"] == want


@pytest.mark.parametrize(
    ("fn", "reason"),
    [
        (lambda x: x.mean(1), "reduction over the sharded dim"),
        (lambda x: x.amax([-2, -1]), "reduction over the sharded dim"),
        (lambda x: x.sum(), "reduction over all dims"),
    ],
)
def test_reduction_over_the_sharded_dim_breaks(fn: Callable[..., Any], reason: str) -> None:
    for _, ctx in Case(fn, X).check({0: S1}):
        assert reasons(ctx) == [reason]


def test_sum_over_the_sharded_dim_is_a_partial_sum() -> None:
    """Each rank sums its own rows; the all-reduce that completes the sum comes before the
    first consumer (here the output)."""
    for gm, ctx in Case(lambda x: x.sum(1) * 2, X).check({0: S1}):
        assert ctx.breaks == []
        assert one(gm, aten.sum.dim_IntList).meta["xdit_placement"] == Partial()


def test_var_with_unbiased_and_keepdim() -> None:
    case = Case(lambda x: x.var(0, unbiased=False, keepdim=True), X)
    gm, _ = case.compile({0: S1}, passes=FRONT_NO_SEED)
    assert one(gm, aten.var.dim).meta["xdit_placement"] == S1
    case.check({0: S1})


def test_elementwise_max_of_two_tensors() -> None:
    case = Case(lambda x, y: torch.max(x, y), X, torch.randn(8, 6))
    for _, ctx in case.check({0: S1}):
        assert ctx.breaks == []


# --------------------------------------------------------------------------- softmax


def test_softmax_over_another_dim_keeps_shard() -> None:
    for gm, ctx in Case(lambda x: x.softmax(-1) + x.cumsum(0), X).check({0: S1}):
        assert ctx.breaks == []
        assert one(gm, aten.softmax.int).meta["xdit_placement"] == S1
        assert one(gm, aten.cumsum.default).meta["xdit_placement"] == S1


def test_softmax_over_the_sharded_dim_breaks() -> None:
    for gm, ctx in Case(lambda x: x.softmax(1), X).check({0: S1}):
        assert reasons(ctx) == ["normalization along the sharded dim"]
        assert one(gm, aten.softmax.int).meta["xdit_placement"] == R


# --------------------------------------------------------------------------- attention

Q = torch.randn(1, 4, 8, 4, generator=torch.Generator().manual_seed(2))
SEQ = Shard(2, (4, 4))


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


def _sdpa_mask(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m)


SDPA = aten.scaled_dot_product_attention.default


def test_sdpa_sequence_sharded_qkv_is_usp() -> None:
    case = Case(_sdpa, Q, Q + 1, Q - 1)
    seeds = {0: SEQ, 1: SEQ, 2: SEQ}
    gm, ctx = case.compile(seeds, passes=FRONT_NO_SEED)
    node = one(gm, SDPA)
    assert node.meta["xdit_attention"] == "usp" and node.meta["xdit_split"] == (4, 4)
    for gm, ctx in case.check(seeds):
        assert ctx.breaks == [] and calls(gm, SDPA) == []
        assert one(gm, USP).meta["xdit_placement"] == SEQ


def test_sdpa_usp_slices_replicated_v_and_keeps_replicated_mask() -> None:
    case = Case(_sdpa_mask, Q, Q + 1, Q - 1, torch.randn(8, 8))
    for gm, ctx in case.check({0: SEQ, 1: SEQ}):
        assert ctx.breaks == []
        usp = one(gm, USP)
        assert usp.args[2].target is slice_shard  # v brought to the sequence shard
        assert usp.args[3].name == "xs_3"  # the mask stays whole: the op cuts it per block


def test_sdpa_with_replicated_kv_is_local_and_slices_the_mask_rows() -> None:
    kv = torch.randn(1, 4, 5, 4)
    case = Case(_sdpa_mask, Q, kv, kv * 2, torch.randn(1, 1, 8, 5))
    for gm, ctx in case.check({0: SEQ}):
        assert ctx.breaks == [] and calls(gm, USP) == []
        node = one(gm, SDPA)
        assert node.meta["xdit_attention"] == "local" and node.meta["xdit_placement"] == SEQ
        assert [s.meta["xdit_placement"] for s in slices_of(gm, "xs_3")] == [SEQ]
        assert slices_of(gm, "xs_1") == [] and slices_of(gm, "xs_2") == []


def test_sdpa_with_key_padding_mask_does_not_slice_it() -> None:
    kv = torch.randn(1, 4, 5, 4)
    case = Case(_sdpa_mask, Q, kv, kv * 2, torch.rand(1, 1, 1, 5) > 0.3)
    for gm, _ in case.check({0: SEQ}):
        assert slices_of(gm, "xs_3") == []


@pytest.mark.parametrize("all_sharded", [False, True])
def test_sdpa_sharded_on_a_batch_dim_is_local(all_sharded: bool) -> None:
    heads = Shard(1, (2, 2))
    seeds = {0: heads, 1: heads, 2: heads} if all_sharded else {0: heads}
    case = Case(_sdpa, Q, Q + 1, Q - 1)
    for gm, ctx in case.check(seeds):
        assert ctx.breaks == [] and calls(gm, USP) == []
        node = one(gm, SDPA)
        assert node.meta["xdit_attention"] == "local" and node.meta["xdit_placement"] == heads
        assert len(calls(gm, slice_shard)) == 3


def test_sdpa_batch_shard_with_mask_sharded_like_q() -> None:
    heads = Shard(1, (2, 2))
    case = Case(_sdpa_mask, Q, Q + 1, Q - 1, torch.randn(1, 4, 8, 8))
    case.check({0: heads, 3: heads})


def test_sdpa_takes_any_head_count() -> None:
    """3 heads at ulysses=2: uneven head groups (no refusal); 1 head at ulysses=2: the Ulysses
    degree drops to 1 and the axis runs as Ring (``xdit_ulysses``)."""
    for heads, u_eff in ((3, None), (1, 1)):
        q = torch.randn(1, heads, 8, 4)
        gm, _ = Case(_sdpa, q, q, q).compile({0: SEQ, 1: SEQ, 2: SEQ}, passes=FRONT_NO_SEED)
        node = one(gm, SDPA)
        assert node.meta["xdit_attention"] == "usp" and node.meta.get("xdit_ulysses") == u_eff


def test_sdpa_causal_or_disabled_rewrite_breaks() -> None:
    case = Case(
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), Q, Q + 1, Q - 1
    )
    for _, ctx in case.check({0: SEQ, 1: SEQ, 2: SEQ}):
        assert reasons(ctx) == ["causal sequence-parallel attention is not supported"]
    case = Case(_sdpa, Q, Q + 1, Q - 1)
    plan = Plan(ulysses=2, disable_passes=("rewrite_attention",))
    for gm, ctx in case.check({0: SEQ, 1: SEQ, 2: SEQ}, plan=plan):
        assert reasons(ctx) == ["rewrite_attention is disabled"]
        assert one(gm, SDPA).meta["xdit_placement"] == R and calls(gm, USP) == []


# --------------------------------------------------------------------------- unknown ops


class _Flip(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * 2
        return torch.flip(y, [2]) + 1


def test_unknown_op_breaks_with_its_source_line() -> None:
    gm0 = capture(_Flip(), (X,), {})
    for rank in (0, 1):
        gm = fx.GraphModule(gm0, copy.deepcopy(gm0.graph))
        next(iter(gm.graph.find_nodes(op="placeholder"))).meta["xdit_seed"] = S1
        ctx = PassContext(plan=Plan(ulysses=2), mesh=MeshInfo.of(Plan(ulysses=2), rank, key="k"))
        gm = run_passes(gm, ALL_NO_SEED, ctx)
        (brk,) = ctx.breaks
        assert (brk.node, brk.op, brk.reason) == (
            "flip",
            "aten.flip.default",
            "no sharding rule for this op",
        )
        assert (
            "test_rules.py" in brk.source
            and "in forward: return torch.flip(y, [2]) + 1" in brk.source
        )
        flip = one(gm, aten.flip.default)
        assert flip.meta["xdit_placement"] == R and flip.args[0].target is gather_shard
        assert one(gm, aten.mul.Tensor).meta["xdit_placement"] == S1
        assert [c.what for c in ctx.collectives] == ["sharding break at flip"]
        got = RankRun(gm, reference(gm0, X), rank).run(X, enable_io_processing=False)[0]
        torch.testing.assert_close(got, _Flip()(X))


# --------------------------------------------------------------------------- attention kernels


def _scores(
    q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    s = q @ k.transpose(-1, -2) * scale
    if mask is None:
        return s
    if mask.dtype == torch.bool:
        return s.masked_fill(~mask, float("-inf"))
    return s + mask


MASKS: Sequence[Callable[[], torch.Tensor | None]] = [
    lambda: None,
    lambda: torch.randn(7, 10),
    lambda: torch.rand(2, 1, 7, 10) > 0.2,
    lambda: torch.rand(1, 1, 1, 10) > 0.3,
]


@pytest.mark.parametrize("backend", ["math", "cpu_flash"])
@pytest.mark.parametrize("make_mask", MASKS)
def test_attention_backends_match_sdpa(backend: str, make_mask: Callable[[], Any]) -> None:
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 3, 7, 8), torch.randn(2, 3, 10, 8), torch.randn(2, 3, 10, 8)
    mask = make_mask()
    out, lse = attention_with_lse(q, k, v, mask, 0.3, backend=backend)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert lse.dtype == torch.float32 and lse.shape == (2, 3, 7)
    torch.testing.assert_close(
        lse, torch.logsumexp(_scores(q, k, mask, 0.3), -1), atol=1e-5, rtol=1e-5
    )


def test_attention_backend_priority() -> None:
    names = backends()
    assert names[-1] == "math" and names.index("cpu_flash") < names.index("math")


@pytest.mark.parametrize("backend", [None, "math", "cpu_flash"])
def test_merge_partial_of_two_key_blocks_is_full_attention(backend: str | None) -> None:
    torch.manual_seed(2)
    q, k, v = torch.randn(2, 3, 7, 8), torch.randn(2, 3, 10, 8), torch.randn(2, 3, 10, 8)
    mask = torch.randn(7, 10)
    out = lse = None
    for lo, hi in ((0, 4), (4, 10)):
        blk = attention_with_lse(
            q, k[..., lo:hi, :], v[..., lo:hi, :], mask[:, lo:hi], 0.3, backend=backend
        )
        out, lse = merge_partial(out, lse, *blk)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    assert (out - ref).abs().max() < 1e-5
    assert (lse - torch.logsumexp(_scores(q, k, mask, 0.3), -1)).abs().max() < 1e-5


@pytest.mark.parametrize(
    "backend",
    [
        "math",
        pytest.param("cpu_flash"),
    ],
)
def test_merge_partial_with_a_fully_masked_block(backend: str) -> None:
    torch.manual_seed(3)
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8)
    mask = torch.ones(5, 8, dtype=torch.bool)
    mask[:, :3] = False  # the first key block is masked out for every query
    out = lse = None
    for lo, hi in ((0, 3), (3, 8)):
        blk = attention_with_lse(
            q, k[..., lo:hi, :], v[..., lo:hi, :], mask[:, lo:hi], 0.5, backend=backend
        )
        out, lse = merge_partial(out, lse, *blk)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.5)
    assert not out.isnan().any()
    assert (out - ref).abs().max() < 1e-5


def test_attention_with_lse_value_dim_differs() -> None:
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 4)
    out, _ = attention_with_lse(q, k, v, None, 0.5)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=0.5))


# --------------------------------------------------------------------------- joint writes, dtype, complex


def _rope_on_image_part(j: torch.Tensor, tab: torch.Tensor) -> torch.Tensor:
    out = j.clone()
    out[:, 3:] = j[:, 3:] * tab[3:]  # functionalized into slice_scatter on the joint dim
    return out


def test_slice_scatter_into_the_body_of_a_joint_dim() -> None:
    case = _joint_then(_rope_on_image_part)
    for gm, ctx in case.check({1: S1}):
        assert ctx.breaks == []
        sc = one(gm, aten.slice_scatter.default)
        assert sc.meta["xdit_placement"] == Shard(1, (4, 4), head=3)
        assert sc.args[2:] == (1, 3, 7, 1)  # local rows of the body


def test_slice_scatter_through_the_body_writes_each_ranks_rows() -> None:
    def write(j: torch.Tensor, tab: torch.Tensor) -> torch.Tensor:
        out = j.clone()
        out[:, 2:6] = 0.0
        return out

    for _, ctx in _joint_then(write).check({1: S1}):  # (check: every node against the global value)
        assert ctx.breaks == []


def test_slice_scatter_along_another_dim_is_elementwise() -> None:
    def write(x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        out[..., 0::2] = x[..., 1::2] * 2  # interleaved real RoPE
        return out

    for gm, ctx in Case(write, X).check({0: S1}):
        assert ctx.breaks == []
        assert one(gm, aten.slice_scatter.default).meta["xdit_placement"] == S1


def test_type_as_takes_only_the_dtype_of_other() -> None:
    case = Case(lambda x, y: y.type_as(x) + 1, X, torch.randn(5, 6))
    for gm, ctx in case.check({0: S1}):
        assert ctx.breaks == []
        assert one(gm, aten.type_as.default).meta["xdit_placement"] == R


def test_complex_rope_keeps_the_shard() -> None:
    def rope(x: torch.Tensor, tab: torch.Tensor) -> torch.Tensor:
        xc = torch.view_as_complex(x.reshape(4, 8, 3, 2))
        fc = torch.polar(torch.ones_like(tab[:8, :3]), tab[:8, :3])
        return torch.view_as_real(xc * fc).flatten(2)

    for gm, ctx in Case(rope, X, TABLE).check({0: S1}):
        assert ctx.breaks == []
        assert one(gm, aten.view_as_complex.default).meta["xdit_placement"] == S1
