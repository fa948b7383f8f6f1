"""The ordered pass list a plan compiles with (STYLE: built explicitly from the plan; no global
order).

``Plan.disable_passes`` removes optional passes by name. PipeFusion compiles in two parts:
"common" (canonicalize, annotate and the batch rounds, run once) and "patch" (the patch round
and, with ``ulysses``/``ring``, the sequence round of each patch, run once per patch graph).
"""

from __future__ import annotations

from typing import Literal

from xdit_compile.passes.annotate import annotate_graph_pass
from xdit_compile.passes.attention import rewrite_attention_pass
from xdit_compile.passes.batch import batch_round
from xdit_compile.passes.canonicalize import canonicalize_graph_pass
from xdit_compile.passes.context import Pass
from xdit_compile.passes.lower import lower_collectives_pass
from xdit_compile.passes.overlap import overlap_collectives_pass
from xdit_compile.passes.patches import patch_round, patch_sequence_round
from xdit_compile.passes.seed import seed_inputs_pass
from xdit_compile.passes.sharding.propagate import propagate_sharding_pass
from xdit_compile.passes.text_heads import text_heads_pass
from xdit_compile.plan import Plan

__all__ = ["build_passes"]


def build_passes(plan: Plan, part: Literal["all", "common", "patch"] = "all") -> list[Pass]:
    """The ordered pass list for ``plan`` (``plan.disable_passes`` removes optional ones)."""
    passes: list[Pass] = []
    if part in ("all", "common"):
        passes += [
            Pass("canonicalize", canonicalize_graph_pass),
            Pass("annotate", annotate_graph_pass),
        ]
        for axis in ("cfg", "dp"):  # batch rounds first: the sequence round sees local batches
            if plan.degrees()[axis] > 1:
                passes += batch_round(axis, propagate_sharding_pass, lower_collectives_pass)
    if part == "patch":
        passes += patch_round(seed_inputs_pass, propagate_sharding_pass, lower_collectives_pass)
        if plan.sp_degree > 1:
            passes += patch_sequence_round(
                seed_inputs_pass,
                propagate_sharding_pass,
                rewrite_attention_pass,
                lower_collectives_pass,
            )
    if part == "all":
        passes += [
            Pass("seed", seed_inputs_pass),
            Pass("propagate_sharding", propagate_sharding_pass),
            Pass("rewrite_attention", rewrite_attention_pass),
            Pass("lower_collectives", lower_collectives_pass),
        ]
        if plan.ulysses > 1:
            passes.append(Pass("text_heads", text_heads_pass))
        passes.append(Pass("overlap_collectives", overlap_collectives_pass))
    return [p for p in passes if p.name not in plan.disable_passes]
