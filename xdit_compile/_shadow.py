"""The repository's top-level folders step aside for installed packages of the same name.

The top level is the architecture (``passes/ runtime/ kernels/ models/``), installed as
``xdit_compile.*``. When the repository root is on ``sys.path`` (``python -m pytest``, ``python -c``
in a checkout), someone else's bare ``import kernels`` (transformers imports the PyPI package
``kernels``) would find the folder first: a regular package on an earlier ``sys.path`` entry wins.
So each folder's ``__init__.py`` checks the name it is being imported under and, for a bare name,
calls :func:`step_aside`, which puts in ``sys.modules`` what that import finds without the
repository root: the installed package, or ``ModuleNotFoundError`` as if the folder were not there.

Standard library only, and loaded by file path: it runs in the middle of another package's import,
so it must not import ``xdit_compile`` (whose ``__init__`` imports diffusers and transformers).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys

__all__ = ["step_aside"]


def _without_root(root: str) -> list[str]:
    return [p for p in sys.path if os.path.realpath(p or os.curdir) != root]


def _is_file(origin: str | None, path: str) -> bool:
    return origin is not None and os.path.realpath(origin) == os.path.realpath(path)


def step_aside(name: str, init_file: str) -> None:
    """Replace the module being imported as ``name`` (this folder) with the installed one.

    ``init_file`` is the folder's ``__init__.py``; its parent's parent is the repository root.
    The import machinery returns whatever ``sys.modules[name]`` holds once the folder's
    ``__init__`` finishes, so the installed package is what the importer gets.
    """
    root = os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(init_file))))
    path = _without_root(root)
    spec = None
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        if find is None:
            continue
        # PathFinder searches sys.path for a top-level name: give it sys.path without the root.
        spec = find(name, path if finder is importlib.machinery.PathFinder else None)
        if spec is not None and not _is_file(spec.origin, init_file):
            break
        spec = None
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
