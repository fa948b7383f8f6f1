"""Worker-side jobs shared by the CLI, tests and benchmarks: run a zoo model serially and in
parallel in the same process group and report the difference, latency and communication.

The serial reference is the plain diffusers module run on one process with the same weights
and inputs; every rank computes it locally (no collectives), so it equals a one-process run.
Rank 0 times it while the other ranks wait, so the serial latency is that of a lone process.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree

from xdit_compile.api import parallelize
from xdit_compile.plan import Plan
from xdit_compile.runtime.collectives import comm_stats

__all__ = ["CompareResult", "compare_zoo_model", "rel_error", "timed"]


@dataclass
class CompareResult:
    model: str
    plan: str
    rank: int
    rel_error: float
    serial_ms: float
    parallel_ms: float
    bytes_per_forward: int
    comm: dict[str, dict[str, int]] = field(default_factory=dict)
    breaks: list[str] = field(default_factory=list)
    seed: dict[str, Any] = field(default_factory=dict)
    flops_share: float = 1.0
    """This rank's estimated share of the forward's FLOPs (1.0: all of them, as serial)."""
    regions: int = 0
    """Regions the model was captured in (0: one whole graph)."""
    region_error: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def rel_error(out: Any, ref: Any) -> float:
    """max |out - ref| / max |ref| over all tensors of two matching output structures."""
    outs = out if isinstance(out, tuple | list) else (out,)
    refs = ref if isinstance(ref, tuple | list) else (ref,)
    err = 0.0
    for o, r in zip(outs, refs, strict=True):
        if isinstance(r, torch.Tensor):
            scale = r.detach().abs().max().clamp_min(1e-30)
            err = max(err, float((o.detach().float() - r.detach().float()).abs().max() / scale))
    return err


def timed(fn: Any, iters: int, barrier: bool) -> tuple[Any, float]:
    """``fn()`` run ``iters`` times (a barrier before each when ``barrier``): last output and
    median milliseconds."""
    times, out = [], None
    for _ in range(iters):
        if barrier:
            dist.barrier()
        t0 = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return out, statistics.median(times)


def compare_zoo_model(
    name: str,
    plan: Plan,
    *,
    size: str = "tiny",
    uneven: bool = False,
    iters: int = 1,
    warmup: int = 0,
    config: dict[str, Any] | None = None,
    inputs: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
) -> CompareResult:
    """Build zoo model ``name``, run it serially and with ``plan``; called on every rank."""
    from xdit_compile.models import build_model, example_inputs

    model = build_model(name, size, dtype=dtype, uneven=uneven, **(config or {}))
    kwargs = example_inputs(name, model, size=size, uneven=uneven, **(inputs or {}))
    # Rank 0 times the serial run alone (the others wait), so it has the machine to itself
    # like a real one-process run; the other ranks compute their reference afterwards.
    rank = dist.get_rank()
    with torch.no_grad():
        serial_ms = float("nan")
        if rank == 0:
            for _ in range(warmup):
                model(**kwargs)
            ref, serial_ms = timed(lambda: model(**kwargs), iters, barrier=False)
        dist.barrier()
        if rank != 0:
            ref = model(**kwargs)
        dist.barrier()
    pm = parallelize(model, plan)
    entry = pm.prepare(**kwargs)

    def call() -> Any:
        if pm.kv_state is None:
            return pm(**kwargs)
        # Displaced K/V: every call is a new denoising step (fresh input tensors; a call with the
        # previous call's latent tensor would be its CFG branch). The first is the warmup step.
        return pm(
            **pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, kwargs)
        )

    for _ in range(warmup):
        call()
    stats = comm_stats()
    stats.reset()
    out, parallel_ms = timed(call, iters, barrier=True)
    per_fwd = stats.total_bytes // iters
    return CompareResult(
        model=name,
        plan=str(plan),
        rank=rank,
        rel_error=rel_error(out, ref),
        serial_ms=serial_ms,
        parallel_ms=parallel_ms,
        bytes_per_forward=per_fwd,
        comm={
            k: {"calls": v["calls"] // iters, "bytes": v["bytes"] // iters}
            for k, v in stats.as_dict().items()
        },
        breaks=[f"{b.op} at {b.source}: {b.reason}" for b in _breaks(pm, entry)],
        seed={k: v for k, v in (entry.seed.as_dict() if entry.seed else {}).items() if k != "shape"}
        if entry is not None
        else {},
        flops_share=_flops_share(pm),
        regions=len(pm.all_regions()) if pm.regions is not None else 0,
        region_error=pm.region_error,
    )


def _breaks(pm: Any, entry: Any) -> list[Any]:
    if entry is not None:
        return list(entry.breaks)
    from xdit_compile.analysis.report import build_report

    return build_report(pm).breaks


def _flops_share(pm: Any) -> float:
    from xdit_compile.analysis.report import build_report

    rep = build_report(pm)
    return rep.flops / rep.serial_flops if rep.serial_flops else 1.0
