"""Whole tiny pipelines with PipeFusion / DistriFusion through ``parallelize_pipeline``.

Reference: the same pipeline with its transformer replaced by the single-process oracle
(:class:`xdit_compile.testing.oracle.DisplacedOracle`), same seed; 3 denoising steps, the first a
warmup step. Tolerance 1e-4 relative on the images (the transformer matches the oracle to float
rounding, see test_displaced; the scheduler and VAE carry that through). Two requests in a row
give the same image as the first alone: each ``pipe()`` call starts with empty buffers.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

TOL = 1e-4
#: Per pipeline: (patch size, video, joint text before the image (None: no joint text)).
LAYOUT = {
    "pixart-sigma": (2, False, None),
    "sd3": (2, False, False),
    "flux": (1, False, True),
    "wan": ((1, 2, 2), True, None),
}

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _images(out: Any) -> torch.Tensor:
    return torch.as_tensor(getattr(out, "frames", None) if hasattr(out, "frames") else out.images)


def _run(pipe: Any, prompt: Any, kw: dict) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return _images(pipe(prompt=prompt, generator=torch.Generator().manual_seed(0), **kw))


def _vs_oracle(name: str, plan_kw: dict, method: str, n: int, prompt: Any = "a red fox") -> dict:
    import xdit_compile as xc
    from xdit_compile.jobs.compare import rel_error
    from xdit_compile.models.pipelines import build_pipeline, pipeline_defaults
    from xdit_compile.testing.oracle import DisplacedOracle, grid_layout

    kw = {**pipeline_defaults(name), "output_type": "pt", "num_inference_steps": 3}
    serial = _run(build_pipeline(name), prompt, kw)
    patch, video, text_first = LAYOUT[name]
    ref_pipe = build_pipeline(name)
    text = (lambda k: k["encoder_hidden_states"].shape[1]) if text_first is not None else 0
    oracle = DisplacedOracle(
        ref_pipe.transformer,
        method,
        grid_layout(patch, n, frames_dim=video),
        text=text,
        text_first=bool(text_first),
        warmup_steps=1,
    )
    object.__setattr__(ref_pipe, "transformer", oracle)
    ref_pipe.__class__ = type(ref_pipe.__class__.__name__, (ref_pipe.__class__,), {})
    reference = []
    for _ in range(2):
        oracle.reset()
        reference.append(_run(ref_pipe, prompt, kw))
    pipe = xc.parallelize_pipeline(build_pipeline(name), xc.Plan(**plan_kw))
    first, second = _run(pipe, prompt, kw), _run(pipe, prompt, kw)
    return {
        "oracle": rel_error(first, reference[0]),
        "again": rel_error(second, first),
        "serial": rel_error(first, serial),
        "finite": bool(torch.isfinite(first).all()),
    }


def _check(results: list[dict]) -> None:
    for r in results:
        assert r["finite"] and r["oracle"] < TOL and r["again"] == 0.0, r
        assert r["serial"] > 0.0, r  # displaced steps ran: not the exact image


@pytest.mark.dist
@pytest.mark.parametrize("name", ["pixart-sigma", "sd3", "flux", "wan"])
def test_pipeline_pipefusion2(pools, name):
    _check(pools(2).run(_vs_oracle, name, dict(pipefusion=2, patches=2), "pipefusion", 2))


@pytest.mark.dist
@pytest.mark.parametrize("name", ["pixart-sigma", "sd3", "flux", "wan"])
def test_pipeline_distrifusion2(pools, name):
    _check(pools(2).run(_vs_oracle, name, dict(distrifusion=2), "distrifusion", 2))


@pytest.mark.dist
@pytest.mark.parametrize(
    "name,plan,method,n,prompt",
    [
        ("pixart-sigma", dict(pipefusion=2, patches=4, cfg=2), "pipefusion", 4, "a red fox"),
        ("sd3", dict(distrifusion=2, cfg=2), "distrifusion", 2, "a red fox"),
        ("wan", dict(pipefusion=2, cfg=2), "pipefusion", 2, "a red fox"),  # CFG as call pairs
        ("flux", dict(pipefusion=2, dp=2), "pipefusion", 2, ["a red fox", "a blue whale"]),
    ],
    ids=[
        "pixart-pipefusion2-cfg2",
        "sd3-distrifusion2-cfg2",
        "wan-pipefusion2-cfg2",
        "flux-pipefusion2-dp2",
    ],
)
def test_pipeline_hybrids(pools, name, plan, method, n, prompt):
    _check(pools(4).run(_vs_oracle, name, plan, method, n, prompt))
