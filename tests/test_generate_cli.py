"""``xdit-compile generate`` end to end on a saved tiny pipeline, and its failure exits.

The parallel image is compared with the plain pipeline run on rank 0 (``--compare-serial``):
relative difference < 1e-4 (fp32, see test_pipeline_parallel).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import torch

from xdit_compile.cli.main import main


@pytest.fixture(scope="module")
def saved_pixart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from xdit_compile.models.pipelines import build_pipeline

    path = tmp_path_factory.mktemp("pipes") / "pixart-sigma"
    build_pipeline("pixart-sigma").save_pretrained(path)
    return path


@pytest.mark.dist
@pytest.mark.parametrize("vae", [[], ["--parallel-vae"]])
def test_generate_saved_pipeline_cfg2(
    saved_pixart: Path, tmp_path: Path, capsys: pytest.CaptureFixture, vae: list[str]
) -> None:
    out = tmp_path / "fox.png"
    rc = main(
        [
            "generate",
            "--model",
            str(saved_pixart),
            "--prompt",
            "a red fox",
            "--cfg",
            "2",
            "--steps",
            "2",
            "--height",
            "32",
            "--width",
            "32",
            "--seed",
            "3",
            "--output",
            str(out),
            "--compare-serial",
            "--timeout",
            "300",
            *vae,
        ]
    )
    text = capsys.readouterr().out
    assert rc == 0, text
    assert ("VAE decoder: Plan(ring=2" in text) == bool(vae), text
    assert out.is_file() and out.stat().st_size > 0
    from PIL import Image

    assert Image.open(out).size == (32, 32)
    diff = float(re.search(r"max relative difference ([0-9.e+-]+)", text).group(1))  # type: ignore[union-attr]
    assert diff < 1e-4, text
    assert "2 steps" in text and "ms/step" in text


@pytest.mark.dist
def test_generate_auto_plan(saved_pixart: Path, capsys: pytest.CaptureFixture) -> None:
    """``--auto``: the cost model picks an exact plan for 2 processes; same image as serial."""
    rc = main(
        [
            "generate",
            "--model",
            str(saved_pixart),
            "--prompt",
            "a red fox",
            "--auto",
            "--nproc",
            "2",
            "--hardware",
            "cpu",
            "--steps",
            "2",
            "--height",
            "32",
            "--width",
            "32",
            "--compare-serial",
            "--timeout",
            "300",
        ]
    )
    text = capsys.readouterr().out
    assert rc == 0, text
    m = re.search(r": Plan\(([^)]*)\) \(chosen by the cost model\), 2 process", text)
    assert m and "auto" not in m.group(1) and "compile=None" in m.group(1), text
    diff = float(re.search(r"max relative difference ([0-9.e+-]+)", text).group(1))  # type: ignore[union-attr]
    assert diff < 1e-4, text


def test_generate_auto_needs_nproc(capsys: pytest.CaptureFixture) -> None:
    assert main(["generate", "--model", "demo", "--prompt", "x", "--auto"]) == 2
    assert "--auto needs --nproc" in capsys.readouterr().err


@pytest.mark.dist
@pytest.mark.parametrize(
    "plan",
    [["--pipefusion", "2", "--patches", "4"], ["--distrifusion", "2"]],
    ids=["pipefusion", "distrifusion"],
)
def test_generate_displaced_kv(
    saved_pixart: Path, tmp_path: Path, capsys: pytest.CaptureFixture, plan
) -> None:
    """3 steps, the first exact (warmup): the image differs from the plain pipeline's, a little
    (stale K/V in steps 2 and 3; equality with the oracle is in test_displaced_pipelines)."""
    out = tmp_path / "fox.png"
    rc = main(
        [
            "generate",
            "--model",
            str(saved_pixart),
            "--prompt",
            "a red fox",
            *plan,
            "--warmup-steps",
            "1",
            "--steps",
            "3",
            "--height",
            "32",
            "--width",
            "32",
            "--output",
            str(out),
            "--compare-serial",
            "--timeout",
            "300",
        ]
    )
    text = capsys.readouterr().out
    assert rc == 0, text
    assert out.is_file() and "3 steps" in text
    diff = float(re.search(r"max relative difference ([0-9.e+-]+)", text).group(1))  # type: ignore[union-attr]
    assert 0 < diff < 0.5, text


@pytest.mark.dist
def test_generate_video_frames_dp2_two_prompts(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "clip"
    rc = main(
        [
            "generate",
            "--model",
            "wan",
            "--prompt",
            "a red fox",
            "a blue whale",
            "--dp",
            "2",
            "--output",
            str(out),
            "--timeout",
            "300",
        ]
    )
    text = capsys.readouterr().out
    assert rc == 0, text
    for i in range(2):
        frames = sorted((tmp_path / f"clip_{i}").glob("frame_*.png"))
        assert len(frames) == 13, text


def test_generate_bad_model_path_fails_fast(capsys: pytest.CaptureFixture) -> None:
    t0 = time.monotonic()
    rc = main(["generate", "--model", "/nonexistent/pipeline", "--prompt", "x", "--ulysses", "2"])
    assert rc == 2 and time.monotonic() - t0 < 10
    assert "no such directory" in capsys.readouterr().err


def test_generate_plan_must_fit_world_size(capsys: pytest.CaptureFixture) -> None:
    rc = main(
        ["generate", "--model", "pixart-sigma", "--prompt", "x", "--cfg", "2", "--nproc", "3"]
    )
    assert rc == 2
    assert "Plan needs 2 processes" in capsys.readouterr().err


@pytest.mark.dist
def test_generate_resolution_the_model_cannot_take(capsys: pytest.CaptureFixture) -> None:
    t0 = time.monotonic()
    rc = main(
        [
            "generate",
            "--model",
            "pixart-sigma",
            "--prompt",
            "x",
            "--ulysses",
            "2",
            "--height",
            "4",
            "--width",
            "4",
            "--timeout",
            "120",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1 and time.monotonic() - t0 < 120, err
    assert "generate failed" in err


def test_dtype_names() -> None:
    from xdit_compile.jobs.generate import _DTYPES

    assert _DTYPES["bf16"] is torch.bfloat16 and _DTYPES["float32"] is torch.float32


def _generate_and_die(opts: object) -> object:
    """generate_job, with rank 1 killed while the pipeline runs."""
    import os
    import threading

    import torch.distributed as dist

    from xdit_compile.jobs.generate import generate_job

    if dist.get_rank() == 1:
        threading.Timer(1.5, lambda: os._exit(9)).start()
    return generate_job(opts)  # type: ignore[arg-type]


@pytest.mark.dist
def test_generate_worker_killed_mid_run_stops_everyone(pools: object) -> None:
    from xdit_compile.jobs.generate import GenerateOptions
    from xdit_compile.testing.launcher import WorkerError

    opts = GenerateOptions(
        model="wan", prompt=["a red fox"], plan={"ulysses": 2}, steps=300, warmup=0
    )
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match="worker process died: rank 1: exit code 9"):
        pools(2).run(_generate_and_die, opts, timeout=300)  # type: ignore[attr-defined]
    assert time.monotonic() - t0 < 60
    assert pools(2).run(int, 1) == [1, 1]  # type: ignore[attr-defined]  # the pool restarts


@pytest.mark.dist
def test_generate_under_torchrun(tmp_path: Path) -> None:
    """Inside torchrun the command uses the existing ranks instead of launching workers."""
    import subprocess
    import sys

    from xdit_compile.testing.launcher import free_port

    out = tmp_path / "fox.png"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "-m",
        "xdit_compile.cli.main",
        "generate",
        "--model",
        "pixart-sigma",
        "--prompt",
        "a red fox",
        "--ulysses",
        "2",
        "--steps",
        "2",
        "--height",
        "32",
        "--width",
        "32",
        "--output",
        str(out),
    ]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    # the ranks' own messages (a C++ abort, a traceback) come before torchrun's summary
    own = [
        ln
        for ln in proc.stderr.splitlines()
        if any(k in ln for k in ("terminate", "Error", "error:", "Abort"))
    ]
    assert proc.returncode == 0, "\n".join(own[:20]) + "\n" + proc.stderr[-1500:]
    assert "Plan(ulysses=2" in proc.stdout and out.is_file()
