"""Which input is the latent being denoised: one predicate for the sequence seed, the batch
rounds (CFG / data parallel) and CFG call pairing.

The latent is the input the output's shape follows (after patchify and unpatchify the output has
the latent's batch and token grid; only its channels may differ, e.g. a learned variance doubles
them). Among floating-point inputs with >= 3 dims (``[B,C,H,W]``, ``[B,C,F,H,W]``, packed
``[B,S,C]``), those that follow the output's shape are preferred to those that do not (extra
vision tokens, image embeddings); among several, the one named ``hidden_states`` (or
``latents``/``sample``/``x``), else the first. ``Plan(seed="name")`` names it outright. Before the
output's shape is known (a call before its first capture) the same order applies without it.

This module reads shapes only: it sits below ``passes`` and ``runtime`` and imports neither.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree

__all__ = ["PREFERRED_NAMES", "SeedError", "call_inputs", "find_latent", "follows"]

PREFERRED_NAMES: tuple[str, ...] = ("hidden_states", "latents", "sample", "x")


class SeedError(ValueError):
    """Nothing to cut: no latent input, or fewer token rows (or batch entries) than ranks."""


def follows(shape: Sequence[int], out: Sequence[int]) -> bool:
    """Whether an output of shape ``out`` follows an input of ``shape``: the same rank and batch,
    every other dim equal but at most one (the channels)."""
    if len(shape) != len(out) or len(shape) < 3 or shape[0] != out[0]:
        return False
    return sum(1 for a, b in zip(shape[1:], out[1:], strict=True) if a != b) <= 1


def find_latent(
    cands: Sequence[tuple[str, torch.Tensor | None]],
    out_shape: Sequence[int] | None = None,
    name: str | None = None,
) -> int | None:
    """Index of the latent among ``cands`` (name, tensor or fake tensor) or None.

    ``name`` (``Plan.seed``) picks the input of that name, or raises listing the candidates.
    """
    if name is not None:
        for i, (n, t) in enumerate(cands):
            if n == name and isinstance(t, torch.Tensor):
                return i
        known = [n for n, t in cands if isinstance(t, torch.Tensor)]
        raise ValueError(
            f"Plan(seed={name!r}): the model has no tensor input of that name; its tensor "
            f"inputs are {known}"
        )
    pool = [
        i
        for i, (_, t) in enumerate(cands)
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() >= 3
    ]
    if not pool:
        return None
    if out_shape is not None:
        shaped = [i for i in pool if follows(tuple(cands[i][1].shape), tuple(out_shape))]  # type: ignore[union-attr]
        pool = shaped or pool
    for pref in PREFERRED_NAMES:
        for i in pool:
            if cands[i][0] == pref:
                return i
    return pool[0]


def call_inputs(
    forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> list[tuple[str, Any]]:
    """The tensors of a call as (argument name, tensor), in the order export names its inputs:
    arguments bound to ``forward``'s signature, nested containers flattened (``name_0``...)."""
    try:
        if forward is None:
            raise TypeError("no signature")
        bound = inspect.signature(forward).bind(*args, **kwargs)
        items = list(bound.arguments.items())
    except (TypeError, ValueError):
        items = [(f"args_{i}", a) for i, a in enumerate(args)] + list(kwargs.items())
    out: list[tuple[str, Any]] = []
    for n, v in items:
        if isinstance(v, torch.Tensor):
            out.append((n, v))
        elif isinstance(v, list | tuple | dict):
            out.extend(
                (f"{n}_{j}", leaf)
                for j, leaf in enumerate(pytree.tree_leaves(v))
                if isinstance(leaf, torch.Tensor)
            )
    return out
