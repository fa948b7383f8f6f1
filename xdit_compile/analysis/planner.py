"""The planner: every valid plan for a model, input and world size, ranked by the cost model.

For each candidate plan the real pass pipeline rewrites the captured graph for rank 0 (the
busiest rank: uneven splits give the first ranks the larger pieces), with no processes, and the
rewritten graph is accounted (:func:`account`): matmul and attention FLOPs with every round
counted (CFG, data parallel, sequence), memory-bound bytes, ops, and every collective with its
static bytes (the numbers ``explain`` reports and the runtime counter is tested against). A plan
the passes refuse (heads not divisible by ``ulysses``, too few token rows) is invalid, with the
reason. :mod:`xdit_compile.analysis.cost` turns the accounting into predicted seconds.

Full-size models are captured on the ``meta`` device (no weights) with each stack of blocks cut
to two layers, and once more per stack with one: every quantity is linear in the layer count of
each stack, so the full model's accounting is ``W(2,..,2) + sum_i (n_i - 2) (W(2,..,2) -
W(.., 1_i, ..))``. PipeFusion (blocks cut into stages, patches streamed through them) is accounted
from its sequence-parallel part: each stage does ``1/P`` of the work of every patch, the
activations leaving a block go to the next stage, and the fill/drain bubble and warmup steps
are the cost model's.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensorMode

from xdit_compile.analysis.accounting import account, stage_bytes
from xdit_compile.analysis.cost import (
    Hardware,
    Prediction,
    Work,
    get_hardware,
    predict,
)
from xdit_compile.compiler.capture import CaptureError, capture
from xdit_compile.compiler.driver import PassError
from xdit_compile.compiler.program import compile as compile_graph
from xdit_compile.compiler.specialize import find_data_dependence, specialize_graph
from xdit_compile.passes.context import Facts
from xdit_compile.passes.seed import graph_latent
from xdit_compile.plan import Plan, config_heads
from xdit_compile.runtime.mesh import MeshInfo

__all__ = [
    "Candidate",
    "Workload",
    "auto",
    "enumerate_plans",
    "format_table",
    "rank_plans",
    "workload",
]

logger = logging.getLogger(__name__)
aten = torch.ops.aten

# --------------------------------------------------------------------------- workloads


@dataclass
class Workload:
    """A model at one input, captured for accounting: the graphs to rewrite per plan and how
    their accountings combine into the full model's."""

    name: str
    graphs: list[tuple[fx.GraphModule, Facts]]
    """(captured graph, what the compiler is told about its model) per capture."""
    coefficients: list[float]
    """Weight of each capture's accounting in the full model's (linear in the layer counts)."""
    heads: int | None
    blocks: int
    """Blocks of the full model (PipeFusion stages cannot exceed it)."""
    cfg_in_batch: bool
    """The example batch holds both CFG branches (a ``cfg=2`` plan cuts them)."""
    batch: int
    """Batch of the example inputs (both CFG branches together when ``cfg_in_batch``)."""
    dtype: torch.dtype
    _cache: dict[Plan, Work | str] = field(default_factory=dict, repr=False)

    def work(self, plan: Plan) -> Work | str:
        """The full model's accounting under ``plan`` (its busiest rank), or why it is invalid."""
        key = replace(plan, compile=None)
        if key not in self._cache:
            self._cache[key] = self._work(key)
        return self._cache[key]

    def _work(self, plan: Plan) -> Work | str:
        if plan.pipefusion > 1:
            if plan.pipefusion > self.blocks:
                return f"{plan.pipefusion} stages but {self.blocks} blocks"
            base = self.work(replace(plan, pipefusion=1, patches=None))
            if isinstance(base, str):
                return base
            # Each stage runs 1/P of the layers for every one of the M patches.
            w = base.scaled(1.0 / plan.pipefusion)
            m = plan.displaced_patches
            w.comm = {a: [c * m, b] for a, (c, b) in w.comm.items()}
            w.stage_bytes, w.serial_flops = base.stage_bytes, base.serial_flops
            return w
        total: Work | None = None
        for (gm0, facts), k in zip(self.graphs, self.coefficients, strict=True):
            got = _rewrite(gm0, facts, plan)
            if isinstance(got, str):
                return got
            if total is None:
                total = got.scaled(k)
                total.stage_bytes = got.stage_bytes  # one block boundary, whatever the layer count
            else:
                total = total + replace(got.scaled(k), stage_bytes=0.0)
        assert total is not None
        return total


def _rewrite(gm0: fx.GraphModule, facts: Facts, plan: Plan) -> Work | str:
    """The accounting of ``plan``'s program for rank 0, or why the passes refuse the plan."""
    gm = fx.GraphModule(gm0, copy.deepcopy(gm0.graph))
    # Accounting only: the program never runs (no shape verifier, no printed graphs).
    try:
        program = compile_graph(
            gm, plan, MeshInfo.of(plan, 0, key="planner"), facts, verify=False, keep_graphs=False
        )
    except PassError as e:  # the passes refuse the plan for this model (heads, rows, stages...)
        return str(e.cause).splitlines()[0][:200]
    except (ValueError, RuntimeError) as e:
        return str(e).splitlines()[0][:200]
    w = account(program)
    w.stage_bytes = stage_bytes(program.graph, program.mesh.sp_rank)
    return w


def _capture_for_accounting(model: torch.nn.Module, real: dict[str, Any]) -> fx.GraphModule:
    """Capture ``model`` at ``real`` inputs; a model on ``meta`` gets meta copies of them, and
    data-dependent sizes (valid text tokens from a mask) are probed on the real ones.

    A forward that needs a real device type (``torch.autocast(x.device.type)`` on its inputs,
    Mochi's rotary tables) cannot run on ``meta``: it is captured again on fake CPU tensors of a
    copy of the model (no memory, the same shapes and dtypes)."""
    meta = next(model.parameters()).device.type == "meta"
    inputs = _to_meta(real) if meta else real
    try:
        gm = capture(model, (), inputs)
    except CaptureError:
        if not meta:
            raise
        gm, inputs = _capture_fake_cpu(model, real)
    probe = find_data_dependence(gm)
    if probe is not None:
        real_cpu = pytree.tree_map(
            lambda x: x.to("cpu") if isinstance(x, torch.Tensor) else x, real
        )
        values = probe((), real_cpu)
        flat = tuple(pytree.tree_leaves(((), inputs)))
        specialize_graph(gm, probe, values, flat)
    return gm


def _capture_fake_cpu(
    model: torch.nn.Module, real: dict[str, Any]
) -> tuple[fx.GraphModule, dict[str, Any]]:
    """``model`` (on ``meta``) captured on fake CPU tensors: a copy whose parameters and buffers
    are fake tensors of the same shapes, strides and dtypes, at fake copies of ``real``."""
    mode = FakeTensorMode()

    def fake(t: torch.Tensor) -> torch.Tensor:
        with mode:
            return torch.empty_strided(
                tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device="cpu"
            )

    copy_ = copy.deepcopy(model)
    copy_._apply(fake)
    inputs = pytree.tree_map(
        lambda x: mode.from_tensor(x.to("cpu")) if isinstance(x, torch.Tensor) else x, real
    )
    return capture(copy_, (), inputs), inputs


def _layer_keys(config: Mapping[str, Any]) -> dict[str, int]:
    return {
        k: int(v)
        for k, v in config.items()
        if k.startswith("num_")
        and k.endswith("layers")
        and isinstance(v, int)
        and not isinstance(v, bool)
        and v > 0
    }


def _to_meta(inputs: dict[str, Any]) -> dict[str, Any]:
    return pytree.tree_map(lambda x: x.to("meta") if isinstance(x, torch.Tensor) else x, inputs)


def workload(
    model: torch.nn.Module | Callable[..., torch.nn.Module],
    example_inputs: dict[str, Any] | Callable[..., dict[str, Any]],
    *,
    cfg_in_batch: bool = False,
    name: str | None = None,
) -> Workload:
    """Capture ``model`` at ``example_inputs`` for accounting.

    A diffusers model (a ``config`` with ``num_*layers`` entries) is rebuilt on the ``meta``
    device with each stack cut to one and two layers (cheap at any size). ``model`` may also be
    a function ``overrides -> model`` (and ``example_inputs`` a function ``model -> inputs``),
    for configs built from scratch. Any other module is captured whole.
    """
    build: Callable[[dict[str, int]], torch.nn.Module] | None = None
    if callable(model) and not isinstance(model, torch.nn.Module):
        build = model
        probe = build({})
    else:
        probe = model
        config = getattr(model, "config", None)
        if config is not None and _layer_keys(config) and hasattr(type(model), "from_config"):
            cls, base = type(model), dict(config)
            dtype = next(
                (p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32
            )

            def build(
                overrides: dict[str, int], cls: Any = cls, base: Any = base, dtype: Any = dtype
            ) -> Any:
                with torch.device("meta"):
                    m = cls.from_config({**base, **overrides})
                return m.to(dtype).eval()

    config = dict(getattr(probe, "config", None) or {})
    heads = config_heads(config)
    layers = _layer_keys(config)
    dtype = next((p.dtype for p in probe.parameters() if p.is_floating_point()), torch.float32)

    def inputs_for(m: torch.nn.Module) -> dict[str, Any]:
        return example_inputs(m) if callable(example_inputs) else example_inputs

    def facts_for(m: torch.nn.Module) -> Facts:
        return Facts(channels=getattr(getattr(m, "config", None), "in_channels", None))

    graphs: list[tuple[fx.GraphModule, Facts]] = []
    coeffs: list[float] = []
    if build is not None and layers:
        # Base: every stack at min(n, 2) layers; per stack longer than 2, one more capture with
        # that stack at 1 layer gives its per-layer increment (models of <= 2 layers per stack:
        # the base is the model itself).
        base = {k: min(n, 2) for k, n in layers.items()}
        longer = [k for k, n in layers.items() if n > 2]
        variants = [base] + [{**base, k: 1} for k in longer]
        for ov in variants:
            m = build(ov)
            gm = _capture_for_accounting(m, inputs_for(m))
            graphs.append((gm, facts_for(m)))
        # W(n) = W(base) + sum_k (n_k - 2) * (W(base) - W(base with k at 1))
        coeffs = [1.0 + sum(layers[k] - 2 for k in longer)] + [
            -float(layers[k] - 2) for k in longer
        ]
        blocks = sum(layers.values())
    else:
        inp = inputs_for(probe)
        gm = _capture_for_accounting(probe, inp)
        graphs.append((gm, facts_for(probe)))
        coeffs = [1.0]
        blocks = (
            len({n.meta.get("xdit_block") for n in gm.graph.nodes} - {None})
            or sum(layers.values())
            or 1
        )
    batch = _batch(graphs[0][0])
    return Workload(
        name or type(probe).__name__, graphs, coeffs, heads, blocks, cfg_in_batch, batch, dtype
    )


def _batch(gm: fx.GraphModule) -> int:
    """The batch of the latent input of ``gm`` (1 where it cannot tell)."""
    node = graph_latent(gm)
    if node is not None and isinstance(node.meta.get("val"), torch.Tensor):
        return int(node.meta["val"].shape[0])
    return 1


# --------------------------------------------------------------------------- enumeration


def _factorizations(n: int, k: int) -> list[tuple[int, ...]]:
    if k == 1:
        return [(n,)]
    out = []
    for d in range(1, n + 1):
        if n % d == 0:
            out += [(d, *rest) for rest in _factorizations(n // d, k - 1)]
    return out


def enumerate_plans(
    world_size: int,
    *,
    batch: int = 1,
    cfg_in_batch: bool = False,
    blocks: int = 1 << 30,
    approximate: bool = True,
    compile: str | None = None,
) -> list[Plan]:
    """Every plan of ``world_size`` ranks the degrees allow (the model's heads and rows are
    checked by rewriting): dp x cfg x pipefusion x (ring x ulysses | distrifusion)."""
    per_branch = batch // 2 if cfg_in_batch else batch
    plans: list[Plan] = []
    for dp, cfg, pf, ring, uly in _factorizations(world_size, 5):
        if cfg > (2 if cfg_in_batch else 1) or dp > max(per_branch, 1):
            continue
        if pf > 1 and (not approximate or ring > 1 or pf > blocks):
            continue
        plans.append(Plan(dp=dp, cfg=cfg, pipefusion=pf, ring=ring, ulysses=uly, compile=compile))
        if pf > 1:  # more patches than stages: smaller bubble, more (smaller) steps
            plans.append(
                Plan(
                    dp=dp,
                    cfg=cfg,
                    pipefusion=pf,
                    patches=2 * pf,
                    ring=ring,
                    ulysses=uly,
                    compile=compile,
                )
            )
        if approximate and uly > 1 and ring == 1 and pf == 1:
            plans.append(Plan(dp=dp, cfg=cfg, distrifusion=uly, compile=compile))
    return plans


@dataclass
class Candidate:
    plan: Plan
    prediction: Prediction | None
    invalid: str = ""

    @property
    def exact(self) -> bool:
        return self.plan.pipefusion == 1 and self.plan.distrifusion == 1


def rank_plans(
    load: Workload,
    world_size: int,
    hardware: str | Hardware = "h100-sxm",
    *,
    steps: int = 28,
    nodes: int = 1,
    approximate: bool = True,
    compile: str | None = None,
    plans: list[Plan] | None = None,
) -> list[Candidate]:
    """Every candidate plan with its prediction, fastest first; invalid plans last, with why."""
    hw = get_hardware(hardware)
    plans = (
        plans
        if plans is not None
        else enumerate_plans(
            world_size,
            batch=load.batch,
            cfg_in_batch=load.cfg_in_batch,
            blocks=load.blocks,
            approximate=approximate,
            compile=compile,
        )
    )
    out: list[Candidate] = []
    for plan in plans:
        w = load.work(plan)
        if isinstance(w, str):
            out.append(Candidate(plan, None, w))
            continue
        out.append(Candidate(plan, predict(plan, w, hw, steps=steps, nodes=nodes)))
    out.sort(key=lambda c: (c.prediction is None, c.prediction.total if c.prediction else math.inf))
    return out


def auto(
    model: torch.nn.Module,
    example_inputs: dict[str, Any],
    world_size: int,
    hardware: str | Hardware = "h100-sxm",
    *,
    steps: int = 28,
    nodes: int = 1,
    approximate: bool = False,
    compile: str | None = None,
    cfg_in_batch: bool = False,
) -> Plan:
    """The fastest predicted plan (exact methods only unless ``approximate``)."""
    load = workload(model, example_inputs, cfg_in_batch=cfg_in_batch)
    ranked = rank_plans(
        load,
        world_size,
        hardware,
        steps=steps,
        nodes=nodes,
        approximate=approximate,
        compile=compile,
    )
    best = next((c for c in ranked if c.prediction is not None), None)
    if best is None:
        reasons = "; ".join(f"{c.plan}: {c.invalid}" for c in ranked[:4])
        raise ValueError(f"no valid plan for {world_size} ranks: {reasons}")
    return best.plan


def short(plan: Plan) -> str:
    """``ulysses=4`` / ``cfg=2 x ring=2`` / ``serial``, plus patches and backend."""
    parts = [f"{k}={v}" for k, v in plan.degrees().items() if v > 1]
    s = " x ".join(parts) or "serial"
    if plan.pipefusion > 1 and plan.displaced_patches != plan.pipefusion:
        s += f" (M={plan.displaced_patches})"
    return s


def format_table(ranked: list[Candidate], *, limit: int = 20, unit: str = "s") -> str:
    """The ranked plans as a text table: total, per step, compute, exposed comm per axis."""
    rows = [c for c in ranked if c.prediction is not None][:limit]
    axes = sorted({a for c in rows for a in c.prediction.comm if c.prediction.comm[a] > 0})  # type: ignore[union-attr]
    head = (
        f"{'#':>2}  {'plan':<32} {'exact':<5} {'total ' + unit:>9} {'step ms':>9} {'compute':>9} "
        + " ".join(f"{a:>11}" for a in axes)
        + f" {'hidden':>8} {'GB/rank':>8}"
    )
    lines = [head, "-" * len(head)]
    for i, c in enumerate(rows, 1):
        p = c.prediction
        assert p is not None
        lines.append(
            f"{i:>2}  {short(c.plan):<32} {'yes' if c.exact else 'no':<5} {p.total:>9.2f} "
            f"{p.step * 1e3:>9.1f} {p.compute * 1e3 * p.calls_per_step:>9.1f} "
            + " ".join(f"{p.comm.get(a, 0.0) * 1e3 * p.calls_per_step:>11.1f}" for a in axes)
            + f" {p.hidden * 1e3:>8.1f} {p.comm_bytes / 1e9:>8.2f}"
        )
    bad = [c for c in ranked if c.prediction is None]
    if bad:
        lines.append(f"invalid ({len(bad)}):")
        seen: set[str] = set()
        for c in bad:
            if c.invalid not in seen:
                seen.add(c.invalid)
                lines.append(f"    {short(c.plan):<32} {c.invalid}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- zoo models


def zoo_steps(name: str) -> int:
    """The pipeline's default denoising steps for zoo model ``name``."""
    from xdit_compile.models.zoo import get_entry

    return get_entry(name).steps


def zoo_workload(
    name: str,
    *,
    height: int | None = None,
    width: int | None = None,
    frames: int | None = None,
    size: str = "full",
    dtype: torch.dtype = torch.bfloat16,
) -> Workload:
    """The workload of zoo model ``name`` (published config, no weights) at ``height`` x
    ``width`` pixels (and ``frames`` video frames); defaults: the zoo's input at ``size``."""
    import diffusers

    from xdit_compile.models.inputs import InputSpec
    from xdit_compile.models.zoo import get_entry

    entry = get_entry(name)
    spatial, temporal = entry.vae_spatial, entry.vae_temporal
    lat_h = height // spatial if height else None
    lat_w = width // spatial if width else None
    lat_f = ((frames - 1) // temporal + 1 if temporal > 1 else frames) if frames else None
    cfg = entry.cfg_in_batch
    base = entry.config(size)

    def build(overrides: dict[str, int]) -> torch.nn.Module:
        with torch.device("meta"):
            m = getattr(diffusers, entry.cls_name)(**{**base, **overrides})
        torch.nn.Module.to(m, dtype=dtype)
        return m.eval()

    def inputs(m: torch.nn.Module) -> dict[str, Any]:
        # Real (CPU) inputs: data-dependent sizes are probed on them; the capture gets meta copies.
        geo = entry.latent_size(size)
        f = (
            lat_f
            if lat_f is not None
            else (
                int(getattr(m, "config", {}).get("video_length", geo.frames or 1))
                if entry.video
                else None
            )
        )
        spec = InputSpec(
            batch=2 if cfg else 1,
            height=lat_h or geo.height,
            width=lat_w or geo.width,
            frames=f,
            text_len=geo.text_len,
            dtype=dtype,
            device=torch.device("cpu"),
        )
        return entry.input_builder(m, spec, torch.Generator().manual_seed(0))

    label = f"{name} ({height or '?'}x{width or '?'}{f'x{frames}f' if frames else ''})"
    return workload(build, inputs, cfg_in_batch=cfg, name=label)
