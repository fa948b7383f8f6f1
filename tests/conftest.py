"""Shared fixtures: persistent gloo worker pools (2 and 4 ranks) reused by all distributed tests."""

from __future__ import annotations

import os

import pytest

from xdit_compile.testing.launcher import WorkerPool

# Verify local shapes of every rewritten graph after its last pass (XDIT_DEBUG=1: after every
# pass, to find the pass that broke one; test_passes checks that mode).
os.environ.setdefault("XDIT_DEBUG", "final")


@pytest.fixture(scope="session")
def pools():
    made: dict[int, WorkerPool] = {}

    def get(n: int) -> WorkerPool:
        if n not in made:
            made[n] = WorkerPool(n)
        return made[n]

    yield get
    for p in made.values():
        p.close()


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests need CUDA: they are skipped (and reported) on CPU-only machines."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (GPU-only path)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
