"""torch.compile(inductor) on the rewritten graph, and the command line end to end."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from xdit_compile import Plan
from xdit_compile.jobs.compare import compare_zoo_model


@pytest.mark.dist
@pytest.mark.slow
def test_inductor_matches_serial(pools):
    # Inductor may fuse/reorder float ops: same 1e-4 relative bound as eager.
    for r in pools(2).run(
        compare_zoo_model, "pixart-sigma", Plan(ulysses=2, compile="inductor"), timeout=600
    ):
        assert r.rel_error < 1e-4, r
        assert r.breaks == []


@pytest.mark.dist
@pytest.mark.slow
def test_inductor_ring_without_text_rows(pools):
    """Ring's attention kernel returns its output in [B, S, H, D] order; the compiled graph
    asserts the op's real strides against its fake (contiguous) ones: Wan's self-attention
    (no text rows joined) under ring=2, compiled."""
    for r in pools(2).run(
        compare_zoo_model, "wan2.1", Plan(ring=2, compile="inductor"), timeout=600
    ):
        assert r.rel_error < 1e-4, r
        assert r.breaks == []


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, "-m", "xdit_compile.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_cli_explain_without_workers():
    p = _cli("explain", "--model", "pixart-sigma", "--ulysses", "2", "--ring", "2")
    assert p.returncode == 0, p.stderr
    assert "sharding breaks: 0" in p.stdout
    assert "xdit.usp_attention" in p.stdout and "gather_shard" in p.stdout  # the graph


@pytest.mark.dist
def test_cli_run(tmp_path):
    out = tmp_path / "r.json"
    p = _cli(
        "run",
        "--model",
        "dit-xl-2",
        "--nproc",
        "2",
        "--ring",
        "2",
        "--iters",
        "1",
        "--json",
        str(out),
    )
    assert p.returncode == 0, p.stderr
    assert "max relative difference vs serial" in p.stdout
    assert out.exists()


def test_cli_bad_plan_fails_before_launch():
    p = _cli("run", "--model", "dit-xl-2", "--nproc", "3", "--ulysses", "2", timeout=60)
    assert p.returncode == 2 and "needs 2 processes" in p.stderr


def test_cli_unknown_model():
    p = _cli("explain", "--model", "nope", "--ulysses", "2", timeout=60)
    assert p.returncode == 2 and "known models" in p.stderr
