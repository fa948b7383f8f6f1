"""explain: PixArt-Sigma at ulysses=2 has no sharding breaks, 2 all-to-alls per self-attention
layer (Q, K and V packed in one, the output in the other), no communication for
cross-attention, and byte counts equal to the closed form; the static counts equal what the
runtime counter measures in a real 2-process run."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

import xdit_compile as xc
from xdit_compile.models import build_model, example_inputs


@pytest.fixture
def fake_pg(request):
    world = request.param
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    yield world
    dist.destroy_process_group()


def _pixart_report(plan: xc.Plan) -> tuple[xc.Report, dict, torch.nn.Module]:
    model = build_model("pixart-sigma")
    kwargs = example_inputs("pixart-sigma", model)
    pm = xc.parallelize(model, plan)
    pm.prepare(**kwargs)
    return xc.explain(pm), kwargs, model


def _ulysses_bytes(b: int, heads: int, tokens: int, dim: int, u: int, itemsize: int = 4) -> int:
    """One all-to-all of a [B, H, S/u, D] shard sends (u - 1)/u of it."""
    return b * heads * (tokens // u) * dim * itemsize * (u - 1) // u


@pytest.mark.parametrize("fake_pg", [2], indirect=True)
def test_pixart_ulysses2_report(fake_pg):
    report, kwargs, model = _pixart_report(xc.Plan(ulysses=2))
    assert report.breaks == []
    layers = model.config.num_layers
    cfg = model.config
    heads, dim = cfg.num_attention_heads, cfg.attention_head_dim
    _, _, h, w = kwargs["hidden_states"].shape
    tokens = (h // cfg.patch_size) * (w // cfg.patch_size)
    attn = [c for c in report.collectives if c.what == "usp_attention"]
    # One USP op per self-attention layer, each 4 all-to-alls (q, k, v in; output back).
    assert len(attn) == layers
    assert all(
        c.op == "all_to_all" and c.axis == "ulysses" and c.calls == 2 for c in attn
    )  # QKV fused, out
    per_call = _ulysses_bytes(1, heads, tokens, dim, 2)
    assert all(c.bytes_per_forward == 4 * per_call for c in attn)
    # Cross-attention (K/V from text) stays plain local SDPA: no collective in that module.
    gm = report.graphs["lower_collectives"]
    assert gm.count("aten.scaled_dot_product_attention.default") == layers
    # The only other collective is the gather of the output [1, 8, 16, 16] (half sent).
    others = [c for c in report.collectives if c.what != "usp_attention"]
    assert [(c.op, c.what) for c in others] == [("all_gather", "output")]
    out_numel = 1 * cfg.out_channels * h * w
    assert others[0].bytes_per_forward == out_numel * 4 // 2
    text = str(report)
    assert "sharding breaks: 0" in text and "usp_attention" in text and "S(2/2)" in text


@pytest.mark.parametrize("fake_pg", [4], indirect=True)
def test_pixart_usp_report(fake_pg):
    report, _, model = _pixart_report(xc.Plan(ulysses=2, ring=2))
    assert report.breaks == []
    totals = report.comm_totals()
    layers = model.config.num_layers
    assert totals[("all_to_all", "ulysses")][0] == 2 * layers  # Q, K, V in one; the output in one
    assert totals[("send_recv", "ring")][0] == 1 * layers  # ring=2: one K/V hand-over per layer
    assert report.flops < report.serial_flops / 2


def _measure(plan: xc.Plan) -> tuple[int, int]:
    from xdit_compile.runtime.collectives import comm_stats

    model = build_model("pixart-sigma")
    kwargs = example_inputs("pixart-sigma", model)
    pm = xc.parallelize(model, plan)
    pm.prepare(**kwargs)
    comm_stats().reset()
    pm(**kwargs)
    return comm_stats().total_bytes, xc.explain(pm).bytes_per_forward


@pytest.mark.dist
@pytest.mark.parametrize("plan,world", [(dict(ulysses=2), 2), (dict(ulysses=2, ring=2), 4)])
def test_static_bytes_equal_measured(pools, plan, world):
    for measured, static in pools(world).run(_measure, xc.Plan(**plan)):
        assert measured == static > 0


@pytest.mark.parametrize("fake_pg", [1, 2], indirect=True)
def test_peak_activation_bytes(fake_pg):
    """Static liveness of an MLP ``x [1, S, C] -> linear 4C -> relu -> linear C``: the input is
    held throughout, the hidden value and its relu are alive together. Serial: (1 + 4 + 4)·S·C
    floats. ulysses=2: the whole input plus this rank's S/2 rows of the two hidden values."""
    s, c = 8, 16
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(c, 4 * c), torch.nn.ReLU(), torch.nn.Linear(4 * c, c)
    ).eval()
    plan = xc.Plan(ulysses=fake_pg) if fake_pg > 1 else xc.Plan()
    pm = xc.parallelize(model, plan)
    pm.prepare(torch.randn(1, s, c))
    report = xc.explain(pm)
    want = 4 * (s * c + 2 * 4 * c * s // fake_pg)
    assert report.activation_bytes == want
    assert f"peak activation bytes on this rank: {want:,}" in report.summary()


class _BreakAndRegroup(torch.nn.Module):
    """A flip along the tokens (no rule: a sharding break, two inputs gathered) and attention
    whose K arrives cut on the heads (the rule asks for the sequence cut: a regroup, no break)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(8, 24)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        q, k, v = (
            z.unflatten(-1, (2, 4)).transpose(1, 2) for z in self.qkv(hidden_states).chunk(3, -1)
        )
        k = k.transpose(1, 2).flip(1).transpose(1, 2)  # flipped tokens: no rule for flip
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return o.transpose(1, 2).flatten(2) + torch.flip(hidden_states, [1]) * hidden_states.flip(1)


@pytest.mark.parametrize("fake_pg", [2], indirect=True)
def test_break_count_agrees_with_the_break_gathers(fake_pg):
    """Every gather listed as a sharding break names a listed break, and every listed break with
    a sharded input has its gathers listed; other gathers (regroups, outputs) are not breaks."""
    pm = xc.parallelize(_BreakAndRegroup(), xc.Plan(ulysses=2))
    pm.prepare(hidden_states=torch.randn(1, 6, 8))
    report = xc.explain(pm)
    assert report.breaks, "the flips must break"
    break_nodes = {b.node for b in report.breaks}
    gathers = [c for c in report.collectives if c.op == "all_gather"]
    labelled = {
        name
        for c in gathers
        if c.what.startswith("sharding break at ")
        for name in c.what.removeprefix("sharding break at ").split(", ")
    }
    assert labelled == break_nodes
    text = report.summary()
    assert f"sharding breaks: {len(report.breaks)}" in text
    assert text.count("(sharding break at ") == sum(
        c.what.startswith("sharding break") for c in gathers
    )
