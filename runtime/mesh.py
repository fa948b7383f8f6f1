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

    @property
    def sp_degree(self) -> int:
        return self.ulysses * self.ring

    @property
    def sp_rank(self) -> int:
        return self.ring_rank * self.ulysses + self.ulysses_rank

    @classmethod
    def of(cls, plan: Plan, rank: int, key: str = "static") -> MeshInfo:
        """``rank``'s view of ``plan``'s mesh (ulysses is the fastest axis)."""
        return cls(key, rank, plan.world_size, plan.ulysses, plan.ring, rank % plan.ulysses,
                   (rank // plan.ulysses) % plan.ring)


class ParallelMesh:
    """A named ``DeviceMesh`` plus the groups the runtime ops use."""

    def __init__(self, info: MeshInfo, mesh: DeviceMesh | None) -> None:
        self.info = info
        self.mesh = mesh
        self._groups: dict[str, dist.ProcessGroup] = {}

    def group(self, axis: str) -> dist.ProcessGroup:
        """Process group of ``axis``: "ulysses", "ring", or "sp" (ring x ulysses flattened)."""
        if axis not in self._groups:
            assert self.mesh is not None, "mesh has no process groups (static analysis only)"
            if axis == "sp":
                self._groups[axis] = self.mesh._flatten("sp").get_group()
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


def build_mesh(plan: Plan) -> ParallelMesh:
    """Create the mesh of ``plan`` in the initialized default process group (collective call)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "xdit_compile.parallelize needs an initialized default process group; call "
            "xdit_compile.init_distributed() or torch.distributed.init_process_group() first"
        )
    world, rank = dist.get_world_size(), dist.get_rank()
    plan.check_world_size(world)
    backend = dist.get_backend()
    device = "cuda" if backend == "nccl" and torch.cuda.is_available() else "cpu"
    names = (MeshAxis.RING.value, MeshAxis.ULYSSES.value)
    mesh = init_device_mesh(device, (plan.ring, plan.ulysses), mesh_dim_names=names)
    key = f"mesh{len(_MESHES)}_r{plan.ring}u{plan.ulysses}"
    info = MeshInfo.of(plan, rank, key)
    pm = ParallelMesh(info, mesh)
    register_mesh(pm)
    logger.info("built mesh %s: ring=%d ulysses=%d", key, plan.ring, plan.ulysses)
    return pm
