"""Draw with the trained demo pipeline from Python: CFG parallel x Ulysses on 4 processes.

    torchrun --nproc-per-node 4 examples/draw_demo.py "a fox face in the snow"
    python examples/draw_demo.py "a red apple on a blue background"   # launches 4 CPU workers

Loads ``models/demo/emoji-pixart`` with ``DiffusionPipeline.from_pretrained`` (no network),
parallelizes its transformer, draws one picture per seed and has rank 0 write ``demo_<seed>.png``.
"""

from __future__ import annotations

import os
import sys

import torch
from diffusers import DiffusionPipeline

import xdit_compile as xc
from xdit_compile.models.demo import demo_path


def main(prompt: str, seeds: tuple[int, ...] = (0, 1, 2)) -> list[str]:
    xc.init_distributed()
    pipe = DiffusionPipeline.from_pretrained(demo_path(), torch_dtype=torch.float32)
    pipe = xc.parallelize_pipeline(pipe, xc.Plan(cfg=2, ulysses=2))
    pipe.set_progress_bar_config(disable=torch.distributed.get_rank() != 0)
    written = []
    for seed in seeds:
        # the demo's transformer is smaller than PixArt's resolution bins: draw at 64x64 as saved
        image = pipe(
            prompt=prompt,
            generator=torch.Generator().manual_seed(seed),
            use_resolution_binning=False,
        ).images[0]
        if torch.distributed.get_rank() == 0:
            image.save(f"demo_{seed}.png")
            written.append(f"demo_{seed}.png")
    return written


if __name__ == "__main__":
    text = sys.argv[1] if len(sys.argv) > 1 else "a fox face in the snow"
    if "RANK" in os.environ:
        main(text)
    else:
        from xdit_compile.testing.launcher import run_distributed

        print("wrote", *run_distributed(main, 4, text)[0])
