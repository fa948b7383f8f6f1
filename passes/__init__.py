"""Graph passes and op rules, imported as ``xdit_compile.passes``."""

if (
    __name__ == "passes"
):  # a bare `import passes` found this folder through the repository root on sys.path
    import runpy as _runpy
    from pathlib import Path as _Path

    _runpy.run_path(str(_Path(__file__).parents[1] / "xdit_compile" / "_shadow.py"))["step_aside"](
        __name__, __file__
    )
