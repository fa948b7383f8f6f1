"""PipeFusion on a diffusers DiT, step by step, against the displaced-K/V oracle.

    torchrun --nproc-per-node 2 examples/pipefusion_steps.py       # GPU (nccl) or CPU (gloo)
    python examples/pipefusion_steps.py                             # launches 2 CPU workers itself

Each rank builds the same PixArt transformer (same seed) and a short trajectory of inputs. The
single-process oracle and the plain model run first (PipeFusion frees the other stage's
parameters in place); then 2 stages x 4 patches run the same steps. Step 0 is the warmup step
(exact); later steps read the patches not yet computed from the previous step, so they differ
from the plain model but equal the oracle.
"""

from __future__ import annotations

import os

import torch
from diffusers import PixArtTransformer2DModel

import xdit_compile as xc
from xdit_compile.testing.oracle import DisplacedOracle, grid_layout


def main() -> list[tuple[float, float]]:
    xc.init_distributed()
    torch.manual_seed(0)
    model = PixArtTransformer2DModel(
        num_attention_heads=4,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=4,
        cross_attention_dim=64,
        caption_channels=32,
        sample_size=16,
        norm_type="ada_norm_single",
        use_additional_conditions=False,
    ).eval()
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(1, 4, 32, 32, generator=g), torch.randn(1, 20, 32, generator=g)
    steps = [
        dict(
            hidden_states=x + 0.5 * t * torch.randn(x.shape, generator=g),
            encoder_hidden_states=text,
            timestep=torch.tensor([900 - 300 * t]),
            return_dict=False,
        )
        for t in range(3)
    ]
    oracle = DisplacedOracle(model, "pipefusion", grid_layout(2, 4), warmup_steps=1)
    refs = [oracle(**s)[0] for s in steps]
    with torch.no_grad():
        serial = [model(**s)[0] for s in steps]
    pm = xc.parallelize(model, xc.Plan(pipefusion=2, patches=4, warmup_steps=1))
    rows = []
    for i, s in enumerate(steps):
        out = pm(**s)[0]
        rel = lambda a, b: float((a - b).abs().max() / b.abs().max())  # noqa: E731
        rows.append((rel(out, refs[i]), rel(out, serial[i])))
    if torch.distributed.get_rank() == 0:
        print(xc.explain(pm).summary())
        for i, (e_oracle, e_serial) in enumerate(rows):
            print(f"step {i}: vs oracle {e_oracle:.1e}, vs plain model {e_serial:.1e}")
    return rows


if __name__ == "__main__":
    if "RANK" in os.environ:
        main()
    else:
        from xdit_compile.testing.launcher import run_distributed

        run_distributed(main, 2)
