"""``parallelize_pipeline`` on the offline tiny pipelines: serial vs parallel, same seed.

Tolerance: output images/videos within 1e-4 relative (max |diff| / max |serial|, fp32). The
parallel transformer differs from the serial one by float rounding only (see test_models_dist);
2 denoising steps and the VAE carry that through: measured <= 1.2e-6.
"""

from __future__ import annotations

import pytest
import torch

TOL = 1e-4


def _images(out: object) -> torch.Tensor:
    for name in ("images", "frames"):
        if hasattr(out, name):
            return torch.as_tensor(getattr(out, name))
    raise AssertionError(f"no images or frames in {type(out).__name__}")


def _serial_vs_parallel(
    name: str, plan_kw: dict, prompt: object = "a red fox", **extra: object
) -> dict:
    import xdit_compile as xc
    from xdit_compile.jobs.compare import rel_error
    from xdit_compile.models.pipelines import build_pipeline, pipeline_defaults
    from xdit_compile.runtime.collectives import comm_stats

    kw = {**pipeline_defaults(name), "output_type": "pt", **extra}
    ref = _images(
        build_pipeline(name)(prompt=prompt, generator=torch.Generator().manual_seed(0), **kw)
    )
    pipe = xc.parallelize_pipeline(build_pipeline(name), xc.Plan(**plan_kw))
    comm_stats().reset()
    got = _images(pipe(prompt=prompt, generator=torch.Generator().manual_seed(0), **kw))
    return {
        "err": rel_error(got, ref),
        "comm": comm_stats().as_dict(),
        "shape": tuple(got.shape),
        "ref_shape": tuple(ref.shape),
        "finite": bool(torch.isfinite(got).all()),
    }


def _check(results: list[dict]) -> None:
    for r in results:
        assert r["finite"] and r["shape"] == r["ref_shape"], r
        assert r["err"] < TOL, r


@pytest.mark.dist
@pytest.mark.parametrize("name", ["pixart-sigma", "sd3", "flux", "cogvideox", "wan"])
def test_pipeline_ulysses2(pools, name):
    _check(pools(2).run(_serial_vs_parallel, name, dict(ulysses=2)))


@pytest.mark.dist
@pytest.mark.parametrize(
    "name,calls",
    [("pixart-sigma", "batched"), ("sd3", "batched"), ("cogvideox", "batched"), ("wan", "pairs")],
)
def test_pipeline_cfg2(pools, name, calls):
    """Batched pipelines: the cfg round gathers each step's output (2 steps -> 2 all-gathers).
    Wan calls the transformer twice per step: the first step runs whole (learning the pairs),
    the second is split, one exchange."""
    results = pools(2).run(_serial_vs_parallel, name, dict(cfg=2))
    _check(results)
    for r in results:
        assert r["comm"]["all_gather@cfg"]["calls"] == (2 if calls == "batched" else 1), r["comm"]


@pytest.mark.dist
def test_flux_true_cfg_pairs_calls(pools):
    """Flux-dev guides through its guidance embedding; its optional "true CFG" (a negative
    prompt with true_cfg_scale > 1) calls the transformer twice per step: paired over cfg."""
    results = pools(2).run(
        _serial_vs_parallel,
        "flux",
        dict(cfg=2),
        "a red fox",
        negative_prompt="blurry",
        true_cfg_scale=2.0,
    )
    _check(results)
    assert all(r["comm"]["all_gather@cfg"]["calls"] == 1 for r in results)  # step 2 of 2 paired


@pytest.mark.dist
@pytest.mark.parametrize("name", ["sd3", "wan"])
def test_pipeline_hybrid_cfg2_ulysses2(pools, name):
    _check(pools(4).run(_serial_vs_parallel, name, dict(cfg=2, ulysses=2)))


@pytest.mark.dist
def test_pipeline_dp2_three_prompts_in_order(pools):
    prompts = ["a red fox", "a blue whale in the deep sea", "mountains"]
    results = pools(2).run(_serial_vs_parallel, "pixart-sigma", dict(dp=2), prompts)
    _check(results)
    assert results[0]["shape"][0] == 3


def test_cfg_pairs_refuse_unpaired_second_call():
    from xdit_compile.runtime.cfg_pairs import CfgPairs

    class Run:
        def __call__(self, args, kwargs):
            return kwargs["hidden_states"] * 2

        def shapes(self, args, kwargs):
            return torch.empty_like(kwargs["hidden_states"])

    pairs = CfgPairs(rank=0, group=None, mode="pairs")
    a, b = torch.ones(1, 2, 3), torch.zeros(1, 2, 3)
    pairs.call(Run(), (), {"hidden_states": a})
    with pytest.raises(RuntimeError, match="different latents"):
        pairs.call(Run(), (), {"hidden_states": b})
