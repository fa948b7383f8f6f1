"""What every pass takes and gives: the pass context, the result, and the typed records passes make.

A pass is ``fn(gm, ctx) -> PassResult``. :class:`PassContext` holds the pass's inputs (the plan,
the mesh as data, the :class:`Facts` about the model, the axis this pass works on, set by the
driver from the pass list) and what passes record for the
:class:`~xdit_compile.compiler.program.Program` (sharding breaks, collective sites, the seed
choices, the patch outputs, the pass trace). Every field is typed; there is no free-form bag. This
module sits below the driver and the passes (both import it), so neither imports the other for these
types.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from xdit_compile.placement import Shard
from xdit_compile.plan import Plan
from xdit_compile.runtime.mesh import MeshInfo

__all__ = [
    "BatchSeed",
    "CollectiveSite",
    "Facts",
    "Pass",
    "PassContext",
    "PassFn",
    "PassResult",
    "PassStat",
    "SeedChoice",
    "ShardingBreak",
]


@dataclass(frozen=True, slots=True)
class PassResult:
    graph_module: fx.GraphModule
    modified: bool


@dataclass(frozen=True, kw_only=True, slots=True)
class Facts:
    """What the compiler is told about the model that its graph cannot show."""

    channels: int | None = None
    """The config's ``in_channels``: tells ``[B,C,F,H,W]`` from ``[B,F,C,H,W]`` when seeding."""
    state_key: str = ""
    """The displaced-K/V state the program's attention ops read and write (PipeFusion and
    DistriFusion plans: the parallel module's
    :class:`~xdit_compile.runtime.displaced.DisplacedState`)."""


@dataclass(frozen=True, slots=True)
class ShardingBreak:
    """An op that could not keep its inputs sharded: they were gathered (correct, slower)."""

    node: str
    op: str
    reason: str
    source: str


@dataclass(frozen=True, slots=True)
class CollectiveSite:
    """A collective in the rewritten graph, with its static cost for this rank."""

    node: str
    op: str
    axis: str
    calls: int
    bytes_per_forward: int
    what: str
    graph_level: bool = False
    """A collective the graph itself runs (counted per forward by the module), as opposed to
    one inside an op that counts itself when it runs (attention, halo exchange)."""


@dataclass(frozen=True, slots=True)
class PassStat:
    """One entry of the pass trace: what a pass did to the graph and how long it took."""

    name: str
    modified: bool
    nodes_before: int
    nodes_after: int
    ops_before: dict[str, int]
    ops_after: dict[str, int]
    seconds: float


@dataclass(frozen=True, kw_only=True, slots=True)
class SeedChoice:
    """What a seed pass cut: the input, the dim, the unit (patch size) and the rows per piece."""

    input: str
    """The graph node cut (a placeholder, or an earlier round's piece of it)."""
    arg: str
    """The model's argument name of that input."""
    dim: int
    patch: int
    split: tuple[int, ...]
    shape: tuple[int, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "input": self.input,
            "arg": self.arg,
            "dim": self.dim,
            "patch": self.patch,
            "split": self.split,
            "shape": self.shape,
        }


@dataclass(frozen=True, kw_only=True, slots=True)
class BatchSeed:
    """What a batch round (cfg / dp) cut: dim 0 of these inputs, ``split`` samples per rank."""

    inputs: list[str]
    batch: int
    split: tuple[int, ...]


@dataclass(kw_only=True)
class PassContext:
    """Everything passes share: the plan, the mesh (as data), the facts, and what passes record."""

    plan: Plan
    mesh: MeshInfo
    facts: Facts = field(default_factory=Facts)
    example_inputs: dict[str, Any] = field(default_factory=dict)
    """Flat input name -> example value, in placeholder order."""
    group_names: dict[str, str] = field(default_factory=dict)
    """Mesh axis -> process group name (what functional collectives in the graph refer to)."""
    axis: str = "sp"
    """The mesh axis the running pass works on: "sp" (the sequence axes), "cfg" / "dp" (the
    batch), or a virtual axis (``virtual``). Set by the driver from the pass list."""
    virtual: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Virtual axes: name -> (degree, this graph's index), e.g. PipeFusion's ``patch`` axis
    (M patches computed one after another on the same ranks; one graph per patch)."""
    # What passes record:
    seed: SeedChoice | None = None
    """What the sequence seed pass cut."""
    patch_seed: SeedChoice | None = None
    """What the patch round's seed cut (PipeFusion)."""
    batch_seeds: dict[str, BatchSeed] = field(default_factory=dict)
    """Batch axis -> what its round cut."""
    patch_outputs: dict[str, Shard] = field(default_factory=dict)
    """A patch graph's outputs -> their placement over the patches (the runtime joins them)."""
    text_heads_localized: int = 0
    """Linear layers whose text rows the ``text_heads`` pass computed per head group."""
    serial_flops: int | None = None
    """The serial model's FLOPs, before any round cut the batch or the sequence."""
    breaks: list[ShardingBreak] = field(default_factory=list)
    collectives: list[CollectiveSite] = field(default_factory=list)
    stats: list[PassStat] = field(default_factory=list)
    graphs: dict[str, str] = field(default_factory=dict)
    """Pass name -> printed graph after that pass (``capture`` is the input)."""

    @property
    def degree(self) -> int:
        if self.axis in self.virtual:
            return self.virtual[self.axis][0]
        return self.mesh.degree(self.axis)

    @property
    def axis_rank(self) -> int:
        if self.axis in self.virtual:
            return self.virtual[self.axis][1]
        return self.mesh.axis_rank(self.axis)

    @property
    def group(self) -> str:
        """Process group name of the current axis (what graph-level collectives use)."""
        return self.group_names.get(self.axis, self.axis)


PassFn = Callable[[fx.GraphModule, PassContext], PassResult]


@dataclass(frozen=True, slots=True)
class Pass:
    """One entry of a pass list: its name (what ``Plan.disable_passes`` and the trace use), the
    function, and the mesh axis it works on (the driver sets ``ctx.axis`` to it)."""

    name: str
    fn: PassFn
    axis: str = "sp"
