"""Attention backends that also return the log-sum-exp (what Ring attention merges with).

A backend is registered with a capability check (device, dtype, mask); :func:`attention_with_lse`
takes the first capable one in priority order, like diffusers' attention dispatcher. The
``math`` backend works everywhere and is the reference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "AttentionBackend",
    "attention_with_lse",
    "register_backend",
    "merge_partial",
    "backends",
]

LseFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, float],
    tuple[torch.Tensor, torch.Tensor],
]


@dataclass(frozen=True, slots=True)
class AttentionBackend:
    name: str
    fn: LseFn
    supports: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], bool]
    """(q, k, v, mask) -> whether this backend can run them."""
    priority: int


_BACKENDS: dict[str, AttentionBackend] = {}


def register_backend(backend: AttentionBackend) -> None:
    _BACKENDS[backend.name] = backend


def backends() -> list[str]:
    return [b.name for b in sorted(_BACKENDS.values(), key=lambda b: -b.priority)]


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if mask is None or mask.dtype != torch.bool:
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
        ~mask, float("-inf")
    )


def _math(q, k, v, mask, scale):  # type: ignore[no-untyped-def]
    """Reference: scores in fp32, softmax via the log-sum-exp."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    bias = _additive(mask, torch.float32)
    if bias is not None:
        scores = scores + bias
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), v.float())
    return out.to(q.dtype), lse


def _fix_empty_rows(out, lse, bias):  # type: ignore[no-untyped-def]
    """Fused kernels report lse = 0 for query rows whose keys are all masked; the merge needs
    -inf there (the block contributes nothing)."""
    if bias is None:
        return out, lse
    empty = torch.isneginf(bias).all(dim=-1).expand(lse.shape)
    return out.masked_fill(empty.unsqueeze(-1), 0.0), lse.masked_fill(empty, float("-inf"))


def _cpu_flash(q, k, v, mask, scale):  # type: ignore[no-untyped-def]
    bias = _additive(mask, q.dtype)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, False, attn_mask=bias, scale=scale
    )
    return _fix_empty_rows(out, lse.float(), bias)


def _cuda_flash(q, k, v, mask, scale):  # type: ignore[no-untyped-def]
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
        q, k, v, 0.0, False, False, scale=scale
    )[:2]
    return out, lse.float()


def _cuda_efficient(q, k, v, mask, scale):  # type: ignore[no-untyped-def]
    bias = _additive(mask, q.dtype)
    if bias is not None:
        bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, bias, True, scale=scale
    )[:2]
    # lse may be padded to a multiple of 32 rows
    return _fix_empty_rows(out, lse[..., : q.shape[2]].float(), bias)


def _same_head_dim(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    return q.shape[-1] == k.shape[-1] == v.shape[-1]


register_backend(AttentionBackend("math", _math, lambda q, k, v, m: True, priority=0))
register_backend(
    AttentionBackend(
        "cuda_flash",
        _cuda_flash,
        lambda q, k, v, m: (
            q.device.type == "cuda"
            and m is None
            and _same_head_dim(q, k, v)
            and q.dtype in (torch.float16, torch.bfloat16)
        ),
        priority=30,
    )
)
register_backend(
    AttentionBackend(
        "cuda_efficient",
        _cuda_efficient,
        lambda q, k, v, m: q.device.type == "cuda" and _same_head_dim(q, k, v),
        priority=20,
    )
)
register_backend(
    AttentionBackend(
        "cpu_flash",
        _cpu_flash,
        lambda q, k, v, m: (
            q.device.type == "cpu"
            and _same_head_dim(q, k, v)
            and q.dtype in (torch.float32, torch.bfloat16)
        ),
        priority=10,
    )
)


def attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of ``q`` over ``k, v``; returns (out, lse) with lse in fp32 [..., Sq]."""
    if backend is not None:
        return _BACKENDS[backend].fn(q, k, v, mask, scale)
    for b in sorted(_BACKENDS.values(), key=lambda b: -b.priority):
        if b.supports(q, k, v, mask):
            return b.fn(q, k, v, mask, scale)
    raise RuntimeError("no attention backend supports these inputs")  # pragma: no cover


def merge_partial(
    out: torch.Tensor | None, lse: torch.Tensor | None, blk_out: torch.Tensor, blk_lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two softmax-attention partials over disjoint key sets, exactly, in fp32.

    With ``lse = log(sum exp(scores))`` per block, the full softmax is the lse-weighted mix:
    ``out = out1 * exp(lse1 - lse) + out2 * exp(lse2 - lse)`` where ``lse = logaddexp(lse1, lse2)``.
    """
    # ``out`` is this merge's own running buffer and ``blk_out`` a fresh kernel output: both are
    # updated in place (one fp32 copy of a low-precision block, none of an fp32 one).
    blk_out = torch.nan_to_num_(blk_out.float())  # a fully masked block yields NaN rows
    if out is None or lse is None:
        return blk_out, blk_lse
    new_lse = torch.logaddexp(lse, blk_lse)
    # Rows masked out in both blocks have lse = -inf; keep them at zero instead of NaN.
    w1 = torch.nan_to_num_(torch.exp(lse - new_lse)).unsqueeze(-1)
    w2 = torch.nan_to_num_(torch.exp(blk_lse - new_lse)).unsqueeze(-1)
    return out.mul_(w1).add_(blk_out.mul_(w2)), new_lse
