"""The parallel VAE: memory and work per rank, and a measured decode on this CPU.

Decoding is where a high-resolution image runs out of memory: the full-size AutoencoderKL
decoder (Flux / SD3 / SDXL / PixArt shape: 512-channel blocks, 3 resnets per up block) holds
activations of 128 channels at full pixel resolution. ``parallelize_vae`` cuts its latent rows
over the ranks (halo rows for convolutions, combined GroupNorm statistics, Ring attention in
the mid block), so each rank holds 1/N of them.

1. **Static** (no processes, a fake process group): ``explain`` of the full-size decoder and
   encoder (16 latent channels, random weights) at 1024x1024 and 2048x2048 for 1, 2, 4 and 8 ranks:
   peak activation bytes per rank (graph values alive at once; the attention's own buffers
   not counted), FLOPs per rank and bytes each rank sends per decode.
2. **Measured** (2 gloo processes x 1 thread, this CPU): the same decoder at ``--pixels``
   (default 512x512): wall time of a decode serial vs ``ring=2`` (second call: the first
   captures), the growth of each process's peak resident memory during the decode (the
   high-water mark reset through ``/proc/self/clear_refs`` just before it, large tensors
   mmapped so that freed memory leaves the process), and the relative difference to the serial
   image.

Writes ``results/parallel_vae.{json,md}``.

    python benchmarks/parallel_vae.py [--pixels 512] [--skip-measured]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

OUT = Path(__file__).parent / "results"
CONFIG: dict[str, Any] = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=16,
    layers_per_block=2,
)


def _vae() -> Any:
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(**CONFIG).eval()


def static_rows(pixels: list[int], degrees: list[int]) -> list[dict[str, Any]]:
    import torch
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import xdit_compile as xc

    vae = _vae()
    rows = []
    for part, px in [(p, x) for p in ("decoder", "encoder") for x in pixels]:
        for n in degrees:
            dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=n)
            pm = xc.parallelize(getattr(vae, part), xc.Plan(ring=n))
            pm.prepare(
                torch.empty(1, 16, px // 8, px // 8)
                if part == "decoder"
                else torch.empty(1, 3, px, px)
            )
            r = xc.explain(pm)
            rows.append(
                {
                    "part": part,
                    "pixels": px,
                    "ranks": n,
                    "peak_activation_bytes": r.activation_bytes,
                    "flops_per_rank": r.flops,
                    "bytes_sent": r.bytes_per_forward,
                    "breaks": len(r.breaks),
                }
            )
            print(rows[-1], flush=True)
            dist.destroy_process_group()
    return rows


def _rss_kb() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process, in kB."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(status["VmRSS"].split()[0]), int(status["VmHWM"].split()[0])


def _measure(pixels: int, parallel: bool) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    import xdit_compile as xc

    vae = _vae()
    z = torch.randn(1, 16, pixels // 8, pixels // 8, generator=torch.Generator().manual_seed(1))
    if parallel:
        xc.parallelize_vae(vae, xc.Plan(ring=dist.get_world_size()))
    with torch.no_grad():
        vae.decode(z, return_dict=False)  # the first call captures (parallel) / warms up
        dist.barrier()
        Path("/proc/self/clear_refs").write_text(
            "5"
        )  # resets the high-water mark to the current RSS
        before = _rss_kb()[0]
        t0 = time.perf_counter()
        img = vae.decode(z, return_dict=False)[0]
        seconds = time.perf_counter() - t0
        peak = _rss_kb()[1]
    return {"seconds": seconds, "peak_rss_growth_bytes": (peak - before) * 1024, "image": img}


def measured_rows(pixels: int) -> list[dict[str, Any]]:
    from xdit_compile.jobs.compare import rel_error
    from xdit_compile.testing.launcher import WorkerPool

    # Tensors come from mmap and go back to the OS when freed, so the resident-memory
    # high-water mark follows the live tensors (glibc would otherwise keep freed heap pages).
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    out = []
    serial_pool = WorkerPool(1)
    serial = serial_pool.run(_measure, pixels, False, timeout=3600)[0]
    serial_pool.close()
    pool = WorkerPool(2)
    par = pool.run(_measure, pixels, True, timeout=3600)
    pool.close()
    out.append(
        {
            "pixels": pixels,
            "run": "serial (1 process)",
            "seconds": serial["seconds"],
            "peak_rss_growth_bytes": [serial["peak_rss_growth_bytes"]],
            "rel_error": 0.0,
        }
    )
    out.append(
        {
            "pixels": pixels,
            "run": "ring=2 (2 processes)",
            "seconds": max(r["seconds"] for r in par),
            "peak_rss_growth_bytes": [r["peak_rss_growth_bytes"] for r in par],
            "rel_error": max(rel_error(r["image"], serial["image"]) for r in par),
        }
    )
    for r in out:
        print({k: v for k, v in r.items()}, flush=True)
    return out


def _mb(b: float) -> str:
    return f"{b / 2**20:,.0f}"


def write(static: list[dict[str, Any]], measured: list[dict[str, Any]], pixels: int) -> None:
    OUT.mkdir(exist_ok=True)
    (OUT / "parallel_vae.json").write_text(
        json.dumps(
            {"config": CONFIG, "static": static, "measured": measured}, indent=1, default=str
        )
        + "\n"
    )
    lines = [
        "# Parallel VAE (`parallelize_vae`, `--parallel-vae`)",
        "",
        "`benchmarks/parallel_vae.py`: the full-size AutoencoderKL (Flux/SD3 shape: blocks "
        "(128, 256, 512, 512), 16 latent channels, random weights), the decoder's latent rows "
        "and the encoder's image rows cut over the ranks (`Plan(ring=N)`).",
        "",
        "## Per rank, from `explain` (static, no GPU needed)",
        "",
        "Peak activation bytes: graph values alive at once on one rank (the attention's own "
        "buffers and the weights, 198 MB fp32, not counted).",
        "",
        "| part | image | ranks | peak activations MB / rank | vs 1 rank | GFLOPs / rank | "
        "sent MB / rank | breaks |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = {(r["part"], r["pixels"]): r["peak_activation_bytes"] for r in static if r["ranks"] == 1}
    for r in static:
        lines.append(
            f"| {r['part']} | {r['pixels']}x{r['pixels']} | {r['ranks']} | "
            f"{_mb(r['peak_activation_bytes'])} | "
            f"{r['peak_activation_bytes'] / base[(r['part'], r['pixels'])]:.2f} | "
            f"{r['flops_per_rank'] / 1e9:,.0f} | {r['bytes_sent'] / 2**20:,.1f} | {r['breaks']} |"
        )
    if measured:
        lines += [
            "",
            f"## Measured on this CPU ({pixels}x{pixels}, fp32, 1 torch thread per process, gloo)",
            "",
            "Second decode call (the first captures). Peak RSS growth: how far each process's "
            "resident-memory high-water mark rose above its resident memory before the decode "
            "(weights excluded).",
            "",
            "| run | seconds | peak RSS growth MB per process | max rel. difference vs serial |",
            "|---|---|---|---|",
        ]
        for r in measured:
            lines.append(
                f"| {r['run']} | {r['seconds']:.2f} | "
                f"{', '.join(_mb(b) for b in r['peak_rss_growth_bytes'])} | {r['rel_error']:.1e} |"
            )
    (OUT / "parallel_vae.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pixels", type=int, default=512)
    ap.add_argument("--skip-measured", action="store_true")
    a = ap.parse_args()
    static = static_rows([1024, 2048], [1, 2, 4, 8])
    measured = [] if a.skip_measured else measured_rows(a.pixels)
    write(static, measured, a.pixels)


if __name__ == "__main__":
    main()
