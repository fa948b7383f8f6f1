"""``parallelize_pipeline``: a whole diffusers pipeline in parallel with one call.

Every rank runs the same pipeline (same prompts, same generator seed, so the same latents and
text embeddings); each transformer component (``transformer``, ``transformer_2``...) is
replaced by its :func:`~xdit_compile.parallelize` d version, whose outputs are gathered and
identical on every rank, so every rank gets the same image. With ``vae=True`` the VAE decoder
and encoder go through the same compiler: their rows are cut over every rank (convolutions
exchange halo rows, GroupNorm combines per-rank statistics, the mid-block attention runs as
Ring attention), so each rank holds 1/N of their activations; otherwise the VAE runs whole on
every rank. CFG needs no per-pipeline code: pipelines that batch both
branches are cut by the ``cfg`` batch round, those that call the transformer twice per step
by call pairing (:mod:`xdit_compile.runtime.cfg_pairs`).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.distributed as dist

from xdit_compile.api import ParallelModule, parallelize
from xdit_compile.plan import Plan

__all__ = ["parallelize_pipeline", "parallelize_vae", "transformer_names"]


def transformer_names(pipe: Any) -> list[str]:
    """The pipeline's denoiser components: ``transformer`` and friends (``transformer_2``)."""
    comps = getattr(pipe, "components", {}) or {}
    return [
        k
        for k, v in comps.items()
        if k.startswith("transformer") and isinstance(v, torch.nn.Module)
    ]


def parallelize_pipeline(
    pipe: Any, plan: Plan, *, broadcast_weights: bool = False, vae: bool | Plan = False
) -> Any:
    """Parallelize ``pipe``'s transformer(s) with ``plan`` in place; returns ``pipe``
    (``broadcast_weights``: see :func:`xdit_compile.parallelize`).

    ``vae``: also parallelize the VAE's decoder and encoder (:func:`parallelize_vae`): ``True``
    cuts their rows over every rank (``Plan(ring=world_size)``: their attention has one head),
    or give their own plan. Outputs are gathered, so every rank still gets the whole image."""
    names = transformer_names(pipe)
    if not names:
        raise ValueError(
            f"{type(pipe).__name__} has no transformer component to parallelize "
            f"(components: {sorted(getattr(pipe, 'components', {}) or {})})"
        )
    if vae is not False:
        # Every rank of the group (also when the transformer's plan is chosen at its first call).
        world = dist.get_world_size() if dist.is_initialized() else plan.world_size
        vae_plan = vae if isinstance(vae, Plan) else Plan(ring=world, compile=plan.compile)
        parallelize_vae(pipe.vae, vae_plan, broadcast_weights=broadcast_weights)
    for name in names:
        module = getattr(pipe, name)
        if not isinstance(module, ParallelModule):
            # Bypass diffusers' register_modules: the component stays registered as the model
            # class it was (save_pretrained of a parallel pipeline is not supported).
            object.__setattr__(
                pipe, name, parallelize(module, plan, broadcast_weights=broadcast_weights)
            )
    if not isinstance(pipe, _Resetting):
        pipe.__class__ = _resetting_class(type(pipe))
    return pipe


def parallelize_vae(vae: Any, plan: Plan, *, broadcast_weights: bool = False) -> Any:
    """Replace ``vae.decoder`` and ``vae.encoder`` by their :func:`~xdit_compile.parallelize` d
    versions (in place; returns ``vae``). The rows of the latent (decoder) or image (encoder)
    are the sequence the plan cuts (``ring`` and ``ulysses`` axes; a one-head attention runs as
    Ring over both axes: the mid-block attention has one head). Both capture lazily, at their first
    call.

    Decoders and encoders that keep per-call state between calls (the causal video VAEs'
    feature caches, passed as list arguments) are refused: a captured graph cannot carry that
    state."""
    import inspect

    parts: dict[str, torch.nn.Module] = {
        name: m
        for name in ("decoder", "encoder")
        if isinstance(m := getattr(vae, name, None), torch.nn.Module)
    }
    if "decoder" not in parts:
        raise ValueError(f"{type(vae).__name__} has no decoder module to parallelize")
    if plan.cfg > 1 or plan.dp > 1 or plan.pipefusion > 1 or plan.distrifusion > 1:
        raise ValueError(
            f"a VAE plan cuts rows only (ring/ulysses), got {plan}; "
            f"use vae=True for Plan(ring=world_size)"
        )
    for name, module in parts.items():
        if isinstance(module, ParallelModule):
            continue
        params = list(inspect.signature(module.forward).parameters.values())[1:]
        stateful = [
            p.name for p in params if isinstance(p.default, list | dict) or "cache" in p.name
        ]
        if stateful:
            raise ValueError(
                f"{type(vae).__name__}.{name} keeps state between calls ({', '.join(stateful)}): "
                "it cannot be captured as one graph; run the VAE whole (vae=False)"
            )
    for name, module in parts.items():
        if not isinstance(module, ParallelModule):
            setattr(vae, name, parallelize(module, plan, broadcast_weights=broadcast_weights))
    return vae


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

        _CLASSES[cls] = type(
            cls.__name__,
            (cls, _Resetting),
            {"__call__": __call__, "__module__": cls.__module__, "__qualname__": cls.__qualname__},
        )
    return _CLASSES[cls]
