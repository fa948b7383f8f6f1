"""Load test of ``xdit-compile serve`` on loopback (bounded in requests and time).

Starts the service (the tiny PixArt-Sigma pipeline at ``cfg=2``: 2 processes) twice: with
batching (``--max-batch 4``) and without (``--max-batch 1``). For each, at concurrency 1, 4 and
16 (closed loop: each client thread sends its next request when the last one is answered, 429
answers retried after ``Retry-After``), it sends ``--requests`` requests of
``--steps`` steps, each one of 8 (prompt, seed) pairs, and checks every image against the
image of its pair made alone at concurrency 1 (a PNG level of difference allowed in batches,
whose matmuls may round differently): a different image is a *mixed-up* request, an error or no
answer a *lost* one. Then it kills a worker (rank 1) during a request and measures the time
until ``/health`` is ok again and the next request succeeds.

Writes ``results/load_test.{json,md}`` and ``load_test.png`` (throughput and p50/p99 latency
against concurrency).

    python benchmarks/load_test.py [--requests 48] [--steps 8] [--max-seconds 90]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from xdit_compile.serve.client import wait_ready

OUT = Path(__file__).parent / "results"
PAIRS = [
    (f"prompt {i}: a small {c} shape", 100 + i)
    for i, c in enumerate(("red", "green", "blue", "yellow", "black", "white", "pink", "orange"))
]
LEVELS = (1, 4, 16)


def _png(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data))).astype(int)


def _health(url: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return json.loads(r.read())
    except (OSError, ValueError):
        return None


class Service:
    def __init__(self, port: int, max_batch: int, max_queue: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        cmd = [
            sys.executable,
            "-m",
            "xdit_compile.cli.main",
            "serve",
            "--model",
            "pixart-sigma",
            "--cfg",
            "2",
            "--port",
            str(port),
            "--max-batch",
            str(max_batch),
            "--max-n",
            "1",
            "--max-queue",
            str(max_queue),
            "--max-steps",
            "400",
        ]
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=dict(os.environ, PYTHONWARNINGS="ignore"),
        )
        self.start_s = wait_ready(self.url, timeout=300, alive=lambda: self.proc.poll() is None)

    def stop(self) -> None:
        try:
            urllib.request.urlopen(
                urllib.request.Request(self.url + "/admin/shutdown", method="POST"), timeout=30
            )
            self.proc.wait(60)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()


def _level(
    svc: Service,
    concurrency: int,
    n_requests: int,
    steps: int,
    max_s: float,
    refs: dict[int, np.ndarray] | None,
) -> tuple[dict[str, Any], dict[int, np.ndarray]]:
    from xdit_compile.serve.client import ClientError, generate_images

    lock = threading.Lock()
    todo = list(range(n_requests))
    lat: list[float] = []
    out: dict[str, Any] = {
        "concurrency": concurrency,
        "sent": 0,
        "ok": 0,
        "lost": 0,
        "mixed_up": 0,
        "rejected_429": 0,
    }
    got: dict[int, np.ndarray] = {}
    t_end = time.monotonic() + max_s

    def client() -> None:
        while True:
            with lock:
                if not todo or time.monotonic() > t_end:
                    return
                i = todo.pop(0)
                out["sent"] += 1
            prompt, seed = PAIRS[i % len(PAIRS)]
            try:
                res = generate_images(
                    svc.url, prompt, seed=seed, steps=steps, timeout=300, retries_on_429=1000
                )
            except (ClientError, OSError):
                with lock:
                    out["lost"] += 1
                continue
            img = _png(res.images[0])
            with lock:
                out["rejected_429"] += res.retries
                lat.append(res.seconds)
                out["ok"] += 1
                if res.seed != seed or refs is not None and np.abs(img - refs[seed]).max() > 1:
                    out["mixed_up"] += 1
                got.setdefault(seed, img)

    t0 = time.monotonic()
    with ThreadPoolExecutor(concurrency) as ex:
        for f in [ex.submit(client) for _ in range(concurrency)]:
            f.result()
    wall = time.monotonic() - t0
    lat.sort()
    out.update(
        wall_s=wall,
        throughput_rps=out["ok"] / wall if wall else 0.0,
        p50_s=statistics.median(lat) if lat else None,
        p99_s=lat[min(len(lat) - 1, int(round(0.99 * (len(lat) - 1))))] if lat else None,
    )
    return out, got


def _recovery(svc: Service, steps: int) -> dict[str, Any]:
    from xdit_compile.serve.client import ClientError, generate_images

    worker = (_health(svc.url) or {}).get("workers", [None])[0]
    if worker is None:
        return {"error": "no worker pid in /health"}
    box: dict[str, Any] = {}

    def inflight() -> None:
        try:
            generate_images(svc.url, "in flight", seed=1, steps=300, timeout=300)
            box["code"] = 200
        except ClientError as e:
            box["code"], box["message"] = e.status, e.message

    th = threading.Thread(target=inflight)
    th.start()
    time.sleep(0.5)
    t0 = time.monotonic()
    os.kill(worker, 9)
    th.join(300)
    wait_ready(svc.url, timeout=300, interval=0.1)
    healthy = time.monotonic() - t0
    generate_images(svc.url, PAIRS[0][0], seed=PAIRS[0][1], steps=steps, timeout=300)
    served = time.monotonic() - t0
    return {
        "in_flight_status": box.get("code"),
        "in_flight_message": box.get("message"),
        "healthy_after_s": healthy,
        "first_image_after_s": served,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=48, help="requests per concurrency level")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--max-seconds", type=float, default=90.0, help="time cap per level")
    ap.add_argument("--max-queue", type=int, default=8)
    a = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from xdit_compile.testing.launcher import free_port

    res: dict[str, Any] = {
        "setup": {
            "model": "pixart-sigma (tiny pipeline, 32x32)",
            "plan": "cfg=2",
            "processes": 2,
            "requests_per_level": a.requests,
            "steps": a.steps,
            "max_queue": a.max_queue,
            "pairs": len(PAIRS),
        },
        "runs": {},
    }
    refs: dict[int, np.ndarray] | None = None
    for label, batch in (("no batching", 1), ("batching (max 4)", 4)):
        svc = Service(free_port(), batch, a.max_queue)
        rows = []
        try:
            if refs is None:  # each pair's image made alone: what every later answer must equal
                _, refs = _level(svc, 1, len(PAIRS), a.steps, 600, None)
            for c in LEVELS:
                row, _ = _level(svc, c, a.requests, a.steps, a.max_seconds, refs)
                rows.append(row)
                print(label, json.dumps(row), flush=True)
            if batch > 1:
                res["recovery"] = _recovery(svc, a.steps)
                print("recovery", res["recovery"], flush=True)
        finally:
            svc.stop()
        res["runs"][label] = {"start_s": svc.start_s, "levels": rows}
    OUT.mkdir(exist_ok=True)
    (OUT / "load_test.json").write_text(json.dumps(res, indent=1))
    md = _markdown(res)
    (OUT / "load_test.md").write_text(md)
    _plot(res, OUT / "load_test.png")
    print(md)
    return 0


def _markdown(res: dict[str, Any]) -> str:
    s = res["setup"]
    out = [
        "# Load test of `xdit-compile serve` (loopback, bounded)",
        "",
        f"`benchmarks/load_test.py`: {s['model']}, `{s['plan']}` on {s['processes']} gloo "
        f"processes (this 2-core CPU), {s['requests_per_level']} requests per level of "
        f"{s['steps']} steps, closed-loop clients, 429 retried after `Retry-After`, queue limit "
        f"{s['max_queue']}. Every answer is checked against its (prompt, seed) pair's image made "
        f"alone ({s['pairs']} pairs): a different image is *mixed up*, an error or no answer is "
        "*lost*.",
        "",
        "| run | concurrency | answered | throughput req/s | p50 s | p99 s | lost | mixed up | "
        "429 answers |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, run in res["runs"].items():
        for r in run["levels"]:
            out.append(
                f"| {label} | {r['concurrency']} | {r['ok']}/{r['sent']} | "
                f"{r['throughput_rps']:.2f} | {r['p50_s']:.3f} | {r['p99_s']:.3f} | {r['lost']} | "
                f"{r['mixed_up']} | {r['rejected_429']} |"
            )
    rec = res.get("recovery")
    if rec:
        out += [
            "",
            "Killed worker (rank 1, SIGKILL) during a request: the request in flight got HTTP "
            f"{rec.get('in_flight_status')} ({rec.get('in_flight_message')}); `/health` was ok "
            f"again after {rec['healthy_after_s']:.1f} s and the next image was served "
            f"{rec['first_image_after_s']:.1f} s after the kill (the group is restarted: pipeline "
            "reloaded, parallelized and warmed up).",
        ]
    return "\n".join(out) + "\n"


def _plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    for label, run in res["runs"].items():
        c = [r["concurrency"] for r in run["levels"]]
        ax1.plot(c, [r["throughput_rps"] for r in run["levels"]], "o-", label=label)
        ax2.plot(c, [r["p50_s"] for r in run["levels"]], "o-", label=f"{label} p50")
        ax2.plot(c, [r["p99_s"] for r in run["levels"]], "x--", label=f"{label} p99")
    for ax, t in ((ax1, "throughput (requests/s)"), (ax2, "latency (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_title(t)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
