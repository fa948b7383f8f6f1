"""The accounting of a compiled Program: what one rank computes, moves and keeps alive.

Per-rank shares of values and FLOPs (:func:`local_fraction`, :func:`estimate_flops`), from the
placements the sharding passes left on the nodes; the cost model's :class:`Work` of a Program
(:func:`account`: matmul and attention FLOPs, memory-bound bytes, kernels and collectives); the
bytes a pipeline stage hands on (:func:`stage_bytes`); peak activation bytes
(:func:`peak_activation_bytes`). The report (``explain``) and the planner both read these.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from xdit_compile.analysis.cost import ELEMENTWISE, Work
from xdit_compile.compiler.program import Program
from xdit_compile.passes import ops
from xdit_compile.passes.flops import node_flops
from xdit_compile.placement import Shard
from xdit_compile.runtime.opargs import op_args
from xdit_compile.runtime.reshard import SPLIT

__all__ = ["account", "estimate_flops", "local_fraction", "peak_activation_bytes", "stage_bytes"]

aten = torch.ops.aten


def local_fraction(node: fx.Node, rank: int) -> float:
    """The share of ``node``'s (global) value that ``rank`` holds under its placement (for
    parallel attention, of its work: ``meta["xdit_work"]``, set for the graph's own rank)."""
    if "xdit_work" in node.meta:
        return float(node.meta["xdit_work"])
    p = node.meta.get("xdit_placement")
    if isinstance(p, tuple) and p:  # several outputs (flex attention: its output first)
        p = p[0]
    if isinstance(p, Shard):
        return p.local_size(rank) / p.total
    return 1.0


def estimate_flops(gm: fx.GraphModule, rank: int) -> tuple[int, int]:
    """(FLOPs on ``rank``, serial FLOPs) estimated from global shapes and placements."""
    local = serial = 0
    for node in gm.graph.nodes:
        f = node_flops(node)
        serial += f
        local += int(f * local_fraction(node, rank))
    return local, serial


#: Collective starts of the ``overlap_collectives`` pass (their finishes copy like the gathers they
#: were).
_STARTS = {start for start, *_ in SPLIT.values()}


def _kind(node: fx.Node) -> str:
    if node.op != "call_function":
        return "none"
    if ops.is_attention(node):  # SDPA and the parallel attention ops
        return "attention"
    name = str(getattr(ops.packet(node.target), "__name__", node.target))
    ns = str(getattr(node.target, "namespace", ""))
    if (
        ns in ("_c10d_functional", "c10d_functional")
        or name in ("wait_tensor",)
        or node.target in _STARTS
    ):
        return "comm"
    if ops.is_matmul(node):
        return "matmul"
    if ops.is_free(node):
        return "free"
    return "pointwise"


def _elementwise_key(node: fx.Node) -> str | None:
    """The :data:`cost.ELEMENTWISE` key of a pointwise node, if its arithmetic is timed."""
    name = str(getattr(getattr(node.target, "overloadpacket", None), "__name__", ""))
    if name == "gelu":
        approx = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        return "gelu_tanh" if approx == "tanh" else "gelu"
    return name if name in ELEMENTWISE else None


_reshape_copies = ops.reshape_copies


def _nbytes(val: Any) -> int:
    if isinstance(val, torch.Tensor):
        return int(val.numel()) * val.element_size()
    if isinstance(val, (list, tuple)):
        return sum(_nbytes(v) for v in val)
    return 0


def account(program: Program) -> Work:
    """The accounting of one rewritten program for its rank."""
    gm, mesh = program.graph, program.mesh
    rank = mesh.sp_rank
    w = Work(serial_flops=float(program.serial_flops))

    def local_bytes(n: Any) -> float:
        if not isinstance(n, fx.Node):
            return 0.0
        return _nbytes(n.meta.get("val")) * local_fraction(n, rank)

    for node in gm.graph.nodes:
        kind = _kind(node)
        if kind == "free" and _reshape_copies(node):
            kind = "pointwise"  # a copy kernel
        if kind in ("none", "free", "comm"):
            continue
        frac = local_fraction(node, rank)
        if kind == "matmul":
            w.matmul_flops += node_flops(node) * frac
        elif kind == "attention":
            w.attention_flops += node_flops(node) * frac
            # Data the parallel attention ops move themselves (no fusion reaches inside them).
            inner = 0.0
            if node.target is torch.ops.xdit.usp_attention.default:
                a = op_args(node)
                qkv_out = sum(local_bytes(a[x]) for x in ("q", "k", "v")) + local_bytes(node)
                kv = local_bytes(a["k"]) + local_bytes(a["v"])
                joint = bool(a["head"] or a["tail"])
                if mesh.ulysses > 1:  # pack for the all-to-alls and unpack: 2 copies of each
                    inner += 4 * qkv_out
                if joint:  # text K/V joined to the body's (a copy), and with Ring a copy of the
                    inner += 2 * kv  # non-contiguous body block before its first send
                    inner += 2 * kv if mesh.ring > 1 else 0
                if mesh.ring > 1:
                    # Ring merges its r partial outputs in fp32 (kernels/attention.py
                    # merge_partial), bytes per output element: each block is converted to fp32
                    # (none for fp32) and cleaned of NaN in place (8); every later block also
                    # scales the running output and itself (8 + 8) and adds them (12).
                    item = max(node.meta["val"].element_size(), 1)
                    conv = 0 if item == 4 else item + 4
                    per_elem = (conv + 8) + (mesh.ring - 1) * (conv + 36)
                    inner += per_elem * local_bytes(node) / item
            elif node.target is torch.ops.xdit.distrifusion_attention.default:
                # The whole (stale) K/V is assembled from the gathered pieces and stored: 2 copies.
                a = op_args(node)
                inner += 4 * sum(_nbytes(a[x].meta.get("val")) for x in ("k", "v"))
            w.eager_bytes += inner
            w.fused_bytes += inner
        else:
            out = local_bytes(node)
            ins = sum(local_bytes(a) for a in node.all_input_nodes)
            w.eager_bytes += out + ins
            key = _elementwise_key(node)
            if key is not None:
                val = node.meta.get("val")
                elems = (
                    float(val.numel()) * local_fraction(node, rank)
                    if isinstance(val, torch.Tensor)
                    else 0.0
                )
                cur = w.elementwise.setdefault(key, [0.0, 0.0])
                cur[0], cur[1] = cur[0] + elems, cur[1] + out + ins
            if any(_kind(u) not in ("pointwise", "free") for u in node.users) or not node.users:
                w.fused_bytes += 2 * out  # materialized: written once, read once
        w.ops += 1
        if kind != "pointwise" or any(_kind(u) not in ("pointwise", "free") for u in node.users):
            w.kernels += 1
        if kind in ("matmul", "attention") and any(_kind(u) == "pointwise" for u in node.users):
            w.fused_bytes += local_bytes(node)  # the fused epilogue reads it
    for c in program.collectives:
        cur = w.comm.setdefault((c.op, c.axis), [0.0, 0.0])
        cur[0] += c.calls
        cur[1] += c.bytes_per_forward
    w.ring_steps = mesh.ring
    return w


def stage_bytes(gm: fx.GraphModule, rank: int) -> float:
    """Bytes (this rank's piece) of the values one block hands to later blocks: what a
    PipeFusion stage sends to the next, per call, all patches together (the largest boundary)."""
    order: dict[str, int] = {}
    for n in gm.graph.nodes:
        b = n.meta.get("xdit_block")
        if b is not None and b not in order:
            order[b] = len(order)
    crossing: dict[int, float] = {}
    for n in gm.graph.nodes:
        b = n.meta.get("xdit_block")
        if b is None:
            continue
        later = [
            order[u.meta["xdit_block"]]
            for u in n.users
            if u.meta.get("xdit_block") is not None and order[u.meta["xdit_block"]] > order[b]
        ]
        if later:
            crossing[order[b]] = crossing.get(order[b], 0.0) + _nbytes(
                n.meta.get("val")
            ) * local_fraction(n, rank)
    return max(crossing.values(), default=0.0)


def peak_activation_bytes(gm: fx.GraphModule, rank: int = 0) -> int:
    """Peak bytes of the graph's values alive at once on ``rank``, run in graph order (static
    liveness): inputs count for the whole run (the caller holds them), parameters not at all,
    views share their base's storage and keep it alive, every other value lives from the node
    that makes it to its last use (the outputs to the end). Buffers inside opaque ops (the
    attention ops' packing, a collective's received buffer before it is cut) are not counted."""
    nodes = list(gm.graph.nodes)
    end_of_run = len(nodes)
    root: dict[fx.Node, fx.Node] = {}
    size: dict[fx.Node, float] = {}
    end: dict[fx.Node, int] = {}
    for i, n in enumerate(nodes):
        if n.op in ("get_attr", "output"):
            continue
        src = next((a for a in n.all_input_nodes if a in root), None)
        if _kind(n) == "free" and src is not None:
            root[n] = root[src]
        else:
            root[n] = n
            size[n] = _nbytes(n.meta.get("val")) * local_fraction(n, rank)
            end[n] = end_of_run if n.op == "placeholder" else i
        for a in n.all_input_nodes:
            if a in root:
                end[root[a]] = max(end[root[a]], i)
        end[root[n]] = max(end[root[n]], i)
    for a in gm.graph.output_node().all_input_nodes:
        if a in root:
            end[root[a]] = end_of_run
    frees: dict[int, list[fx.Node]] = {}
    for r, e in end.items():
        frees.setdefault(e, []).append(r)
    live = peak = 0.0
    for i, n in enumerate(nodes):
        if n in size:  # a value with its own storage
            live += size[n]
            peak = max(peak, live)
        for r in frees.get(i, []):
            live -= size[r]
    return int(peak)
