"""Placements and the reshard helpers the rules rewrite with: shard normalization, even splits,
slicing and gathering shards.

Harness (capture, compile per rank, run against the reference): ``tests/rules_harness.py``.
"""

from __future__ import annotations

import pytest
import torch
from graph_harness import piece
from rules_harness import (
    R,
    seed_each_test,  # noqa: F401  (autouse: each test starts from seed 0)
)

from xdit_compile.placement import Shard, even_split, local_shape
from xdit_compile.runtime import reshard
from xdit_compile.runtime.reshard import gather_shard, slice_shard

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
