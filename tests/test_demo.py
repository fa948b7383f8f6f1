"""The trained demo pipeline (models/demo): loads offline, draws its subjects, and
``xdit-compile generate`` runs it with its own defaults, serial vs parallel within the stated
tolerance of each dtype (fp32: 1e-4; bf16: :data:`xdit_compile.jobs.generate.TOLERANCE`)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from xdit_compile.cli.main import main
from xdit_compile.jobs.generate import TOLERANCE
from xdit_compile.models import demo


def _diff(text: str) -> float:
    m = re.search(r"max relative difference ([0-9.e+-]+)", text)
    assert m, text
    return float(m.group(1))


def test_reference_is_nearest_to_itself():
    refs = demo.committed_references()
    n = len(refs)
    assert n == len(demo.SUBJECTS) >= 30
    assert demo.retrieval_accuracy(refs, torch.arange(n), refs) == 1.0
    torch.manual_seed(0)
    noisy = refs + 0.3 * torch.randn_like(refs)  # pixel noise: pooled away
    assert demo.retrieval_accuracy(noisy, torch.arange(n), refs) == 1.0
    # a wrong label is never "right": each reference is nearest to itself only
    assert demo.retrieval_accuracy(refs, torch.arange(n).roll(1), refs) == 0.0


def test_noise_is_at_chance():
    torch.manual_seed(0)
    refs = demo.committed_references()
    noise = torch.rand(800, 3, 64, 64) * 2 - 1
    labels = torch.arange(len(refs)).repeat(20)
    acc = demo.retrieval_accuracy(noise, labels, refs)
    assert acc < 2.5 / len(refs), acc  # chance is 1/40: 20 of 800 expected


def test_references_are_the_font_renderings():
    """The committed references are what the training data's renderer draws (where the font
    is installed: `apt-get install fonts-noto-color-emoji`; only training needs it)."""
    try:
        demo.font_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    assert torch.equal(demo.reference_images(), demo.committed_references())
    assert (
        demo.caption(demo.SUBJECTS[0], "in the snow", ("small", "on the left"))
        == "a small fox face on the left in the snow"
    )


def test_demo_loads_offline_and_draws(monkeypatch):
    """from_pretrained from the repo with the hub switched off; the trained pipeline draws its
    subjects (retrieval accuracy on 10 subjects, 1 seed: the benchmark measures all 40)."""
    from diffusers import DiffusionPipeline, PixArtSigmaPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = demo.demo_path()
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size < 40e6, size
    pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True, torch_dtype=torch.float32)
    assert isinstance(pipe, PixArtSigmaPipeline)
    pipe.set_progress_bar_config(disable=True)
    subjects = list(range(0, 40, 4))
    prompts = [demo.caption(demo.SUBJECTS[i]) for i in subjects]
    gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    with torch.no_grad():
        images = pipe(
            prompt=prompts,
            generator=gens,
            output_type="pt",
            use_resolution_binning=False,
            clean_caption=False,
        ).images
    assert images.shape == (10, 3, 64, 64)
    acc = demo.retrieval_accuracy(
        images * 2 - 1, torch.tensor(subjects), demo.committed_references()
    )
    assert acc >= 0.7, acc


@pytest.mark.dist
def test_generate_saved_demo_uses_its_defaults(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """No --steps/--height: the saved pipeline's own defaults (20 steps, 64x64, guidance 4.5,
    300 text tokens), serial vs cfg=2 x ulysses=2 within 1e-4 (fp32)."""
    out = tmp_path / "fox.png"
    rc = main(
        [
            "generate",
            "--model",
            str(demo.demo_path()),
            "--prompt",
            "a fox face in the snow",
            "--cfg",
            "2",
            "--ulysses",
            "2",
            "--compare-serial",
            "--output",
            str(out),
            "--timeout",
            "600",
        ]
    )
    text = capsys.readouterr().out
    assert rc == 0, text
    assert (
        "20 steps" in text and "num_inference_steps=20" in text and "guidance_scale=4.5" in text
    ), text
    assert "max_sequence_length=300" in text, text
    from PIL import Image

    assert Image.open(out).size == (64, 64)
    assert _diff(text) < TOLERANCE[torch.float32] == 1e-4, text


@pytest.mark.dist
def test_generate_demo_bf16(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """bfloat16 on CPU: serial vs ring=2 (whose merge rounds differently from one softmax) within
    the bf16 tolerance, and not bit-equal to the fp32 image (the dtype is really used)."""
    images = {}
    for dtype in ("bfloat16", "float32"):
        out = tmp_path / f"{dtype}.png"
        rc = main(
            [
                "generate",
                "--model",
                "demo",
                "--prompt",
                "a red apple",
                "--ring",
                "2",
                "--dtype",
                dtype,
                "--compare-serial",
                "--output",
                str(out),
                "--timeout",
                "600",
            ]
        )
        text = capsys.readouterr().out
        assert rc == 0, text
        if dtype == "bfloat16":
            assert _diff(text) < TOLERANCE[torch.bfloat16], text
        from PIL import Image

        images[dtype] = torch.tensor(list(Image.open(out).getdata()), dtype=torch.float32)
    assert not torch.equal(images["bfloat16"], images["float32"])


def test_training_script_resumes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The training script on 2 subjects for a few steps, then again with more steps: it
    resumes from its checkpoints (step counts carry over) and saves a loadable pipeline."""
    try:
        demo.font_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    from diffusers import DiffusionPipeline

    from xdit_compile.models.train_demo import main as train

    work, out = tmp_path / "work", tmp_path / "pipe" / "p"
    common = [
        "--work",
        str(work),
        "--out",
        str(out),
        "--subjects",
        "2",
        "--vae-batch",
        "4",
        "--batch",
        "4",
        "--checkpoint-every",
        "1",
        "--threads",
        "1",
    ]
    train([*common, "--vae-steps", "2", "--dit-steps", "2"])
    assert "resumed" not in capsys.readouterr().out
    train([*common, "--vae-steps", "3", "--dit-steps", "4"])
    text = capsys.readouterr().out
    assert "vae: resumed at step 2" in text and "dit+t5: resumed at step 2" in text, text
    log = __import__("json").loads((out.parent / "training.json").read_text())
    assert log["vae"]["steps"] == 3 and log["dit"]["steps"] == 4
    assert torch.load(work / "dit.pt", weights_only=False)["step"] == 4
    assert (out.parent / "training_loss.png").is_file()
    pipe = DiffusionPipeline.from_pretrained(out)
    assert type(pipe).__name__ == "PixArtSigmaPipeline"
