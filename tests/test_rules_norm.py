"""Sharding rules of normalizations: layer/RMS norm and group norm.

Harness (capture, compile per rank, run against the reference): ``tests/rules_harness.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from graph_harness import calls, one
from rules_harness import (
    S1,
    Case,
    R,
    X,
    aten,
    reasons,
    seed_each_test,  # noqa: F401  (autouse: each test starts from seed 0)
)

from xdit_compile.placement import Shard
from xdit_compile.runtime import reshard
from xdit_compile.runtime.reshard import slice_shard

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


# ------------------------------------------------------------------ group norm (VAE decoder)
@pytest.mark.parametrize("split", [(4, 4), (5, 3), (8, 0)])
def test_group_norm_over_sharded_rows_combines_statistics(split: tuple[int, int]) -> None:
    """A VAE's GroupNorm over rows cut across the ranks: each rank sends only its per-group
    statistics (count, mean, squared deviations) and normalizes its own rows; every rank's
    output equals its rows of the serial group_norm (an empty piece too)."""
    x = torch.randn(2, 6, 8, 5) * 3 + 1.5  # an offset mean: a sum-of-squares shortcut would drift
    case = Case(
        lambda x, w, b: F.group_norm(x, 3, w, b, eps=1e-6), x, torch.randn(6), torch.randn(6)
    )
    for gm, ctx in case.check({0: Shard(2, split)}):
        assert ctx.breaks == []
        assert calls(gm, aten.group_norm.default) == []
        gn = one(gm, reshard.group_norm_sharded)
        assert (
            gn.args[1] == 3 and gn.args[4] == 1e-6 and gn.meta["xdit_placement"] == Shard(2, split)
        )
        site = next(c for c in ctx.collectives if c.what == "group_norm statistics")
        assert (site.op, site.bytes_per_forward) == (
            "all_gather",
            3 * 2 * 3 * 4,
        )  # B*G floats x3, 1 peer


def test_group_norm_over_sharded_channels_breaks() -> None:
    case = Case(lambda x: F.group_norm(x, 2), torch.randn(1, 4, 6, 6))
    for _, ctx in case.check({0: Shard(1, (2, 2))}):
        assert reasons(ctx) == ["group_norm normalizes over the sharded channel dim"]
