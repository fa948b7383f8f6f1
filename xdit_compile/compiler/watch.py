"""Mutation tracking for module trees: a counter that moves whenever their Python state may change.

A parallel module checks at every call that its model's Python-side state is the one its graphs
were compiled for (:mod:`xdit_compile.compiler.state`). Comparing a whole snapshot costs about a
microsecond per module, milliseconds for a LoRA-loaded DiT: too much per call. Instead the tree
is *watched*: every change goes through something that moves :func:`version`, and a call only
compares one integer (and the few plain objects modules hold, like attention processors).

- Each module's class becomes a subclass (same name, module and qualname; cached per class, as
  ``torch.nn.utils.parametrize`` does) whose ``__setattr__``, ``__delattr__``, parameter, buffer,
  submodule and forward-hook registration and ``_apply`` (``.to()``, ``.half()``...) move the
  counter first: adapter switches, ``train()``/``eval()``, processor swaps, replaced parameters.
- The plain containers modules hold (dicts, lists, sets: PEFT's scaling dicts and merged-adapter
  lists) and their empty forward-hook dicts become versioned subclasses whose mutators move it
  too: in-place edits like ``scaling[name] = w`` or a hook handle's ``remove()``. Containers that
  already hold hooks (handles may point at them) and containers of other types are left as they
  are; the snapshot compares them at every call instead.

``isinstance``, the class name and ``obj.__class__`` are unchanged (only ``type(obj)`` shows the
subclass); pickling and ``copy.deepcopy`` give instances of the original classes. Writes that bypass
Python attribute assignment (``vars(m)[k] = v``, ``object.__setattr__``) are not seen here; the full
snapshot comparison at every new request (:meth:`~xdit_compile.api.ParallelModule.reset`) and after
any move of the counter catches them.
"""

from __future__ import annotations

import copyreg
import functools
from collections import OrderedDict
from typing import Any

import torch

__all__ = ["HOOK_DICTS", "TORCH_CONTAINERS", "version", "watch_module"]

_COUNT = [0]

#: Containers of ``nn.Module`` changed only through its methods (which watched classes wrap).
TORCH_CONTAINERS = frozenset({"_parameters", "_buffers", "_modules"})
#: Forward-hook dicts: registration goes through the module, removal through the handle.
HOOK_DICTS = frozenset(
    {
        "_forward_hooks",
        "_forward_pre_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_hooks_always_called",
        "_forward_pre_hooks_with_kwargs",
    }
)


def version() -> int:
    """How many times watched state may have changed (in any watched tree) so far."""
    return _COUNT[0]


def _bump() -> None:
    _COUNT[0] += 1


def _mutator(base: type, name: str) -> Any:
    method = getattr(base, name)

    @functools.wraps(
        method
    )  # the signature too: torch inspects register_buffer's for ``persistent``
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        _COUNT[0] += 1
        return method(self, *args, **kwargs)

    return wrapper


def _versioned_type(name: str, base: type, names: tuple[str, ...]) -> type:
    ns: dict[str, Any] = {n: _mutator(base, n) for n in names}
    ns.update(__module__=__name__, __qualname__=name)  # picklable by name: a module attribute
    return type(name, (base,), ns)


_DICT_MUTATORS = (
    "__setitem__",
    "__delitem__",
    "__ior__",
    "pop",
    "popitem",
    "clear",
    "update",
    "setdefault",
)
VersionedDict = _versioned_type("VersionedDict", dict, _DICT_MUTATORS)
VersionedOrderedDict = _versioned_type(
    "VersionedOrderedDict", OrderedDict, (*_DICT_MUTATORS, "move_to_end")
)
VersionedList = _versioned_type(
    "VersionedList",
    list,
    (
        "__setitem__",
        "__delitem__",
        "__iadd__",
        "__imul__",
        "append",
        "extend",
        "insert",
        "pop",
        "remove",
        "clear",
        "sort",
        "reverse",
    ),
)
VersionedSet = _versioned_type(
    "VersionedSet",
    set,
    (
        "add",
        "discard",
        "remove",
        "pop",
        "clear",
        "update",
        "difference_update",
        "intersection_update",
        "symmetric_difference_update",
        "__ior__",
        "__iand__",
        "__isub__",
        "__ixor__",
    ),
)
_VERSIONED: dict[type, type] = {
    dict: VersionedDict,
    OrderedDict: VersionedOrderedDict,
    list: VersionedList,
    set: VersionedSet,
}


def _versioned(v: Any) -> Any:
    """``v`` with every plain container in it a versioned one (the same contents)."""
    kind = _VERSIONED.get(type(v))
    if kind is VersionedDict or kind is VersionedOrderedDict:
        return kind((k, _versioned(x)) for k, x in v.items())
    if kind is not None:
        return kind(_versioned(x) for x in v)
    if type(v) is tuple and any(type(x) in _VERSIONED for x in v):
        return tuple(_versioned(x) for x in v)
    return v


_MODULE_MUTATORS = (
    "__setattr__",
    "__delattr__",
    "register_parameter",
    "register_buffer",
    "register_module",
    "add_module",
    "register_forward_hook",
    "register_forward_pre_hook",
    "_apply",
)
_WATCHED: dict[type, type] = {}


def _reduce_as(base: type) -> Any:
    def __reduce_ex__(self: Any, protocol: Any) -> Any:
        rv = object.__reduce_ex__(self, protocol)
        if isinstance(rv, tuple) and rv and rv[0] is copyreg.__newobj__ and rv[1][0] is type(self):  # type: ignore[attr-defined]
            rv = (rv[0], (base, *rv[1][1:]), *rv[2:])  # pickles and copies as the original class
        return rv

    return __reduce_ex__


_SET_CLASS = object.__dict__["__class__"].__set__


def _class_as(base: type) -> property:
    """``obj.__class__`` reads as the original class (registries keyed by class, such as
    diffusers' hook registry, find it; ``type(obj)`` is the watched one). Assigning it
    (``torch.nn.utils.parametrize``) moves the counter."""

    def setter(self: Any, cls: type) -> None:
        _COUNT[0] += 1
        _SET_CLASS(self, cls)

    return property(lambda self: base, setter)


def _watched_class(cls: type) -> type:
    if cls.__dict__.get("_xdit_watched", False):
        return cls
    if cls not in _WATCHED:
        ns: dict[str, Any] = {n: _mutator(cls, n) for n in _MODULE_MUTATORS}
        ns.update(
            _xdit_watched=True,
            __module__=cls.__module__,
            __qualname__=cls.__qualname__,
            __doc__=cls.__doc__,
            __reduce_ex__=_reduce_as(cls),
            __class__=_class_as(cls),
        )
        _WATCHED[cls] = type(cls.__name__, (cls,), ns)
    return _WATCHED[cls]


def watch_module(m: torch.nn.Module) -> list[tuple[Any, str]]:
    """Watch ``m`` (not its children); returns the ``(owner, key)`` of the containers left as
    they are, which the caller must compare at every call. Idempotent."""
    left: list[tuple[Any, str]] = []
    cls = type(m)
    if not cls.__dict__.get("_xdit_watched", False):
        # (``type``, not ``m.__class__``: an earlier watch reports the original class there)
        try:
            m.__class__ = _watched_class(cls)
        except TypeError:  # a layout that cannot take a subclass (slots, extension types)
            return [(m, k) for k in vars(m)]
    d = vars(m)
    for k, v in list(d.items()):
        if k in TORCH_CONTAINERS or type(v) in _VERSIONED.values():
            continue
        if k in HOOK_DICTS:
            if type(v) is OrderedDict and not v:
                d[k] = VersionedOrderedDict()
            elif type(v) is not VersionedOrderedDict:
                left.append((m, k))  # holds hooks already: their handles point at this dict
            continue
        if type(v) in _VERSIONED or type(v) is tuple:
            d[k] = _versioned(v)
        elif isinstance(v, dict | list | set):
            left.append((m, k))  # a container of another type (FrozenDict...)
    return left
