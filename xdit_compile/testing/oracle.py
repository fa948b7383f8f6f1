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

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["DisplacedOracle", "grid_layout"]


class _Hook(TorchFunctionMode):
    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            names = ("query", "key", "value")
            qkv = list(args[:3]) + [kwargs.pop(n) for n in names[len(args[:3]) :]]
            return self.fn(*qkv, *args[3:], **kwargs)
        return func(*args, **kwargs)


class DisplacedOracle(torch.nn.Module):
    """Displaced-K/V reference of ``model`` (see the module docstring); call it like the model
    (keyword arguments), or put it in a pipeline in place of the transformer.

    ``layout(kwargs)`` gives, for a call's inputs, the token indices (into the body sequence) of
    each patch and ``out_index(j, out)``: patch ``j``'s rows of an output tensor, as an index usable
    for reading and writing. ``text``: text tokens in joint attention (0: none) and whether they
    come first (``text`` may be a function of the call's inputs). A call whose ``hidden_states`` is
    the very tensor of the previous call is the next CFG branch of the same step, with buffers of
    its own.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        method: str,
        layout: Callable[[dict[str, Any]], Any],
        *,
        text: int | Callable[[dict[str, Any]], int] = 0,
        text_first: bool = True,
        warmup_steps: int = 1,
    ) -> None:
        super().__init__()
        if method not in ("pipefusion", "distrifusion"):
            raise ValueError(f"method must be 'pipefusion' or 'distrifusion', got {method!r}")
        self.model = model
        self.method, self.layout = method, layout
        self.text_of = text if callable(text) else (lambda kwargs, t=text: t)
        self.text, self.text_first, self.warmup = 0, text_first, warmup_steps
        self.reset()

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("model", "_modules", "_parameters", "_buffers"):
                raise
            return getattr(self._modules["model"], name)

    def reset(self) -> None:
        self.step, self.branch, self._prev = -1, 0, None
        self.kv: dict[tuple[int, int], list[torch.Tensor]] = {}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if args:  # positional arguments by the model's parameter names
            names = list(inspect.signature(self.model.forward).parameters)
            kwargs = {**dict(zip(names, args, strict=False)), **kwargs}
        x = kwargs.get("hidden_states")
        if x is not None and x is self._prev:
            self.branch += 1
        else:
            self.step, self.branch = self.step + 1, 0
        self._prev = x
        self.patches, self.out_index = self.layout(kwargs)
        self.text = int(self.text_of(kwargs))
        self.body = sum(len(p) for p in self.patches)
        with torch.no_grad():
            if self.step < self.warmup or not any(b == self.branch for b, _ in self.kv):
                return self._exact(kwargs)
            return self._displaced(kwargs)

    def _rows(self, j: int) -> torch.Tensor:
        """Rows of patch ``j`` in the joint key sequence."""
        return self.patches[j] + (self.text if self.text_first else 0)

    def _text_rows(self) -> torch.Tensor:
        start = 0 if self.text_first else self.body
        return torch.arange(start, start + self.text)

    def _is_self(self, k: torch.Tensor) -> bool:
        return k.shape[-2] == self.body + self.text

    def _exact(self, kwargs: dict[str, Any]) -> Any:
        layer = iter(range(10**9))

        def attn(q, k, v, *args, **kw):  # type: ignore[no-untyped-def]
            if self._is_self(k):
                self.kv[(self.branch, next(layer))] = [k.clone(), v.clone()]
            return F.scaled_dot_product_attention(q, k, v, *args, **kw)

        with _Hook(attn):
            return self.model(**kwargs)

    def _displaced(self, kwargs: dict[str, Any]) -> Any:
        out: Any = None
        self._next = {
            i: [k.clone(), v.clone()] for i, (k, v) in self.kv.items() if i[0] == self.branch
        }
        got: Any = None
        for j in range(len(self.patches)):
            got = self._pass(j, kwargs)
            if out is None:
                out = [t.clone() for t in _tensors(got)]
            for o, g in zip(out, _tensors(got), strict=True):
                idx = self.out_index(j, o)
                o[idx] = g[idx]
        if self.method == "distrifusion":
            self.kv.update(self._next)
        return _like(got, out)

    def _pass(self, j: int, kwargs: dict[str, Any]) -> Any:
        layer = iter(range(10**9))
        rows, text = self._rows(j), self._text_rows()

        def attn(q, k, v, *args, **kw):  # type: ignore[no-untyped-def]
            if not self._is_self(k):
                return F.scaled_dot_product_attention(q, k, v, *args, **kw)
            i = (self.branch, next(layer))
            if self.method == "pipefusion":
                buf = self.kv[i]
                for b, fresh in zip(buf, (k, v), strict=True):
                    b[..., rows, :] = fresh[..., rows, :]
                    if j == 0:
                        b[..., text, :] = fresh[..., text, :]
                kk, vv = buf
            else:
                kk, vv = (t.clone() for t in self.kv[i])
                for b, nxt, fresh in zip((kk, vv), self._next[i], (k, v), strict=True):
                    b[..., rows, :] = fresh[..., rows, :]
                    b[..., text, :] = fresh[..., text, :]
                    nxt[..., rows, :] = fresh[..., rows, :]
            return F.scaled_dot_product_attention(q, kk, vv, *args, **kw)

        with _Hook(attn):
            return self.model(**kwargs)


def grid_layout(
    patch: int | tuple[int, ...], n: int, frames_dim: bool = False
) -> Callable[[dict[str, Any]], Any]:
    """``layout`` for latents cut along their outermost token-grid dim into ``n`` pieces of
    whole patch units, as evenly as they go (first pieces larger), the way the compiler seeds:
    rows of ``[B, C, H, W]`` images (``patch``: the patch size), frames of ``[B, C, F, H, W]``
    videos (``frames_dim``; ``patch``: (t, h, w)), or tokens of packed ``[B, S, C]`` latents."""

    def layout(kwargs: dict[str, Any]) -> Any:
        x = kwargs["hidden_states"]
        if x.dim() == 3:
            units, per_unit, dim, unit = x.shape[1], 1, 1, 1
        elif x.dim() == 4:
            p = patch if isinstance(patch, int) else patch[-1]
            units, per_unit, dim, unit = x.shape[2] // p, x.shape[3] // p, 2, p
        else:
            t, h, w = patch if isinstance(patch, tuple) else (1, patch, patch)
            assert frames_dim, "videos: frames_dim=True (cut along frames)"
            units, per_unit, dim, unit = (
                x.shape[2] // t,
                (x.shape[3] // h) * (x.shape[4] // w),
                2,
                t,
            )
        rows, rem = divmod(units, n)
        offs = [0]
        for i in range(n):
            offs.append(offs[-1] + rows + (1 if i < rem else 0))
        patches = [torch.arange(offs[i] * per_unit, offs[i + 1] * per_unit) for i in range(n)]

        def out_index(j: int, o: torch.Tensor) -> Any:
            return (slice(None),) * dim + (slice(offs[j] * unit, offs[j + 1] * unit),)

        return patches, out_index

    return layout


def _like(template: Any, tensors: list[torch.Tensor]) -> Any:
    """``tensors`` in the structure of the model's output ``template``."""
    if isinstance(template, torch.Tensor):
        return tensors[0]
    it = iter(tensors)
    items = [next(it) if isinstance(t, torch.Tensor) else t for t in template]
    return type(template)(items) if isinstance(template, tuple | list) else items


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return [
        t for t in (out if isinstance(out, tuple | list) else (out,)) if isinstance(t, torch.Tensor)
    ]
