"""PipeFusion's schedule as data, its simulator and the stage balancing: no processes."""

from __future__ import annotations

import pytest

from xdit_compile.passes.stages import StageCut, balance
from xdit_compile.runtime.schedule import (
    Action,
    Deadlock,
    grid,
    pipefusion_schedule,
    simulate,
    speedup_bound,
)


@pytest.mark.parametrize("stages", range(1, 9))
def test_every_schedule_completes(stages):
    for patches in range(stages, 17):
        starts = simulate(pipefusion_schedule(stages, patches))
        for s, per in enumerate(starts):
            # stage s runs patch j in slot s + j: the pipeline fills, streams, and drains
            assert per == {j: float(s + j) for j in range(patches)}, (stages, patches, s)


def test_receives_are_posted_before_anything_runs():
    for acts in pipefusion_schedule(3, 4)[1:]:
        kinds = [a.kind for a in acts]
        assert kinds[:4] == ["POST"] * 4
        assert kinds.index("RUN") > kinds.index("WAIT")
    last = pipefusion_schedule(3, 4)[-1]
    assert "SEND" not in [a.kind for a in last] and last[-1] == Action("BCAST")


def test_simulator_finds_deadlocks():
    # A receive that is never posted: the zero-capacity send waits forever, and so does its peer.
    bad = [[Action("RUN", 0), Action("SEND", 0)], [Action("WAIT", 0), Action("RUN", 0)]]
    with pytest.raises(Deadlock, match=r"rank 0: SEND 0, rank 1: WAIT 0"):
        simulate(bad)
    # Patches received in the wrong order: rank 1 waits for patch 1, which comes after patch 0.
    swapped = pipefusion_schedule(2, 2)
    swapped[0] = [
        Action("RUN", 0),
        Action("SEND", 0),
        Action("RUN", 1),
        Action("SEND", 1),
        Action("BCAST"),
    ]
    swapped[1] = [Action("POST", 1), Action("WAIT", 1), Action("RUN", 1), Action("BCAST")]
    with pytest.raises(Deadlock, match="SEND 0"):
        simulate(swapped)
    # A broadcast one rank never joins.
    with pytest.raises(Deadlock, match="BCAST"):
        simulate([[Action("BCAST")], [Action("RUN", 0)]])


def test_grid_and_bound():
    text = grid(pipefusion_schedule(2, 3))
    assert text.splitlines()[0] == "slot | stage 0 | stage 1"
    rows = [ln.split("|") for ln in text.splitlines()[2:]]
    assert [[c.strip() for c in r[1:]] for r in rows] == [
        ["p0", "."],
        ["p1", "p0"],
        ["p2", "p1"],
        [".", "p2"],
    ]
    assert speedup_bound(4, 8) == pytest.approx(32 / 11)
    assert speedup_bound(1, 5) == 1.0
    # Unequal stage costs: the slower stage sets the pace.
    starts = simulate(pipefusion_schedule(2, 3), cost=[1.0, 2.0])
    assert starts[1] == {0: 1.0, 1: 3.0, 2: 5.0}


def test_balance_by_cost():
    assert balance([1, 1, 1, 1], 2) == (2, 2)
    assert balance([3, 1, 1, 1], 2) == (1, 3)
    assert balance([1] * 7, 3) in ((2, 2, 3), (2, 3, 2), (3, 2, 2))
    assert (
        max(sum(x) for x in _groups([5, 1, 1, 1, 1, 1, 5], balance([5, 1, 1, 1, 1, 1, 5], 3))) == 5
    )
    with pytest.raises(ValueError, match="3 stages need at least 3 blocks"):
        balance([1, 1], 3)


def _groups(costs, sizes):
    out, i = [], 0
    for s in sizes:
        out.append(costs[i : i + s])
        i += s
    return out


def test_stage_cut_lookup():
    cut = StageCut(("a.0", "a.1", "b.0", "b.1", "b.2"), (2, 3))
    assert [cut.stage_of(b) for b in cut.blocks] == [0, 0, 1, 1, 1]
    assert cut.stage_blocks(1) == ("b.0", "b.1", "b.2") and cut.stages == 2
