"""The Python-side state a captured graph depends on, watched at every call.

A graph captured from ``model.forward`` bakes in what the Python code read while it was traced:
which LoRA adapters are active and their scales, whether they are fused, which parameter and
buffer *objects* the modules hold, the attention processors and their settings, forward hooks,
train/eval, the autocast state. None of that is an input of the graph, so changing it after the
first call would leave the graph stale: a wrong result. This module makes that state part of what
a compiled graph is valid for, for any module tree (nothing here knows PEFT or diffusers' classes):

- :class:`StateWatch` snapshots the tree once (every module's attributes but the few a forward
  under ``no_grad`` never reads, with containers copied; the attributes of the plain objects they
  hold, e.g. attention processors; every tensor's storage; the global state forwards read) and
  answers :meth:`StateWatch.unchanged` at each call with a handful of C-level comparisons.
- :class:`Fingerprint` is the hashable form of the same state: the cache key of compiled graphs
  (switching back to an earlier adapter reuses its graph), and :meth:`Fingerprint.diff` says what
  changed, for the log and ``explain``.

What a change means is decided by the caller (:class:`~xdit_compile.api.ParallelModule`): recompile
for the new state, or refuse. In-place edits of a tensor's values need nothing: graphs read the
live tensors.
"""

from __future__ import annotations

import enum
import operator
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn.modules import module as _nn_module

from xdit_compile.compiler.watch import version, watch_module

__all__ = [
    "Fingerprint",
    "Snapshot",
    "StateNow",
    "StateTracker",
    "StateWatch",
    "diffusers_hooks",
    "fingerprint",
]

#: Standard ``nn.Module`` attributes a forward under ``no_grad`` never reads: backward and
#: state-dict hooks, and the flags kept beside the forward-hook dicts (same keys as those).
IRRELEVANT = frozenset(
    {
        "_backward_pre_hooks",
        "_backward_hooks",
        "_is_full_backward_hook",
        "_state_dict_hooks",
        "_state_dict_pre_hooks",
        "_load_state_dict_pre_hooks",
        "_load_state_dict_post_hooks",
        "_non_persistent_buffers_set",
        "_forward_hooks_with_kwargs",
        "_forward_hooks_always_called",
        "_forward_pre_hooks_with_kwargs",
    }
)
_ATOMS = (
    type(None),
    bool,
    int,
    float,
    complex,
    str,
    bytes,
    torch.dtype,
    torch.device,
    torch.Size,
    torch.layout,
    torch.memory_format,
    range,
    slice,
    type,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    types.ModuleType,
    enum.Enum,
)
_CONTAINERS = (dict, list, tuple, set, frozenset)
#: How deep plain objects are followed (module -> processor -> its settings).
_DEPTH = 3
_data_ptr = torch.Tensor.data_ptr


class _Same:
    """Equal only to the very object it holds (tensors whose ``==`` could answer by value)."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __eq__(self, other: object) -> bool:
        return other is self.obj if not isinstance(other, _Same) else other.obj is self.obj

    __hash__ = None  # type: ignore[assignment]


def _call(getter: Any, d: dict[str, Any]) -> Any:
    return getter(d)


def _ignored(key: str, value: Any) -> bool:
    """Attributes no captured graph depends on: those a forward under ``no_grad`` never reads,
    and diffusers' hook registry while it holds no hooks (pipelines set its context per call;
    with hooks, the model is refused: :func:`diffusers_hooks`)."""
    return key in IRRELEVANT or (key == "_diffusers_hook" and not getattr(value, "hooks", None))


def _plain_object(v: Any) -> bool:
    return hasattr(v, "__dict__") and not isinstance(v, (*_ATOMS, torch.nn.Module, torch.Tensor))


class _Collect:
    """One walk of a module tree: the snapshot :class:`StateWatch` compares against."""

    def __init__(self) -> None:
        self.tensors: list[torch.Tensor] = []
        self.objects: list[Any] = []
        self._seen: set[int] = set()

    def copy(self, v: Any, depth: int = 0) -> Any:
        """``v`` as the snapshot holds it: containers copied (compared by value), tensors kept
        (compared by identity: the same object is equal to itself without ``==``), plain objects
        kept and their attributes snapshot too."""
        if isinstance(v, torch.Tensor):
            self.tensors.append(v)
            exact = type(v) in (torch.Tensor, torch.nn.Parameter) and v.numel() > 1
            return (
                v if exact else _Same(v)
            )  # ``==`` of 1-element or subclass tensors answers by value
        if isinstance(v, (*_ATOMS, torch.nn.Module)):
            return v
        if isinstance(v, dict):
            return {k: self.copy(x, depth + 1) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return (
                type(v)(self.copy(x, depth + 1) for x in v)
                if type(v) in (list, tuple)
                else [self.copy(x, depth + 1) for x in v]
            )
        if isinstance(v, set | frozenset):
            return set(v)
        if _plain_object(v) and depth < _DEPTH and id(v) not in self._seen:
            self._seen.add(id(v))
            self.objects.append((v, depth))
        return v


@dataclass
class Snapshot:
    """Every module's attributes (but the few a forward under ``no_grad`` never reads), with
    containers copied, the attributes of the plain objects they hold, every tensor's storage and
    the global state forwards read: compared with the live tree in a few C-level comparisons per
    module (:meth:`matches`, about a microsecond per module)."""

    dicts: list[dict[str, Any]]
    lens: list[int]
    getters: list[Any]
    snap: list[Any]
    objects: list[Any]
    object_snap: list[Any]
    tensors: list[torch.Tensor]
    ptrs: list[int]
    glob: tuple[Any, ...]

    @classmethod
    def of(cls, root: torch.nn.Module) -> Snapshot:
        col = _Collect()
        dicts = [vars(m) for _, m in _modules(root)]
        getters, snap = [], []
        for d in dicts:
            keys = [k for k, v in d.items() if not _ignored(k, v)]
            getter = (
                operator.itemgetter(*keys)
                if len(keys) > 1
                else ((lambda d, k=keys[0]: (d[k],)) if keys else (lambda d: ()))
            )
            getters.append(getter)
            snap.append(tuple(col.copy(v) for v in getter(d)))
        objects, object_snap = [], []
        i = 0
        while i < len(col.objects):  # objects found while copying objects' attributes join the list
            obj, depth = col.objects[i]
            objects.append(obj)
            object_snap.append({k: col.copy(v, depth + 1) for k, v in vars(obj).items()})
            i += 1
        return cls(
            dicts,
            list(map(len, dicts)),
            getters,
            snap,
            objects,
            object_snap,
            col.tensors,
            list(map(_data_ptr, col.tensors)),
            _global_state(),
        )

    def matches(self) -> bool:
        """Whether the live tree still has this state (every comparison puts the snapshot
        first, so tensors compare by identity, containers by value)."""
        try:
            return (
                list(map(len, self.dicts)) == self.lens
                and self.snap == list(map(_call, self.getters, self.dicts))
                and self.object_snap == list(map(vars, self.objects))
                and list(map(_data_ptr, self.tensors)) == self.ptrs
                and _global_state() == self.glob
            )
        except (RuntimeError, TypeError, ValueError):  # a replaced tensor's ``==``: it changed
            return False


@dataclass
class StateWatch:
    """The state of a watched tree (:mod:`xdit_compile.compiler.watch`): :meth:`quick` at every call
    compares the mutation counter, the plain objects modules hold (attention processors and
    their settings), the containers the counter cannot follow and the global state; the full
    :class:`Snapshot` backs it where the counter moved, and at every new request."""

    version: int
    snapshot: Snapshot
    left: list[tuple[Any, str]]
    left_snap: list[Any]

    @classmethod
    def of(cls, root: torch.nn.Module) -> StateWatch:
        left: list[tuple[Any, str]] = []
        for _, m in _modules(root):
            left += watch_module(m)
        snapshot = Snapshot.of(root)
        col = _Collect()
        return cls(version(), snapshot, left, [col.copy(vars(o)[k]) for o, k in left])

    def quick(self) -> bool:
        """Unchanged since the snapshot, as far as the counter and the per-call comparisons see."""
        s = self.snapshot
        try:
            return (
                version() == self.version
                and s.object_snap == list(map(vars, s.objects))
                and self.left_snap == [vars(o)[k] for o, k in self.left]
                and _global_state() == s.glob
            )
        except (RuntimeError, TypeError, ValueError):
            return False

    def matches(self) -> bool:
        """The full comparison; where it holds, the counter's moves since are forgotten."""
        if not (self.snapshot.matches() and self.left_snap == [vars(o)[k] for o, k in self.left]):
            return False
        self.version = version()
        return True


def _modules(root: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    """``(path, module)`` of the tree, without descending into nested parallel modules (opaque
    here: they watch their own trees)."""
    seen: set[int] = set()
    stack = [("", root)]
    while stack:
        name, m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        yield name, m
        if getattr(m, "_xdit_opaque", False) and m is not root:
            continue
        kids = [(f"{name}.{k}" if name else k, c) for k, c in m._modules.items() if c is not None]
        stack.extend(reversed(kids))


_CUDA = torch.cuda.is_available()


def _global_state() -> tuple[Any, ...]:
    """Global state a traced forward reads: autocast, and global module hooks (they run in
    every module's ``__call__``)."""
    cpu = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")
    cuda = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")) if _CUDA else ()
    hooks = tuple(
        tuple(d) for d in (_nn_module._global_forward_hooks, _nn_module._global_forward_pre_hooks)
    )
    return cpu, cuda, hooks


# --------------------------------------------------------------------------------------------
# Fingerprints: the hashable form, for cache keys and for saying what changed


def _freeze(v: Any, depth: int = 0, seen: frozenset[int] = frozenset()) -> Any:
    if isinstance(v, torch.Tensor):
        return ("tensor", id(v), v.dtype, tuple(v.shape), str(v.device), v.data_ptr())
    if isinstance(v, torch.nn.Module):
        return ("module", id(v), type(v).__qualname__)
    if isinstance(v, _ATOMS):
        try:
            hash(v)
            return v
        except TypeError:
            return ("object", id(v))
    if isinstance(v, dict):
        return ("dict", tuple((_freeze(k), _freeze(x, depth + 1, seen)) for k, x in v.items()))
    if isinstance(v, list | tuple):  # versioned or not: the same contents are the same state
        return (
            "list" if isinstance(v, list) else "tuple",
            tuple(_freeze(x, depth + 1, seen) for x in v),
        )
    if isinstance(v, set | frozenset):
        return ("set", frozenset(_freeze(x, depth + 1, seen) for x in v))
    if _plain_object(v) and depth < _DEPTH and id(v) not in seen:
        inner = seen | {id(v)}
        return (
            "object",
            id(v),
            type(v).__qualname__,
            tuple((k, _freeze(x, depth + 1, inner)) for k, x in vars(v).items()),
        )
    return ("object", id(v))


@dataclass(frozen=True)
class Fingerprint:
    """The state of a module tree by module path (``key``: hashable), holding its tensors (so
    the ids in it stay theirs while a compiled graph keyed by it lives)."""

    key: tuple[Any, ...]
    tensors: tuple[torch.Tensor, ...] = field(compare=False, repr=False, hash=False)

    def __hash__(self) -> int:
        return hash(self.key)

    def diff(self, other: Fingerprint, limit: int = 4) -> list[str]:
        """What differs from ``other`` (the earlier state): one line per kind of change, with
        the modules it happened in (``_active_adapter ['a'] -> ['b'] in 8 modules: ...``)."""
        mine, theirs = dict(self.key), dict(other.key)
        by_what: dict[str, list[str]] = {}
        for path in dict.fromkeys([*theirs, *mine]):
            a, b = theirs.get(path), mine.get(path)
            if a == b:
                continue
            what = (
                "module added"
                if a is None
                else "module removed"
                if b is None
                else _what(dict(a), dict(b))
            )
            by_what.setdefault(what, []).append(path or "<root>")
        out = []
        for what, paths in list(by_what.items())[:limit]:
            where = (
                paths[0]
                if len(paths) == 1
                else (
                    f"{len(paths)} modules: "
                    f"{', '.join(paths[:3])}{', ...' if len(paths) > 3 else ''}"
                )
            )
            out.append(f"{what} ({where})")
        if len(by_what) > limit:
            out.append(f"and {len(by_what) - limit} more kinds of change")
        return out

    def holds_only(self, alive: set[int]) -> bool:
        """Whether every tensor of this state is among ``alive`` (ids of the live tree's)."""
        return all(id(t) in alive for t in self.tensors)


def _what(before: dict[str, Any], after: dict[str, Any]) -> str:
    keys = [k for k in dict.fromkeys([*before, *after]) if before.get(k) != after.get(k)]
    parts = []
    for k in keys[:3]:
        a, b = before.get(k), after.get(k)
        if k in ("_parameters", "_buffers", "_modules") and a and b:
            da, db = dict(a[1]), dict(b[1])
            names = [n for n in dict.fromkeys([*da, *db]) if da.get(n) != db.get(n)]
            parts.append(f"{k.strip('_')} {', '.join(names[:4])} replaced")
        elif k in ("_forward_hooks", "_forward_pre_hooks"):
            parts.append(f"{k.strip('_').replace('_', ' ')} changed")
        else:
            parts.append(f"{k} {_short(a)} -> {_short(b)}")
    return "; ".join(parts) + (" ..." if len(keys) > 3 else "")


def _short(v: Any) -> str:
    if isinstance(v, tuple) and v and v[0] == "dict":
        return (
            "{"
            + ", ".join(f"{_short(k)}: {_short(x)}" for k, x in v[1][:4])
            + ("..." if len(v[1]) > 4 else "")
            + "}"
        )
    if isinstance(v, tuple) and v and v[0] in ("list", "tuple"):
        return "[" + ", ".join(_short(x) for x in v[1][:4]) + "]"
    if isinstance(v, tuple) and v and v[0] == "tensor":
        return f"tensor{list(v[3])} {str(v[2]).removeprefix('torch.')}"
    if isinstance(v, tuple) and v and v[0] in ("object", "module"):
        return f"<{v[2] if len(v) > 2 else 'object'}>"
    s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


def fingerprint(root: torch.nn.Module) -> Fingerprint:
    """The hashable state of ``root``'s tree (the attributes :class:`StateWatch` compares)."""
    entries, tensors = [], []
    for name, m in _modules(root):
        d = vars(m)
        entries.append((name, tuple((k, _freeze(v)) for k, v in d.items() if not _ignored(k, v))))
        for k in ("_parameters", "_buffers"):
            tensors += [t for t in d[k].values() if isinstance(t, torch.Tensor)]
    entries.append(("<global>", (("state", _freeze(_global_state())),)))
    return Fingerprint(tuple(entries), tuple(tensors))


def diffusers_hooks(root: torch.nn.Module) -> list[str]:
    """``path: hook names`` of modules carrying diffusers hooks (``enable_cache``, layerwise
    casting, group offloading...): they decide per call in Python, which a graph cannot."""
    out = []
    for name, m in root.named_modules():
        registry = vars(m).get("_diffusers_hook")
        hooks = getattr(registry, "hooks", None)
        if hooks:
            out.append(f"{name or '<root>'}: {', '.join(hooks)}")
    return out


@dataclass(frozen=True, slots=True)
class StateNow:
    """The model's state at a call: its id, whether it differs from the last call's, and the
    ids of earlier states dropped because the model no longer holds their tensors."""

    id: int
    changed: bool = False
    dropped: frozenset[int] = frozenset()


class StateTracker:
    """Which Python-side state a model is in, as a small id per distinct state seen.

    Each call costs a few comparisons per module while nothing changed (the mutation counter,
    :meth:`StateWatch.quick`); when the counter moved, the whole snapshot is compared; when the
    state really changed, its fingerprint finds an earlier state again (its programs are reused)
    or makes a new id. States holding tensors the model no longer has (replaced weights) are
    dropped: their programs keep the old tensors alive and can never be valid again.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.watch: StateWatch | None = None
        """Snapshot of the state after the last compile or state change."""
        self.states: dict[Fingerprint, int] = {}
        self.current = -1
        self.recheck = False
        """Compare the whole snapshot at the next call (a new request)."""
        self.changes: list[str] = []
        """What changed each time the state changed after the first call."""

    def now(self) -> StateNow:
        """The current state (refused, with the fix, when the model carries diffusers hooks)."""
        w = self.watch
        if w is not None and not self.recheck and w.quick():
            return StateNow(self.current)
        self.recheck = False
        if w is not None and w.matches():  # the mutation counter moved, the state did not
            return StateNow(self.current)
        fp = fingerprint(self.model)
        changed, dropped = False, frozenset[int]()
        if self.states and fp not in self.states:
            old = next(f for f, i in self.states.items() if i == self.current)
            self.changes.append("; ".join(fp.diff(old) or ["module state"]))
            changed, dropped = True, self._drop_stale(fp)
        hooks = diffusers_hooks(self.model)
        if hooks:
            raise ValueError(
                f"{type(self.model).__name__} carries diffusers hooks ({'; '.join(hooks[:3])}): "
                "they decide in Python at every call, which a compiled graph cannot; remove them "
                "(e.g. model.disable_cache()) before calling the parallel model"
            )
        if fp not in self.states:
            self.states[fp] = max(self.states.values(), default=-1) + 1
        elif self.states[fp] != self.current:
            self.changes.append(f"back to state {self.states[fp]} (its graphs are reused)")
        self.current = self.states[fp]
        self.rewatch()
        return StateNow(self.current, changed, dropped)

    def rewatch(self) -> None:
        """Take the snapshot again (after a compile: what capture and compile left)."""
        self.watch = StateWatch.of(self.model)

    def _drop_stale(self, current: Fingerprint) -> frozenset[int]:
        alive = {id(t) for t in current.tensors}
        dead = frozenset(i for f, i in self.states.items() if not f.holds_only(alive))
        self.states = {f: i for f, i in self.states.items() if i not in dead}
        return dead
