"""Decode (and encode) with the VAE's rows cut over the ranks: 1/N of its activations each.

    torchrun --nproc-per-node 4 examples/parallel_vae.py           # GPU (nccl) or CPU (gloo)
    python examples/parallel_vae.py                                 # launches 4 CPU workers itself

Each rank builds the same small AutoencoderKL (same seed), decodes and encodes serially as the
reference, then with ``parallelize_vae`` (``Plan(ring=4)``), and prints the differences and
what the compiler did to the decoder: halo exchanges for the convolutions, GroupNorm statistics
combined across ranks, Ring attention in the mid block, no sharding breaks. For a whole
pipeline: ``parallelize_pipeline(pipe, plan, vae=True)`` or ``xdit-compile generate
--parallel-vae``.
"""

from __future__ import annotations

import os

import torch
from diffusers import AutoencoderKL

import xdit_compile as xc


def main() -> dict[str, float]:
    _, world = xc.init_distributed()
    torch.manual_seed(0)  # identical weights on every rank (parallelize checks this)
    vae = AutoencoderKL(
        block_out_channels=(32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        norm_num_groups=16,
        layers_per_block=1,
    ).eval()
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 4, 24, 20, generator=g)  # a 96x80 image's latent
    image = torch.randn(1, 3, 96, 80, generator=g)
    with torch.no_grad():
        ref_image = vae.decode(z).sample
        ref_latent = vae.encode(image).latent_dist.mean
        xc.parallelize_vae(vae, xc.Plan(ring=world))
        out_image = vae.decode(z).sample  # every rank gets the whole image
        out_latent = vae.encode(image).latent_dist.mean
    errs = {
        "decode": float((out_image - ref_image).abs().max() / ref_image.abs().max()),
        "encode": float((out_latent - ref_latent).abs().max() / ref_latent.abs().max()),
    }
    if torch.distributed.get_rank() == 0:
        print(xc.explain(vae.decoder).summary())
        for k, v in errs.items():
            print(f"{k}: relative difference vs serial {v:.2e}")
    return errs


if __name__ == "__main__":
    if "RANK" in os.environ:
        main()
    else:
        from xdit_compile.testing.launcher import run_distributed

        run_distributed(main, 4)
