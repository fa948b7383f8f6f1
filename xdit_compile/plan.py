"""The parallel plan: which degree of each parallel method a model runs with.

A ``Plan`` is pure data. It is validated when created (degrees, backend, pass names) and again
against the world size and the model before anything runs (:func:`Plan.check_world_size`,
the ``heads`` check of the attention rule), so a bad plan fails fast with the fix in the message.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MeshAxis", "Plan", "BUILT_AXES", "OPTIONAL_PASSES", "config_heads"]

#: Config keys that name a model's attention (query) heads, by diffusers family.
_HEAD_KEYS = ("num_attention_heads", "num_heads", "heads_num", "n_heads", "attention_heads")


def config_heads(config: Mapping[str, Any] | None) -> int | None:
    """The attention (query) heads a model's config states, or None where it says nothing."""
    if not config:
        return None
    for key in _HEAD_KEYS:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


class MeshAxis(str, enum.Enum):  # enum.StrEnum is Python 3.11+
    """Named mesh axes, slowest to fastest (the fastest gets neighbouring ranks)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    DP = "dp"
    CFG = "cfg"
    PIPEFUSION = "pipefusion"
    DISTRIFUSION = "distrifusion"
    RING = "ring"
    ULYSSES = "ulysses"


#: Axes whose parallel method is implemented; a degree > 1 on any other axis is rejected.
BUILT_AXES: tuple[MeshAxis, ...] = tuple(MeshAxis)

#: Passes and rewrites a plan may switch off (``Plan.disable_passes``).
OPTIONAL_PASSES: tuple[str, ...] = (
    "canonicalize",
    "rewrite_attention",
    "shard_text_rows",
    "overlap_collectives",
    "text_heads",
)

_BACKENDS = (None, "eager", "inductor")


@dataclass(frozen=True, kw_only=True, slots=True)
class Plan:
    """How to parallelize one model. The product of all degrees must equal the world size."""

    ulysses: int = 1
    """Ulysses degree: all-to-all turns sequence shards into head shards inside attention."""
    ring: int = 1
    """Ring degree: K/V blocks travel around the ring, partial results merged by log-sum-exp."""
    cfg: int = 1
    """CFG parallel degree: the conditional and unconditional halves of the batch on different
    ranks (pipelines that run both branches in one transformer call)."""
    pipefusion: int = 1
    """PipeFusion stages: the blocks are cut into this many pipeline stages, one per rank of the
    axis, and ``patches`` pieces of the token sequence stream through them; attention reads the
    patches not yet computed from the previous step (displaced K/V)."""
    distrifusion: int = 1
    """DistriFusion degree: each rank keeps one patch of the token sequence through all layers;
    attention reads the other ranks' K/V from the previous step, gathered asynchronously. Takes
    the place of ``ulysses``/``ring`` (not combined with them)."""
    dp: int = 1
    """Data parallel degree: the batch (prompts x images per prompt) cut over rank groups."""
    patches: int | None = None
    """PipeFusion patches per step (M); default: ``pipefusion``. ``patches > 1`` with
    ``pipefusion=1`` runs the displaced-K/V patch schedule on one rank (a reference)."""
    warmup_steps: int = 1
    """Steps of each request (``pipe()`` call or ``pm.reset()``) that PipeFusion and DistriFusion
    run with fresh K/V everywhere (exact), filling the displaced-K/V buffers."""
    stage_blocks: tuple[int, ...] = ()
    """PipeFusion: blocks per stage, in order (e.g. ``(10, 18)``); default: balanced by FLOPs."""
    seed: str | None = None
    """The latent input sequence parallelism cuts, by argument name (e.g. ``"hidden_states"``),
    where the default choice is wrong: the input the output's shape follows, else the first
    floating-point input with >= 3 dims (see :mod:`xdit_compile.latent`)."""
    seed_dim: int | None = None
    """The dim of the latent input to cut; default: its outermost token-grid dim with enough
    token rows for the degree (``H`` of ``[B,C,H,W]``, falling back to ``W``; ``F``, ``H``, ``W``
    of videos; ``S`` of packed ``[B,S,C]``)."""
    compile: str | None = None
    """Backend for the rewritten graph: None/"eager" (GraphModule) or "inductor" (torch.compile)."""
    auto: bool = False
    """Choose the degrees with the cost model at the first call (:func:`xdit_compile.auto_plan` on
    that call's inputs and the process group's world size), exact methods only; leave every degree
    at 1. The plan chosen for the first input signature serves every later one."""
    hardware: str | None = None
    """``auto``: the hardware profile to predict for (a name of
    ``xdit_compile.analysis.cost.HARDWARE`` or a calibrated JSON file); default: the local
    device's profile (:func:`xdit_compile.analysis.cost.detect`)."""
    disable_passes: tuple[str, ...] = field(default_factory=tuple)
    """Names of optional passes or rewrites to skip: "canonicalize"; "rewrite_attention" (keep
    gathers + plain SDPA); "shard_text_rows" (keep joint attention's text rows replicated on
    every rank after attention instead of cutting them over the ranks); "overlap_collectives"
    (start and wait for each graph-level collective in one place, where its result is used);
    "text_heads" (under Ulysses, project every head of joint attention's text K/V on every rank)."""

    def __post_init__(self) -> None:
        for axis in MeshAxis:
            degree = getattr(self, axis.value)
            if not isinstance(degree, int) or isinstance(degree, bool) or degree < 1:
                raise ValueError(f"Plan.{axis.value} must be an integer >= 1, got {degree!r}")
            if degree > 1 and axis not in BUILT_AXES:
                built = ", ".join(a.value for a in BUILT_AXES)
                raise ValueError(
                    f"Plan.{axis.value}={degree}: {axis.value} parallelism is not built yet; "
                    f"use {built} (set {axis.value}=1)"
                )
        self._check_displaced()
        if not isinstance(self.auto, bool):
            raise ValueError(f"Plan.auto must be True or False, got {self.auto!r}")
        if self.auto and self.world_size > 1:
            set_ = ", ".join(f"{k}={v}" for k, v in self.degrees().items() if v > 1)
            raise ValueError(
                f"Plan(auto=True, {set_}): auto chooses the degrees; leave them at 1, or "
                f"drop auto=True to use these degrees"
            )
        if self.hardware is not None and not self.auto:
            raise ValueError(
                "Plan.hardware is what Plan(auto=True) predicts for; set auto=True too"
            )
        if self.compile not in _BACKENDS:
            raise ValueError(
                f"Plan.compile={self.compile!r} is unknown; choose one of None, 'eager', 'inductor'"
            )
        if isinstance(self.disable_passes, str | list):
            names = (
                (self.disable_passes,)
                if isinstance(self.disable_passes, str)
                else self.disable_passes
            )
            object.__setattr__(self, "disable_passes", tuple(names))
        unknown = [p for p in self.disable_passes if p not in OPTIONAL_PASSES]
        if unknown:
            raise ValueError(
                f"Plan.disable_passes: {unknown} cannot be disabled; optional passes are "
                f"{list(OPTIONAL_PASSES)}"
            )

        if self.seed is not None and (not isinstance(self.seed, str) or not self.seed):
            raise ValueError(
                f"Plan.seed names the latent input (e.g. 'hidden_states'), got {self.seed!r}"
            )
        if self.seed_dim is not None and (
            not isinstance(self.seed_dim, int) or isinstance(self.seed_dim, bool)
        ):
            raise ValueError(
                f"Plan.seed_dim must be an integer dim of the latent input, got {self.seed_dim!r}"
            )

    def _check_displaced(self) -> None:
        """PipeFusion / DistriFusion options; plans that cannot work are refused with the fix."""
        if self.patches is not None and (not isinstance(self.patches, int) or self.patches < 1):
            raise ValueError(f"Plan.patches must be an integer >= 1, got {self.patches!r}")
        if self.patches is not None and self.patches < self.pipefusion:
            raise ValueError(
                f"Plan(pipefusion={self.pipefusion}, patches={self.patches}): fewer patches than "
                f"stages leaves stages idle; use patches >= {self.pipefusion} (e.g. "
                f"patches={2 * self.pipefusion})"
            )
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 1:
            raise ValueError(
                f"Plan.warmup_steps must be an integer >= 1 (the first step of a request "
                f"has no previous step to read K/V from), got {self.warmup_steps!r}"
            )
        if isinstance(self.stage_blocks, list):
            object.__setattr__(self, "stage_blocks", tuple(self.stage_blocks))
        if self.stage_blocks and (
            len(self.stage_blocks) != self.pipefusion
            or any(not isinstance(b, int) or b < 1 for b in self.stage_blocks)
        ):
            raise ValueError(
                f"Plan.stage_blocks={self.stage_blocks}: give one block count >= 1 per pipefusion "
                f"stage ({self.pipefusion} numbers), or leave it empty to balance by FLOPs"
            )
        if self.distrifusion > 1 and self.sp_degree > 1:
            raise ValueError(
                f"Plan(distrifusion={self.distrifusion}, ulysses={self.ulysses}, "
                f"ring={self.ring}): DistriFusion takes the place of the sequence axes; use one of "
                "them"
            )
        if self.displaced_patches > 1 and self.ring > 1:
            raise ValueError(
                f"Plan(pipefusion={self.pipefusion}, ring={self.ring}): PipeFusion with Ring "
                f"attention is not built; cut each patch with ulysses instead"
            )
        if self.distrifusion > 1 and self.displaced_patches > 1:
            raise ValueError(
                "Plan: DistriFusion and PipeFusion cannot be combined; choose one "
                "(pipefusion x ulysses/ring, or distrifusion x cfg/dp)"
            )

    @property
    def displaced_patches(self) -> int:
        """Patches M of the PipeFusion schedule (1: no PipeFusion)."""
        return self.patches if self.patches is not None else self.pipefusion

    @property
    def world_size(self) -> int:
        """Number of processes this plan needs: the product of all degrees."""
        return math.prod(getattr(self, a.value) for a in MeshAxis)

    @property
    def sp_degree(self) -> int:
        """Sequence-parallel degree: ring x ulysses."""
        return self.ring * self.ulysses

    def degrees(self) -> dict[str, int]:
        """Axis name -> degree, slowest axis first."""
        return {a.value: getattr(self, a.value) for a in MeshAxis}

    def check_world_size(self, world_size: int) -> None:
        """Raise ``ValueError`` if the plan does not fit ``world_size`` processes (an ``auto``
        plan fits any: its degrees are chosen for the world size at the first call)."""
        if self.auto:
            return
        if self.world_size != world_size:
            parts = " x ".join(f"{k}={v}" for k, v in self.degrees().items() if v > 1) or "1"
            raise ValueError(
                f"Plan needs {self.world_size} processes ({parts}) but the world size is "
                f"{world_size}; choose degrees whose product is {world_size}, e.g. "
                f"Plan(ulysses={world_size}) or Plan(ring={world_size})"
            )

    def check_model(self, config: Mapping[str, Any] | None, name: str = "the model") -> None:
        """Check the plan against what ``config`` (a model's config) states, before any process
        starts. Ulysses takes any head count (uneven head groups; fewer heads than ranks run the
        rest of the axis as Ring), so nothing about heads is refused here."""
        return None

    def __str__(self) -> str:
        if self.auto:
            hw = f", hardware={self.hardware}" if self.hardware else ""
            return f"Plan(auto{hw}, compile={self.compile})"
        degrees = ", ".join(f"{k}={v}" for k, v in self.degrees().items() if v > 1) or "serial"
        if self.displaced_patches > 1:
            degrees += f", patches={self.displaced_patches}"
        if self.displaced_patches > 1 or self.distrifusion > 1:
            degrees += f", warmup_steps={self.warmup_steps}"
        return f"Plan({degrees}, compile={self.compile})"
