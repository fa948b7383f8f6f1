"""Public entry points: ``init_distributed``, ``parallelize`` and the module it returns.

``parallelize(model, plan)`` checks the plan against the process group, builds the named
mesh, checks once that every rank holds the same parameters, and returns a
:class:`ParallelModule`. That module captures and compiles lazily: the first call with a new
input signature (shapes, dtypes, non-tensor values) runs capture and the pass list built from
the plan, then executes the rewritten graph; later calls with the same signature reuse it.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.fx._pytree as fx_pytree
import torch.utils._pytree as pytree

from xdit_compile.analysis.cost import detect
from xdit_compile.analysis.planner import auto
from xdit_compile.compiler.capture import CaptureError, capture
from xdit_compile.compiler.driver import PassError
from xdit_compile.compiler.pipefusion import release_parameters
from xdit_compile.compiler.program import Program
from xdit_compile.compiler.program import compile as compile_graph
from xdit_compile.compiler.specialize import Probe, find_data_dependence, specialize_graph
from xdit_compile.compiler.state import StateTracker
from xdit_compile.latent import SeedError
from xdit_compile.passes.context import Facts
from xdit_compile.passes.flops import node_flops
from xdit_compile.passes.seed import graph_latent
from xdit_compile.plan import Plan
from xdit_compile.runtime.cfg_pairs import CfgPairs, latent, latent_batch
from xdit_compile.runtime.displaced import DisplacedState, new_state
from xdit_compile.runtime.mesh import ParallelMesh, build_mesh

__all__ = ["ParallelModule", "init_distributed", "parallelize"]

logger = logging.getLogger(__name__)


class _InRegions(Exception):
    """This module runs in regions (or eagerly): there is no one graph to run."""


def init_distributed(backend: str | None = None) -> tuple[int, int]:
    """Initialize the default process group from torchrun's environment (convenience only).

    Uses nccl when CUDA is available, gloo otherwise. Returns ``(rank, world_size)``; a
    single process without torchrun variables gets a one-rank group.
    """
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if "RANK" not in os.environ:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29511")
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), dist.get_world_size()


def _signature(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    leaves, spec = pytree.tree_flatten((args, kwargs))
    sig: list[Any] = [str(spec)]
    for x in leaves:
        if isinstance(x, torch.Tensor):
            sig.append(("T", tuple(x.shape), x.dtype, x.device.type))
        else:
            sig.append(("V", repr(x)))
    return tuple(sig)


class ParallelModule(torch.nn.Module):
    """A model parallelized by xdit_compile: same call signature and outputs as the model.

    It stands for the model: attributes it does not have are the model's (``config``,
    ``set_adapters``...), and class checks see the model's class (``isinstance(pm,
    ModelMixin)``, ``issubclass(pm.__class__, ...)``: diffusers' pipeline-level LoRA calls), while
    ``type(pm)`` is ``ParallelModule``. Every call checks the model's Python-side state (LoRA
    adapters, processors, hooks, replaced parameters, train/eval;
    :mod:`xdit_compile.compiler.state`): a compiled graph runs only for the state it was captured
    in.
    """

    _xdit_opaque = True  # state watches of enclosing trees do not descend into this module

    def __init__(
        self,
        model: torch.nn.Module,
        plan: Plan,
        mesh: ParallelMesh | None,
        region: str | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.plan = plan
        """The plan (for ``Plan(auto=True)``: the one the cost model chose, after the first
        call)."""
        self.mesh: ParallelMesh = mesh  # type: ignore[assignment]  # None only until auto chooses
        self.region = region
        """Set for a region of a model that could not be captured whole: its name in the model."""
        self.regions: list[ParallelModule] | None = None
        """Set when this module could not be captured whole: the regions its children became
        (each captured and parallelized on its own, the glue between them run eagerly)."""
        self.region_error: str = ""
        """Why this module runs in regions (or, for a region, eagerly): the capture error."""
        self.eager = False
        """A region that runs eagerly on every rank: no latent input to cut (embeddings,
        routers)."""
        self.eager_flops = 0
        self._cache: dict[tuple[Any, ...], Program] = {}
        self._tracker = StateTracker(model)
        """The model's Python-side state: its id is the first part of every cache key."""
        self._probes: dict[tuple[Any, ...], Probe | None] = {}
        self._last: Program | None = None
        self._pairs: CfgPairs | None = None
        self._stage_cut: Any = None
        self._latent_name: str | None = plan.seed
        """The latent input's name (``Plan.seed``, or what the first compile seeded)."""
        self.kv_state: DisplacedState | None = None
        """Displaced K/V of the current request (PipeFusion / DistriFusion plans only)."""
        if plan.distrifusion > 1 or plan.displaced_patches > 1:
            self.kv_state = new_state(plan.warmup_steps)

    def reset(self) -> None:
        """Start a new request: drop every displaced-K/V buffer (the next calls run the warmup
        steps again) and compare the model's whole state at the next call.
        ``parallelize_pipeline`` calls it at the start of every ``pipe()`` call."""
        if self.kv_state is not None:
            self.kv_state.reset()
        # Changes made between requests by means the mutation counter does not see (direct
        # ``vars(m)`` writes) are caught by the full comparison at the request's first call.
        self._tracker.recheck = True
        if self._pairs is not None:
            self._pairs.first, self._pairs.kept = None, None

    @property
    def config(self) -> Any:
        return getattr(self.model, "config", None)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def prepare(self, *args: Any, **kwargs: Any) -> Program | None:
        """Capture and rewrite for this input signature without running (cached).

        The signature is the inputs' shapes, dtypes and non-tensor values, plus the values of
        any data-dependent sizes (e.g. Mochi's number of valid text tokens), see
        :mod:`xdit_compile.compiler.specialize`. None for a model that runs in regions (its regions
        compile when first called).
        """
        self._choose_plan(args, kwargs)
        try:
            return self._prepare(args, kwargs, self._plan_for(args, kwargs))
        except _InRegions:
            return None

    def _choose_plan(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """``Plan(auto=True)``: rank 0 asks the cost model for the fastest exact plan at these
        inputs and the world size (:func:`xdit_compile.analysis.planner.auto`), every rank receives
        it (one broadcast), and the mesh is built for it. Runs once, at the first call."""
        if not self.plan.auto:
            return
        world = dist.get_world_size()
        chosen: list[Any] = [None]
        if dist.get_rank() == 0:
            try:
                sig = inspect.signature(self.model.forward)
                bound = sig.bind(*args, **kwargs)
                var_kw = next(
                    (p.name for p in sig.parameters.values() if p.kind is p.VAR_KEYWORD), None
                )
                inputs = {k: v for k, v in bound.arguments.items() if k != var_kw}
                inputs.update(bound.arguments.get(var_kw, {}) if var_kw else {})
                hardware = self.plan.hardware or detect(next(self.model.parameters()).device)
                chosen[0] = auto(self.model, inputs, world, hardware, compile=self.plan.compile)
                logger.info("Plan(auto=True) on %d ranks of %s: %s", world, hardware, chosen[0])
            except Exception as e:  # every rank must learn that the choice failed
                chosen[0] = f"Plan(auto=True) found no plan: {type(e).__name__}: {e}"
        if world > 1:
            dist.broadcast_object_list(chosen, src=0)
        if isinstance(chosen[0], str):
            raise ValueError(chosen[0])
        plan = replace(
            chosen[0],
            compile=self.plan.compile,
            disable_passes=self.plan.disable_passes,
            seed=self.plan.seed,
            seed_dim=self.plan.seed_dim,
        )
        config = getattr(self.model, "config", None)
        plan.check_model(config if isinstance(config, Mapping) else None, type(self.model).__name__)
        self.plan, self.mesh = plan, build_mesh(plan)

    def _plan_for(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Plan:
        """The plan a call compiles with: without the cfg batch round when the batch cannot be
        cut over cfg (one branch per call, see :mod:`xdit_compile.runtime.cfg_pairs`)."""
        if (
            self.plan.cfg > 1
            and latent_batch(args, kwargs, self.model.forward, self._latent_name) < self.plan.cfg
        ):
            return replace(self.plan, cfg=1)
        return self.plan

    @property  # type: ignore[misc]
    def __class__(self) -> type:  # type: ignore[override]
        """The wrapped model's class, for ``isinstance`` / ``issubclass(x.__class__, ...)``
        checks (``type(self)`` stays ``ParallelModule``)."""
        model = self.__dict__.get("_modules", {}).get("model")
        return model.__class__ if model is not None else ParallelModule

    def _get_name(self) -> str:
        return "ParallelModule"

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(
            "a ParallelModule cannot be pickled or deep-copied; save or copy its model "
            "(pm.model) and parallelize the copy"
        )

    def _state(self) -> int:
        """The id of the model's current Python-side state (:class:`StateTracker`); programs of
        states the model can never be in again are dropped."""
        now = self._tracker.now()
        if now.changed:
            logger.info(
                "%s: model state changed since the last call (%s): compiling for the new state",
                self.region or type(self.model).__name__,
                self._tracker.changes[-1],
            )
            if dist.is_initialized() and dist.get_world_size() > 1 and self.plan.pipefusion == 1:
                _check_same_parameters(
                    self.model
                )  # e.g. LoRA weights initialized unseeded per rank
        if now.dropped:
            self._cache = {k: v for k, v in self._cache.items() if k[0] not in now.dropped}
            self._probes = {k: v for k, v in self._probes.items() if k[0] not in now.dropped}
        return now.id

    @property
    def state_changes(self) -> list[str]:
        """What changed in the model's state each time it changed after the first call (the
        calls after it recompiled, or reused the programs of that earlier state)."""
        return self._tracker.changes

    def _prepare(self, args: tuple[Any, ...], kwargs: dict[str, Any], plan: Plan) -> Program:
        sig = (
            self._state(),
            *_signature(args, kwargs),
            plan.cfg,
        )  # the state id first: see _drop_stale_states
        probe = self._probes.get(sig)
        key = sig + probe(args, kwargs) if probe is not None else sig
        if key not in self._cache:
            try:
                gm = capture(self.model, args, kwargs)
            except CaptureError as e:
                self._enter_regions(e, plan)
                raise _InRegions from None
            if sig not in self._probes:
                self._probes[sig] = probe = find_data_dependence(gm)
            if probe is not None:
                values = probe(args, kwargs)
                flat = tuple(fx_pytree.tree_flatten_spec((args, kwargs), probe.in_spec))
                specialize_graph(gm, probe, values, flat)
                key = sig + values
                logger.info(
                    "specialized %s to data-dependent sizes %s", type(self.model).__name__, values
                )
            if self._latent_name is None:  # later calls find the latent by the name seeded here
                found = graph_latent(
                    gm
                )  # (after specializing: the output's shape may depend on data)
                self._latent_name = str(found.target) if found is not None else None
            try:
                self._cache[key] = self._compile(gm, plan)
                self._tracker.rewatch()  # what capture and compile left (freed stages)
            except PassError as e:
                if self.region is None or not isinstance(e.cause, SeedError):
                    raise
                self.eager = True  # nothing to cut in this region: it runs whole on every rank
                self.eager_flops = sum(node_flops(n) for n in gm.graph.nodes)
                raise _InRegions from None
        self._last = self._cache[key]
        return self._last

    def _enter_regions(self, error: CaptureError, plan: Plan) -> None:
        """Capture below the failing point: each child module (each element of a module list)
        becomes a region of its own, captured and parallelized when first called; this
        module's own forward (the glue, with its data-dependent Python) runs eagerly. Regions
        take whole tensors and return whole tensors (their outputs are gathered)."""
        if plan.displaced_patches > 1 or plan.distrifusion > 1:
            raise error.with_hint(
                "PipeFusion and DistriFusion need the model captured whole; "
                "use ulysses/ring/cfg/dp for this model"
            ) from None
        self.region_error = error.reason
        self.regions = []
        prefix = f"{self.region}." if self.region else ""

        def wrap(name: str, child: torch.nn.Module) -> torch.nn.Module:
            if isinstance(child, ParallelModule) or not any(True for _ in child.parameters()):
                return child
            region = ParallelModule(child, self.plan, self.mesh, region=prefix + name)
            assert self.regions is not None
            self.regions.append(region)
            return region

        for name, child in list(self.model.named_children()):
            if isinstance(child, torch.nn.ModuleList | torch.nn.Sequential):
                for i, sub in enumerate(list(child)):
                    child[i] = wrap(f"{name}.{i}", sub)
            elif isinstance(child, torch.nn.ModuleDict):
                for k, sub in list(child.items()):
                    child[k] = wrap(f"{name}.{k}", sub)
            else:
                setattr(self.model, name, wrap(name, child))
        logger.info(
            "%s could not be captured whole: %d regions (%s)",
            self.region or type(self.model).__name__,
            len(self.regions),
            self.region_error,
        )

    def all_regions(self) -> list[ParallelModule]:
        """Every region below this module, depth first (regions that split further included)."""
        out: list[ParallelModule] = []
        for r in self.regions or []:
            out.append(r)
            out += r.all_regions()
        return out

    def _compile(self, gm: fx.GraphModule, plan: Plan) -> Program:
        channels = getattr(getattr(self.model, "config", None), "in_channels", None)
        program = compile_graph(
            gm,
            plan,
            self.mesh,
            Facts(channels=channels),
            state=self.kv_state,
            stage_cut=self._stage_cut,
        )
        logger.info(
            "compiled %s for a new input signature (%d sharding breaks)",
            type(self.model).__name__,
            len(program.breaks),
        )
        if program.pipefusion is not None:
            self._stage_cut = (
                program.stage_cut
            )  # later signatures keep the parameters on the same ranks
            freed = release_parameters(self.model, program.kept)
            logger.info(
                "PipeFusion stage %d: freed %d parameter bytes of other stages",
                program.mesh.pipefusion_rank,
                freed,
            )
        return program

    def pipeline_modules(self) -> list[torch.nn.Module]:
        """What this rank holds of the model: the model and the compiled pieces (PipeFusion)."""
        return [self.model] + [m for program in self._cache.values() for m in program.kept]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self._choose_plan(args, kwargs)
        # The latent tells steps and CFG branches apart; plain plans do not need it.
        x = (
            latent(args, kwargs, self.model.forward, self._latent_name)
            if self.kv_state is not None or self.plan.cfg > 1
            else None
        )
        if self.kv_state is not None:  # every call counts, also those CFG pairing skips here
            self.kv_state.begin_call(x)
        plan = self._plan_for(args, kwargs)
        if (
            plan.cfg != self.plan.cfg and self.region is None
        ):  # one CFG branch per call: pair the calls
            if self.plan.cfg != 2:
                raise ValueError(
                    f"cfg={self.plan.cfg} with one CFG branch per transformer call: "
                    f"pairing calls needs cfg=2"
                )
            if self._pairs is None:
                self._pairs = CfgPairs(self.mesh.info.cfg_rank, self.mesh.group("cfg"))
            return self._pairs.call(_PairRunner(self, plan), args, kwargs, x)
        return self._run(args, kwargs, plan)

    def _run(self, args: tuple[Any, ...], kwargs: dict[str, Any], plan: Plan) -> Any:
        if self.regions is None and not self.eager:
            try:
                entry = self._prepare(args, kwargs, plan)
            except _InRegions:
                entry = None
        else:
            entry = None
        if entry is None:  # regions (children parallel, glue eager) or an eager region
            with torch.no_grad():
                return self.model(*args, **kwargs)
        return entry.run(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        """Attributes the wrapped model has and this module does not (``config`` users,
        diffusers' ``cache_context``...), so pipelines can call it like the model."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("model", "_modules", "_parameters", "_buffers"):
                raise
            return getattr(self._modules["model"], name)

    @property
    def graphs(self) -> dict[str, str]:
        """Printed graph after each pass, for the last compiled input signature."""
        return dict(self._last.graphs) if self._last else {}

    @property
    def compiled(self) -> list[Program]:
        """Every Program compiled so far (one per input signature and model state)."""
        return list(self._cache.values())

    @property
    def last(self) -> Program | None:
        """The Program of the last call's input signature."""
        return self._last


class _PairRunner:
    """What :class:`~xdit_compile.runtime.cfg_pairs.CfgPairs` calls: run one call, or give the
    shapes of its outputs (placeholders) without running it."""

    def __init__(self, pm: ParallelModule, plan: Plan) -> None:
        self.pm, self.plan = pm, plan

    def __call__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return self.pm._run(args, kwargs, self.plan)

    def shapes(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return self.pm._prepare(args, kwargs, self.plan).empty_outputs(args, kwargs)


def _check_same_parameters(model: torch.nn.Module) -> None:
    """One all-gather of per-parameter (sum, sum of squares) in fp64; names differing ones."""
    if dist.get_world_size() == 1:
        return
    names, sums = [], []
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        t = p.detach().double()
        names.append(name)
        sums.append(torch.stack([t.sum(), (t * t).sum()]))
    local = torch.stack(sums).cpu() if sums else torch.zeros(0, 2, dtype=torch.float64)
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    gathered = [torch.empty_like(local, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local.to(device))
    bad: set[str] = set()
    for other in gathered[1:]:
        # equal_nan: parameters made with torch.empty may hold NaN bits, the same on every rank
        diff = ~torch.isclose(
            other.cpu(), gathered[0].cpu(), rtol=1e-12, atol=0, equal_nan=True
        ).all(dim=1)
        bad.update(names[i] for i in diff.nonzero().flatten().tolist())
    if bad:
        shown = ", ".join(sorted(bad)[:10])
        raise ValueError(
            f"parameters differ between ranks ({len(bad)}): {shown}. Build or load the model "
            "identically on every rank (e.g. torch.manual_seed before construction), or pass "
            "broadcast_weights=True to parallelize to use rank 0's weights everywhere (some "
            "models create parameters with torch.empty, so equal seeds do not give equal weights)"
        )


def _broadcast_weights(model: torch.nn.Module) -> int:
    """Copy rank 0's parameters and buffers into every rank's model, in place; returns the bytes
    each rank received."""
    if dist.get_world_size() == 1:
        return 0
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    total = 0
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            buf = t.detach().to(device).contiguous()
            dist.broadcast(buf, src=0)
            if dist.get_rank() != 0:
                t.copy_(buf.to(t.device))
            total += buf.numel() * buf.element_size()
    return total


def parallelize(
    model: torch.nn.Module, plan: Plan, *, broadcast_weights: bool = False
) -> ParallelModule:
    """Parallelize ``model`` with ``plan`` inside the initialized default process group.

    Returns a module with the model's call signature and outputs; outputs are gathered and
    identical on every rank. Capture and compilation happen on the first call. Every rank must
    hold the same weights (checked); ``broadcast_weights=True`` copies rank 0's to the others
    first (for models that create parameters with ``torch.empty``). ``Plan(auto=True)`` lets
    the cost model choose the degrees at the first call (see :class:`~xdit_compile.Plan`).
    """
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be an xdit_compile.Plan, got {type(plan).__name__}")
    if isinstance(model, ParallelModule):
        raise TypeError("model is already parallelized")
    config = getattr(model, "config", None)
    plan.check_model(config if isinstance(config, Mapping) else None, type(model).__name__)
    if plan.auto and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "xdit_compile.parallelize needs an initialized default process group; call "
            "xdit_compile.init_distributed() or torch.distributed.init_process_group() first"
        )
    mesh = None if plan.auto else build_mesh(plan)  # auto: built when the first call chooses
    if broadcast_weights:
        _broadcast_weights(model)
    _check_same_parameters(model)
    return ParallelModule(model, plan, mesh)
