"""Does an asynchronous all-to-all overlap with compute on this machine (2 gloo processes)?

Chunked ("pipelined") Ulysses, where the all-to-all of one group of heads runs while the
previous group attends, only pays where a collective in flight leaves the compute thread
alone. This measures it directly, in 2 gloo processes x 1 torch thread, for all-to-alls of the
size Ulysses sends per attention layer in the mid-size Flux of ``bench_vs_diffusers_cp.py``
(about 2 MB per rank) and a matmul of a few milliseconds:

- ``compute``: the matmuls alone;
- ``all_to_all``: the collective alone;
- ``sync``: the collective, waited for, then the matmuls (what Ulysses does today);
- ``async``: the collective started, the matmuls, then the wait (what chunking would do).

``async`` near ``max(compute, all_to_all)`` means overlap works; near ``sync`` means it does
not. Median of ``--iters`` runs each (barrier before each), rounds interleaved. Writes
``results/gloo_overlap.{json,md}``.

    python benchmarks/gloo_overlap.py [--iters 21] [--mb 2]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import time
from pathlib import Path
from typing import Any

OUT = Path(__file__).parent / "results"
CASES = ("compute", "all_to_all", "sync", "async")


def _worker(rank: int, port: int, iters: int, mb: float, q: Any) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed._functional_collectives as fc

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    g = dist.group.WORLD
    x = torch.randn(2, int(mb * (1 << 20)) // 4)  # half of it goes to the peer
    a, b = torch.randn(512, 512), torch.randn(512, 2048)

    def compute() -> None:
        for _ in range(2):
            torch.mm(a, b)

    def a2a() -> None:
        fc.wait_tensor(fc.all_to_all_single(x, None, None, g))

    def sync() -> None:
        a2a()
        compute()

    def asyn() -> None:
        y = fc.all_to_all_single(x, None, None, g)
        compute()
        fc.wait_tensor(y)

    fns = {"compute": compute, "all_to_all": a2a, "sync": sync, "async": asyn}
    times: dict[str, list[float]] = {k: [] for k in CASES}
    for fn in fns.values():  # warm up
        dist.barrier()
        fn()
    for _ in range(iters):
        for k in CASES:
            dist.barrier()
            t0 = time.perf_counter()
            fns[k]()
            times[k].append((time.perf_counter() - t0) * 1e3)
    dist.destroy_process_group()
    q.put((rank, times))


def main() -> int:
    import torch.multiprocessing as mp

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=21)
    ap.add_argument("--mb", type=float, default=2.0, help="MB each rank sends per all-to-all")
    a = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, port, a.iters, a.mb, q)) for r in range(2)]
    for p in procs:
        p.start()
    res = dict(q.get(timeout=600) for _ in procs)
    for p in procs:
        p.join()
    med = {k: max(statistics.median(res[r][k]) for r in res) for k in CASES}
    ideal = max(med["compute"], med["all_to_all"])
    hidden = (med["sync"] - med["async"]) / med["all_to_all"] if med["all_to_all"] else 0.0
    out = {
        "iters": a.iters,
        "mb_sent": a.mb / 2,
        "median_ms": med,
        "ideal_overlap_ms": ideal,
        "fraction_of_all_to_all_hidden": hidden,
        "times_ms": {str(r): res[r] for r in res},
    }
    OUT.mkdir(exist_ok=True)
    (OUT / "gloo_overlap.json").write_text(json.dumps(out, indent=1))
    md = [
        "# Async all-to-all vs compute on this machine (2 gloo processes x 1 thread)",
        "",
        f"Script: `benchmarks/gloo_overlap.py`. Median of {a.iters} interleaved runs each, slower "
        f"rank; each rank sends {a.mb / 2:g} MB per all-to-all.",
        "",
        "| case | ms |",
        "|---|---|",
    ]
    md += [f"| {k} | {med[k]:.2f} |" for k in CASES]
    md += [
        "",
        f"Perfect overlap would give {ideal:.2f} ms for `async`. Fraction of the all-to-all hidden "
        f"by starting it before the compute: **{hidden:.0%}**.",
        "",
    ]
    (OUT / "gloo_overlap.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
