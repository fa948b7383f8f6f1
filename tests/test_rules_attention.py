"""Sharding rules of attention, and the attention kernels the rewritten ops call.

Harness (capture, compile per rank, run against the reference): ``tests/rules_harness.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from graph_harness import FRONT_NO_SEED, USP, calls, one
from rules_harness import (
    Case,
    R,
    aten,
    reasons,
    seed_each_test,  # noqa: F401  (autouse: each test starts from seed 0)
    slices_of,
)

from xdit_compile.kernels.attention import attention_with_lse, backends, merge_partial
from xdit_compile.placement import Shard
from xdit_compile.plan import Plan
from xdit_compile.runtime.reshard import slice_shard

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
