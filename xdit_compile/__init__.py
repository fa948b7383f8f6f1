"""xdit_compile: parallel Diffusion Transformers by graph rewriting, with no per-model code."""

from xdit_compile.analysis.planner import auto as _auto
from xdit_compile.analysis.report import Report, build_report
from xdit_compile.api import ParallelModule, init_distributed, parallelize
from xdit_compile.pipeline import parallelize_pipeline, parallelize_vae
from xdit_compile.plan import _AUTO, MeshAxis, Plan

__all__ = [
    "MeshAxis", "ParallelModule", "Plan", "Report", "explain", "init_distributed", "parallelize",
    "parallelize_pipeline", "parallelize_vae",
]
__version__ = "0.1.0"
_AUTO[:] = [_auto]  # Plan.auto (plan.py imports nothing of the package)


def explain(pm: ParallelModule) -> Report:
    """Structured report of what was rewritten for ``pm``'s last input signature.

    ``print(explain(pm))`` shows it readably; the fields (``collectives``, ``breaks``, ...)
    are data for tools and tests.
    """
    return build_report(pm)
