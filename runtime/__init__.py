"""Mesh, counted collectives, parallel attention, schedules; imported as
``xdit_compile.runtime``."""

if (
    __name__ == "runtime"
):  # a bare `import runtime` found this folder through the repository root on sys.path
    import runpy as _runpy
    from pathlib import Path as _Path

    _runpy.run_path(str(_Path(__file__).parents[1] / "xdit_compile" / "_shadow.py"))["step_aside"](
        __name__, __file__
    )
