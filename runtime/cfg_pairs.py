"""CFG parallel for pipelines that call the transformer twice per step (Wan, Qwen-Image true CFG).

Pipelines like PixArt batch both branches into one call; the ``cfg`` batch round handles them.
Others call the transformer for the conditional branch, then again for the unconditional one,
with the same latents, and combine the two outputs afterwards. No batch exists to cut, so the
split happens across calls, with no per-pipeline code:

1. **Learn** (the first two calls, e.g. the first denoising step): both run whole on every
   rank. If they received the same latent tensor, calls come in CFG pairs; otherwise pairing is
   off for good and every call runs whole (exact, no CFG speedup; logged).
2. **Pair** (every later pair): ``cfg`` rank 0 computes the first call of a pair and returns its
   output; rank 1 returns a NaN-filled placeholder of the same shape. On the second call rank 1
   computes, the two outputs are exchanged (one all-gather over ``cfg``), rank 1 writes the
   first output into its placeholder *in place* (the pipeline holds that tensor, or views of
   it, until it combines the branches) and both return the second output.

A pipeline that used the first output before making the second call would see NaNs (a loud
failure, not a silently different image); a second call with different latents than the first
raises at once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree

from xdit_compile.latent import call_inputs, find_latent
from xdit_compile.runtime.collectives import count

__all__ = ["CfgPairs", "latent", "latent_batch"]

logger = logging.getLogger(__name__)


def latent(
    args: tuple[Any, ...], kwargs: dict[str, Any], forward: Any = None, name: str | None = None
) -> torch.Tensor | None:
    """The call's latent input (:func:`xdit_compile.latent.find_latent`; ``forward`` names the
    arguments, ``name`` is the one the compiled graph seeds or ``Plan.seed``)."""
    cands = call_inputs(forward, args, kwargs)
    if name is not None and name not in [n for n, _ in cands]:
        name = None  # a graph-side name the call does not use: fall back to the default order
    i = find_latent(cands, None, name)
    return cands[i][1] if i is not None else None


def latent_batch(
    args: tuple[Any, ...], kwargs: dict[str, Any], forward: Any = None, name: str | None = None
) -> int:
    """Batch size of the call's latent input (1 if there is none)."""
    x = latent(args, kwargs, forward, name)
    return int(x.shape[0]) if x is not None else 1


def _identity(x: torch.Tensor | None) -> tuple[Any, ...]:
    if x is None:
        return ()
    return (x.data_ptr(), x._version, tuple(x.shape), x.dtype)


@dataclass
class CfgPairs:
    """Per-module state of the call-pairing scheme (see the module docstring)."""

    rank: int
    group: Any
    mode: str = "learn"
    """"learn" (first two calls), "pairs" or "off"."""
    seen: list[tuple[Any, ...]] = field(default_factory=list)
    first: tuple[Any, ...] | None = None
    """Identity of the latents of the pending pair's first call."""
    kept: Any = None
    """The first call's output (rank 0) or placeholder (rank 1), until the second call."""

    def call(
        self, run: Any, args: tuple[Any, ...], kwargs: dict[str, Any], x: torch.Tensor | None = None
    ) -> Any:
        """``run(args, kwargs)`` computes one call on this rank's sequence-parallel group; ``x``
        is the call's latent input (found by :func:`latent` if not given)."""
        ident = _identity(x if x is not None else latent(args, kwargs))
        if self.mode == "learn":
            self.seen.append(ident)
            if len(self.seen) == 2:
                self.mode = "pairs" if self.seen[0] == self.seen[1] and ident else "off"
                if self.mode == "off":
                    logger.warning(
                        "cfg=%d: the transformer is not called in CFG pairs with the "
                        "same latents; every call runs on all cfg ranks (no CFG speedup)",
                        dist.get_world_size(self.group),
                    )
            return run(args, kwargs)
        if self.mode == "off":
            return run(args, kwargs)
        if self.first is None:  # first call of a pair
            self.first = ident
            if self.rank == 0:
                self.kept = run(args, kwargs)
                return self.kept
            self.kept = pytree.tree_map(
                lambda t: torch.full_like(t, float("nan")) if isinstance(t, torch.Tensor) else t,
                run.shapes(args, kwargs),
            )
            return self.kept
        if ident != self.first:
            self.first, self.kept = None, None
            raise RuntimeError(
                "cfg parallel: the transformer's second call of a CFG pair got different latents "
                "than the first; this pipeline does not call it in (cond, uncond) pairs every step"
            )
        self.first = None
        mine = run(args, kwargs) if self.rank == 1 else None
        other = self._exchange(self.kept if self.rank == 0 else mine)
        if self.rank == 0:
            out = other
        else:
            for dst, src in zip(
                pytree.tree_leaves(self.kept), pytree.tree_leaves(other), strict=True
            ):
                if isinstance(dst, torch.Tensor):
                    dst.copy_(src)
            out = mine
        self.kept = None
        return out

    def _exchange(self, out: Any) -> Any:
        """Send this rank's output to the other cfg rank; returns the other's."""
        leaves, spec = pytree.tree_flatten(out)
        got = []
        for t in leaves:
            if not isinstance(t, torch.Tensor):
                got.append(t)
                continue
            bufs = [torch.empty_like(t) for _ in range(2)]
            dist.all_gather(bufs, t.contiguous(), group=self.group)
            count("all_gather", "cfg", t.numel() * t.element_size())
            got.append(bufs[1 - self.rank])
        return pytree.tree_unflatten(got, spec)
