"""CFG parallel and data parallel (batch sharding rounds), alone and with sequence parallelism.

Serial vs parallel on gloo with the zoo's tiny models, relative error < 1e-4 in fp32 (see
test_models_dist): cutting the batch only changes matmul shapes, so differences are float
rounding (measured <= 6e-7).
"""

from __future__ import annotations

import pytest

from xdit_compile import Plan
from xdit_compile.jobs.compare import compare_zoo_model
from xdit_compile.testing.launcher import WorkerError

TOL = 1e-4
# Pipelines that run both CFG branches in one transformer call ([uncond, cond] in dim 0).
BATCHED_CFG = ["pixart-sigma", "sd3", "cogvideox-2b", "latte", "hunyuan-dit"]


def _check(results: list, axes: dict[str, int]) -> None:
    for r in results:
        assert r.rel_error < TOL, r
        assert r.breaks == [], r.breaks
        for axis in axes:
            assert r.comm[f"all_gather@{axis}"]["calls"] == 1, r.comm  # the output, once


@pytest.mark.dist
@pytest.mark.parametrize("name", BATCHED_CFG)
def test_cfg2_matches_serial(pools, name):
    _check(pools(2).run(compare_zoo_model, name, Plan(cfg=2), inputs={"batch": 2}), {"cfg": 2})


@pytest.mark.dist
@pytest.mark.parametrize("name", ["pixart-sigma", "flux-dev"])
def test_dp2_uneven_batch_matches_serial(pools, name):
    """3 samples over 2 ranks: pieces of 2 and 1, gathered back in order."""
    results = pools(2).run(compare_zoo_model, name, Plan(dp=2), inputs={"batch": 3})
    _check(results, {"dp": 2})


@pytest.mark.dist
@pytest.mark.parametrize(
    "plan",
    [dict(cfg=2, ulysses=2), dict(dp=2, ring=2), dict(cfg=2, ring=2), dict(dp=2, cfg=2)],
    ids=lambda p: "x".join(f"{k}{v}" for k, v in p.items()),
)
@pytest.mark.parametrize("name", ["pixart-sigma", "sd3"])
def test_hybrid_4_ranks(pools, name, plan):
    batch = 4 if plan.get("dp", 1) * plan.get("cfg", 1) == 4 else 2
    results = pools(4).run(compare_zoo_model, name, Plan(**plan), inputs={"batch": batch})
    _check(results, {a: d for a, d in plan.items() if a in ("cfg", "dp")})


@pytest.mark.dist
def test_dp_needs_a_batch_to_cut(pools):
    with pytest.raises(WorkerError, match=r"latent batch is 1, dp=2 cannot split it"):
        pools(2).run(compare_zoo_model, "pixart-sigma", Plan(dp=2), inputs={"batch": 1})


@pytest.mark.dist
def test_cfg_with_one_branch_per_call_runs_whole_until_paired(pools):
    """Batch 1 under cfg=2: no batch to cut, so calls are paired (test_pipeline_parallel); the
    first two calls (which learn the pattern) run whole on every rank, exactly."""
    for r in pools(2).run(compare_zoo_model, "pixart-sigma", Plan(cfg=2), inputs={"batch": 1}):
        assert r.rel_error < TOL and r.breaks == [], r
        assert "all_gather@cfg" not in r.comm
