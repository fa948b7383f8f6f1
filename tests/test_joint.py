"""Joint text+image attention: text K/V are never sent by any collective.

Byte accounting per tensor: with the image fixed, the bytes every K/V-moving collective
(Ulysses all-to-all, Ring send/recv) sends must not change when the text gets longer; only the
gather of the text rows' attention *outputs* over heads (Ulysses) may grow, by exactly the
text rows' share. A design that sent text K/V (or padded them in) fails this.
"""

from __future__ import annotations

import pytest
import torch

import xdit_compile as xc
from xdit_compile.jobs.compare import rel_error
from xdit_compile.placement import even_split


def _flux(text_len: int) -> tuple[torch.nn.Module, dict]:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=32,
        pooled_projection_dim=16,
        guidance_embeds=False,
        axes_dims_rope=(2, 2, 4),
    ).eval()
    g = torch.Generator().manual_seed(1)
    h, w = 5, 7  # 35 image tokens: uneven over 2 and 4 ranks
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    inputs = dict(
        hidden_states=torch.randn(1, h * w, 16, generator=g),
        encoder_hidden_states=torch.randn(1, text_len, 32, generator=g),
        pooled_projections=torch.randn(1, 16, generator=g),
        timestep=torch.tensor([0.5]),
        img_ids=ids.reshape(h * w, 3),
        txt_ids=torch.zeros(text_len, 3),
        return_dict=False,
    )
    return model, inputs


def _bytes_by_op(plan: xc.Plan, text_len: int) -> dict:
    from xdit_compile.runtime.collectives import comm_stats

    model, inputs = _flux(text_len)
    with torch.no_grad():
        ref = model(**inputs)
    pm = xc.parallelize(model, plan)
    pm.prepare(**inputs)
    comm_stats().reset()
    out = pm(**inputs)
    return {
        "err": rel_error(out, ref),
        "comm": comm_stats().as_dict(),
        "breaks": len(pm.last.breaks),
    }


@pytest.mark.dist
@pytest.mark.parametrize(
    "plan,world", [(dict(ulysses=2), 2), (dict(ring=2), 2), (dict(ulysses=2, ring=2), 4)]
)
def test_text_kv_never_sent(pools, plan, world):
    """Default: text rows leave attention cut over the ranks (each rank gets its even piece of
    them with all heads, riding in Ulysses' output all-to-all), and are gathered back as hidden
    states before the next K/V projections; query rows may stay cut. Text K/V are never sent."""
    short = pools(world).run(_bytes_by_op, xc.Plan(**plan), 6)
    long = pools(world).run(_bytes_by_op, xc.Plan(**plan), 22)
    for rank, (a, b) in enumerate(zip(short, long, strict=True)):
        assert a["err"] < 1e-4 and b["err"] < 1e-4  # exact vs serial (fp32, see test_models_dist)
        assert a["breaks"] == b["breaks"] == 0
        assert a["comm"].get("send_recv@ring") == b["comm"].get("send_recv@ring")  # ring K/V
        assert "all_gather@ulysses" not in b["comm"]
        if plan.get("ulysses", 1) > 1:
            # Text rows in the all-to-alls, [rows, 2 heads, 8] fp32 each way: both joint
            # attention layers send the Ulysses peer its piece of the text output rows; the
            # single-stream layer (whose text rows arrive cut) also sends this rank's piece of
            # the text *queries*. Sending text K/V would add two more terms per layer.
            peer = rank ^ 1  # ring-major, ulysses-minor: the other rank of this Ulysses pair
            grown = [even_split(22, world)[r] - even_split(6, world)[r] for r in range(world)]
            grow = (
                b["comm"]["all_to_all@ulysses"]["bytes"] - a["comm"]["all_to_all@ulysses"]["bytes"]
            )
            assert grow == (2 * grown[peer] + 1 * grown[rank]) * 2 * 8 * 4
        # The single-stream block gathers its cut text rows (hidden states) before Q/K/V.
        assert b["comm"]["all_gather@sp"]["bytes"] > a["comm"]["all_gather@sp"]["bytes"]


@pytest.mark.dist
@pytest.mark.parametrize("plan,world", [(dict(ulysses=2), 2), (dict(ring=2), 2)])
def test_text_kv_never_sent_with_whole_text_rows(pools, plan, world):
    """``disable_passes=("shard_text_rows",)``: text rows stay on every rank; Ulysses gathers
    the text outputs over heads instead."""
    p = xc.Plan(**plan, disable_passes=("shard_text_rows",))
    short = pools(world).run(_bytes_by_op, p, 6)
    long = pools(world).run(_bytes_by_op, p, 22)
    for a, b in zip(short, long, strict=True):
        assert a["err"] < 1e-4 and b["err"] < 1e-4
        assert a["breaks"] == b["breaks"] == 0
        for key in ("all_to_all@ulysses", "send_recv@ring", "all_gather@sp"):
            assert a["comm"].get(key) == b["comm"].get(key), key  # K/V traffic: image only
        if plan.get("ulysses", 1) > 1:
            # 2 joint attention layers gather text outputs over heads: [1, 2 heads, T, 8] fp32
            # sent to the one peer of the Ulysses group.
            grow = (
                b["comm"]["all_gather@ulysses"]["bytes"] - a["comm"]["all_gather@ulysses"]["bytes"]
            )
            assert grow == 2 * (22 - 6) * 2 * 8 * 4
        else:
            assert "all_gather@ulysses" not in b["comm"]


def _overlap_on_and_off():
    model, inputs = _flux(12)
    outs, orders = {}, {}
    for label, off in (("on", ()), ("off", ("overlap_collectives",))):
        pm = xc.parallelize(model, xc.Plan(ulysses=2, disable_passes=off))
        outs[label] = pm(**inputs)[0]
        nodes = list(pm.last.graph.graph.nodes)
        orders[label] = [
            (
                n.name,
                n.op if n.op != "call_function" else getattr(n.target, "__name__", str(n.target)),
                sorted(u.name for u in n.users),
                [str(a) for a in n.all_input_nodes],
            )
            for n in nodes
        ]
    return {"same": torch.equal(outs["on"], outs["off"]), "orders": orders}


@pytest.mark.dist
def test_overlap_collectives_start_early_finish_late_same_result(pools):
    """The split collectives compute the same bits as the single call (same ops, reordered); each
    start sits right after its input's producer, each finish right before the first use, and in
    Flux's single block the text-row gather has the MLP and Q projections in flight over it."""
    for r in pools(2).run(_overlap_on_and_off):
        assert r["same"]
        on = r["orders"]["on"]
        assert sum(t in ("gather_shard", "gather_text") for _, t, _, _ in r["orders"]["off"]) == 2
        pos = {name: i for i, (name, *_) in enumerate(on)}
        starts = [(i, e) for i, e in enumerate(on) if e[1].endswith("_start")]
        assert {e[1] for _, e in starts} == {"gather_text_start", "gather_shard_start"}
        assert not any(e[1] in ("gather_shard", "gather_text") for e in on)
        for i, (_name, _, users, inputs) in starts:
            (finish,) = users
            j = pos[finish]
            # right after the producer of its input (or the last placeholder); the finish right
            # before its first user
            assert on[i - 1][0] in inputs or (
                on[i - 1][1] == "placeholder" and on[i][1] != "placeholder"
            )
            first_use = min(pos[u] for u in on[j][2])
            assert first_use == j + 1
        text = next(i for i, e in starts if e[1] == "gather_text_start")
        finish = pos[on[text][2][0]]
        between = [on[k][1] for k in range(text + 1, finish)]
        assert between.count("linear.default") >= 2, (
            between
        )  # proj_mlp and to_q run during the gather


def _text_heads_on_and_off():
    import torch.distributed as dist

    model, inputs = _flux(12)
    with torch.no_grad():
        ref = model(**inputs)[0]
    res = {"rank": dist.get_rank()}
    for label, off in (("on", ()), ("off", ("text_heads",))):
        pm = xc.parallelize(model, xc.Plan(ulysses=2, disable_passes=off))
        out = pm(**inputs)[0]
        rep = xc.explain(pm)
        pads = [n.args[1] for n in pm.last.graph.graph.nodes if "constant_pad_nd" in str(n.target)]
        res[label] = {
            "err": float((out - ref).abs().max() / ref.abs().max()),
            "out": out,
            "flops": rep.flops,
            "pads": pads,
        }
    return res


@pytest.mark.dist
def test_text_heads_projects_only_this_ranks_heads(pools):
    """Ulysses=2 on joint attention: the text K/V projections (add_k_proj, add_v_proj; and
    add_q_proj of the first block, whose text query rows are on every rank) compute only this
    rank's 2 of 4 heads (the rest are zeros the attention never reads); the output matches
    serial as before, and each rank's FLOPs drop by exactly half of those projections."""
    text_len, width = 12, 32  # joint_attention_dim -> inner dim 4 heads x 8
    saved = 3 * (2 * text_len * width * width) // 2  # Q, K and V, half of the heads, 1 dual block
    for r in pools(2).run(_text_heads_on_and_off):
        assert r["on"]["err"] < 1e-5 and r["off"]["err"] < 1e-5
        assert torch.allclose(r["on"]["out"], r["off"]["out"], rtol=0, atol=1e-6)
        assert r["off"]["flops"] - r["on"]["flops"] == saved
        own = [[0, 16]] * 3 if r["rank"] == 0 else [[16, 0]] * 3  # features of heads 0-1 / 2-3
        assert r["on"]["pads"] == own and r["off"]["pads"] == []


class _LeakyJoint(torch.nn.Module):
    """Joint attention whose text K is also used outside attention (``leak``): the text K
    projection must then keep every head."""

    def __init__(self, leak: bool) -> None:
        super().__init__()
        self.leak = leak
        self.q, self.k, self.v = (torch.nn.Linear(16, 16) for _ in range(3))
        self.tq, self.tk, self.tv = (torch.nn.Linear(16, 16) for _ in range(3))
        self.out = torch.nn.Linear(16, 16)

    def forward(
        self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        b, s, _ = hidden_states.shape
        t = encoder_hidden_states.shape[1]

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(b, x.shape[1], 4, 4).transpose(1, 2)

        tk = self.tk(encoder_hidden_states)
        q = torch.cat([heads(self.tq(encoder_hidden_states)), heads(self.q(hidden_states))], dim=2)
        k = torch.cat([heads(tk), heads(self.k(hidden_states))], dim=2)
        v = torch.cat([heads(self.tv(encoder_hidden_states)), heads(self.v(hidden_states))], dim=2)
        o = (
            torch.nn.functional.scaled_dot_product_attention(q, k, v)
            .transpose(1, 2)
            .reshape(b, s + t, 16)
        )
        o = self.out(o[:, t:])
        return o + tk.mean() if self.leak else o


@pytest.fixture
def fake_pg2():
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("leak", [False, True])
def test_text_heads_leaves_text_kv_used_elsewhere(fake_pg2, leak):
    torch.manual_seed(0)
    model = _LeakyJoint(leak).eval()
    inputs = {
        "hidden_states": torch.randn(1, 8, 16),
        "encoder_hidden_states": torch.randn(1, 4, 16),
    }
    pm = xc.parallelize(model, xc.Plan(ulysses=2, seed="hidden_states"))
    pm.prepare(**inputs)
    assert any(
        "usp_attention" in str(n.target) for n in pm.last.graph.graph.nodes
    )  # joint, text rows kept
    assert pm.last.text_heads_localized == (2 if leak else 3)  # Q and V only when K leaks
