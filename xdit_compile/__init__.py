"""xdit_compile: parallel Diffusion Transformers by graph rewriting, with no per-model code."""

from collections.abc import Mapping
from typing import Any

from xdit_compile.analysis.cost import Hardware
from xdit_compile.analysis.planner import auto as _auto
from xdit_compile.analysis.report import Report, build_report
from xdit_compile.api import ParallelModule, init_distributed, parallelize
from xdit_compile.compiler.program import Program
from xdit_compile.pipeline import parallelize_pipeline, parallelize_vae
from xdit_compile.plan import MeshAxis, Plan

__all__ = [
    "MeshAxis",
    "ParallelModule",
    "Plan",
    "Program",
    "Report",
    "auto_plan",
    "explain",
    "init_distributed",
    "parallelize",
    "parallelize_pipeline",
    "parallelize_vae",
]
__version__ = "0.1.0"


def explain(pm: ParallelModule) -> Report:
    """Structured report of what was rewritten for ``pm``'s last input signature.

    ``print(explain(pm))`` shows it readably; the fields (``collectives``, ``breaks``, ...)
    are data for tools and tests.
    """
    return build_report(pm)


def auto_plan(
    model: Any,
    example_inputs: Mapping[str, Any],
    world_size: int,
    hardware: str | Hardware = "h100-sxm",
    **options: Any,
) -> Plan:
    """The plan the cost model predicts fastest for ``model(**example_inputs)`` on ``world_size``
    GPUs of ``hardware`` (a profile name of :mod:`xdit_compile.analysis.cost`, a calibrated JSON
    file, or a ``Hardware``). Exact plans only unless ``approximate=True``; other options:
    ``steps``, ``nodes``, ``compile``, ``cfg_in_batch`` (the batch holds both CFG branches).
    ``Plan(auto=True)`` makes the same choice at the first call. See
    :func:`xdit_compile.analysis.planner.auto` and ``xdit-compile plan``."""
    return _auto(model, dict(example_inputs), world_size, hardware, **options)
