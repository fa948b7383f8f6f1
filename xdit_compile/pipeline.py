"""``parallelize_pipeline``: a whole diffusers pipeline in parallel with one call.

Every rank runs the same pipeline (same prompts, same generator seed, so the same latents and
text embeddings); each transformer component (``transformer``, ``transformer_2``...) is
replaced by its :func:`~xdit_compile.parallelize` d version, whose outputs are gathered and
identical on every rank, so every rank gets the same image. The VAE runs whole on every rank
(a parallel VAE is a later issue). CFG needs no per-pipeline code: pipelines that batch both
branches are cut by the ``cfg`` batch round, those that call the transformer twice per step
by call pairing (:mod:`xdit_compile.cfg_pairs`).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from xdit_compile.api import ParallelModule, parallelize
from xdit_compile.plan import Plan

__all__ = ["parallelize_pipeline", "transformer_names"]


def transformer_names(pipe: Any) -> list[str]:
    """The pipeline's denoiser components: ``transformer`` and friends (``transformer_2``)."""
    comps = getattr(pipe, "components", {}) or {}
    return [k for k, v in comps.items() if k.startswith("transformer") and isinstance(v, torch.nn.Module)]


def parallelize_pipeline(pipe: Any, plan: Plan, *, broadcast_weights: bool = False) -> Any:
    """Parallelize ``pipe``'s transformer(s) with ``plan`` in place; returns ``pipe``
    (``broadcast_weights``: see :func:`xdit_compile.parallelize`)."""
    names = transformer_names(pipe)
    if not names:
        raise ValueError(f"{type(pipe).__name__} has no transformer component to parallelize "
                         f"(components: {sorted(getattr(pipe, 'components', {}) or {})})")
    for name in names:
        module = getattr(pipe, name)
        if not isinstance(module, ParallelModule):
            # Bypass diffusers' register_modules: the component stays registered as the model
            # class it was (save_pretrained of a parallel pipeline is not supported).
            object.__setattr__(pipe, name, parallelize(module, plan, broadcast_weights=broadcast_weights))
    if not isinstance(pipe, _Resetting):
        pipe.__class__ = _resetting_class(type(pipe))
    return pipe


class _Resetting:
    """Marker base of pipeline classes whose ``__call__`` starts a new request first."""


_CLASSES: dict[type, type] = {}


def _resetting_class(cls: type) -> type:
    """``cls`` with a ``__call__`` that resets the parallel transformers' per-request state
    (displaced K/V, CFG pairing) before running; same name, so diffusers sees the same class."""
    if cls not in _CLASSES:
        @functools.wraps(cls.__call__)  # keeps the signature that callers inspect
        def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
            for name in transformer_names(self):
                module = getattr(self, name)
                if isinstance(module, ParallelModule):
                    module.reset()
            return cls.__call__(self, *args, **kwargs)

        _CLASSES[cls] = type(cls.__name__, (cls, _Resetting), {
            "__call__": __call__, "__module__": cls.__module__, "__qualname__": cls.__qualname__})
    return _CLASSES[cls]
