"""Parallel VAE (``parallelize_vae`` / ``parallelize_pipeline(..., vae=True)``).

The decoder's latent rows (the encoder's image rows) are cut over the ranks; convolutions
exchange halo rows (one-sided for the encoder's stride-2 downsamplings), GroupNorm combines
per-rank statistics, nearest upsampling stays local and the mid-block attention (one head)
runs as Ring attention. Every step is exact up to float rounding, so the image equals
the serial decode within 1e-5 relative (fp32; measured 1.8e-6 to 1.9e-6).
"""

from __future__ import annotations

import pytest
import torch

TOL = 1e-5


def _tiny_vae(seed: int = 0):  # type: ignore[no-untyped-def]
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        mid_block_add_attention=True,
    ).eval()


def _decode_vs_serial(rows: int, cols: int, plan_kw: dict) -> dict:
    import xdit_compile as xc
    from xdit_compile.jobs.compare import rel_error
    from xdit_compile.runtime.collectives import comm_stats

    z = torch.randn(1, 4, rows, cols, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = _tiny_vae().decode(z, return_dict=False)[0]
        vae = xc.parallelize_vae(_tiny_vae(), xc.Plan(**plan_kw))
        comm_stats().reset()
        got = vae.decode(z, return_dict=False)[0]
    report = xc.explain(vae.decoder)
    return {
        "err": rel_error(got, ref),
        "shape": tuple(got.shape),
        "ref_shape": tuple(ref.shape),
        "breaks": len(report.breaks),
        "comm": comm_stats().as_dict(),
        "ops": sorted({c.what for c in report.collectives}),
    }


@pytest.mark.dist
@pytest.mark.parametrize(
    ("world", "rows", "plan_kw"),
    [
        (2, 8, {"ring": 2}),
        (4, 13, {"ring": 4}),  # uneven rows: 4, 3, 3, 3
        (
            4,
            10,
            {"ring": 2, "ulysses": 2},
        ),  # one-head attention at ulysses=2: it runs as Ring over all 4
        (
            2,
            9,
            {"ring": 2, "compile": "inductor"},
        ),  # group_norm_sharded traced into inductor's graph
    ],
)
def test_decoder_rows_cut_over_ranks_match_serial(pools, world, rows, plan_kw):
    for r in pools(world).run(_decode_vs_serial, rows, 6, plan_kw):
        assert r["shape"] == r["ref_shape"] == (1, 3, rows * 4, 24)
        assert r["err"] < TOL, r
        assert r["breaks"] == 0
        assert r["ops"] == ["conv halo", "group_norm statistics", "output", "usp_attention"]


def _encode_vs_serial(rows: int, cols: int, plan_kw: dict) -> dict:
    import xdit_compile as xc
    from xdit_compile.jobs.compare import rel_error

    x = torch.randn(1, 3, rows, cols, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = _tiny_vae().encode(x).latent_dist
        vae = xc.parallelize_vae(_tiny_vae(), xc.Plan(**plan_kw))
        got = vae.encode(x).latent_dist
    report = xc.explain(vae.encoder)
    return {
        "err": max(rel_error(got.mean, ref.mean), rel_error(got.std, ref.std)),
        "shape": tuple(got.mean.shape),
        "ref_shape": tuple(ref.mean.shape),
        "breaks": len(report.breaks),
        "seed": report.seed,
    }


@pytest.mark.dist
@pytest.mark.parametrize(("world", "rows"), [(2, 32), (4, 40)])
def test_encoder_rows_cut_over_ranks_match_serial(pools, world, rows):
    """The encoder's stride-2 downsamplings (after F.pad(x, (0, 1, 0, 1))) take a one-row halo
    from the next rank; the image rows are cut in multiples of the total downsampling (4 here),
    so 40 rows on 4 ranks are 12/12/8/8 and every downsampling stays aligned: no gathers."""
    for r in pools(world).run(_encode_vs_serial, rows, 12, {"ring": world}):
        assert r["shape"] == r["ref_shape"] == (1, 4, rows // 4, 3)
        assert r["err"] < TOL, r
        assert r["breaks"] == 0, r
        assert r["seed"]["patch"] == 4, r["seed"]


def _pipeline_vae(name: str) -> dict:
    import xdit_compile as xc
    from xdit_compile.jobs.compare import rel_error
    from xdit_compile.models.pipelines import build_pipeline, pipeline_defaults

    kw = {**pipeline_defaults(name), "output_type": "pt"}
    ref = build_pipeline(name)(
        prompt="a red fox", generator=torch.Generator().manual_seed(0), **kw
    ).images
    pipe = xc.parallelize_pipeline(build_pipeline(name), xc.Plan(cfg=2), vae=True)
    got = pipe(prompt="a red fox", generator=torch.Generator().manual_seed(0), **kw).images
    return {
        "err": rel_error(torch.as_tensor(got), torch.as_tensor(ref)),
        "plan": str(pipe.vae.decoder.plan),
    }


@pytest.mark.dist
def test_pipeline_with_parallel_vae_matches_serial(pools):
    """cfg=2 for the transformer, the decoder's rows over both ranks: the serial image."""
    for r in pools(2).run(_pipeline_vae, "pixart-sigma"):
        assert r["err"] < 1e-4, r  # transformer rounding (see test_pipeline_parallel) + VAE's
        assert r["plan"].startswith("Plan(ring=2"), r


def test_stateful_decoder_is_refused() -> None:
    import xdit_compile as xc

    class CausalDecoder(torch.nn.Module):
        def forward(self, x, feat_cache=None, feat_idx=[0]):  # noqa: B006  (diffusers' video VAEs)
            return x

    class VideoVAE(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.decoder = CausalDecoder()

    with pytest.raises(ValueError, match=r"keeps state between calls \(feat_cache, feat_idx\)"):
        xc.parallelize_vae(VideoVAE(), xc.Plan(ring=2))
    with pytest.raises(ValueError, match="cuts rows only"):
        xc.parallelize_vae(_tiny_vae(), xc.Plan(cfg=2))
