"""The cost model: predicted latency of a plan from its accounting and a hardware profile.

A plan's accounting (:class:`Work`, built by :mod:`xdit_compile.analysis.planner` from the rewritten
graph, the same numbers ``explain`` reports) says, for the busiest rank and one transformer call:
matmul and attention FLOPs, the bytes that memory-bound ops move, how many ops are dispatched, and
every collective (op, mesh axis, calls, bytes sent). A :class:`Hardware` profile turns them into
time:

- compute: matmul FLOPs / sustained matmul rate + attention FLOPs / sustained attention rate +
  memory-bound bytes / sustained memory bandwidth. Eager mode moves every pointwise op's inputs and
  output through memory and dispatches every op; ``compile="inductor"`` moves only the tensors a
  fused kernel must materialize and launches one kernel per fused group. On GPUs dispatch runs
  ahead of the device (the step takes the larger of the two); on CPUs it adds.
- communication per mesh axis: ``calls x latency + bytes / bandwidth`` of the link that axis
  crosses. Axes are laid out slowest to fastest (``dp, cfg, pipefusion, distrifusion, ring,
  ulysses``), so an axis of degree ``d`` whose faster axes multiply to ``s`` spans ``d x s``
  neighbouring ranks: the link is that of the smallest level of the topology (NVLink island,
  PCIe switch, CPU socket, node) holding ``d x s`` ranks.
- overlap where the method allows it: Ring's K/V passes hide behind the attention of the blocks
  already received; DistriFusion's gathers of stale K/V hide behind the whole step after its
  warmup steps; PipeFusion's sends to the next stage are asynchronous. Ulysses' all-to-alls and
  graph-level gathers are on the critical path.

Datasheet profiles state peak numbers; sustained rates are peak x an efficiency that is the same
for every GPU (:data:`EFFICIENCY`, typical of large cuBLAS GEMMs, FlashAttention forward and NCCL
bus bandwidth as their authors publish them). No constant here is fitted to end-to-end latencies:
the published ones in ``benchmarks/validate_cost_model.py`` are only compared against.
:func:`calibrate` measures the machine it runs on instead (matmul, attention, memory, dispatch,
and the gloo link between two local processes).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from xdit_compile.passes.ops import TRANSCENDENTAL
from xdit_compile.plan import MeshAxis, Plan

__all__ = [
    "EFFICIENCY",
    "ELEMENTWISE",
    "HARDWARE",
    "Hardware",
    "Link",
    "Prediction",
    "Work",
    "axis_span",
    "calibrate",
    "detect",
    "get_hardware",
    "measure_group",
    "predict",
]

#: Sustained / peak, the same for every GPU profile (not fitted to end-to-end latencies):
#: large bf16 GEMMs reach about 70% of the tensor-core peak, FlashAttention-2/3 forward
#: 50-75% (we take 50%), HBM/GDDR streams about 80%, and NCCL's bus bandwidth about 80% of the
#: link's.
EFFICIENCY = {"matmul": 0.70, "attention": 0.50, "memory": 0.80, "link": 0.80}


#: Pointwise ops whose arithmetic (transcendentals, :data:`xdit_compile.passes.ops.TRANSCENDENTAL`)
#: can take longer than their memory traffic on a CPU core, each timed by :func:`calibrate`:
#: key -> (aten op name, keyword arguments); tanh-approximated GELU is timed apart.
ELEMENTWISE: dict[str, tuple[str, dict[str, Any]]] = {
    "gelu_tanh": ("gelu", {"approximate": "tanh"}),
    **{name: (name, {}) for name in sorted(p.__name__ for p in TRANSCENDENTAL)},
}


@dataclass(frozen=True)
class Link:
    """One level of the interconnect: per-rank bandwidth (bytes/s, one direction, sustained) and
    the latency of one collective call (s)."""

    name: str
    bandwidth: float
    latency: float

    def time(self, calls: int, nbytes: int) -> float:
        return calls * self.latency + nbytes / self.bandwidth


@dataclass(frozen=True)
class Hardware:
    """A device and its interconnect, with sustained rates (see :data:`EFFICIENCY`)."""

    name: str
    description: str
    matmul: float
    """Sustained matmul FLOP/s (bf16 on GPUs; the dtype of ``--calibrate`` on CPUs)."""
    attention: float
    """Sustained attention FLOP/s."""
    memory: float
    """Sustained memory bandwidth, bytes/s."""
    op_overhead: float
    """Seconds to dispatch one eager op (framework + launch)."""
    kernel_overhead: float
    """Seconds to launch one kernel of a compiled graph."""
    levels: tuple[tuple[int, Link], ...]
    """Interconnect levels, innermost first: (ranks per group at this level, link). A group
    larger than the last level crosses nodes (:attr:`network`)."""
    network: Link
    """The link between nodes."""
    gpus_per_node: int = 8
    sockets: int = 1
    """CPU sockets per node the GPUs are spread over (PCIe boxes: a node's GPUs sit half on
    each socket, and traffic between the halves crosses the socket link, ``levels[-1]``)."""
    async_dispatch: bool = True
    """GPUs queue kernels: dispatch overlaps device time. CPUs run ops as they are dispatched."""
    overlap: float = 1.0
    """Fraction of overlappable communication that actually hides behind compute."""
    shared: dict[str, float] = field(default_factory=dict)
    """Rates per rank ("matmul", "attention", "memory") when ``shared_ranks`` ranks compute at
    once on one machine (measured by :func:`calibrate` on CPUs, whose ranks share memory
    bandwidth and caches); empty where ranks do not slow each other (GPUs)."""
    shared_ranks: int = 1
    elementwise: dict[str, float] = field(default_factory=dict)
    """Elements per second of the pointwise ops in :data:`ELEMENTWISE` as eager kernels (measured
    by :func:`calibrate`). An op takes the longer of its memory traffic and its arithmetic; empty
    where memory always dominates (datasheet GPU profiles)."""
    source: str = ""

    def link(self, span: int, nodes: int = 1, world: int = 1) -> Link:
        """The slowest link inside a group of ``span`` neighbouring ranks of ``world`` ranks
        spread evenly over ``nodes`` nodes (and, where a node has several CPU sockets, evenly
        over its sockets)."""
        per_node = max(1, world // max(nodes, 1))
        if span > per_node:
            return self.network
        if self.sockets > 1:
            return (
                self.levels[0][1]
                if span <= max(1, per_node // self.sockets)
                else self.levels[-1][1]
            )
        for size, link in self.levels:
            if span <= size:
                return link
        return self.levels[-1][1]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Hardware:
        d = dict(d)
        d["levels"] = tuple((int(s), Link(**lk)) for s, lk in d["levels"])
        d["network"] = Link(**d["network"])
        return cls(**d)


def _gpu(
    name: str,
    description: str,
    *,
    bf16_tflops: float,
    mem_tbs: float,
    levels: list[tuple[int, str, float, float]],
    net_gbs: float,
    source: str,
    gpus_per_node: int = 8,
    sockets: int = 1,
) -> Hardware:
    e = EFFICIENCY
    return Hardware(
        name=name,
        description=description,
        matmul=bf16_tflops * 1e12 * e["matmul"],
        attention=bf16_tflops * 1e12 * e["attention"],
        memory=mem_tbs * 1e12 * e["memory"],
        op_overhead=8e-6,
        kernel_overhead=4e-6,
        levels=tuple(
            (size, Link(lname, gbs * 1e9 * e["link"], lat)) for size, lname, gbs, lat in levels
        ),
        network=Link("network", net_gbs * 1e9 * e["link"], 10e-6),
        gpus_per_node=gpus_per_node,
        sockets=sockets,
        async_dispatch=True,
        overlap=1.0,
        source=source,
    )


#: Datasheet profiles. Bandwidths are per GPU and direction; bf16 tensor-core peaks are dense.
HARDWARE: dict[str, Hardware] = {
    "h100-sxm": _gpu(
        "h100-sxm",
        "NVIDIA H100 SXM5 80GB, NVLink 4 + NVSwitch, 8 per node, InfiniBand NDR",
        bf16_tflops=989,
        mem_tbs=3.35,
        levels=[(8, "nvlink", 450, 5e-6)],
        net_gbs=50,
        source="NVIDIA H100 datasheet: 989 TFLOPS bf16 dense, 3.35 TB/s HBM3, NVLink 900 GB/s "
        "(450 each way); ConnectX-7 400 Gb/s per GPU",
    ),
    "h200-sxm": _gpu(
        "h200-sxm",
        "NVIDIA H200 SXM 141GB, NVLink 4 + NVSwitch, 8 per node, InfiniBand NDR",
        bf16_tflops=989,
        mem_tbs=4.8,
        levels=[(8, "nvlink", 450, 5e-6)],
        net_gbs=50,
        source="NVIDIA H200 datasheet: 989 TFLOPS bf16 dense, 4.8 TB/s HBM3e, NVLink 900 GB/s",
    ),
    "a100-sxm": _gpu(
        "a100-sxm",
        "NVIDIA A100 SXM4 80GB, NVLink 3 + NVSwitch, 8 per node, InfiniBand HDR",
        bf16_tflops=312,
        mem_tbs=2.04,
        levels=[(8, "nvlink", 300, 5e-6)],
        net_gbs=25,
        source="NVIDIA A100 datasheet: 312 TFLOPS bf16 dense, 2.04 TB/s HBM2e, NVLink 600 GB/s",
    ),
    "l40-pcie": _gpu(
        "l40-pcie",
        "NVIDIA L40 48GB, PCIe Gen4 x16, half of a node's GPUs on each of 2 CPU sockets",
        bf16_tflops=181,
        mem_tbs=0.864,
        levels=[(4, "pcie", 32, 10e-6), (8, "upi", 20, 20e-6)],
        net_gbs=25,
        sockets=2,
        source="NVIDIA L40 datasheet: 181 TFLOPS bf16 dense, 864 GB/s GDDR6, PCIe Gen4 x16 "
        "(32 GB/s each way); Xeon UPI about 20 GB/s each way between sockets",
    ),
    "rtx-4090": _gpu(
        "rtx-4090",
        "NVIDIA GeForce RTX 4090 24GB, PCIe Gen4 x16 without peer-to-peer, 2 sockets",
        bf16_tflops=165,
        mem_tbs=1.008,
        levels=[(4, "pcie-host", 16, 15e-6), (8, "upi", 12, 25e-6)],
        net_gbs=12.5,
        sockets=2,
        source="Ada whitepaper: 165 TFLOPS bf16 dense (fp32 accumulate), 1008 GB/s "
        "GDDR6X; no P2P, so traffic goes through host memory",
    ),
    "cpu": Hardware(
        name="cpu",
        description="a generic CPU core per rank, gloo over loopback (run --calibrate for yours)",
        matmul=50e9,
        attention=25e9,
        memory=8e9,
        op_overhead=15e-6,
        kernel_overhead=10e-6,
        levels=((1 << 20, Link("loopback", 1.0e9, 60e-6)),),
        network=Link("network", 1.0e9, 100e-6),
        gpus_per_node=1 << 20,
        async_dispatch=False,
        overlap=0.0,
        source="rough defaults; xdit-compile plan --calibrate measures this machine",
    ),
}


def get_hardware(name: str | Hardware) -> Hardware:
    """A profile by name (``HARDWARE``), a path to a calibrated JSON profile, or a profile."""
    if isinstance(name, Hardware):
        return name
    if name in HARDWARE:
        return HARDWARE[name]
    if os.path.exists(name):
        return Hardware.from_dict(json.loads(Path(name).read_text()))
    raise ValueError(
        f"unknown hardware {name!r}; choose one of {sorted(HARDWARE)} or a calibrated JSON file"
    )


#: Substrings of ``torch.cuda.get_device_name()`` -> profile, most specific first.
_DEVICE_NAMES = (
    ("H200", "h200-sxm"),
    ("H100", "h100-sxm"),
    ("A100", "a100-sxm"),
    ("L40", "l40-pcie"),
    ("4090", "rtx-4090"),
)


def detect(device: Any = None) -> str:
    """The profile name for ``device`` (default: CUDA if available, else CPU): the closest
    datasheet profile by the GPU's name; ``"cpu"`` for CPUs and unknown GPUs are reported."""
    import torch

    dev = (
        torch.device(device)
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    if dev.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(dev)
    for key, profile in _DEVICE_NAMES:
        if key in name:
            return profile
    raise ValueError(
        f"no hardware profile for {name!r}; pass Plan(auto=True, hardware=...) with one of "
        f"{sorted(HARDWARE)} or a file from `xdit-compile plan --calibrate --save-profile`"
    )


# --------------------------------------------------------------------------- accounting


@dataclass
class Work:
    """One transformer call on the busiest rank of a plan (see
    :mod:`xdit_compile.analysis.planner`)."""

    matmul_flops: float = 0.0
    attention_flops: float = 0.0
    eager_bytes: float = 0.0
    """Bytes pointwise/reduction ops read and write when each runs as its own kernel."""
    fused_bytes: float = 0.0
    """Bytes that must be materialized when pointwise ops are fused into their neighbours."""
    ops: float = 0.0
    """Ops dispatched in eager mode."""
    kernels: float = 0.0
    """Kernels of the compiled graph (matmuls, attention, fused groups)."""
    comm: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    """(op, axis) -> [calls, bytes sent] per call."""
    ring_steps: int = 1
    """Ring degree: its K/V passes overlap with r-1 of r attention blocks."""
    stage_bytes: float = 0.0
    """PipeFusion: bytes sent to the next stage per call (asynchronous)."""
    serial_flops: float = 0.0
    elementwise: dict[str, list[float]] = field(default_factory=dict)
    """Pointwise ops whose arithmetic can outlast their memory traffic (:data:`ELEMENTWISE`):
    op -> [elements written, bytes moved]."""

    @property
    def flops(self) -> float:
        return self.matmul_flops + self.attention_flops

    def scaled(self, k: float) -> Work:
        return Work(
            self.matmul_flops * k,
            self.attention_flops * k,
            self.eager_bytes * k,
            self.fused_bytes * k,
            self.ops * k,
            self.kernels * k,
            {a: [c * k, b * k] for a, (c, b) in self.comm.items()},
            self.ring_steps,
            self.stage_bytes * k,
            self.serial_flops * k,
            {o: [e * k, b * k] for o, (e, b) in self.elementwise.items()},
        )

    def __add__(self, o: Work) -> Work:
        comm = {a: list(v) for a, v in self.comm.items()}
        for a, (c, b) in o.comm.items():
            cur = comm.setdefault(a, [0.0, 0.0])
            cur[0], cur[1] = cur[0] + c, cur[1] + b
        ew = {a: list(v) for a, v in self.elementwise.items()}
        for op, (e, b) in o.elementwise.items():
            acc = ew.setdefault(op, [0.0, 0.0])
            acc[0], acc[1] = acc[0] + e, acc[1] + b
        return Work(
            self.matmul_flops + o.matmul_flops,
            self.attention_flops + o.attention_flops,
            self.eager_bytes + o.eager_bytes,
            self.fused_bytes + o.fused_bytes,
            self.ops + o.ops,
            self.kernels + o.kernels,
            comm,
            max(self.ring_steps, o.ring_steps),
            self.stage_bytes + o.stage_bytes,
            self.serial_flops + o.serial_flops,
            ew,
        )


# --------------------------------------------------------------------------- the model


def axis_span(plan: Plan, axis: str) -> int:
    """Neighbouring ranks one group of ``axis`` spans ("sp": the sequence axes together)."""
    order = [a.value for a in MeshAxis]  # slowest first
    degrees = plan.degrees()
    if axis == "sp":
        return degrees["distrifusion"] * degrees["ring"] * degrees["ulysses"]
    if axis not in degrees:
        return plan.world_size
    faster = math.prod(degrees[a] for a in order[order.index(axis) + 1 :])
    return degrees[axis] * faster


@dataclass
class Prediction:
    """Predicted seconds of one plan, split by where the time goes."""

    plan: Plan
    hardware: str
    steps: int
    compute: float
    """Per call: device time of matmuls, attention and memory-bound ops (or dispatch, if larger)."""
    comm: dict[str, float]
    """Per call: exposed communication seconds per mesh axis."""
    hidden: float
    """Per call: communication seconds hidden behind compute."""
    warmup_extra: float
    """Extra seconds of a request's warmup steps (PipeFusion/DistriFusion run them exactly)."""
    calls_per_step: int
    flops: float
    comm_bytes: float
    step: float = 0.0
    total: float = 0.0

    def __post_init__(self) -> None:
        self.step = self.calls_per_step * (self.compute + sum(self.comm.values()))
        self.total = self.steps * self.step + self.warmup_extra

    def as_dict(self) -> dict[str, Any]:
        return {
            "plan": str(self.plan),
            "hardware": self.hardware,
            "steps": self.steps,
            "total_s": self.total,
            "step_s": self.step,
            "compute_s": self.compute,
            "comm_s": self.comm,
            "hidden_s": self.hidden,
            "warmup_extra_s": self.warmup_extra,
            "flops": self.flops,
            "comm_bytes": self.comm_bytes,
        }


def _compute(w: Work, hw: Hardware, compiled: bool) -> tuple[float, float]:
    """(compute seconds, attention seconds) of ``w``."""
    attn = w.attention_flops / hw.attention
    device = (
        w.matmul_flops / hw.matmul
        + attn
        + (w.fused_bytes if compiled else w.eager_bytes) / hw.memory
    )
    if not compiled:  # an eager transcendental op may take longer than its memory traffic
        for op, (elems, nbytes) in w.elementwise.items():
            if hw.elementwise.get(op):
                device += max(0.0, elems / hw.elementwise[op] - nbytes / hw.memory)
    dispatch = (w.kernels * hw.kernel_overhead) if compiled else (w.ops * hw.op_overhead)
    return (max(device, dispatch) if hw.async_dispatch else device + dispatch), attn


def predict(
    plan: Plan,
    work: Work,
    hardware: str | Hardware,
    *,
    steps: int = 28,
    nodes: int = 1,
    calls_per_step: int = 1,
) -> Prediction:
    """Predicted latency of ``steps`` denoising steps under ``plan`` (``work``: one call on its
    busiest rank; ``calls_per_step``: transformer calls per step, e.g. 2 for CFG run as two
    calls)."""
    hw = get_hardware(hardware)
    world = plan.world_size
    if hw.shared and world > 1:  # ranks on one CPU slow each other down: their measured rates
        sh = hw.shared
        hw = replace(
            hw,
            matmul=sh.get("matmul", hw.matmul),
            attention=sh.get("attention", hw.attention),
            memory=sh.get("memory", hw.memory),
            elementwise={k: sh.get(f"elementwise.{k}", v) for k, v in hw.elementwise.items()},
        )
    compiled = plan.compile == "inductor"
    compute, attn = _compute(work, hw, compiled)
    exposed: dict[str, float] = {}
    hidden = 0.0
    df_time = 0.0
    for (op, axis), (calls, nbytes) in work.comm.items():
        link = hw.link(axis_span(plan, axis), nodes, world)
        t = link.time(int(round(calls)), int(nbytes))
        if op == "send_recv" and axis == "ring" and work.ring_steps > 1:
            room = hw.overlap * attn * (work.ring_steps - 1) / work.ring_steps
            hide = min(t, room)
        elif axis == "distrifusion":
            df_time += t
            hide = min(t, hw.overlap * compute)
        else:
            hide = 0.0
        hidden += hide
        exposed[axis] = exposed.get(axis, 0.0) + t - hide
    warm = 0.0
    if plan.distrifusion > 1:  # warmup steps gather fresh K/V synchronously: nothing hides
        warm += plan.warmup_steps * calls_per_step * min(df_time, hw.overlap * compute)
    if plan.pipefusion > 1:
        p, m = plan.pipefusion, plan.displaced_patches
        stage = hw.link(axis_span(plan, "pipefusion"), nodes, world)
        send = stage.time(m, int(work.stage_bytes))
        hide = min(send, hw.overlap * compute)
        hidden += hide
        exposed["pipefusion"] = exposed.get("pipefusion", 0.0) + send - hide
        # The pipeline fills and drains within each call: (M + P - 1) slots of one patch-stage each.
        bubble = compute * (p - 1) / m
        exposed["pipefusion"] += bubble
        # Warmup steps run the whole sequence as one patch through the stages one after another.
        warm += plan.warmup_steps * calls_per_step * (compute * p - compute - bubble)
    comm_bytes = sum(b for _, b in work.comm.values()) + (
        work.stage_bytes if plan.pipefusion > 1 else 0.0
    )
    return Prediction(
        plan, hw.name, steps, compute, exposed, hidden, warm, calls_per_step, work.flops, comm_bytes
    )


# --------------------------------------------------------------------------- calibration


def _median(fn: Any, reps: int = 7, before: Any = None) -> float:
    """Median seconds of ``fn`` over ``reps`` runs after one warm-up (``before`` runs untimed
    ahead of each: a barrier keeps ranks measuring in lockstep). The median, not the best run:
    a model's forward is timed by its median too, and on a shared machine the best run of a
    micro-benchmark is a moment of luck the forward does not get."""
    fn()
    times = []
    for _ in range(reps):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _measure_compute(threads: int, dtype: str, before: Any = None) -> dict[str, float]:
    """Sustained matmul / attention FLOP/s, memory bytes/s and seconds per eager op, here."""
    import torch

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    dt = getattr(torch, dtype)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    aten = torch.ops.aten
    try:
        n = 4096 if cuda else 512
        a, b = torch.randn(n, n, device=dev, dtype=dt), torch.randn(n, n, device=dev, dtype=dt)
        t_mm = _median(lambda: (aten.mm.default(a, b), sync()), before=before)
        q = torch.randn(
            1, 24 if cuda else 4, 4096 if cuda else 1024, 128 if cuda else 64, device=dev, dtype=dt
        )
        t_at = _median(
            lambda: (aten.scaled_dot_product_attention.default(q, q, q), sync()), before=before
        )
        big = torch.randn(64 << 20, device=dev, dtype=torch.float32)  # 256 MB: well past any cache
        t_mem = _median(lambda: (big.mul_(1.0), sync()), before=before)
        # Dispatch as a rewritten graph does it: an OpOverload call per node.
        tiny = torch.randn(8, device=dev)
        t_op = (
            _median(
                lambda: [aten.add.Tensor(tiny, 1.0) for _ in range(200)] and sync(), before=before
            )
            / 200
        )
        # Transcendentals on an activation-sized tensor (4 MB in fp32 on CPUs).
        x = torch.randn(1 << (24 if cuda else 20), device=dev, dtype=dt)
        ew = {}
        for key, (op, kw) in ELEMENTWISE.items():
            fn = getattr(aten, op).default
            ew[f"elementwise.{key}"] = x.numel() / _median(
                lambda fn=fn, kw=kw: (fn(x, **kw), sync()), before=before
            )
    finally:
        torch.set_num_threads(old)
    return {
        "matmul": 2 * n**3 / t_mm,
        "attention": 4 * q.numel() * q.shape[-2] / t_at,
        "memory": 2 * big.numel() * 4 / t_mem,
        "op": t_op,
        **ew,
    }


def _measure_link_here(sizes: tuple[int, int] = (1 << 10, 16 << 20)) -> Link:
    """gloo all-to-all in the current process group, ranks in lockstep: latency and bandwidth
    from a two-point fit (``sizes``: bytes each rank sends)."""
    import torch
    import torch.distributed as dist

    t = []
    for n in sizes:
        x = torch.ones(
            dist.get_world_size(), n // 4 // max(dist.get_world_size() - 1, 1), dtype=torch.float32
        )
        y = torch.empty_like(x)
        t.append(
            _median(lambda x=x, y=y: dist.all_to_all_single(y, x), reps=15, before=dist.barrier)
        )
    bw = (sizes[1] - sizes[0]) / max(t[1] - t[0], 1e-9)
    return Link("loopback", bw, max(t[0], 1e-6))  # a 1 KB call: its latency, nearly all of it


def measure_group(*, threads: int = 1, dtype: str = "float32", link: bool = True) -> Hardware:
    """Calibrate in the current (gloo) process group; call on every rank, all get the same
    profile. Rank 0 measures alone (the others wait at a barrier): the serial rates. Then every
    rank measures at once, in lockstep: the rates a parallel plan's ranks get while they share
    the machine (the slowest rank's). Then the gloo all-to-all between them."""
    import torch
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    dist.barrier()
    solo = _measure_compute(threads, dtype) if rank == 0 else {}
    dist.barrier()
    mine = _measure_compute(threads, dtype, before=dist.barrier)
    each: list[Any] = [None] * world
    dist.all_gather_object(each, mine)
    measured_link = _measure_link_here() if link else None
    box: list[Any] = [solo, measured_link]
    dist.broadcast_object_list(box, src=0)
    solo, measured_link = box[0], box[1]
    shared = {k: min(m[k] for m in each) for k in mine if k != "op"}
    cuda = torch.cuda.is_available()
    return _profile(solo, shared if world > 1 else {}, world, measured_link, threads, dtype, cuda)


def _profile(
    solo: dict[str, float],
    shared: dict[str, float],
    ranks: int,
    measured_link: Link | None,
    threads: int,
    dtype: str,
    cuda: bool,
) -> Hardware:
    base = HARDWARE["h100-sxm"] if cuda else HARDWARE["cpu"]
    lk = measured_link if measured_link is not None else base.levels[0][1]
    return replace(
        base,
        name="calibrated",
        description=(
            f"measured on this machine ({'cuda' if cuda else 'cpu'}, {threads} thread(s) per rank, "
            f"{dtype})"
        ),
        matmul=solo["matmul"],
        attention=solo["attention"],
        memory=solo["memory"],
        op_overhead=solo["op"],
        kernel_overhead=solo["op"],
        levels=((base.levels[0][0], lk),),
        network=lk if not cuda else base.network,
        shared=shared,
        shared_ranks=ranks if shared else 1,
        elementwise={
            k.split(".", 1)[1]: v for k, v in solo.items() if k.startswith("elementwise.")
        },
        source="xdit_compile.analysis.cost.calibrate()",
    )


def _group_worker(
    rank: int, world: int, port: int, threads: int, dtype: str, link: bool, q: Any
) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    hw = measure_group(threads=threads, dtype=dtype, link=link)
    dist.destroy_process_group()
    if rank == 0:
        q.put(hw.as_dict())


def _spawn(target: Any, world: int, *args: Any) -> Any:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, world, port, *args, q)) for r in range(world)]
    for p in procs:
        p.start()
    out = q.get(timeout=600)
    for p in procs:
        p.join()
    return out


def calibrate(
    *, threads: int = 1, link: bool = True, dtype: str = "float32", ranks: int = 2
) -> Hardware:
    """Measure this machine (one rank = ``threads`` CPU threads, or the current CUDA device):
    matmul and attention FLOP/s, memory bandwidth, per-op dispatch, and (``link``, CPUs) the
    gloo all-to-all between local processes and the same compute rates measured in ``ranks``
    processes at once (CPU ranks share memory bandwidth and caches: a parallel plan's ranks run
    at those); see :func:`measure_group`, which does it inside a running process group.
    Every rate is the median of several runs. Returns a profile named ``"calibrated"``."""
    import torch

    cuda = torch.cuda.is_available()
    if link and not cuda and ranks > 1:
        return Hardware.from_dict(_spawn(_group_worker, ranks, threads, dtype, True))
    return _profile(_measure_compute(threads, dtype), {}, 1, None, threads, dtype, cuda)
