"""A single-process reference of the displaced-K/V semantics, independent of the compiler.

:class:`DisplacedOracle` runs the plain (eager) model and intercepts every
``scaled_dot_product_attention`` call with a ``TorchFunctionMode``. For each patch ``j`` of a
step it runs the whole model once ("pass ``j``") and keeps only patch ``j``'s output rows: a
token's rows depend on other tokens only through attention, so pass ``j`` computes exactly what
patch ``j`` would compute in a patch-by-patch run. In every self-attention of pass ``j``:

- PipeFusion: K/V = the layer's buffer (this step's rows for patches ``< j``, the previous step's
  for ``> j``) with patch ``j``'s rows fresh; the text rows are fresh in pass 0 and read from the
  buffer (written by pass 0 this step) in later passes; pass ``j`` writes its fresh rows back.
- DistriFusion: K/V = the previous step's buffer with patch ``j``'s rows and the text rows fresh;
  the next step's buffer takes every pass's fresh rows.

Warmup steps run the model once, exact, and record every layer's K/V. Self-attentions are
recognized by their key count (body tokens, plus text tokens for joint attention); the caller
gives the token indices of each patch, the text length and side, and where each patch's rows
are in the output, so nothing here knows a model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["DisplacedOracle"]


class _Hook(TorchFunctionMode):
    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            names = ("query", "key", "value")
            qkv = list(args[:3]) + [kwargs.pop(n) for n in names[len(args[:3]):]]
            return self.fn(*qkv, *args[3:], **kwargs)
        return func(*args, **kwargs)


class DisplacedOracle:
    """Displaced-K/V reference of ``model`` (see the module docstring).

    ``patches``: token indices (into the body sequence) of each patch; ``text``: text tokens in
    joint attention (0: none) and whether they come first; ``out_index(j, out)``: patch ``j``'s
    rows of an output tensor as an index usable for reading and writing (e.g.
    ``(slice(None), slice(None), slice(a, b))``).
    """

    def __init__(self, model: torch.nn.Module, method: str, patches: list[torch.Tensor], *,
                 text: int = 0, text_first: bool = True, warmup_steps: int = 1,
                 out_index: Callable[[int, torch.Tensor], Any]) -> None:
        if method not in ("pipefusion", "distrifusion"):
            raise ValueError(f"method must be 'pipefusion' or 'distrifusion', got {method!r}")
        self.model, self.method, self.patches = model, method, patches
        self.text, self.text_first, self.warmup = text, text_first, warmup_steps
        self.out_index = out_index
        self.body = sum(len(p) for p in patches)
        self.step = -1
        self.buffers: dict[int, list[torch.Tensor]] = {}
        self._next: dict[int, list[torch.Tensor]] = {}

    def reset(self) -> None:
        self.step, self.buffers = -1, {}

    def _rows(self, j: int) -> torch.Tensor:
        """Rows of patch ``j`` in the joint key sequence."""
        return self.patches[j] + (self.text if self.text_first else 0)

    def _text_rows(self) -> torch.Tensor:
        start = 0 if self.text_first else self.body
        return torch.arange(start, start + self.text)

    def _is_self(self, k: torch.Tensor) -> bool:
        return k.shape[-2] == self.body + self.text

    def __call__(self, **kwargs: Any) -> Any:
        self.step += 1
        with torch.no_grad():
            if self.step < self.warmup or not self.buffers:
                return self._exact(kwargs)
            return self._displaced(kwargs)

    def _exact(self, kwargs: dict[str, Any]) -> Any:
        layer = iter(range(10**9))

        def attn(q, k, v, *args, **kw):  # type: ignore[no-untyped-def]
            if self._is_self(k):
                self.buffers[next(layer)] = [k.clone(), v.clone()]
            return F.scaled_dot_product_attention(q, k, v, *args, **kw)

        with _Hook(attn):
            return self.model(**kwargs)

    def _displaced(self, kwargs: dict[str, Any]) -> Any:
        out: Any = None
        self._next = {i: [k.clone(), v.clone()] for i, (k, v) in self.buffers.items()}
        for j in range(len(self.patches)):
            got = self._pass(j, kwargs)
            if out is None:
                out = [t.clone() for t in _tensors(got)]
            for o, g in zip(out, _tensors(got), strict=True):
                idx = self.out_index(j, o)
                o[idx] = g[idx]
        if self.method == "distrifusion":
            self.buffers = self._next
        return out[0] if len(out) == 1 else tuple(out)

    def _pass(self, j: int, kwargs: dict[str, Any]) -> Any:
        layer = iter(range(10**9))
        rows, text = self._rows(j), self._text_rows()

        def attn(q, k, v, *args, **kw):  # type: ignore[no-untyped-def]
            if not self._is_self(k):
                return F.scaled_dot_product_attention(q, k, v, *args, **kw)
            i = next(layer)
            if self.method == "pipefusion":
                buf = self.buffers[i]
                for b, fresh in zip(buf, (k, v), strict=True):
                    b[..., rows, :] = fresh[..., rows, :]
                    if j == 0:
                        b[..., text, :] = fresh[..., text, :]
                kk, vv = buf
            else:
                kk, vv = (t.clone() for t in self.buffers[i])
                for b, nxt, fresh in zip((kk, vv), self._next[i], (k, v), strict=True):
                    b[..., rows, :] = fresh[..., rows, :]
                    b[..., text, :] = fresh[..., text, :]
                    nxt[..., rows, :] = fresh[..., rows, :]
            return F.scaled_dot_product_attention(q, kk, vv, *args, **kw)

        with _Hook(attn):
            return self.model(**kwargs)


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for t in (out if isinstance(out, tuple | list) else (out,)) if isinstance(t, torch.Tensor)]
