"""Named device mesh for a plan, and a registry so graph ops can name their process groups.

Graph nodes cannot hold ``ProcessGroup`` objects (export and inductor need plain data), so a
rewritten graph refers to its mesh by a string key; :func:`get_mesh` resolves it at run time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from xdit_compile.plan import MeshAxis, Plan

__all__ = ["MeshInfo", "ParallelMesh", "build_mesh", "get_mesh", "register_mesh"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class MeshInfo:
    """What passes need to know about the mesh: pure data, no process groups.

    ``sp_rank`` orders the sequence-parallel ranks ring-major, ulysses-minor, so the shard a
    rank holds is contiguous inside its Ulysses group (what USP needs to be exact).
    """

    key: str
    rank: int
    world_size: int
    ulysses: int
    ring: int
    ulysses_rank: int
    ring_rank: int
    cfg: int = 1
    cfg_rank: int = 0
    dp: int = 1
    dp_rank: int = 0
    pipefusion: int = 1
    pipefusion_rank: int = 0
    distrifusion: int = 1
    distrifusion_rank: int = 0

    @property
    def sp_degree(self) -> int:
        """Degree of the sequence axes: distrifusion x ring x ulysses (DistriFusion takes the
        place of ring and ulysses, so at most one of them is > 1 with it)."""
        return self.distrifusion * self.ulysses * self.ring

    @property
    def sp_rank(self) -> int:
        return (
            self.distrifusion_rank * self.ring + self.ring_rank
        ) * self.ulysses + self.ulysses_rank

    def degree(self, axis: str) -> int:
        """Degree of a sharding axis: "sp" (the sequence axes), "cfg" or "dp"."""
        return self.sp_degree if axis == "sp" else int(getattr(self, axis))

    def axis_rank(self, axis: str) -> int:
        """This rank's index along a sharding axis: "sp", "cfg" or "dp"."""
        return self.sp_rank if axis == "sp" else int(getattr(self, f"{axis}_rank"))

    @classmethod
    def of(cls, plan: Plan, rank: int, key: str = "static") -> MeshInfo:
        """``rank``'s view of ``plan``'s mesh: axes dp, cfg, pipefusion, distrifusion, ring,
        ulysses, slowest to fastest."""
        r = rank
        uly, r = r % plan.ulysses, r // plan.ulysses
        ring, r = r % plan.ring, r // plan.ring
        df, r = r % plan.distrifusion, r // plan.distrifusion
        pf, r = r % plan.pipefusion, r // plan.pipefusion
        cfg, r = r % plan.cfg, r // plan.cfg
        return cls(
            key,
            rank,
            plan.world_size,
            plan.ulysses,
            plan.ring,
            uly,
            ring,
            plan.cfg,
            cfg,
            plan.dp,
            r % plan.dp,
            plan.pipefusion,
            pf,
            plan.distrifusion,
            df,
        )


class ParallelMesh:
    """A named ``DeviceMesh`` plus the groups the runtime ops use."""

    def __init__(self, info: MeshInfo, mesh: DeviceMesh | None) -> None:
        self.info = info
        self.mesh = mesh
        self._groups: dict[str, dist.ProcessGroup] = {}

    def group(self, axis: str) -> dist.ProcessGroup:
        """Process group of ``axis``: "dp", "cfg", "pipefusion", "distrifusion", "ring",
        "ulysses", or "sp" (distrifusion x ring x ulysses flattened, slowest first)."""
        if axis not in self._groups:
            assert self.mesh is not None, "mesh has no process groups (static analysis only)"
            if axis == "sp":
                self._groups[axis] = (
                    self.mesh["distrifusion", "ring", "ulysses"]._flatten("sp").get_group()
                )
            else:
                self._groups[axis] = self.mesh.get_group(axis)
        return self._groups[axis]

    def group_name(self, axis: str) -> str:
        return self.group(axis).group_name


_MESHES: dict[str, ParallelMesh] = {}


def register_mesh(mesh: ParallelMesh) -> None:
    _MESHES[mesh.info.key] = mesh


def get_mesh(key: str) -> ParallelMesh:
    try:
        return _MESHES[key]
    except KeyError:
        raise RuntimeError(f"xdit_compile mesh {key!r} is not registered in this process") from None


#: Meshes built in this process, by their degrees, with the default process group they were
#: built in: parallelizing again with the same degrees reuses the mesh and its groups. Every new
#: group costs communicators on every rank (with gloo a polling thread each, with NCCL memory and
#: set-up time), so a process that parallelizes many models or plans (a server, a test run) must
#: not create them anew each time.
_BUILT: dict[tuple[int, ...], tuple[object, ParallelMesh]] = {}


def build_mesh(plan: Plan) -> ParallelMesh:
    """The mesh of ``plan`` in the initialized default process group (a collective call the first
    time these degrees are asked for in this group; the same mesh again afterwards)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "xdit_compile.parallelize needs an initialized default process group; call "
            "xdit_compile.init_distributed() or torch.distributed.init_process_group() first"
        )
    world, rank = dist.get_world_size(), dist.get_rank()
    plan.check_world_size(world)
    names = tuple(a.value for a in MeshAxis)
    shape = tuple(int(getattr(plan, n)) for n in names)
    default = dist.distributed_c10d._get_default_group()
    built = _BUILT.get(shape)
    if built is not None and built[0] is default:
        return built[1]
    backend = dist.get_backend()
    device = "cuda" if backend == "nccl" and torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(device, shape, mesh_dim_names=names)
    key = (
        f"mesh{len(_MESHES)}_d{plan.dp}c{plan.cfg}p{plan.pipefusion}f{plan.distrifusion}"
        f"r{plan.ring}u{plan.ulysses}"
    )
    info = MeshInfo.of(plan, rank, key)
    pm = ParallelMesh(info, mesh)
    register_mesh(pm)
    _BUILT[shape] = (default, pm)
    logger.info("built mesh %s: %s", key, ", ".join(f"{n}={getattr(plan, n)}" for n in names))
    return pm
