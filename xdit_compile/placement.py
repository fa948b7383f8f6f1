"""Placements: how a tensor of the global graph is laid out over the sequence-parallel ranks.

Shared vocabulary of ``passes`` (which decide placements) and ``runtime`` (which moves data by
them): it imports neither.

``Replicate()``: every rank holds the whole tensor.
``Partial()``: pending sum over ranks (all-reduced where a consumer needs the value).
``Shard(dim, split, outer, inner)``: dimension ``dim`` is viewed as ``[outer, N, inner]`` and the
middle factor ``N = sum(split)`` is cut into contiguous pieces, rank ``i`` holding ``split[i]`` of
it. ``outer``/``inner`` let a shard survive reshapes that merge it with other dims, e.g.
``[B, S, F, C] -> [B*S, F, C]`` keeps S sharded inside the merged dim (``outer=B``). Uneven
``split`` values are exact shards, never padding.
``Shard(..., head=a, tail=b)``: the dim is a concatenation ``[a replicated rows, sharded body,
b replicated rows]``, e.g. text tokens joined to image tokens: every rank holds all ``a + b`` text
rows and its piece of the body, in that order.
``Shard(..., text=True)``: the text rows are sharded too, each of head and tail cut evenly
(``even_split``): rank ``i`` holds ``[head piece i, body piece i, tail piece i]``. Without head
and tail, ``text=True`` marks a tensor made only of such text rows. Joint attention returns its
text rows this way, so the layers after it (output projection, MLP) do not repeat the text
work on every rank; the projections that make the next attention's Q/K/V gather the text
rows back first, so text K/V are computed on every rank and never communicated.
``Shard(..., text=True, text_to=k)``: the text rows are all on rank ``k`` (the others hold none).
PipeFusion's virtual patch axis keeps text rows this way, with the first patch: they are
computed once per step, and their K/V reach the other patches through the displaced-K/V buffer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

__all__ = [
    "Partial",
    "Placement",
    "Replicate",
    "Shard",
    "even_split",
    "fmt",
    "local_shape",
    "text_split",
]


@dataclass(frozen=True, slots=True)
class Replicate:
    def __str__(self) -> str:
        return "R"


@dataclass(frozen=True, slots=True)
class Shard:
    dim: int
    split: tuple[int, ...]
    outer: int = 1
    inner: int = 1
    head: int = 0
    """Replicated rows before the sharded body (which may be merged: ``outer``/``inner``)."""
    tail: int = 0
    """Replicated rows after the sharded body."""
    text: bool = False
    """Head/tail rows (or, with neither, all rows) are text rows cut evenly over the ranks."""
    text_to: int = -1
    """With ``text``: -1 cuts the text rows evenly; ``k >= 0`` puts them all on rank ``k``."""

    def __post_init__(self) -> None:
        # With nothing outside it, an inner factor is just finer units of one contiguous
        # range: fold it in, so equal layouts compare equal.
        if self.outer == 1 and self.inner != 1:
            object.__setattr__(self, "split", tuple(s * self.inner for s in self.split))
            object.__setattr__(self, "inner", 1)

    @property
    def total(self) -> int:
        """Global size of the sharded dimension."""
        return self.head + self.outer * sum(self.split) * self.inner + self.tail

    @property
    def joint(self) -> bool:
        """Whether replicated rows are joined to the body (``head`` or ``tail``)."""
        return bool(self.head or self.tail)

    def body(self) -> Shard:
        """The same shard without its head and tail rows."""
        return replace(self, head=0, tail=0, text=False)

    def text_rows(self, rank: int) -> tuple[int, int]:
        """Head and tail rows held by ``rank`` (all of them unless ``text``)."""
        if not self.text:
            return self.head, self.tail
        n = len(self.split)
        return text_split(self.head, n, self.text_to)[rank], text_split(self.tail, n, self.text_to)[
            rank
        ]

    def local_size(self, rank: int) -> int:
        head, tail = self.text_rows(rank)
        return head + self.outer * self.split[rank] * self.inner + tail

    def offset(self, rank: int) -> int:
        """Start of ``rank``'s piece inside the sharded factor N."""
        return sum(self.split[:rank])

    def with_dim(self, dim: int) -> Shard:
        return replace(self, dim=dim)

    def scaled(self, factor: int) -> Shard:
        """The same cut measured in units ``factor`` times larger (``split`` divided)."""
        return replace(self, split=tuple(s // factor for s in self.split))

    def divisible(self, factor: int) -> bool:
        return all(s % factor == 0 for s in self.split)

    def __str__(self) -> str:
        even = len(set(self.split)) == 1
        cut = f"/{len(self.split)}" if even else f"{list(self.split)}"
        extra = "".join(
            [
                f",outer={self.outer}" if self.outer != 1 else "",
                f",inner={self.inner}" if self.inner != 1 else "",
                f",head={self.head}" if self.head else "",
                f",tail={self.tail}" if self.tail else "",
                (",text" if self.text_to < 0 else f",text@{self.text_to}") if self.text else "",
            ]
        )
        return f"S({self.dim}{cut}{extra})"


@dataclass(frozen=True, slots=True)
class Partial:
    """Every rank holds a partial sum; the full value is their sum (e.g. a matmul that
    contracts the sharded sequence, as in linear attention)."""

    def __str__(self) -> str:
        return "P(sum)"


Placement = Replicate | Shard | Partial


def even_split(n: int, parts: int, unit: int = 1) -> tuple[int, ...]:
    """Cut ``n`` units of size ``unit`` into ``parts`` contiguous pieces, sizes differing by at most
    one unit (``torch.tensor_split`` order: the first pieces get the extra unit)."""
    rows, rem = divmod(n, parts)
    return tuple((rows + (1 if i < rem else 0)) * unit for i in range(parts))


def text_split(rows: int, parts: int, owner: int = -1) -> tuple[int, ...]:
    """How ``rows`` text rows are cut over ``parts`` ranks: evenly (``owner < 0``), or all on
    rank ``owner``."""
    if owner < 0:
        return even_split(rows, parts)
    return tuple(rows if i == owner else 0 for i in range(parts))


def fmt(p: object) -> str:
    if isinstance(p, tuple | list):
        return "(" + ", ".join(fmt(x) for x in p) + ")"
    return str(p) if p is not None else "-"


def local_shape(shape: tuple[int, ...] | list[int], p: Placement, rank: int) -> list[int]:
    out = list(shape)
    if isinstance(p, Shard):
        out[p.dim] = p.local_size(rank)
    return out
