"""Capture a model's forward as one functional ATen-level FX graph.

``torch.export`` non-strict first (traces the real Python, so diffusers' control flow on
configs just runs), strict (TorchDynamo) as a fallback. The exported program is
functionalized without decomposing (``run_decompositions({})``): in-place ops become
out-of-place, while ``linear``, ``scaled_dot_product_attention`` and ``einsum`` stay whole for
the sharding rules. Capture runs under ``torch.no_grad()``; shapes are static, so a new input
signature is a new capture.
"""

from __future__ import annotations

import logging
import traceback
from typing import Any

import torch
import torch.fx as fx

__all__ = ["CaptureError", "capture"]

logger = logging.getLogger(__name__)


class CaptureError(RuntimeError):
    """The model could not be captured as one graph; the message names the op and line."""


def _user_frame(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    user = [f for f in frames if "/torch/" not in f.filename and "/xdit_compile/" not in f.filename]
    if not user:
        return "<unknown location>"
    f = user[-1]
    return f"{f.filename}:{f.lineno} in {f.name}: {(f.line or '').strip()}"


def _summary(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[0][:400] if lines else type(exc).__name__


def capture(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> fx.GraphModule:
    """Export ``model(*args, **kwargs)``; returns a GraphModule taking the same arguments."""
    errors: list[str] = []
    for strict in (False, True):
        try:
            with torch.no_grad():
                ep = torch.export.export(model, args, kwargs, strict=strict)
                ep = ep.run_decompositions({})
            gm = ep.module()
            assert isinstance(gm, fx.GraphModule)
            if strict:
                logger.info("captured %s with strict export", type(model).__name__)
            return gm
        except Exception as e:  # noqa: BLE001  (export raises many kinds; we report them all)
            mode = "strict" if strict else "non-strict"
            errors.append(f"  {mode} export: {type(e).__name__}: {_summary(e)}\n    at {_user_frame(e)}")
            logger.debug("%s export failed", mode, exc_info=True)
    raise CaptureError(
        f"could not capture {type(model).__name__} as one graph:\n" + "\n".join(errors)
        + "\nRemove data-dependent Python control flow at that line, or report the op."
    )
