"""Every zoo model compiles at ``pipefusion=2`` and ``distrifusion=2`` with no sharding break, or
is refused with a message naming the op that mixes patches (one process, fake process group:
compilation only; numerics are in test_displaced)."""

from __future__ import annotations

import pytest
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

import xdit_compile as xc
from xdit_compile.models import build_model, example_inputs, get_entry, list_models

#: The zoo records which models PipeFusion cannot cut into patches, and the op the refusal names
#: (``ZooEntry.pipefusion_refused``): Sana's linear attention sums over all tokens (a partial sum
#: across patches); Mochi picks its valid text tokens with an index on text rows that only the
#: first patch holds. This test checks every entry's record (the README's table shows them).
#: Sana has no softmax attention (linear attention: exact partial sums), so nothing is displaced.
NO_SOFTMAX_ATTENTION = {"sana"}


@pytest.fixture(scope="module")
def fake_pg():
    dist.init_process_group("fake", store=FakeStore(), rank=1, world_size=2)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize(
    "plan", [xc.Plan(pipefusion=2), xc.Plan(distrifusion=2)], ids=["pipefusion2", "distrifusion2"]
)
@pytest.mark.parametrize("name", list_models())
def test_zoo_compiles_or_is_refused(fake_pg, name, plan):
    model = build_model(name, "tiny")
    kwargs = example_inputs(name, model)
    pm = xc.parallelize(model, plan)
    refused = get_entry(name).pipefusion_refused if plan.pipefusion > 1 else None
    if refused:
        with pytest.raises(
            ValueError, match=f"PipeFusion cannot cut this model into patches: .*{refused}"
        ):
            pm.prepare(**kwargs)
        return
    pm.prepare(**kwargs)
    report = xc.explain(pm)
    assert report.breaks == []
    if plan.pipefusion > 1:  # rank 1 = the last stage: the second half of the blocks
        info = report.pipefusion
        assert info.stage == 1 and sum(info.cut.counts) == len(info.cut.blocks) >= 2
        assert len(info.buffers) > 0
    else:
        assert (len(report.displaced) > 0) == (name not in NO_SOFTMAX_ATTENTION)


@pytest.mark.parametrize(
    "plan,match",
    [
        (
            xc.Plan(pipefusion=2, stage_blocks=(1, 2)),
            r"stage_blocks=\(1, 2\) sums to 3, but the model has 2 blocks",
        ),
        (
            xc.Plan(pipefusion=2, patches=16),
            "8 token rows .* 16 PipeFusion patches need at least 16: use fewer patches",
        ),
    ],
)
def test_pipefusion_plans_that_cannot_work(fake_pg, plan, match):
    model = build_model("pixart-sigma", "tiny")
    with pytest.raises(ValueError, match=match):
        xc.parallelize(model, plan).prepare(**example_inputs("pixart-sigma", model))


def test_more_stages_than_blocks():
    from xdit_compile.passes.stages import balance

    with pytest.raises(ValueError, match="4 stages need at least 4 blocks, the model has 2"):
        balance([1, 1], 4)
    with pytest.raises(
        ValueError, match="PipeFusion with Ring attention is not built; cut each patch with ulysses"
    ):
        xc.Plan(pipefusion=2, ring=2)
