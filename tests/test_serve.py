"""``xdit-compile serve``: the HTTP service over 2 gloo ranks (tiny PixArt-Sigma pipeline, cfg=2),
on 127.0.0.1 only. Images are compared with what ``generate`` writes for the same seed."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from xdit_compile.jobs.generate import GenerateOptions, generate_job
from xdit_compile.serve.group import serve_job
from xdit_compile.serve.options import ServeOptions
from xdit_compile.testing.launcher import free_port

pytestmark = [pytest.mark.dist, pytest.mark.slow]

MODEL = "pixart-sigma"
PLAN = {"cfg": 2}
SEED = 7


def _http(
    method: str, url: str, body: dict[str, Any] | None = None, timeout: float = 120.0
) -> tuple[int, dict[str, str], bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        url, data=data, method=method, headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def _png(b64: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


class Server:
    def __init__(self, url: str, reference: np.ndarray, seed: int) -> None:
        self.url, self.reference, self.seed = url, reference, seed

    def post(
        self, body: dict[str, Any], timeout: float = 120.0
    ) -> tuple[int, dict[str, str], dict[str, Any]]:
        code, headers, raw = _http("POST", self.url + "/v1/images/generations", body, timeout)
        return code, headers, json.loads(raw)

    def get(self, path: str) -> tuple[int, bytes]:
        code, _, raw = _http("GET", self.url + path)
        return code, raw

    def metric(self, name: str) -> float:
        text = self.get("/metrics")[1].decode()
        return sum(
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith(name + " ") or line.startswith(name + "{")
        )


def _wait_healthy(url: str, alive: Any, timeout: float = 300.0) -> float:
    from xdit_compile.serve.client import wait_ready

    try:
        return wait_ready(url, timeout=timeout, alive=alive, interval=0.2)
    except RuntimeError:
        pytest.fail("the service exited")
    except TimeoutError:
        pytest.fail("the service did not become healthy")


@pytest.fixture(scope="module")
def reference(pools, tmp_path_factory):
    """What `xdit-compile generate` makes for the prompt and seed, with the same plan."""
    from PIL import Image

    out = tmp_path_factory.mktemp("serve") / "ref.png"
    pools(2).run(
        generate_job,
        GenerateOptions(
            model=MODEL, prompt=["a red apple"], plan=PLAN, seed=SEED, output=str(out), warmup=0
        ),
        timeout=600,
    )
    return np.asarray(Image.open(out))


@pytest.fixture(scope="module")
def server(reference):
    """`xdit-compile serve` as its own process: rank 0 (HTTP, queue) starts rank 1 itself."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "xdit_compile.cli",
        "serve",
        "--model",
        MODEL,
        "--cfg",
        "2",
        "--port",
        str(port),
        "--max-queue",
        "2",
        "--max-batch",
        "4",
        "--max-n",
        "4",
        "--max-steps",
        "400",
        "--max-prompt-chars",
        "200",
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, lambda: proc.poll() is None)
        yield Server(url, reference, SEED)
        code, _, raw = _http("POST", url + "/admin/shutdown")
        assert code == 200, raw
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
        assert "stopped after" in out, out
    finally:
        if proc.poll() is None:
            proc.kill()


def test_health_models_metrics(server):
    code, raw = server.get("/health")
    health = json.loads(raw)
    assert code == 200 and health["status"] == "ok" and health["plan"]["cfg"] == 2
    code, raw = server.get("/v1/models")
    assert code == 200 and json.loads(raw)["data"][0]["id"] == MODEL
    code, raw = server.get("/metrics")
    text = raw.decode()
    assert (
        code == 200
        and "xdit_queue_length 0" in text
        and "# TYPE xdit_request_seconds histogram" in text
    )


def test_image_equals_generate_for_the_same_seed(server):
    code, _, body = server.post({"prompt": "a red apple", "seed": server.seed})
    assert code == 200, body
    assert body["seed"] == server.seed and len(body["data"]) == 1
    img = _png(body["data"][0]["b64_json"])
    assert img.shape == server.reference.shape
    assert np.array_equal(img, server.reference)  # same plan, seed and call: the same PNG
    # A different seed gives a different image (the comparison above can fail).
    other = _png(
        server.post({"prompt": "a red apple", "seed": server.seed + 1})[2]["data"][0]["b64_json"]
    )
    assert not np.array_equal(other, server.reference)


def test_n_images_use_consecutive_seeds(server):
    code, _, body = server.post({"prompt": "a red apple", "seed": server.seed - 1, "n": 2})
    assert code == 200 and len(body["data"]) == 2
    # The second image of seed s is the first image of seed s + 1 (one generator per image).
    assert np.array_equal(_png(body["data"][1]["b64_json"]), server.reference)


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "x", "size": "48x48"}, "size"),  # a size that is not served
        ({"prompt": "x", "size": "big"}, "size"),  # not WxH
        ({"prompt": "x", "steps": 401}, "steps"),  # too many steps
        ({"prompt": "x" * 201}, "prompt"),  # prompt too long
        ({"prompt": ""}, "prompt"),  # empty prompt
        ({"prompt": 3}, "prompt"),  # wrong type
        ({"prompt": "x", "n": "two"}, "n"),  # wrong type
        ({"prompt": "x", "n": 5}, "n"),  # too many images
        ({"prompt": "x", "guidance_scale": -1}, "guidance_scale"),
        ({"prompt": "x", "response_format": "url"}, "response_format"),
        ({"n": 1}, "prompt"),  # missing prompt
    ],
)
def test_bad_input_is_a_4xx_with_a_message(server, body, param):
    code, _, out = server.post(body)
    assert code == 400, out
    assert out["error"]["param"] == param and out["error"]["message"]


def test_unknown_model_is_404(server):
    code, _, out = server.post({"prompt": "x", "model": "not-this-one"})
    assert code == 404 and "not served" in out["error"]["message"]


def test_same_signature_requests_are_batched_and_keep_their_seeds(server):
    batches0, images0 = (
        server.metric("xdit_batches_total"),
        server.metric("xdit_batch_images_total"),
    )
    with ThreadPoolExecutor(4) as ex:
        # A long request of another signature keeps the engine busy while the others queue.
        slow = ex.submit(server.post, {"prompt": "a slow one", "steps": 300})
        time.sleep(0.3)
        quick = [
            ex.submit(server.post, {"prompt": "a red apple", "seed": s})
            for s in (server.seed, server.seed + 1)
        ]
        results = [f.result() for f in [slow, *quick]]
    assert [r[0] for r in results] == [200, 200, 200], results
    batches = server.metric("xdit_batches_total") - batches0
    images = server.metric("xdit_batch_images_total") - images0
    assert images == 3 and batches == 2  # the two quick requests shared one pipeline call
    # In a batch of 2 the matmuls may round differently: at most one PNG level apart.
    img = _png(results[1][2]["data"][0]["b64_json"]).astype(int)
    assert np.abs(img - server.reference.astype(int)).max() <= 1
    assert results[1][2]["seed"] == server.seed and results[2][2]["seed"] == server.seed + 1


def test_full_queue_is_429_with_retry_after(server):
    with ThreadPoolExecutor(5) as ex:
        slow = ex.submit(server.post, {"prompt": "busy", "steps": 300})
        time.sleep(0.3)
        # max_queue=2: two wait, the rest are turned away.
        more = [ex.submit(server.post, {"prompt": f"p{i}", "steps": 2 + i}) for i in range(4)]
        codes = [f.result()[0] for f in more]
        rejected = [f.result() for f in more if f.result()[0] == 429]
    assert slow.result()[0] == 200
    assert codes.count(200) == 2 and codes.count(429) == 2, codes
    assert all(
        int(r[1]["retry-after"]) >= 1 and "queue is full" in r[2]["error"]["message"]
        for r in rejected
    )


def test_disconnect_aborts_at_a_step_boundary_and_the_next_request_runs(server):
    aborted0 = server.metric("xdit_aborted_batches_total")
    with pytest.raises((TimeoutError, urllib.error.URLError)):
        server.post({"prompt": "leaving", "steps": 400}, timeout=0.5)  # the client gives up
    deadline = time.monotonic() + 30
    while server.metric("xdit_aborted_batches_total") == aborted0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert server.metric("xdit_aborted_batches_total") == aborted0 + 1
    code, _, body = server.post({"prompt": "a red apple", "seed": server.seed})
    assert code == 200 and np.array_equal(_png(body["data"][0]["b64_json"]), server.reference)


def test_client_command_writes_the_image(server, tmp_path):
    out = tmp_path / "apple.png"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "xdit_compile.cli",
            "client",
            "--url",
            server.url,
            "--prompt",
            "a red apple",
            "--seed",
            str(server.seed),
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    assert r.returncode == 0, r.stderr
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(out)), server.reference)
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "xdit_compile.cli",
            "client",
            "--url",
            server.url,
            "--prompt",
            "x",
            "--size",
            "1x1",
            "--output",
            str(tmp_path / "no.png"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    assert bad.returncode == 1 and "HTTP 400" in bad.stderr and "not served" in bad.stderr


def test_killed_worker_gives_5xx_and_the_service_recovers(server):
    code, raw = server.get("/health")
    health = json.loads(raw)
    worker = health["workers"][0]
    with ThreadPoolExecutor(1) as ex:
        running = ex.submit(server.post, {"prompt": "in flight", "steps": 400})
        time.sleep(0.8)
        t0 = time.monotonic()
        os.kill(worker, 9)
        code, _, body = running.result()
    assert code == 500 and "worker" in body["error"]["message"], body
    _wait_healthy(server.url, lambda: True, timeout=120)
    recovery = time.monotonic() - t0
    health = json.loads(server.get("/health")[1])
    assert (
        health["restarts"] >= 1
        and health["workers"] != [worker]
        and "exit code" in health["last_failure"]
    )
    code, _, body = server.post({"prompt": "a red apple", "seed": server.seed})
    assert code == 200 and np.array_equal(_png(body["data"][0]["b64_json"]), server.reference)
    assert recovery < 120


def test_serve_job_under_a_launcher(pools, reference):
    """The torchrun path (every rank runs serve_job; rank 0 serves HTTP): here in the test's
    2 gloo workers."""
    port = free_port()
    box: dict[str, Any] = {}
    opts = ServeOptions(
        model=MODEL, plan=PLAN, port=port, timeout_s=8.0, max_steps=50000, max_batch=1
    )

    def run() -> None:
        try:
            box["stats"] = pools(2).run(serve_job, opts, timeout=600)
        except Exception as e:  # noqa: BLE001  (asserted below)
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    _wait_healthy(url, thread.is_alive)
    code, _, raw = _http(
        "POST", url + "/v1/images/generations", {"prompt": "a red apple", "seed": SEED}
    )
    body = json.loads(raw)
    assert code == 200 and np.array_equal(_png(body["data"][0]["b64_json"]), reference)
    text = _http("GET", url + "/metrics")[2].decode()
    assert 'xdit_stage_seconds_sum{stage="run"}' in text and "xdit_stage_seconds_count 1" in text
    # Per-request timeout (8 s here): 504, and the batch stops at a step boundary.
    t0 = time.monotonic()
    code, _, raw = _http(
        "POST", url + "/v1/images/generations", {"prompt": "too slow", "steps": 50000}
    )
    assert code == 504 and "longer than 8 s" in json.loads(raw)["error"]["message"], raw
    assert 7.5 < time.monotonic() - t0 < 60
    # Graceful shutdown: the running request finishes, the queued ones get 503.
    with ThreadPoolExecutor(3) as ex:
        running = ex.submit(
            _http, "POST", url + "/v1/images/generations", {"prompt": "running", "steps": 300}
        )
        time.sleep(0.3)
        queued = [
            ex.submit(_http, "POST", url + "/v1/images/generations", {"prompt": f"queued {i}"})
            for i in range(2)
        ]
        time.sleep(0.3)
        code, _, raw = _http("POST", url + "/admin/shutdown")
        assert code == 200 and json.loads(raw)["rejected"] == 2
        assert running.result()[0] == 200
        assert [f.result()[0] for f in queued] == [503, 503]
    thread.join(120)
    assert "error" not in box, box
    assert [s.aborted_batches for s in box["stats"]] == [1, 1]  # the timed-out one, on both ranks
    assert [s.batches for s in box["stats"]] == [2, 2]


def _sse(url: str, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    req = urllib.request.Request(
        url + "/v1/images/generations",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"content-type": "application/json"},
    )
    events, name = [], None
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for raw in r:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    return events


def test_progress_as_server_sent_events(server):
    events = _sse(server.url, {"prompt": "a red apple", "seed": server.seed, "stream": True})
    names = [n for n, _ in events]
    assert names[-1] == "image_generation.completed" and "image_generation.progress" in names
    steps = [d["step"] for n, d in events if n == "image_generation.progress"]
    assert (
        steps == sorted(steps) and steps[-1] == events[0][1]["steps"]
    )  # every step counted, in order
    assert np.array_equal(_png(events[-1][1]["data"][0]["b64_json"]), server.reference)
    long = _sse(server.url, {"prompt": "longer", "steps": 150, "stream": True})
    assert (
        len([1 for n, _ in long if n == "image_generation.progress"]) > 1
    )  # several steps reported


# --------------------------------------------------------------------------- video pipelines


VIDEO = "wan"


@pytest.fixture(scope="module")
def video_reference(pools, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve_video") / "ref"
    pools(2).run(
        generate_job,
        GenerateOptions(
            model=VIDEO, prompt=["a fox"], plan=PLAN, seed=SEED, output=str(out), warmup=0
        ),
        timeout=600,
    )
    from PIL import Image

    return np.stack([np.asarray(Image.open(f)) for f in sorted(out.glob("frame_*.png"))])


@pytest.fixture(scope="module")
def video_server(video_reference):
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "xdit_compile.cli",
        "serve",
        "--model",
        VIDEO,
        "--cfg",
        "2",
        "--port",
        str(port),
        "--max-batch",
        "1",
        "--max-steps",
        "400",
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, lambda: proc.poll() is None)
        yield url
        assert _http("POST", url + "/admin/shutdown")[0] == 200
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
    finally:
        if proc.poll() is None:
            proc.kill()


def _wait_video(url: str, vid: str, timeout: float = 300.0) -> dict[str, Any]:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        obj = json.loads(_http("GET", f"{url}/v1/videos/{vid}")[2])
        if obj["status"] in ("completed", "failed"):
            return obj
        time.sleep(0.2)
    pytest.fail(f"video {vid} did not finish")


def test_video_job_equals_generate(video_server, video_reference):
    code, _, raw = _http("POST", video_server + "/v1/videos", {"prompt": "a fox", "seed": SEED})
    job = json.loads(raw)
    assert code == 200 and job["object"] == "video" and job["status"] in ("queued", "in_progress")
    done = _wait_video(video_server, job["id"])
    assert done["status"] == "completed" and done["progress"] == 100
    code, headers, raw = _http("GET", f"{video_server}/v1/videos/{job['id']}/content?format=npy")
    assert code == 200
    frames = np.load(io.BytesIO(raw))
    assert frames.shape == video_reference.shape and np.array_equal(frames, video_reference)
    code, headers, raw = _http("GET", f"{video_server}/v1/videos/{job['id']}/content?format=apng")
    assert (
        code == 200 and headers["content-type"] == "image/apng" and raw[:8] == b"\x89PNG\r\n\x1a\n"
    )


def test_video_errors_and_delete(video_server):
    assert _http("GET", video_server + "/v1/videos/video-999")[0] == 404
    code, _, raw = _http("POST", video_server + "/v1/images/generations", {"prompt": "x"})
    assert code == 400 and "makes videos" in json.loads(raw)["error"]["message"]
    code, _, raw = _http("POST", video_server + "/v1/videos", {"prompt": "x", "frames": 1000})
    assert code == 400 and json.loads(raw)["error"]["param"] == "frames"
    vid = json.loads(
        _http("POST", video_server + "/v1/videos", {"prompt": "long", "steps": 300})[2]
    )["id"]
    code, _, raw = _http("GET", f"{video_server}/v1/videos/{vid}/content")
    assert code == 409 and "poll" in json.loads(raw)["error"]["message"]  # not finished yet
    # Delete it while it runs (a queued job would just leave the queue: no batch to abort).
    started = time.monotonic() + 60
    while json.loads(_http("GET", f"{video_server}/v1/videos/{vid}")[2])["status"] == "queued":
        assert time.monotonic() < started, "the job did not start"
        time.sleep(0.05)
    assert _http("DELETE", f"{video_server}/v1/videos/{vid}")[0] == 200
    assert _http("GET", f"{video_server}/v1/videos/{vid}")[0] == 404
    # The deleted job stops at a step boundary (an aborted batch), and the next one runs.
    deadline = time.monotonic() + 60

    def aborted() -> float:
        text = _http("GET", video_server + "/metrics")[2].decode()
        return float(
            next(
                ln.split()[-1]
                for ln in text.splitlines()
                if ln.startswith("xdit_aborted_batches_total")
            )
        )

    while aborted() < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert aborted() == 1
    nxt = json.loads(_http("POST", video_server + "/v1/videos", {"prompt": "next", "seed": 1})[2])[
        "id"
    ]
    assert _wait_video(video_server, nxt)["status"] == "completed"


def test_two_torchrun_launches_serve_as_one_replica(reference):
    """Multi-node: one replica of 2 ranks from two `torchrun --nnodes 2` launches (one per
    "node", here both on this machine); rank 0 (node 0) serves. Same image as one launch."""
    master, port = free_port(), free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc_per_node",
                "1",
                "--node_rank",
                str(node),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(master),
                "-m",
                "xdit_compile.cli",
                "serve",
                "--model",
                MODEL,
                "--cfg",
                "2",
                "--port",
                str(port),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for node in (0, 1)
    ]
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, lambda: all(p.poll() is None for p in procs))
        code, _, raw = _http(
            "POST", url + "/v1/images/generations", {"prompt": "a red apple", "seed": SEED}
        )
        assert code == 200, raw
        assert np.array_equal(_png(json.loads(raw)["data"][0]["b64_json"]), reference)
        assert _http("POST", url + "/admin/shutdown")[0] == 200
        outs = [p.communicate(timeout=120)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def test_ray_serve_replicas_answer_behind_one_endpoint(reference):
    """Two replicas, each a process group of 2 ranks (cfg=2), behind one Ray Serve endpoint on a
    local Ray cluster."""
    import ray
    from ray import serve

    from xdit_compile.serve.ray import deployment

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(
            deployment(ServeOptions(model=MODEL, plan=PLAN, max_batch=1), world=2, num_replicas=2),
            route_prefix="/",
        )
        url = f"http://127.0.0.1:{port}"
        seen = set()
        for _ in range(20):  # bounded: Ray spreads requests over both replicas
            code, headers, raw = _http(
                "POST", url + "/v1/images/generations", {"prompt": "a red apple", "seed": SEED}
            )
            assert code == 200, raw
            assert np.array_equal(_png(json.loads(raw)["data"][0]["b64_json"]), reference)
            seen.add(headers["x-xdit-replica"])
            if len(seen) == 2:
                break
        assert len(seen) == 2, seen
        code, _, raw = _http("POST", url + "/v1/images/generations", {"prompt": "x", "size": "1x1"})
        assert (
            code == 400 and "not served" in json.loads(raw)["error"]["message"]
        )  # errors pass through
        assert (
            _http("POST", url + "/admin/shutdown")[0] == 403
        )  # replicas stop with Ray, not a client
    finally:
        serve.shutdown()
        ray.shutdown()


def test_a_group_that_cannot_start_gives_up_with_the_reason():
    """A served size the pipeline rejects (not a multiple of its VAE factor) fails the warm-up on
    every start: after --max-start-failures starts the command exits non-zero with the reason."""
    cmd = [
        sys.executable,
        "-m",
        "xdit_compile.cli",
        "serve",
        "--model",
        MODEL,
        "--cfg",
        "2",
        "--port",
        str(free_port()),
        "--sizes",
        "33x33",
        "--max-start-failures",
        "2",
    ]
    r = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert "failed to start 2 times" in r.stderr and "divisible" in r.stderr, r.stderr[-2000:]


def test_replica_command_line_carries_every_option(tmp_path) -> None:
    """A Ray replica starts its group with `serve_args(opts)`: parsed by the CLI, the command
    line gives back the same options (host and port are the replica's own)."""
    from xdit_compile.cli.main import _parser, serve_options
    from xdit_compile.serve.options import ServeOptions
    from xdit_compile.serve.ray import serve_args

    opts = ServeOptions(
        model=MODEL,
        plan={
            "ulysses": 1,
            "ring": 1,
            "cfg": 1,
            "dp": 1,
            "pipefusion": 2,
            "distrifusion": 1,
            "patches": 4,
            "warmup_steps": 2,
            "stage_blocks": (1, 1),
            "compile": "inductor",
            "auto": False,
            "hardware": None,
        },
        port=8123,
        dtype="bfloat16",
        sizes=["32x32", "64x32"],
        default_steps=7,
        max_steps=50,
        max_n=3,
        max_batch=2,
        max_queue=5,
        max_prompt_chars=99,
        timeout_s=12.5,
        warmup=False,
        max_start_failures=4,
        parallel_vae=True,
        loras={"style": str(tmp_path), "other": str(tmp_path)},
    )
    argv = serve_args(opts, world=2)
    assert argv[1:3] == ["-m", "xdit_compile.cli"]
    assert serve_options(_parser().parse_args(argv[3:])) == opts


def _lora_dir(root: Any) -> str:
    """A random LoRA for the tiny SD3 pipeline's transformer, written with save_lora_weights."""
    import torch
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from xdit_compile.models.pipelines import build_pipeline

    pipe = build_pipeline("sd3")
    torch.manual_seed(3)
    pipe.transformer.add_adapter(
        LoraConfig(
            r=4,
            lora_alpha=8,
            init_lora_weights=False,
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        ),
        "style",
    )
    StableDiffusion3Pipeline.save_lora_weights(
        root,
        transformer_lora_layers=get_peft_model_state_dict(pipe.transformer, adapter_name="style"),
    )
    return str(root)


def test_each_request_runs_with_its_own_adapters(pools, tmp_path):
    """Requests with different LoRA choices, sent together, are never batched together and never
    see each other's adapter state: each image equals what `generate` makes with that choice."""
    from PIL import Image

    lora = _lora_dir(tmp_path / "lora")
    refs = {}
    for key, weights in {"base": None, "style": {"style": 1.0}, "half": {"style": 0.5}}.items():
        out = tmp_path / f"{key}.png"
        loras = {"style": lora} if weights else {}
        pools(2).run(
            generate_job,
            GenerateOptions(
                model="sd3",
                prompt=["a red apple"],
                plan=PLAN,
                seed=SEED,
                output=str(out),
                warmup=0,
                loras=loras,
                lora_weights=weights or {},
            ),
            timeout=600,
        )
        refs[key] = np.asarray(Image.open(out))
    assert not np.array_equal(refs["base"], refs["style"]) and not np.array_equal(
        refs["style"], refs["half"]
    )
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "xdit_compile.cli",
        "serve",
        "--model",
        "sd3",
        "--cfg",
        "2",
        "--port",
        str(port),
        "--max-batch",
        "2",
        "--lora",
        f"style={lora}",
    ]  # batches of 2: only same-adapter requests may share one
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, lambda: proc.poll() is None)
        srv = Server(url, refs["base"], SEED)
        asks = {"style": {"style": 1.0}, "base": None, "half": {"style": 0.5}}
        with ThreadPoolExecutor(3) as ex:  # queued together: one batch each, in arrival order
            got = dict(
                zip(
                    asks,
                    ex.map(
                        lambda w: srv.post({"prompt": "a red apple", "seed": SEED, "lora": w}),
                        asks.values(),
                    ),
                    strict=True,
                )
            )
        for key, (code, _, body) in got.items():
            assert code == 200, body
            assert np.array_equal(_png(body["data"][0]["b64_json"]), refs[key]), key
        code, _, body = srv.post(
            {"prompt": "a red apple", "seed": SEED}
        )  # after the others: adapters off
        assert code == 200 and np.array_equal(_png(body["data"][0]["b64_json"]), refs["base"])
        code, _, body = srv.post({"prompt": "a red apple", "lora": {"nope": 1.0}})
        assert (
            code == 400
            and body["error"]["param"] == "lora"
            and "'nope' is not loaded" in body["error"]["message"]
        )
        code, _, _ = _http("POST", url + "/admin/shutdown")
        assert code == 200
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
