"""Bad plans and inputs fail fast with a clear message, and no worker is left hanging."""

from __future__ import annotations

import time

import pytest

from xdit_compile import Plan
from xdit_compile.jobs.compare import compare_zoo_model
from xdit_compile.testing.launcher import WorkerError


def test_unknown_degree_is_rejected():
    with pytest.raises(TypeError, match="tensor"):
        Plan(tensor=2)  # type: ignore[call-arg]


def test_every_axis_is_built():
    assert Plan(cfg=2, dp=2, ring=2, ulysses=2).world_size == 16
    assert Plan(pipefusion=2, ulysses=2, cfg=2).world_size == 8
    assert Plan(distrifusion=4, cfg=2).world_size == 8
    assert Plan(pipefusion=4).displaced_patches == 4  # patches default to the stage count
    assert (
        str(Plan(pipefusion=2, patches=8, warmup_steps=2))
        == "Plan(pipefusion=2, patches=8, warmup_steps=2, compile=None)"
    )


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_degree_must_be_positive_int(bad):
    with pytest.raises(ValueError, match="integer >= 1"):
        Plan(ulysses=bad)


def test_world_size_mismatch_message():
    with pytest.raises(ValueError, match="needs 4 processes .* world size is 2"):
        Plan(ulysses=2, ring=2).check_world_size(2)


def _fail_with_world_mismatch():
    import xdit_compile as xc
    from xdit_compile.models import build_model

    xc.parallelize(build_model("dit-xl-2"), Plan(ulysses=4))


@pytest.mark.dist
def test_world_size_mismatch_in_workers(pools):
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match="needs 4 processes"):
        pools(2).run(_fail_with_world_mismatch, timeout=120)
    assert time.monotonic() - t0 < 120
    # The pool restarts cleanly after a failure.
    assert pools(2).run(int, 3) == [3, 3]


@pytest.mark.dist
@pytest.mark.parametrize("plan", [Plan(ring=2), Plan(ulysses=2)], ids=["ring2", "ulysses2"])
def test_heads_ulysses_does_not_divide_run_exact(pools, plan):
    """3 heads over 2 Ulysses ranks: uneven head groups (2 + 1), no refusal
    (tests/test_heads.py)."""
    (r0, r1) = pools(2).run(
        compare_zoo_model,
        "pixart-sigma",
        plan,
        config={"num_attention_heads": 3, "cross_attention_dim": 24},
    )
    assert r0.rel_error < 1e-4 and r1.rel_error < 1e-4


@pytest.mark.dist
def test_too_few_rows(pools):
    with pytest.raises(WorkerError, match="token rows .* needs at least 4"):
        pools(4).run(
            compare_zoo_model,
            "dit-xl-2",
            Plan(ulysses=2, ring=2),
            inputs={"height": 6, "width": 6},
            timeout=120,
        )


def _die_on_rank_1():
    import os

    import torch.distributed as dist

    if dist.get_rank() == 1:
        os._exit(3)
    dist.barrier()  # rank 0 would wait here forever without the pool's timeout


@pytest.mark.dist
def test_dead_worker_does_not_hang(pools):
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match=r"worker process died: rank 1: exit code 3"):
        pools(2).run(_die_on_rank_1, timeout=120)
    assert time.monotonic() - t0 < 20  # noticed when the process dies, not at the timeout
    assert pools(2).run(int, 1) == [1, 1]


def test_workers_exit_when_their_parent_is_killed(tmp_path):
    """A pool whose parent dies without closing it (a killed pytest) leaves no orphans behind:
    each worker watches its parent and exits."""
    import subprocess
    import sys

    script = tmp_path / "parent.py"
    script.write_text(
        "import os\n"
        "from xdit_compile.testing.launcher import WorkerPool\n"
        "if __name__ == '__main__':\n"
        "    pool = WorkerPool(2)\n"
        "    print(*pool.run(os.getpid), flush=True)\n"
        "    os._exit(0)  # no pool.close(): the workers are orphaned\n"
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 2, out.stderr[-2000:]
    deadline = time.monotonic() + 30
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.5)
        alive = [p for p in pids if _running(p)]
    assert not alive, f"workers {alive} outlived their parent"


def _running(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by init) is not running
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
