"""The passes one by one, the driver that runs them, the plan and the shape verifier.

No process group: graphs are compiled for rank 0 and rank 1 of a 2-rank mesh given as data
(``MeshInfo``) and, where numerics are checked, each rank's rewritten graph is executed in this
process: ``gather_shard`` runs for real with its all-gather fed from the other rank's piece of the
global value, Ulysses attention is answered from the original graph's global values, and every
other node runs on local tensors and is compared with this rank's slice of its global value.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from graph_harness import (
    ALL,
    FRONT,
    REWRITE,
    USP,
    RankRun,
    calls,
    compile_for,
    count,
    placeholder_values,
    reference,
)

from xdit_compile.compiler.capture import capture
from xdit_compile.compiler.driver import PassError, op_histogram, run_passes
from xdit_compile.compiler.pass_list import build_passes
from xdit_compile.passes.annotate import annotate_graph_pass, block_of
from xdit_compile.passes.attention import rewrite_attention_pass
from xdit_compile.passes.canonicalize import _einsum_permutation, canonicalize_graph_pass
from xdit_compile.passes.context import CollectiveSite, Pass, PassContext, PassFn, PassResult
from xdit_compile.passes.seed import seed_inputs_pass
from xdit_compile.passes.sharding.engine import redistribute
from xdit_compile.passes.verify import verify_local_shapes
from xdit_compile.placement import Replicate, Shard
from xdit_compile.plan import OPTIONAL_PASSES, Plan
from xdit_compile.runtime.mesh import MeshInfo
from xdit_compile.runtime.reshard import gather_bytes, gather_shard, slice_shard

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
R = Replicate()


class TinyDiT(nn.Module):
    """Patch embedding, a replicated timestep path, self- and cross-attention, a projection."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(4, 32, 2, 2)
        self.t_mlp = nn.Linear(1, 32)
        self.norm = nn.LayerNorm(32)
        self.q, self.k, self.v = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32)
        self.ck, self.cv = nn.Linear(16, 32), nn.Linear(16, 32)
        self.out = nn.Linear(32, 8)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep: torch.Tensor,
    ) -> torch.Tensor:
        x = self.proj(hidden_states).flatten(2).transpose(1, 2)
        x = x + self.t_mlp(timestep[:, None])[:, None]
        b, s, c = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, -1, 4, 8).transpose(1, 2)

        h = self.norm(x)
        a = F.scaled_dot_product_attention(heads(self.q(h)), heads(self.k(h)), heads(self.v(h)))
        x = x + a.transpose(1, 2).reshape(b, s, c)
        enc = encoder_hidden_states
        a = F.scaled_dot_product_attention(
            heads(self.q(x)), heads(self.ck(enc)), heads(self.cv(enc))
        )
        x = x + a.transpose(1, 2).reshape(b, s, c)
        return self.out(x)


@pytest.fixture(scope="module")
def tiny() -> tuple[fx.GraphModule, dict[str, torch.Tensor], dict[str, Any]]:
    torch.manual_seed(0)
    kwargs = {
        "hidden_states": torch.randn(1, 4, 8, 8),
        "encoder_hidden_states": torch.randn(1, 5, 16),
        "timestep": torch.tensor([3.0]),
    }
    gm = capture(TinyDiT().eval(), (), kwargs)
    return gm, kwargs, reference(gm, **kwargs)


# --------------------------------------------------------------------------- canonicalize


class _Canon(nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float64)
        p = torch.einsum("bhwc->bchw", x)
        return torch.einsum("bchw,bchw->bc", p, y) + p.sum()


def test_canonicalize_removes_checks_and_turns_permuting_einsum_into_permute() -> None:
    kw = {"x": torch.randn(2, 3, 4, 5), "y": torch.randn(2, 5, 3, 4, dtype=torch.float64)}
    gm = capture(_Canon(), (), kw)
    before = gm(**kw)
    assert count(gm, aten._assert_tensor_metadata.default) == 1
    assert len(gm.graph.find_nodes(op="call_module", target="_guards_fn")) == 1
    assert count(gm, aten.einsum.default) == 2
    ctx = PassContext(plan=Plan(), mesh=MeshInfo.of(Plan(), 0, key="k"))
    res = canonicalize_graph_pass(gm, ctx)
    assert res.modified and res.graph_module is gm
    gm.graph.lint()
    gm.recompile()
    assert count(gm, aten._assert_tensor_metadata.default) == 0
    assert gm.graph.find_nodes(op="call_module") == []
    (einsum,) = calls(gm, aten.einsum.default)
    assert einsum.args[0] == "bchw,bchw->bc"
    (perm,) = calls(gm, aten.permute.default)
    assert perm.args[1] == [0, 3, 1, 2] and perm.meta["xdit_pass"] == "canonicalize"
    assert torch.equal(gm(**kw), before)
    assert not canonicalize_graph_pass(gm, ctx).modified  # idempotent


@pytest.mark.parametrize(
    ("eq", "perm"),
    [
        ("ij->ji", [1, 0]),
        ("abc->cab", [2, 0, 1]),
        ("nhwpqc->nchpwq", [0, 5, 1, 3, 2, 4]),
        ("b s c -> b c s", [0, 2, 1]),
        ("ij->ij", [0, 1]),
        ("ij,jk->ik", None),
        ("ii->i", None),
        ("ij->i", None),
        ("...ij->...ji", None),
        ("ij", None),
    ],
)
def test_einsum_permutation(eq: str, perm: list[int] | None) -> None:
    assert _einsum_permutation(eq) == perm
    if perm is not None:
        lhs = eq.replace(" ", "").split("->")[0]
        x = torch.randn(*range(2, 2 + len(lhs)))
        assert torch.equal(torch.einsum(eq, x), x.permute(perm))


# --------------------------------------------------------------------------- annotate


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.to_out = nn.ModuleList([nn.Linear(4, 4), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_out[0](self.lin(x))


class _Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_Block(), _Block()])
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.head(x)


def test_annotate_records_global_shapes_and_blocks() -> None:
    gm = capture(_Stack(), (), {"x": torch.randn(1, 3, 4)})
    code = gm.code
    ctx = PassContext(plan=Plan(), mesh=MeshInfo.of(Plan(), 0, key="k"))
    assert not annotate_graph_pass(gm, ctx).modified
    assert gm.code == code
    for n in gm.graph.nodes:
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor):
            assert n.meta["xdit_shape"] == tuple(val.shape)
        else:
            assert "xdit_shape" not in n.meta
    linears = calls(gm, aten.linear.default)
    # lin and to_out.0 of each block (a nested ModuleList stays in its block), then the head
    assert [n.meta.get("xdit_block") for n in linears] == [
        "blocks.0",
        "blocks.0",
        "blocks.1",
        "blocks.1",
        None,
    ]
    assert linears[0].meta["xdit_shape"] == (1, 3, 4) and linears[-1].meta["xdit_shape"] == (
        1,
        3,
        2,
    )


def test_block_of_reads_export_and_dynamo_style_names() -> None:
    g = fx.Graph()
    n = g.placeholder("x")
    n.meta["nn_module_stack"] = {
        "a": ("L['self'].transformer_blocks", "ModuleList"),
        "b": ("L['self'].transformer_blocks.3", "Block"),
        "c": ("L['self'].transformer_blocks.3.attn.to_q", "Linear"),
    }
    assert block_of(n) == "transformer_blocks.3"
    n.meta["nn_module_stack"] = {"a": ("L__self___blocks.12.ff", "FF")}
    assert block_of(n) == "blocks.12"
    n.meta["nn_module_stack"] = {"a": ("proj_out", "Linear")}
    assert block_of(n) is None


# --------------------------------------------------------------------------- seed


class _Embed(nn.Module):
    def __init__(self, dims: int = 2, stride: Any = 2) -> None:
        super().__init__()
        conv = {1: nn.Identity, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.c = conv(4, 8, stride, stride) if dims > 1 else conv()

    def forward(self, timestep: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.c(hidden_states * 2) + timestep


def _seed(
    module: nn.Module, shape: tuple[int, ...], degree: int = 2
) -> tuple[fx.GraphModule, PassContext]:
    gm = capture(module, (), {"timestep": torch.tensor(1.0), "hidden_states": torch.randn(shape)})
    plan = Plan(ulysses=degree)
    ctx = PassContext(plan=plan, mesh=MeshInfo.of(plan, 0, key="k"))
    res = seed_inputs_pass(gm, ctx)
    assert res.modified
    return gm, ctx


@pytest.mark.parametrize(
    ("module", "shape", "dim", "patch", "split"),
    [
        (_Embed(2), (1, 4, 8, 8), 2, 2, (4, 4)),  # [B, C, H, W]: H, in whole patches
        (_Embed(2), (1, 4, 10, 8), 2, 2, (6, 4)),  # 5 patch rows: uneven
        (_Embed(1), (1, 4, 3, 8), 2, 1, (2, 1)),  # no convolution: patch 1
        (_Embed(1), (1, 16, 4), 1, 1, (8, 8)),  # packed [B, S, C]: S
        (_Embed(3, (1, 2, 2)), (1, 4, 4, 8, 8), 2, 1, (2, 2)),  # [B, C, F, H, W]: frames
        (_Embed(3, (1, 2, 2)), (1, 4, 1, 8, 8), 3, 2, (4, 4)),  # one frame: H
    ],
)
def test_seed_chooses_the_token_grid_dim(
    module: nn.Module, shape: tuple[int, ...], dim: int, patch: int, split: tuple[int, ...]
) -> None:
    gm, ctx = _seed(module, shape)
    (node,) = [p for p in gm.graph.find_nodes(op="placeholder") if "xdit_seed" in p.meta]
    assert node.name == "hidden_states"  # the 0-d timestep comes first but is not a latent
    assert node.meta["xdit_seed"] == Shard(dim, split)
    assert ctx.seed is not None and ctx.seed.as_dict() == {
        "input": "hidden_states",
        "arg": "hidden_states",
        "dim": dim,
        "patch": patch,
        "split": split,
        "shape": shape,
    }


def test_seed_three_ranks_uneven() -> None:
    _, ctx = _seed(_Embed(2), (1, 4, 10, 8), degree=3)
    assert ctx.seed.split == (4, 4, 2)


def test_seed_falls_back_to_the_next_token_grid_dim() -> None:
    """One patch row (H = 2, patch 2) but four patch columns: W is cut."""
    gm, ctx = _seed(_Embed(2), (1, 4, 2, 8))
    assert (ctx.seed.dim, ctx.seed.split) == (3, (4, 4))


def test_seed_rejects_fewer_rows_than_ranks() -> None:
    with pytest.raises(ValueError, match="has 1 token rows along dim 3"):
        _seed(_Embed(2), (1, 4, 2, 2))


class _TwoLatents(nn.Module):
    """Extra vision tokens come first; the output follows ``hidden_states``' shape."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(4, 4, 2, stride=2)
        self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)

    def forward(self, vision: torch.Tensor, hidden_states_in: torch.Tensor) -> torch.Tensor:
        return self.up(self.c(hidden_states_in)) + vision.mean()


def _seed_plan(plan: Plan, module: nn.Module, **inputs: torch.Tensor) -> PassContext:
    gm = capture(module, (), inputs)
    ctx = PassContext(plan=plan, mesh=MeshInfo.of(plan, 0, key="k"))
    seed_inputs_pass(gm, ctx)
    return ctx


def test_seed_takes_the_input_the_output_follows() -> None:
    ins = {"vision": torch.randn(1, 6, 8), "hidden_states_in": torch.randn(1, 4, 8, 8)}
    ctx = _seed_plan(Plan(ulysses=2), _TwoLatents(), **ins)
    assert (ctx.seed.arg, ctx.seed.dim, ctx.seed.patch) == ("hidden_states_in", 2, 2)


def test_plan_seed_names_the_input_and_dim() -> None:
    ins = {"vision": torch.randn(1, 6, 8), "hidden_states_in": torch.randn(1, 4, 8, 8)}
    ctx = _seed_plan(Plan(ulysses=2, seed="vision"), _TwoLatents(), **ins)
    assert (ctx.seed.arg, ctx.seed.dim) == ("vision", 1)
    ctx = _seed_plan(Plan(ulysses=2, seed="hidden_states_in", seed_dim=-1), _TwoLatents(), **ins)
    assert (ctx.seed.dim, ctx.seed.split) == (3, (4, 4))
    with pytest.raises(
        ValueError, match=r"no tensor input of that name; its tensor inputs are \['vision'"
    ):
        _seed_plan(Plan(ulysses=2, seed="latents"), _TwoLatents(), **ins)
    with pytest.raises(ValueError, match="seed names the latent"):
        Plan(ulysses=2, seed="")


def test_seed_single_rank_and_missing_latent() -> None:
    gm = capture(
        _Embed(2), (), {"timestep": torch.tensor(1.0), "hidden_states": torch.randn(1, 4, 8, 8)}
    )
    ctx = PassContext(plan=Plan(), mesh=MeshInfo.of(Plan(), 0, key="k"))
    assert not seed_inputs_pass(gm, ctx).modified and ctx.seed is None
    gm = capture(_Embed(1), (), {"timestep": torch.tensor(1.0), "hidden_states": torch.randn(4, 8)})
    ctx = PassContext(plan=Plan(ulysses=2), mesh=MeshInfo.of(Plan(ulysses=2), 0, key="k"))
    with pytest.raises(ValueError, match="no latent input found"):
        seed_inputs_pass(gm, ctx)


# --------------------------------------------------------------------------- propagate


def test_propagate_tiny_dit_has_no_breaks(tiny: Any) -> None:
    gm0, _, _ = tiny
    gm, ctx = compile_for(gm0, 0, FRONT)
    assert ctx.breaks == []
    assert ctx.seed.split == (4, 4) and ctx.seed.patch == 2
    self_attn, cross_attn = calls(gm, SDPA)
    assert self_attn.meta["xdit_attention"] == "usp" and self_attn.meta["xdit_split"] == (8, 8)
    assert cross_attn.meta["xdit_attention"] == "local"
    assert self_attn.meta["xdit_placement"] == cross_attn.meta["xdit_placement"] == Shard(2, (8, 8))
    # only two placement changes: the seeded input and the output
    seed_move, out_move = calls(gm, redistribute)
    assert seed_move.args == (
        gm.graph.find_nodes(op="placeholder", target="hidden_states")[0],
        "R",
        "S(2/2)",
    )
    assert seed_move.meta["xdit_dst"] == Shard(2, (4, 4))
    assert (out_move.meta["xdit_src"], out_move.meta["xdit_dst"]) == (Shard(1, (8, 8)), R)
    assert out_move.meta.get("xdit_output_gather") is True
    assert gm.graph.find_nodes(op="output")[0].args[0] == (out_move,)
    conv = calls(gm, aten.conv2d.default)[0]
    assert conv.meta["xdit_placement"] == Shard(2, (2, 2))
    assert calls(gm, aten.layer_norm.default)[0].meta["xdit_placement"] == Shard(1, (8, 8))
    linears = {n.args[1].target: n.meta["xdit_placement"] for n in calls(gm, aten.linear.default)}
    assert linears["t_mlp.weight"] == linears["ck.weight"] == linears["cv.weight"] == R
    assert linears["q.weight"] == linears["out.weight"] == Shard(1, (8, 8))
    assert all("xdit_placement" in n.meta for n in gm.graph.nodes)
    views = [n for n in calls(gm, aten.reshape.default) if n.meta["xdit_shape"] == (1, 16, 4, 8)]
    assert views and all(v.args[1] == [1, 8, 4, 8] for v in views)  # sizes made local


def test_propagate_single_rank_is_all_replicated(tiny: Any) -> None:
    gm0, _, _ = tiny
    plan = Plan()
    gm, ctx = compile_for(gm0, 0, ALL, plan=plan)
    assert ctx.stats[3].name == "propagate_sharding" and not ctx.stats[3].modified
    assert all(n.meta["xdit_placement"] == R for n in gm.graph.nodes)
    assert count(gm, redistribute) == 0 and count(gm, gather_shard) == 0 and count(gm, USP) == 0
    assert ctx.collectives == [] and ctx.breaks == []


# --------------------------------------------------------------------------- rewrite_attention


def test_rewrite_attention_ulysses(tiny: Any) -> None:
    gm0, _, _ = tiny
    gm, ctx = compile_for(gm0, 0, REWRITE)
    assert count(gm, SDPA) == 1  # cross-attention stays plain and local
    (usp,) = calls(gm, USP)
    q, k, v = usp.args[:3]
    assert [a.name for a in (q, k, v)] == ["transpose_1", "transpose_2", "transpose_3"]
    assert usp.args[3:] == (None, None, "k", [8, 8], 0, 0)
    assert usp.meta["xdit_pass"] == "rewrite_attention" and usp.meta["xdit_placement"] == Shard(
        2, (8, 8)
    )
    # local q [1, 4, 8, 8], 2 heads per rank: the other rank's 2 heads of q, k, v (8 tokens x
    # (8 + 8 + 8) floats) go out, then the other rank's 8 output rows of my 2 heads go back
    per_tok = 1 * (4 // 2) * 4
    want = per_tok * 8 * 1 * (2 * 8 + 8) + per_tok * 8 * (16 - 8)
    assert ctx.collectives == [
        CollectiveSite(usp.name, "all_to_all", "ulysses", 2, want, "usp_attention")
    ]
    assert ctx.stats[-1].name == "rewrite_attention" and ctx.stats[-1].modified
    assert ctx.stats[-1].ops_after.get("xdit.usp_attention") == 1


@pytest.mark.parametrize("rank", [0, 1])
def test_rewrite_attention_ring(tiny: Any, rank: int) -> None:
    gm0, _, _ = tiny
    gm, ctx = compile_for(gm0, rank, REWRITE, plan=Plan(ring=2))
    (usp,) = calls(gm, USP)
    assert usp.args[5:] == ("k", [8, 8], 0, 0)
    # one K/V block of 8 tokens x 4 heads x (8 + 8) floats goes to the next rank
    assert ctx.collectives == [
        CollectiveSite(usp.name, "send_recv", "ring", 1, 8 * 4 * 16 * 4, "usp_attention")
    ]


class _DropAttn(nn.Module):
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(
            hidden_states, hidden_states, hidden_states, dropout_p=0.1
        )


def test_rewrite_attention_rejects_dropout() -> None:
    gm0 = capture(_DropAttn(), (), {"hidden_states": torch.randn(1, 2, 8, 4)})
    with pytest.raises(ValueError, match="rewrite_attention.*dropout > 0 is not supported"):
        compile_for(gm0, 0, REWRITE)


def test_rewrite_attention_without_usp_is_unmodified(tiny: Any) -> None:
    gm0, _, _ = tiny
    plan = Plan(ulysses=2, disable_passes=("rewrite_attention",))
    gm, ctx = compile_for(
        gm0, 0, [*FRONT, ("rewrite_attention", rewrite_attention_pass)], plan=plan
    )
    assert not ctx.stats[-1].modified and count(gm, USP) == 0
    assert [b.reason for b in ctx.breaks] == ["rewrite_attention is disabled"]


# --------------------------------------------------------------------------- lower


@pytest.mark.parametrize("rank", [0, 1])
def test_lower_tiny_dit(tiny: Any, rank: int) -> None:
    gm0, kwargs, ref = tiny
    gm, ctx = compile_for(gm0, rank, ALL, group_names={"sp": "grp0"})
    assert count(gm, redistribute) == 0
    (sl,) = calls(gm, slice_shard)
    assert sl.args[0].name == "hidden_states" and sl.args[1:] == (2, 1, 1, 4 * rank, 4, 0, 0)
    (ga,) = calls(gm, gather_shard)
    out_proj = next(n for n in calls(gm, aten.linear.default) if n.args[1].target == "out.weight")
    assert ga.args[0] is out_proj and ga.args[1:] == (1, 1, 1, [8, 8], "grp0", 0, 0)
    assert gm.graph.find_nodes(op="output")[0].args[0] == (ga,)
    gathers = [c for c in ctx.collectives if c.op == "all_gather"]
    assert gathers == [
        CollectiveSite(
            ga.name,
            "all_gather",
            "sp",
            1,
            gather_bytes(8, 4, [8, 8]),
            "output",
            graph_level=True,
        )
    ]
    assert {c.op for c in ctx.collectives} == {"all_gather", "all_to_all"}
    run = RankRun(gm, ref, rank, gm0)
    (out,) = run.run(*placeholder_values(gm, kwargs), enable_io_processing=False)
    assert run.checked > 30
    torch.testing.assert_close(out, ref[out_proj.name])
    torch.testing.assert_close(out, ref["output"][0])


class _MixedAttn(nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q * 1, k * 1, v * 1)


@pytest.mark.parametrize("rank", [0, 1])
def test_lower_shard_to_other_shard_is_gather_then_slice(rank: int) -> None:
    torch.manual_seed(1)
    kw = {name: torch.randn(1, 2, 8, 4) for name in "qkv"}
    gm0 = capture(_MixedAttn(), (), kw)
    phs = {p.name: p for p in gm0.graph.find_nodes(op="placeholder")}
    phs["q"].meta["xdit_seed"] = phs["v"].meta["xdit_seed"] = Shard(2, (4, 4))
    phs["k"].meta["xdit_seed"] = Shard(1, (1, 1))  # heads: must move to the sequence shard
    passes = [p for p in ALL if p[0] != "seed"]
    gm, ctx = compile_for(gm0, rank, passes)
    usp = calls(gm, USP)[0]
    moved = usp.args[1]
    assert moved.target is slice_shard and moved.args[1:] == (2, 1, 1, 4 * rank, 4, 0, 0)
    assert moved.args[0].target is gather_shard and moved.args[0].args[1] == 1
    # The rule asked for K's other cut (no sharding break): explain labels the gather so.
    assert not ctx.breaks
    assert [c.what for c in ctx.collectives if c.op == "all_gather"] == ["regroup", "output"]
    ref = reference(gm0, **kw)
    run = RankRun(gm, ref, rank, gm0)
    (out,) = run.run(*placeholder_values(gm, kw), enable_io_processing=False)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(kw["q"], kw["k"], kw["v"]))


# --------------------------------------------------------------------------- verify


def test_verify_local_shapes_accepts_the_lowered_graph_and_catches_a_wrong_placement(
    tiny: Any,
) -> None:
    gm0, _, _ = tiny
    gm, ctx = compile_for(gm0, 1, ALL)
    verify_local_shapes(gm, ctx, after="test")
    node = calls(gm, aten.layer_norm.default)[0]
    node.meta["xdit_placement"] = Shard(1, (12, 4))  # rank 1 would hold 4 rows, it holds 8
    with pytest.raises(
        AssertionError,
        match=r"local shapes wrong after test:\n%layer_norm.*"
        r"local shape \[1, 8, 32\], expected \[1, 4, 32\]",
    ):
        verify_local_shapes(gm, ctx, after="test")
    node.meta["xdit_placement"] = R
    with pytest.raises(AssertionError, match="expected \\[1, 16, 32\\]"):
        verify_local_shapes(gm, ctx, after="test")


def test_verify_skips_graphs_it_cannot_run(tiny: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import xdit_compile.passes.verify as verify

    ran: list[fx.GraphModule] = []
    monkeypatch.setattr(verify, "fake_run", lambda gm, **kw: ran.append(gm))
    gm0, _, _ = tiny
    gm, ctx = compile_for(gm0, 0, FRONT)  # redistribute markers are not executable yet
    calls(gm, aten.layer_norm.default)[0].meta["xdit_placement"] = R  # would be wrong if checked
    verify_local_shapes(gm, ctx)
    fresh = fx.GraphModule(gm0, copy.deepcopy(gm0.graph))  # no placements at all
    verify_local_shapes(fresh, ctx)
    assert ran == []
    lowered, lctx = compile_for(gm0, 0, ALL)  # the same check does run a lowered graph
    ran.clear()  # (the driver may have verified it already, under XDIT_DEBUG)
    verify_local_shapes(lowered, lctx)
    assert ran == [lowered]


# --------------------------------------------------------------------------- driver


def _noop(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    return PassResult(gm, False)


def _add_relu(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    out = gm.graph.find_nodes(op="output")[0]
    (res,) = out.args[0]
    with gm.graph.inserting_before(out):
        relu = gm.graph.call_function(aten.relu.default, (res,))  # the driver stamps it
    out.args = ((relu,),)
    return PassResult(gm, True)


def _boom(exc: Exception) -> PassFn:
    def run(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        raise exc

    return run


class _Lin(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) - 0.5


@pytest.fixture
def lin_gm() -> fx.GraphModule:
    return capture(_Lin(), (), {"x": torch.randn(2, 4)})


def test_run_passes_records_stats_and_graphs(lin_gm: fx.GraphModule) -> None:
    x = torch.randn(2, 4)
    want = torch.relu(lin_gm(x=x))
    ctx = PassContext(plan=Plan(), mesh=MeshInfo.of(Plan(), 0, key="k"))
    gm = run_passes(lin_gm, [("noop", _noop), ("add_relu", _add_relu)], ctx)
    torch.testing.assert_close(gm(x=x), want)  # recompiled after the pass
    assert [s.name for s in ctx.stats] == ["noop", "add_relu"]
    noop, relu = ctx.stats
    assert not noop.modified and noop.nodes_before == noop.nodes_after
    assert relu.modified and relu.nodes_after == relu.nodes_before + 1
    assert relu.ops_before == noop.ops_after == noop.ops_before
    assert relu.ops_after == op_histogram(gm)
    assert "aten.relu" not in relu.ops_before and relu.ops_after["aten.relu"] == 1
    assert relu.ops_after["aten.linear"] == 1 and relu.seconds > 0
    assert list(ctx.graphs) == ["capture", "noop", "add_relu"]
    assert "relu" not in ctx.graphs["noop"] and "<add_relu>" in ctx.graphs["add_relu"]


@pytest.mark.parametrize(
    ("exc", "raised"),
    [
        (KeyError("missing"), RuntimeError),
        (ValueError("bad plan"), ValueError),
        (AssertionError("broken"), RuntimeError),
    ],
)
def test_run_passes_names_the_failing_pass(
    lin_gm: fx.GraphModule, exc: Exception, raised: type
) -> None:
    ctx = PassContext(plan=Plan(), mesh=MeshInfo.of(Plan(), 0, key="k"))
    passes = [("noop", _noop), ("add_relu", _add_relu), ("boom", _boom(exc)), ("never", _noop)]
    with pytest.raises(raised) as info:
        run_passes(lin_gm, passes, ctx)
    msg = str(info.value)
    assert msg.startswith(
        "xdit_compile pass 'boom' failed (passes run before it: noop, add_relu): "
    )
    assert str(exc) in msg and info.value.__cause__ is exc
    err = info.value
    assert isinstance(err, PassError)  # typed: callers read the fields, never the message
    assert (err.pass_name, err.ran_before, err.cause) == ("boom", ["noop", "add_relu"], exc)
    assert [s.name for s in ctx.stats] == ["noop", "add_relu"]


def test_run_passes_sets_each_pass_axis(lin_gm: fx.GraphModule) -> None:
    """The pass list says which mesh axis each pass works on; the driver sets it (passes never
    do)."""
    seen: list[str] = []

    def record(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        seen.append(ctx.axis)
        return PassResult(gm, False)

    ctx = PassContext(plan=Plan(), mesh=MeshInfo.of(Plan(), 0, key="k"))
    run_passes(
        lin_gm, [Pass("a", record, "cfg"), Pass("b", record), Pass("c", record, "patch")], ctx
    )
    assert seen == ["cfg", "sp", "patch"]


def test_run_passes_first_pass_failure_and_bad_return(lin_gm: fx.GraphModule) -> None:
    ctx = PassContext(plan=Plan(), mesh=MeshInfo.of(Plan(), 0, key="k"))
    with pytest.raises(RuntimeError, match=r"pass 'first' failed \(passes run before it: none\)"):
        run_passes(lin_gm, [("first", _boom(KeyError("k")))], ctx)

    def wrong(gm: fx.GraphModule, ctx: PassContext) -> Any:
        return gm

    with pytest.raises(RuntimeError, match="pass returned GraphModule, expected PassResult"):
        run_passes(lin_gm, [("wrong", wrong)], ctx)


def test_run_passes_verifies_under_debug(
    lin_gm: fx.GraphModule, monkeypatch: pytest.MonkeyPatch
) -> None:
    def mislabel(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        annotate_graph_pass(gm, ctx)
        calls(gm, aten.linear.default)[0].meta["xdit_placement"] = Shard(0, (1, 0))
        return PassResult(gm, False)

    plan = Plan(ulysses=2)
    monkeypatch.setenv("XDIT_DEBUG", "0")
    run_passes(
        lin_gm, [("mislabel", mislabel)], PassContext(plan=plan, mesh=MeshInfo.of(plan, 0, key="k"))
    )
    monkeypatch.setenv("XDIT_DEBUG", "1")
    with pytest.raises(
        RuntimeError, match="pass 'mislabel' failed.*local shapes wrong after mislabel"
    ):
        run_passes(
            lin_gm,
            [("mislabel", mislabel)],
            PassContext(plan=plan, mesh=MeshInfo.of(plan, 1, key="k")),
        )
    # "final": only after the last pass, which then fails for what an earlier pass mislabelled.
    monkeypatch.setenv("XDIT_DEBUG", "final")
    with pytest.raises(RuntimeError, match="pass 'last' failed.*local shapes wrong after last"):
        run_passes(
            lin_gm,
            [("mislabel", mislabel), ("last", _noop)],
            PassContext(plan=plan, mesh=MeshInfo.of(plan, 1, key="k")),
        )


# --------------------------------------------------------------------------- plan / pass list


def test_plan_degrees() -> None:
    plan = Plan(ulysses=2, ring=3)
    assert plan.world_size == 6 and plan.sp_degree == 6
    assert plan.degrees() == {
        "dp": 1,
        "cfg": 1,
        "pipefusion": 1,
        "distrifusion": 1,
        "ring": 3,
        "ulysses": 2,
    }
    plan.check_world_size(6)
    with pytest.raises(ValueError, match="Plan needs 6 processes .*world size is 4"):
        plan.check_world_size(4)
    assert Plan().world_size == 1
    assert str(plan) == "Plan(ring=3, ulysses=2, compile=None)"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ulysses": 0}, "Plan.ulysses must be an integer >= 1"),
        ({"ring": True}, "Plan.ring must be an integer >= 1"),
        ({"ulysses": 2.0}, "Plan.ulysses must be an integer >= 1"),
        ({"pipefusion": 4, "patches": 2}, r"fewer patches than stages .* use patches >= 4"),
        ({"distrifusion": 2, "ulysses": 2}, "DistriFusion takes the place of the sequence axes"),
        ({"distrifusion": 2, "pipefusion": 2}, "DistriFusion and PipeFusion cannot be combined"),
        ({"pipefusion": 2, "stage_blocks": (3,)}, "give one block count >= 1 per pipefusion stage"),
        ({"warmup_steps": 0}, "warmup_steps must be an integer >= 1"),
        ({"patches": 0}, "Plan.patches must be an integer >= 1"),
        ({"cfg": -1}, "Plan.cfg must be an integer >= 1"),
        ({"dp": 0}, "Plan.dp must be an integer >= 1"),
        ({"compile": "xla"}, "Plan.compile='xla' is unknown"),
        ({"disable_passes": ("lower_collectives",)}, "cannot be disabled"),
        ({"disable_passes": "seed"}, r"\['seed'\] cannot be disabled"),
    ],
)
def test_plan_validation(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Plan(**kwargs)


def test_build_passes_order_and_disable() -> None:
    names = [p.name for p in build_passes(Plan(ulysses=2))]
    assert names == [
        "canonicalize",
        "annotate",
        "seed",
        "propagate_sharding",
        "rewrite_attention",
        "lower_collectives",
        "text_heads",
        "overlap_collectives",
    ]
    # shard_text_rows is a rewrite inside propagate_sharding, not a pass of its own
    assert set(OPTIONAL_PASSES) == {
        "canonicalize",
        "rewrite_attention",
        "shard_text_rows",
        "overlap_collectives",
        "text_heads",
    }
    assert "shard_text_rows" in Plan(disable_passes="shard_text_rows").disable_passes
    plan = Plan(ulysses=2, disable_passes="rewrite_attention")
    assert plan.disable_passes == ("rewrite_attention",)
    assert [p.name for p in build_passes(plan)] == [n for n in names if n != "rewrite_attention"]
    plan = Plan(disable_passes=["canonicalize", "rewrite_attention"])
    assert [p.name for p in build_passes(plan)] == [
        "annotate",
        "seed",
        "propagate_sharding",
        "lower_collectives",
        "overlap_collectives",  # text_heads only with ulysses > 1
    ]
