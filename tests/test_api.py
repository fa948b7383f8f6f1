"""parallelize(): lazy capture cached per input signature, model outputs kept, parameter check."""

from __future__ import annotations

import pytest
import torch

import xdit_compile as xc
from xdit_compile.models import build_model, example_inputs


def _signatures_and_outputs():
    import torch.distributed as dist

    model = build_model("pixart-sigma")
    pm = xc.parallelize(model, xc.Plan(ulysses=2))
    a = example_inputs("pixart-sigma", model)
    b = example_inputs("pixart-sigma", model, seed=1)  # same signature, other values
    c = example_inputs("pixart-sigma", model, height=24, width=24)  # new resolution
    outs = [pm(**x)[0] for x in (a, b, c)]
    refs = [model(**x)[0] for x in (a, b, c)]
    d = dict(a, return_dict=True)  # the model's output dataclass comes back as such
    obj, ref_obj = pm(**d), model(**d)
    err = max(float((o - r).abs().max() / r.abs().max()) for o, r in zip(outs, refs, strict=True))
    return {
        "compiled": len(pm.compiled),
        "err": err,
        "types": (type(obj).__name__, type(ref_obj).__name__),
        "dc_err": float((obj.sample - ref_obj.sample).abs().max()),
        "rank": dist.get_rank(),
        "graphs": sorted(pm.graphs),
    }


@pytest.mark.dist
def test_lazy_capture_is_cached_per_signature(pools):
    for r in pools(2).run(_signatures_and_outputs):
        assert r["compiled"] == 3  # a and b share one graph; c and the return_dict call add two
        assert r["err"] < 1e-4
        assert r["types"] == ("Transformer2DModelOutput", "Transformer2DModelOutput")
        assert r["dc_err"] < 1e-4
        assert r["graphs"] == sorted(
            [
                "capture",
                "canonicalize",
                "annotate",
                "seed",
                "propagate_sharding",
                "rewrite_attention",
                "lower_collectives",
                "text_heads",
                "overlap_collectives",
            ]
        )


def _different_weights():
    import torch.distributed as dist

    model = build_model("dit-xl-2", seed=dist.get_rank())  # rank-dependent: must be refused
    xc.parallelize(model, xc.Plan(ring=2))


@pytest.mark.dist
def test_parameters_must_match_across_ranks(pools):
    from xdit_compile.testing.launcher import WorkerError

    with pytest.raises(
        WorkerError,
        match=r"parameters differ between ranks .*(pos_embed|weight).*broadcast_weights=True",
    ):
        pools(2).run(_different_weights, timeout=120)


def _broadcast_then_run():
    import torch.distributed as dist

    from xdit_compile.models.zoo import example_inputs

    model = build_model("dit-xl-2", seed=dist.get_rank())  # different on every rank
    inputs = example_inputs("dit-xl-2", model, seed=0)
    pm = xc.parallelize(model, xc.Plan(ring=2), broadcast_weights=True)
    with torch.no_grad():
        out = pm(**inputs)[0]
    serial = build_model("dit-xl-2", seed=0)  # rank 0's weights
    with torch.no_grad():
        ref = serial(**inputs)[0]
    return float((out - ref).abs().max() / ref.abs().max())


@pytest.mark.dist
def test_broadcast_weights_uses_rank_0s_weights(pools):
    """Weights that differ by construction: rank 0's reach every rank, and the parallel output
    equals rank 0's serial model (fp32, relative error < 1e-5)."""
    errs = pools(2).run(_broadcast_then_run, timeout=180)
    assert max(errs) < 1e-5


def test_parallelize_needs_a_process_group():
    import torch.distributed as dist

    assert not dist.is_initialized()  # fixtures that make a fake group destroy it after use
    with pytest.raises(RuntimeError, match="init_distributed"):
        xc.parallelize(torch.nn.Linear(2, 2), xc.Plan())


def test_parallelize_rejects_non_plan():
    with pytest.raises(TypeError, match="Plan"):
        xc.parallelize(torch.nn.Linear(2, 2), {"ulysses": 2})  # type: ignore[arg-type]


def _auto_plan():
    import torch.distributed as dist

    model = build_model("flux-dev")
    inputs = example_inputs("flux-dev", model)
    pm = xc.parallelize(model, xc.Plan(auto=True, hardware="h100-sxm"))
    out, ref = pm(**inputs)[0], model(**inputs)[0]
    # The plan every rank received is the one the cost model gives for these inputs (computed
    # again here, on each rank, independently of rank 0's choice).
    direct = xc.auto_plan(model, inputs, dist.get_world_size(), "h100-sxm")
    return {
        "plan": pm.plan,
        "direct": direct,
        "err": float((out - ref).abs().max() / ref.abs().max()),
        "text": str(xc.Plan(auto=True, hardware="h100-sxm")),
    }


@pytest.mark.dist
def test_auto_plan_is_chosen_at_the_first_call_and_exact(pools):
    res = pools(2).run(_auto_plan, timeout=300)
    assert res[0]["plan"] == res[1]["plan"] == res[0]["direct"] == res[1]["direct"]
    plan = res[0]["plan"]
    assert not plan.auto and plan.world_size == 2 and plan.pipefusion == plan.distrifusion == 1
    assert all(r["err"] < 1e-4 for r in res)  # fp32, tiny Flux: parallel vs the same model serial
    assert res[0]["text"] == "Plan(auto, hardware=h100-sxm, compile=None)"


def test_auto_plan_options_are_checked():
    with pytest.raises(ValueError, match="auto chooses the degrees"):
        xc.Plan(auto=True, ulysses=2)
    with pytest.raises(ValueError, match="set auto=True"):
        xc.Plan(hardware="h100-sxm")
    xc.Plan(auto=True).check_world_size(8)  # any world size: the degrees are chosen for it
    with pytest.raises(RuntimeError, match="init_distributed"):
        xc.parallelize(torch.nn.Linear(2, 2), xc.Plan(auto=True))


def _groups_after_parallelizing_again():
    import torch.distributed as dist

    def groups() -> int:
        return len(dist.distributed_c10d._world.pg_map)

    model = build_model("pixart-sigma")
    x = example_inputs("pixart-sigma", model)
    first = xc.parallelize(model, xc.Plan(ulysses=2))
    first(**x)
    before = groups()
    again = [
        xc.parallelize(build_model("pixart-sigma", seed=i), xc.Plan(ulysses=2)) for i in range(3)
    ]
    out = again[-1](**x)[0]
    ring = xc.parallelize(model, xc.Plan(ring=2))  # other degrees: a mesh of its own, once
    ring(**x)
    after_ring = groups()
    xc.parallelize(model, xc.Plan(ring=2))(**x)
    ref = build_model("pixart-sigma", seed=2)(**x)[0]
    return {
        "same_mesh": all(p.mesh is first.mesh for p in again),
        "new_groups": groups() - before,
        "ring_own": ring.mesh is not first.mesh,
        "ring_groups": after_ring - before,
        "ring_again": groups() - after_ring,
        "err": float((out - ref).abs().max() / ref.abs().max()),
    }


@pytest.mark.dist
def test_parallelizing_again_reuses_the_mesh(pools):
    """Each new process group costs every rank communicators (with gloo a thread polling every
    10 ms; a test run that made new groups per parallelize slowed to a crawl): the same degrees
    in the same default group reuse one mesh, other degrees build theirs once (or found it built
    by an earlier test in this pool)."""
    for r in pools(2).run(_groups_after_parallelizing_again):
        assert r["same_mesh"] and r["err"] < 1e-4, r
        assert r["ring_own"] and r["ring_again"] == 0, r
        assert r["new_groups"] == r["ring_groups"], r
