"""xdit_compile: parallel Diffusion Transformers by graph rewriting, with no per-model code."""

from xdit_compile.api import ParallelModule, init_distributed, parallelize
from xdit_compile.plan import MeshAxis, Plan

__all__ = ["MeshAxis", "ParallelModule", "Plan", "explain", "init_distributed", "parallelize"]
__version__ = "0.1.0"


def explain(pm: ParallelModule, *, rank_view: bool = True) -> "Report":  # noqa: F821
    """Structured report of what was rewritten for ``pm``'s last input signature."""
    from xdit_compile.report import build_report

    return build_report(pm)
