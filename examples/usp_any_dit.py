"""Parallelize a diffusers DiT that xdit_compile has no special code for.

    torchrun --nproc-per-node 4 examples/usp_any_dit.py            # GPU (nccl) or CPU (gloo)
    python examples/usp_any_dit.py                                  # launches 4 CPU workers itself

Each rank builds the same model (same seed), runs it serially as the reference, then runs the
parallelized module (Ulysses 2 x Ring 2) and prints the difference and what was rewritten.
"""

from __future__ import annotations

import os

import torch
from diffusers import PixArtTransformer2DModel

import xdit_compile as xc


def main() -> dict[str, float]:
    xc.init_distributed()
    torch.manual_seed(0)  # identical weights on every rank (parallelize checks this)
    model = PixArtTransformer2DModel(
        num_attention_heads=4,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        cross_attention_dim=64,
        caption_channels=32,
        sample_size=16,
        norm_type="ada_norm_single",
        use_additional_conditions=False,
    ).eval()
    g = torch.Generator().manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(1, 4, 32, 32, generator=g),
        encoder_hidden_states=torch.randn(1, 20, 32, generator=g),
        timestep=torch.tensor([500]),
        return_dict=False,
    )
    with torch.no_grad():
        ref = model(**inputs)[0]
    pm = xc.parallelize(model, xc.Plan(ulysses=2, ring=2))
    out = pm(**inputs)[0]
    err = float((out - ref).abs().max() / ref.abs().max())
    if torch.distributed.get_rank() == 0:
        print(xc.explain(pm).summary())
        print(f"relative difference vs serial: {err:.2e}")
    return {"rel_error": err}


if __name__ == "__main__":
    if "RANK" in os.environ:
        main()
    else:
        from xdit_compile.testing.launcher import run_distributed

        run_distributed(main, 4)
