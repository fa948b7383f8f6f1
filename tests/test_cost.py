"""The accounting, the cost model and the planner.

- Accounting: a rank's FLOPs count every round (CFG, data parallel, sequence); the static bytes of
  the planner's accounting equal the closed forms (Ulysses 4 shards of (N-1)/N per self-attention
  layer, Ring's K/V passed N-1 times) and what the runtime counter measures in real gloo runs.
- Cost model: which link an axis crosses, what overlaps, PipeFusion's bubble, and that a faster
  link or device never predicts a slower plan.
- Planner: invalid plans are refused with the reason, ``auto_plan`` and ``xdit-compile plan``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

import xdit_compile as xc
from xdit_compile.analysis import cost, planner
from xdit_compile.cli.main import main as cli
from xdit_compile.models import build_model, example_inputs


@pytest.fixture(scope="module")
def pixart_cfg():
    """Tiny PixArt-Sigma with both CFG branches in the batch (as its pipeline calls it)."""
    model = build_model("pixart-sigma")
    inputs = example_inputs("pixart-sigma", model, batch=2)
    return model, inputs, planner.workload(model, inputs, cfg_in_batch=True)


def _geometry(model, inputs):
    cfg = model.config
    hs = cfg.num_attention_heads * cfg.attention_head_dim
    b, _, h, w = inputs["hidden_states"].shape
    tokens = (h // cfg.patch_size) * (w // cfg.patch_size)
    return b, tokens, hs, cfg.num_layers


# --------------------------------------------------------------------------- accounting


def test_flops_count_every_round(pixart_cfg):
    _, _, load = pixart_cfg
    serial = load.work(xc.Plan())
    assert serial.flops == serial.serial_flops > 0
    for plan in (xc.Plan(cfg=2), xc.Plan(dp=2)):
        w = load.work(plan)
        assert w.serial_flops == serial.serial_flops
        assert w.flops == pytest.approx(serial.flops / 2, rel=1e-12), plan
    both = load.work(xc.Plan(cfg=2, ulysses=2))
    # The sequence round halves the image tokens' work again; the text side stays replicated.
    assert serial.flops / 4 <= both.flops < serial.flops / 2


@pytest.fixture
def fake_pg2():
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    yield
    dist.destroy_process_group()


def test_explain_reports_half_the_flops_under_cfg(fake_pg2):
    """Before: 1.00 of serial (the batch round had already halved the 'serial' count)."""
    model = build_model("pixart-sigma")
    inputs = example_inputs("pixart-sigma", model, batch=2)
    pm = xc.parallelize(model, xc.Plan(cfg=2))
    pm.prepare(**inputs)
    rep = xc.explain(pm)
    assert rep.flops / rep.serial_flops == pytest.approx(0.5)
    assert "(0.50 of serial)" in rep.summary()


@pytest.mark.parametrize("n", [2, 4])
def test_bytes_equal_the_closed_forms(pixart_cfg, n):
    model, inputs, load = pixart_cfg
    b, tokens, hs, layers = _geometry(model, inputs)
    item = 4
    uly = load.work(xc.Plan(ulysses=n)).comm
    # Per self-attention layer: q, k, v in and the output back, each a [B, S/N, hs] shard of which
    # (N-1)/N leaves the rank: (4/N) * S * hs * (N-1)/N per sample. Cross-attention sends nothing.
    assert uly[("all_to_all", "ulysses")] == [
        2 * layers,
        layers * 4 * b * (tokens // n) * hs * (n - 1) // n * item,
    ]
    ring = load.work(xc.Plan(ring=n)).comm
    # K and V blocks pass N-1 times: 2 * S * hs * (N-1)/N per sample.
    assert ring[("send_recv", "ring")] == [
        (n - 1) * layers,
        layers * 2 * b * (tokens // n) * hs * (n - 1) * item,
    ]
    bsz, _, h, w = inputs["hidden_states"].shape
    out = bsz * model.config.out_channels * h * w * item  # the output (noise and variance channels)
    cfg = load.work(xc.Plan(cfg=2)).comm
    assert cfg == {("all_gather", "cfg"): [1, out // 2]}  # each rank sends its branch once


def _measured_vs_planned(cases: list[tuple[xc.Plan, int]]) -> list[tuple[str, float, float]]:
    from xdit_compile.runtime.collectives import comm_stats

    out = []
    for plan, batch in cases:
        model = build_model("pixart-sigma")
        inputs = example_inputs("pixart-sigma", model, batch=batch)
        planned = planner.workload(model, inputs, cfg_in_batch=batch == 2).work(plan)
        assert not isinstance(planned, str)
        pm = xc.parallelize(model, plan)
        pm(**inputs)
        comm_stats().reset()
        pm(**inputs)
        out.append(
            (
                str(plan),
                float(comm_stats().total_bytes),
                float(sum(b for _, b in planned.comm.values())),
            )
        )
    return out


@pytest.mark.dist
def test_planned_bytes_equal_measured(pools):
    """The planner's static accounting (rank 0) equals the runtime counter on every rank (even
    splits: every rank sends the same). Ring x Ulysses at 4 ranks: ``test_explain`` checks the
    same static sites against the counter."""
    cases = [(xc.Plan(ulysses=2), 1), (xc.Plan(ring=2), 1), (xc.Plan(cfg=2), 2)]
    for rank_result in pools(2).run(_measured_vs_planned, cases):
        for plan, measured, planned in rank_result:
            assert measured == planned > 0, plan


# --------------------------------------------------------------------------- cost model


def test_links_follow_the_mesh_layout():
    l40, h100 = cost.get_hardware("l40-pcie"), cost.get_hardware("h100-sxm")
    p = xc.Plan(cfg=2, ulysses=4)
    assert cost.axis_span(p, "ulysses") == 4 and cost.axis_span(p, "cfg") == 8
    assert l40.link(4, 1, 8).name == "pcie"  # ulysses: inside one socket's half of the node
    assert l40.link(8, 1, 8).name == "upi"  # cfg: across the sockets
    assert (
        l40.link(3, 1, 6).name == "pcie" and l40.link(6, 1, 6).name == "upi"
    )  # 6 GPUs: 3 per socket
    assert h100.link(8, 1, 8).name == "nvlink"
    assert h100.link(8, 2, 16).name == "nvlink" and h100.link(16, 2, 16).name == "network"


def _work(**kw) -> cost.Work:
    return cost.Work(
        matmul_flops=1e12,
        attention_flops=1e12,
        eager_bytes=1e9,
        fused_bytes=1e8,
        ops=100,
        kernels=10,
        serial_flops=2e12,
        **kw,
    )


def test_ring_hides_behind_attention_and_ulysses_does_not():
    hw = cost.get_hardware("h100-sxm")
    attn = 1e12 / hw.attention
    small = 0.1 * attn * hw.levels[0][1].bandwidth  # bytes a tenth of the attention time moves
    ring = cost.predict(
        xc.Plan(ring=4), _work(comm={("send_recv", "ring"): [3, small]}, ring_steps=4), hw
    )
    assert ring.comm["ring"] == 0 and ring.hidden > 0
    uly = cost.predict(xc.Plan(ulysses=4), _work(comm={("all_to_all", "ulysses"): [4, small]}), hw)
    assert uly.comm["ulysses"] == pytest.approx(
        4 * hw.levels[0][1].latency + small / hw.levels[0][1].bandwidth
    )
    big = 10 * attn * hw.levels[0][1].bandwidth
    ring_big = cost.predict(
        xc.Plan(ring=4), _work(comm={("send_recv", "ring"): [3, big]}, ring_steps=4), hw
    )
    assert ring_big.comm["ring"] == pytest.approx(
        ring_big.comm["ring"] + ring_big.hidden - 0.75 * attn
    )


def test_pipefusion_bubble():
    hw = cost.get_hardware("h100-sxm")
    w = _work()
    one = cost.predict(xc.Plan(), w, hw, steps=10)
    for p, m in [(2, 2), (4, 4), (4, 8)]:
        pw = w.scaled(1 / p)
        pred = cost.predict(xc.Plan(pipefusion=p, patches=m), pw, hw, steps=10)
        # (M + P - 1) patch-stage slots of compute / (P M) each, per step.
        assert pred.step == pytest.approx(one.step / p * (m + p - 1) / m, rel=1e-3)
        assert pred.warmup_extra > 0  # the warmup step runs the stages one after another


def test_faster_hardware_is_never_slower(pixart_cfg):
    _, _, load = pixart_cfg
    base = cost.get_hardware("l40-pcie")
    faster = dataclasses.replace(
        base,
        matmul=2 * base.matmul,
        attention=2 * base.attention,
        memory=2 * base.memory,
        levels=tuple(
            (s, dataclasses.replace(lk, bandwidth=2 * lk.bandwidth)) for s, lk in base.levels
        ),
    )
    for plan in planner.enumerate_plans(4, batch=2, cfg_in_batch=True):
        w = load.work(plan)
        if isinstance(w, str):
            continue
        assert cost.predict(plan, w, faster).total <= cost.predict(plan, w, base).total, plan


def test_calibrate_measures_this_machine():
    hw = cost.calibrate(link=False)
    assert hw.name == "calibrated" and hw.matmul > 1e8 and hw.attention > 1e7 and hw.memory > 1e8
    assert 0 < hw.op_overhead < 1e-2
    assert set(hw.elementwise) == set(cost.ELEMENTWISE) and min(hw.elementwise.values()) > 1e6
    assert not hw.shared  # one process: no shared rates
    assert cost.Hardware.from_dict(hw.as_dict()) == hw


def test_calibrate_two_ranks_measures_them_together_and_the_link():
    hw = cost.calibrate(ranks=2)
    assert hw.shared_ranks == 2
    assert {"matmul", "attention", "memory"} <= set(hw.shared)
    assert {f"elementwise.{k}" for k in cost.ELEMENTWISE} <= set(hw.shared)
    link = hw.levels[0][1]
    assert link.bandwidth > 1e6 and 0 < link.latency < 0.1
    assert cost.Hardware.from_dict(hw.as_dict()) == hw


class _Gelus(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(16, 64)

    def forward(self, x):
        h = self.lin(x)
        # A permuted tensor reshaped: no view of it has this shape, so the reshape copies.
        y = h.permute(0, 2, 1).reshape(x.shape[0], -1)
        z = h.reshape(x.shape[0], -1)  # contiguous: a view, free
        return (
            torch.nn.functional.gelu(y, approximate="tanh")
            + torch.nn.functional.gelu(z)
            + torch.sigmoid(z)
        )


def test_transcendentals_and_copying_reshapes_are_accounted():
    x = torch.randn(2, 8, 16)
    load = planner.workload(_Gelus(), {"x": x})
    w = load.work(xc.Plan())
    n = 2 * 8 * 64  # elements of every pointwise output here
    assert w.elementwise["gelu_tanh"][0] == n and w.elementwise["gelu"][0] == n
    assert w.elementwise["sigmoid"][0] == n
    assert w.elementwise["gelu_tanh"][1] == 2 * 4 * n  # read and written once, fp32
    # linear out + its view read by the reshape copy (out+in), then 3 ops out+in, 2 adds.
    assert w.eager_bytes == 4 * n * (2 + 3 * 2 + 2 * 3)
    hw = dataclasses.replace(cost.get_hardware("cpu"), elementwise={"gelu_tanh": 1e6})
    fast = dataclasses.replace(hw, elementwise={"gelu_tanh": 1e15})
    base = cost.predict(xc.Plan(), w, fast, steps=1).step
    slow = cost.predict(xc.Plan(), w, hw, steps=1).step
    # The slow op costs its arithmetic instead of its memory traffic; a fast one never less.
    assert slow - base == pytest.approx(n / 1e6 - 2 * 4 * n / hw.memory, rel=1e-9)
    assert base == cost.predict(xc.Plan(), w, dataclasses.replace(hw, elementwise={}), steps=1).step
    # Compiled graphs fuse pointwise ops into vectorized kernels: no eager arithmetic term.
    assert (
        cost.predict(xc.Plan(compile="inductor"), w, hw, steps=1).step
        == cost.predict(xc.Plan(compile="inductor"), w, fast, steps=1).step
    )


# --------------------------------------------------------------------------- planner


def test_invalid_plans_say_why(pixart_cfg):
    _, _, load = pixart_cfg
    got = load.work(xc.Plan(pipefusion=4))
    assert isinstance(got, str) and "4 stages but 2 blocks" in got
    ranked = planner.rank_plans(
        load, 4, "h100-sxm", plans=[xc.Plan(pipefusion=4), xc.Plan(ulysses=4)]
    )
    assert ranked[-1].prediction is None and "blocks" in ranked[-1].invalid
    assert ranked[0].prediction is not None


def test_heads_ulysses_does_not_divide_cost_the_slowest_rank(pixart_cfg):
    """4 heads over ulysses=3 (2 + 1 + 1): valid, and rank 0 is charged its 2 heads of every
    query row of the self-attentions, more than a third of their work."""
    _, _, load = pixart_cfg
    assert load.heads is not None and load.heads % 3
    uly, ring = load.work(xc.Plan(ulysses=3)), load.work(xc.Plan(ring=3))
    assert not isinstance(uly, str) and not isinstance(ring, str)
    assert uly.attention_flops > ring.attention_flops * 1.2


def test_auto_picks_cfg_for_a_cfg_pipeline(pixart_cfg):
    model, inputs, _ = pixart_cfg
    # Cutting the CFG branches sends one output gather; every sequence plan sends per layer.
    assert xc.auto_plan(model, inputs, 2, "l40-pcie", cfg_in_batch=True) == xc.Plan(cfg=2)
    # 4 ranks over PCIe: the CFG cut plus a 2-way sequence cut beats any 4-way sequence cut. (On
    # NVLink this tiny model's plans are all within a few microseconds of each other.)
    plan = xc.auto_plan(model, inputs, 4, "l40-pcie", cfg_in_batch=True, compile="inductor")
    assert plan.cfg == 2 and plan.world_size == 4 and plan.compile == "inductor"
    assert plan.pipefusion == plan.distrifusion == 1  # exact plans unless approximate=True


def test_cli_plan(capsys, tmp_path):
    out = tmp_path / "plans.json"
    assert (
        cli(
            [
                "plan",
                "--model",
                "pixart-sigma",
                "--size",
                "tiny",
                "--gpus",
                "4",
                "--hardware",
                "l40-pcie",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "4 x l40-pcie" in text and "best: Plan(" in text and "cfg=2" in text
    assert out.exists() and '"plans"' in out.read_text()
    assert (
        cli(
            [
                "plan",
                "--model",
                "pixart-sigma",
                "--size",
                "tiny",
                "--gpus",
                "4",
                "--hardware",
                "tpu",
            ]
        )
        == 2
    )


def test_meta_capture_of_a_full_size_model_is_cheap():
    """The full-size accounting never allocates weights: SD3 (2B parameters) at 1024 px."""
    load = planner.zoo_workload("sd3", height=1024, width=1024)
    w = load.work(xc.Plan(ulysses=2))
    assert not isinstance(w, str)
    assert w.serial_flops > 1e13 and w.flops < w.serial_flops * 0.6
    assert all(p.device.type == "meta" for gm, _ in load.graphs for p in gm.parameters())
    assert torch.tensor(0).device.type == "cpu"
