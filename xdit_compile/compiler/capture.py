"""Capture a model's forward as one functional ATen-level FX graph.

``torch.export`` non-strict first (traces the real Python, so diffusers' control flow on
configs just runs), strict (TorchDynamo) as a fallback. The exported program is
functionalized without decomposing (``run_decompositions({})``): in-place ops become
out-of-place, while ``linear``, ``scaled_dot_product_attention`` and ``einsum`` stay whole for
the sharding rules. Capture runs under ``torch.no_grad()``; shapes are static, so a new input
signature is a new capture.
"""

from __future__ import annotations

import contextlib
import logging
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import DataDependentOutputException
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

__all__ = ["CaptureAttempt", "CaptureError", "capture"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CaptureAttempt:
    """One way of capturing that failed: the export mode, the error and where in the model."""

    mode: str
    error: str
    """The exception's type name."""
    summary: str
    """Its message's first line."""
    location: str
    """The model's source line (file:line in function: code) the error came from."""

    def __str__(self) -> str:
        return f"{self.mode} export: {self.error}: {self.summary}"


class CaptureError(RuntimeError):
    """The model could not be captured as one graph: every attempt, with the op and line, and
    what to do about it (``hint``)."""

    def __init__(self, model: str, attempts: list[CaptureAttempt], hint: str) -> None:
        self.model, self.attempts, self.hint = model, list(attempts), hint
        lines = [f"  {a}\n    at {a.location}" for a in self.attempts]
        super().__init__(
            f"could not capture {model} as one graph:\n" + "\n".join(lines) + "\n" + hint
        )

    @property
    def reason(self) -> str:
        """The first attempt's error, in one line (what a region report shows)."""
        return str(self.attempts[0]) if self.attempts else self.hint

    def with_hint(self, more: str) -> CaptureError:
        """The same error with ``more`` added to its hint."""
        return CaptureError(self.model, self.attempts, f"{self.hint}\n{more}")


def _data_dependent(exc: BaseException) -> bool:
    """Whether ``exc`` (or an error it wraps) is a guard on a data-dependent value."""
    kinds = (GuardOnDataDependentSymNode, DataDependentOutputException)
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, kinds):
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


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


@contextlib.contextmanager
def _data_as_detach() -> Iterator[None]:
    """``x.data`` read as ``x.detach()`` while tracing: the same values without autograd
    (capture runs under ``no_grad``), but a traced op export can follow. Writes through ``.data``
    (``pos.data[:, T:].copy_(emb)``, CogVideoX's positional table) become functional updates."""
    base = torch._C.TensorBase.data
    torch.Tensor.data = property(lambda self: self.detach(), lambda self, v: base.__set__(self, v))  # type: ignore[method-assign,assignment,attr-defined]
    try:
        yield
    finally:
        del torch.Tensor.data


def _snapshot(
    model: torch.nn.Module,
) -> list[tuple[torch.nn.Module, dict[str, Any], dict[str, Any], dict[str, Any]]]:
    return [(m, dict(m.__dict__), dict(m._buffers), dict(m._parameters)) for m in model.modules()]


def _changed_attributes(snap: list[Any]) -> list[str]:
    """Tensor attributes the forward set on its modules (``self.cache = tensor``), by name."""
    names = {id(m): n for n, m in snap[0][0].named_modules()} if snap else {}
    out = []
    for m, attrs, bufs, _ in snap:
        for k, v in list(m.__dict__.items()) + list(m._buffers.items()):
            before = attrs.get(k, bufs.get(k))
            if isinstance(v, torch.Tensor) and v is not before:
                out.append(f"{names.get(id(m), '?')}.{k}".lstrip("."))
    return out


def _restore(snap: list[Any]) -> None:
    """Undo attributes a failed trace left on the modules (fake tensors in caches)."""
    for m, attrs, bufs, params in snap:
        for k in set(m.__dict__) - set(attrs):
            del m.__dict__[k]
        m.__dict__.update(attrs)
        m._buffers.clear()
        m._buffers.update(bufs)
        m._parameters.clear()
        m._parameters.update(params)


def _export(
    model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], strict: bool
) -> fx.GraphModule:
    with torch.no_grad(), _data_as_detach():
        ep = torch.export.export(model, args, kwargs, strict=strict)
        ep = ep.run_decompositions({})
    gm = ep.module()
    assert isinstance(gm, fx.GraphModule)
    return gm


def capture(
    model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> fx.GraphModule:
    """Export ``model(*args, **kwargs)``; returns a GraphModule taking the same arguments.

    A forward that stores tensors on its modules (``self.pos = table`` or ``register_buffer`` for
    a new input size) cannot be traced faithfully: the stored values are fake, and export may
    even turn the store into a write to an input. Such a trace is discarded (the model is left as
    it was), the model runs once eagerly to fill its caches with real tensors, and the capture is
    tried again; a forward that stores tensors on every call is refused, naming them.
    """
    errors: list[CaptureAttempt] = []
    stored: list[str] = []
    data_dependent = False
    for attempt in ("non-strict", "after an eager call that fills the model's caches", "strict"):
        if attempt.startswith("after") and not stored:
            continue
        if attempt == "strict" and (stored or data_dependent):
            break  # strict tracing fails the same way on data-dependent Python (and is slow)
        try:
            if attempt.startswith("after"):
                with torch.no_grad():
                    model(*args, **kwargs)
            snap = _snapshot(model)
            try:
                gm = _export(model, args, kwargs, strict=attempt == "strict")
            finally:  # tracing may leave fake tensors on the modules: the model stays as it was
                changed = _changed_attributes(snap)
                stored = stored or changed
                _restore(snap)
            if changed:
                stored = changed
                raise RuntimeError(
                    f"the forward stores tensors on the model: {', '.join(changed[:5])}"
                )
            if attempt != "non-strict":
                how = "with strict export" if attempt == "strict" else attempt
                logger.info("captured %s %s", type(model).__name__, how)
            return gm
        except Exception as e:  # noqa: BLE001  (export raises many kinds; we report them all)
            data_dependent = data_dependent or _data_dependent(e)
            errors.append(CaptureAttempt(attempt, type(e).__name__, _summary(e), _user_frame(e)))
            logger.debug("%s export failed", attempt, exc_info=True)
    hint = (
        "The forward stores tensors on the model (" + ", ".join(stored[:5]) + ") on every call: "
        "compute them in __init__ (register a buffer there), or pass them as inputs."
        if stored
        else "Remove data-dependent Python control flow at that line, or report the op."
    )
    raise CaptureError(type(model).__name__, errors, hint)
