"""Grouped-query attention (``enable_gqa=True``: K/V with fewer heads than Q) under every
attention rewrite: the rewritten graph computes what the model computes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from xdit_compile import Plan

EXACT_TOL = 1e-5  # fp32, reordered sums


class _GQABlock(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.hd)
        self.o = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.heads, self.hd).transpose(1, 2)
        k, v = self.kv(x).view(b, s, 2, self.kv_heads, self.hd).permute(2, 0, 3, 1, 4)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return x + self.o(a.transpose(1, 2).reshape(b, s, -1))


class _GQAModel(nn.Module):
    """8 query heads sharing 2 K/V heads (groups of 4)."""

    def __init__(self, dim: int = 64, heads: int = 8, kv_heads: int = 2, layers: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_GQABlock(dim, heads, kv_heads) for _ in range(layers)])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states
        for b in self.blocks:
            x = b(x)
        return x


def _gqa(plan: dict) -> dict:
    import xdit_compile as xc
    from xdit_compile.jobs.compare import rel_error

    torch.manual_seed(0)
    model = _GQAModel().eval()
    x = torch.randn(2, 30, 64)  # 30 rows: uneven over 4 ranks' worth of splits too
    with torch.no_grad():
        ref = model(hidden_states=x)
        pm = xc.parallelize(model, Plan(**plan))
        out = pm(hidden_states=x)  # first step: exact for the displaced methods too
    return {"err": rel_error(out, ref)}


@pytest.mark.dist
@pytest.mark.parametrize(
    "plan",
    [dict(ulysses=2), dict(ring=2), dict(distrifusion=2), dict(pipefusion=2, patches=2)],
    ids=str,
)
def test_gqa_attention_is_kept(pools, plan):
    for r in pools(2).run(_gqa, plan):
        assert r["err"] < EXACT_TOL, r
