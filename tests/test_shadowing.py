"""The top-level folders (``kernels/ models/ passes/ runtime/``) never shadow installed packages.

``python -m`` and ``python -c`` put the repository root first on ``sys.path``; transformers then
imports the PyPI package ``kernels`` and must get it, not this repository's folder. Each case runs
in a fresh interpreter started in the repository root with the root explicitly first on
``sys.path``.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("kernels", "models", "passes", "runtime")


def _run(code: str) -> str:
    prelude = f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
    done = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.parametrize("name", FOLDERS)
def test_bare_name_is_the_installed_package_or_missing(name: str) -> None:
    out = _run(f"""
        import importlib.metadata as md
        try:
            import {name} as m
        except ModuleNotFoundError as e:
            assert e.name == {name!r}, e
            print("missing")
        else:
            print("found", m.__file__)
        import xdit_compile.{name} as ours  # the package's own import is unaffected
        print("ours", ours.__file__)
    """)
    lines = dict(line.split(" ", 1) if " " in line else (line, "") for line in out.splitlines())
    assert lines["ours"].startswith(str(ROOT / name)), out
    if "found" in lines:
        found = Path(lines["found"]).resolve()
        assert not found.is_relative_to(ROOT / name), f"{name} resolved to the repository: {out}"


def test_the_installed_kernels_package_wins() -> None:
    pytest.importorskip("kernels", reason="the PyPI package `kernels` is a test dependency")
    out = _run("""
        import kernels
        from kernels import CUDAProperties  # what transformers imports from it
        print(kernels.__file__)
    """)
    assert not Path(out.strip()).resolve().is_relative_to(ROOT / "kernels"), out


def test_peft_enabled_diffusers_models_import_with_the_root_first() -> None:
    _run("""
        import torch
        from peft import LoraConfig
        from diffusers import FluxTransformer2DModel
        m = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1,
            num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8))
        m.add_adapter(LoraConfig(r=2, target_modules=["to_q"]), adapter_name="a")
        assert m.active_adapters() == ["a"]
    """)
