"""Every op rule against the single-device op (``tests/conformance.py``), and proof that the
harness catches the class of bug it exists for: ops that select, sort, scan or index across the
sharded dim treated as local, and integer arguments that are not sizes rewritten as sizes."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
import torch.fx as fx
from conformance import (
    UNCHECKED,
    Sample,
    _opinfo_index,
    check_sample,
    rule_ops,
    samples,
)
from graph_harness import ALL_NO_SEED, RankRun, compile_for, reference

from xdit_compile.compiler.capture import capture
from xdit_compile.passes.sharding import engine, propagate
from xdit_compile.passes.sharding.engine import Decision, RuleCtx
from xdit_compile.placement import Shard
from xdit_compile.plan import Plan

aten = torch.ops.aten
PLANS = [Plan(ulysses=2), Plan(ring=3)]
# CI budget: 2 OpInfo samples per OpInfo, 3 samples per op, 6 placements per sample and mesh
# (``python tests/conformance.py`` runs 3, 12 and 24).
PER_OP, MOST, LIMIT = 2, 3, 6


@pytest.fixture(autouse=True)
def _no_debug_lint(monkeypatch: pytest.MonkeyPatch) -> None:
    """The harness checks every node's value itself: the driver's debug re-propagation after
    every pass (on in the other tests) only costs time here."""
    monkeypatch.setenv("XDIT_DEBUG", "0")


@functools.cache
def _samples(name: str) -> list[Sample]:
    return samples(name, _opinfo_index(), PER_OP, MOST)


@pytest.mark.parametrize("name", sorted(rule_ops()))
def test_rule_matches_the_single_device_op(name: str) -> None:
    results = [check_sample(name, s, PLANS, LIMIT) for s in _samples(name)]
    failures = [f for r in results for f in r.failures]
    assert not failures, "\n".join(failures[:10])
    cases = sum(r.cases for r in results)
    assert (cases > 0) == (name not in UNCHECKED), (
        f"{name}: {cases} cases; skipped: {[r.skipped for r in results]}"
    )


def test_unchecked_list_names_registered_ops_only() -> None:
    assert set(rule_ops()) >= UNCHECKED


# --------------------------------------------------------------------------- the harness finds bugs


def _local(node: fx.Node, rc: RuleCtx) -> Decision:
    """A wrong rule: the op treated as local on whatever shard its first input has."""
    sh = rc.spec(node.args[0])
    if isinstance(node.args[0], list | tuple):
        sh = rc.spec(node.args[0][0])
    val = node.meta.get("val")
    return Decision(out=tuple(sh for _ in val) if isinstance(val, tuple | list) else sh)


@pytest.mark.parametrize(
    "op",
    [
        "topk",
        "sort",
        "argsort",
        "cumsum",
        "cummax",
        "gather",
        "scatter_add",
        "max",
        "argmax",
        "index_select",
        "kthvalue",
    ],
)
def test_harness_catches_cross_token_ops_treated_as_local(
    op: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The harness alone: propagation's own check (a decision whose layout does not fit the
    # tensor becomes a break) would turn some of these wrong rules into exact breaks.
    monkeypatch.setattr(propagate, "_misfit", lambda d, node: "")
    packet = getattr(aten, op)
    monkeypatch.setitem(engine.RULES, packet, _local)
    for o in packet.overloads():
        monkeypatch.delitem(engine.RULES, getattr(packet, o), raising=False)
    caught = any(
        check_sample(op, s, PLANS, LIMIT, first_failure=True).failures for s in _samples(op)
    )
    assert caught, f"a local rule for {op} was not caught"


def _topk_k_as_size(node: fx.Node, rc: RuleCtx) -> Decision:
    """A wrong rule: top-k along an unsharded dim (right) with ``k`` rewritten as if it were a
    size of the sharded dim (wrong: it counts entries along another dim)."""
    x = node.args[0]
    sh = rc.spec(x)
    assert isinstance(sh, Shard)
    nd = len(rc.shape(x))
    dim = int(node.args[2]) % nd if len(node.args) > 2 else nd - 1
    if dim == sh.dim:
        raise engine.Break("along the sharded dim")
    k = int(node.args[1])
    local_k = max(1, k * sh.local_size(rc.rank) // sh.total)
    return Decision(out=(sh, sh), args=(x, local_k, *node.args[2:]))


def test_a_decision_that_does_not_fit_its_tensor_breaks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Propagation checks every decision against the global shapes: a rule that gives top-k's
    k outputs the input's cut of n rows (or asks for an input layout of another length) is a
    reported break, gathered and exact, never a wrong slice."""
    monkeypatch.setitem(engine.RULES, aten.topk, _local)
    x = torch.randn(2, 6, 4)
    gm = capture(_Boom(), (x,), {})
    for rank in (0, 1):
        rgm, ctx = compile_for(gm, rank, ALL_NO_SEED, Plan(ulysses=2), seeds={0: Shard(2, (2, 2))})
        assert [b.node for b in ctx.breaks] == ["topk"] and ctx.breaks[0].reason.startswith(
            "rule error: output"
        )
        out = RankRun(rgm, reference(gm, x), rank, gm).run(x, enable_io_processing=False)[0]
        torch.testing.assert_close(out, _Boom()(x))


def test_harness_catches_an_integer_argument_rewritten_as_a_size(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(engine.RULES, aten.topk, _topk_k_as_size)
    s = Sample("router.topk", lambda x: torch.topk(x, 4, dim=-1), (torch.randn(2, 6, 8),))
    res = check_sample("topk", s, [Plan(ulysses=2)], 100)
    assert res.failures, "rewriting k was not caught"


def test_harness_catches_squeeze_of_a_local_size_one_dim(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bug the harness found in the view rule: ``squeeze()`` kept as is drops the sharded
    dim on a rank whose piece has one row (5 rows over 3 ranks: 2, 2, 1)."""

    def old_view(node: fx.Node, rc: RuleCtx) -> Decision:
        return Decision(out=rc.spec(node.args[0]))

    s = Sample("squeeze", lambda x: torch.squeeze(x) * 2, (torch.randn(5, 1, 3),))
    assert not check_sample("squeeze", s, [Plan(ring=3)], 100).failures
    monkeypatch.setitem(engine.RULES, aten.squeeze, old_view)
    assert check_sample("squeeze", s, [Plan(ring=3)], 100).failures


def test_causal_attention_with_sharded_queries_breaks() -> None:
    """Found by the harness: causal attention to whole K/V was treated as local, but the causal
    mask depends on each query row's global position."""

    def f(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    q, k, v = (torch.randn(1, 2, 6, 4) for _ in range(3))
    res = check_sample(
        "scaled_dot_product_attention", Sample("causal", f, (q, k, v)), [Plan(ulysses=2)], 100
    )
    assert not res.failures and res.breaks > 0


class _Boom(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.topk(x, 2, dim=-1).values * 2


def test_a_rule_that_fails_gathers_and_reports(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rule tripping on a form nobody foresaw is a reported break (gathered, exact), not a
    crash."""

    def broken(node: fx.Node, rc: RuleCtx) -> Any:
        raise IndexError("unforeseen form")

    monkeypatch.setitem(engine.RULES, aten.topk, broken)
    x = torch.randn(2, 6, 4)
    gm = capture(_Boom(), (x,), {})
    _, ctx = compile_for(gm, 0, ALL_NO_SEED, Plan(ulysses=2), seeds={0: Shard(1, (3, 3))})
    assert [b.reason for b in ctx.breaks] == ["rule failed: IndexError: unforeseen form"]


def _expert_choice(x: torch.Tensor, gate: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Expert-choice routing: each expert picks its top-k tokens (top-k over the token dim),
    gathers them, and scatters its outputs back: every step reads across tokens."""
    b, s, c = x.shape
    e, k = gate.shape[0], s // 2
    probs = (x @ gate.t()).softmax(-1).transpose(1, 2)  # [B, E, S]
    weight, idx = torch.topk(probs, k, dim=-1)  # [B, E, k]
    picked = torch.gather(x.unsqueeze(1).expand(b, e, s, c), 2, idx[..., None].expand(b, e, k, c))
    ys = (picked @ w[None]) * weight[..., None]
    return torch.zeros_like(x).scatter_add(
        1, idx.reshape(b, e * k)[..., None].expand(b, e * k, c), ys.reshape(b, e * k, c)
    )


def test_expert_choice_router_is_exact() -> None:
    """The class of model reported silently wrong: tokens cut on any dim, the router's result
    equals the single-device one (its cross-token steps break and gather)."""
    g = torch.Generator().manual_seed(0)
    s = Sample(
        "router.expert_choice",
        _expert_choice,
        (
            torch.randn(2, 8, 6, generator=g),
            torch.randn(4, 6, generator=g),
            torch.randn(4, 6, 6, generator=g),
        ),
    )
    res = check_sample("topk", s, PLANS, 100)
    assert res.cases > 10 and not res.failures, res.failures[:3]
