"""Data-dependent sizes (valid text tokens picked with ``nonzero``, as Mochi does): specialized
to the probed values, recompiled when they change, exact against the serial model.

Tolerance: relative error < 1e-4 in fp32 (see test_models_dist); measured 0 to ~3e-7.
"""

from __future__ import annotations

import pytest
import torch
import torch.fx._pytree as fx_pytree
import torch.nn.functional as F

import xdit_compile as xc
from xdit_compile.compiler.capture import capture
from xdit_compile.compiler.specialize import (
    SpecializationMismatch,
    find_data_dependence,
    specialize_graph,
)
from xdit_compile.jobs.compare import rel_error


class _ValidTextAttention(torch.nn.Module):
    """Image tokens attend jointly with the *valid* text tokens only, selected by ``nonzero``;
    the text part of the output is padded back to full length (Mochi's processor pattern)."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.qkv_text = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b, s, _ = x.shape
        return tuple(t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in x.chunk(3, dim=-1))

    def forward(
        self, hidden_states: torch.Tensor, text: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        q, k, v = self._split(self.qkv(hidden_states))
        tq, tk, tv = self._split(self.qkv_text(text))
        keep = torch.nonzero(mask[0], as_tuple=False).flatten()
        o = F.scaled_dot_product_attention(
            torch.cat([q, tq[:, :, keep]], dim=2),
            torch.cat([k, tk[:, :, keep]], dim=2),
            torch.cat([v, tv[:, :, keep]], dim=2),
        )
        total = hidden_states.shape[1] + text.shape[1]
        o = F.pad(o, (0, 0, 0, total - o.shape[2]))
        o = o.transpose(1, 2).flatten(2)
        img, txt = o.split([hidden_states.shape[1], text.shape[1]], dim=1)
        return self.out(img) + hidden_states, txt


def _inputs(valid: int, rows: int = 9, text_len: int = 6) -> dict:
    g = torch.Generator().manual_seed(valid)
    mask = torch.zeros(1, text_len, dtype=torch.bool)
    mask[0, :valid] = True
    return dict(
        hidden_states=torch.randn(1, rows, 16, generator=g),
        text=torch.randn(1, text_len, 16, generator=g),
        mask=mask,
    )


def test_specialized_graph_is_static_and_exact():
    torch.manual_seed(0)
    model = _ValidTextAttention().eval()
    kw = _inputs(valid=4)
    gm = capture(model, (), kw)
    probe = find_data_dependence(gm)
    assert probe is not None and probe.binders == ["nonzero"]
    values = probe((), kw)
    assert values == (("u0", 4),)
    specialize_graph(gm, probe, values, tuple(fx_pytree.tree_flatten_spec(((), kw), probe.in_spec)))
    for n in gm.graph.nodes:
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor):
            assert all(isinstance(s, int) for s in val.shape), n
    with torch.no_grad():
        torch.testing.assert_close(gm(**kw), model(**kw), rtol=0, atol=0)
        with pytest.raises(SpecializationMismatch, match=r"\[3, 1\] differs from the \[4, 1\]"):
            gm(**_inputs(valid=3))


def test_no_probe_for_static_graphs():
    gm = capture(torch.nn.Linear(4, 4), (torch.randn(2, 4),), {})
    assert find_data_dependence(gm) is None


def _two_prompts(plan: xc.Plan) -> dict:
    torch.manual_seed(0)
    model = _ValidTextAttention().eval()
    pm = xc.parallelize(model, plan)
    errs, keys = [], []
    for valid in (4, 2, 4):  # the third call reuses the first graph
        kw = _inputs(valid)
        with torch.no_grad():
            ref = model(**kw)
        errs.append(rel_error(pm(**kw), ref))
        keys.append(id(pm.last))
    return {
        "errs": errs,
        "graphs": len(pm.compiled),
        "reused": keys[0] == keys[2],
        "breaks": len(pm.last.breaks),
    }


@pytest.mark.dist
@pytest.mark.parametrize("plan", [dict(ulysses=2), dict(ring=2)])
def test_data_dependent_text_length_recompiles_and_matches(pools, plan):
    for r in pools(2).run(_two_prompts, xc.Plan(**plan)):
        assert max(r["errs"]) < 1e-4, r
        assert r["graphs"] == 2 and r["reused"], r
        assert r["breaks"] == 0, r
