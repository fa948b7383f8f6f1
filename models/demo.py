"""The demo: a small text-to-image pipeline trained here on rendered colour emoji.

Data (offline): the subjects of :data:`SUBJECTS` rendered from Noto Color Emoji (Debian's
``fonts-noto-color-emoji``, SIL Open Font License 1.1; see ``models/demo/DATA.md``) at 64x64
pixels, with the augmentations their captions describe: a background ("on a blue
background", "in the snow", ...), a size ("a small fox face") and a position ("... on the
left"). Captions come from the Unicode names (``unicodedata.name``: FOX FACE -> "a fox face").

Pipeline: real diffusers/transformers classes (``PixArtSigmaPipeline`` with a small
``PixArtTransformer2DModel``, a small ``T5EncoderModel`` + ``T5TokenizerFast`` and an
``AutoencoderKL`` with a 4x downsampling, so 64x64 pixels are a 16x16 latent and 8x8 = 64
tokens of patch 2). ``xdit_compile.models.train_demo`` trains all three from scratch on CPU;
the result is committed in ``save_pretrained`` format under :func:`demo_path` and loads with
``DiffusionPipeline.from_pretrained`` (no network).
"""

from __future__ import annotations

import random
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from PIL import Image as PILImage

__all__ = [
    "BACKGROUNDS",
    "LAYOUTS",
    "SUBJECTS",
    "Sample",
    "build_components",
    "caption",
    "committed_references",
    "demo_path",
    "font_path",
    "image_distance",
    "render",
    "retrieval_accuracy",
    "reference_images",
    "samples",
    "subject_name",
]

#: The subjects the demo draws (one code point each, visually distinct at 64x64).
SUBJECTS: tuple[str, ...] = (
    "\U0001f98a",
    "\U0001f34e",
    "\U0001f3e1",
    "\U0001f34c",
    "\U0001f347",
    "\U0001f349",
    "\U0001f352",
    "\U0001f353",
    "\U0001f34d",
    "\U0001f34b",
    "\U0001f34a",
    "\U0001f955",
    "\U0001f33d",
    "\U0001f966",
    "\U0001f344",
    "\U0001f355",
    "\U0001f354",
    "\U0001f382",
    "\U0001f438",
    "\U0001f437",
    "\U0001f431",
    "\U0001f436",
    "\U0001f43c",
    "\U0001f42f",
    "\U0001f42e",
    "\U0001f427",
    "\U0001f419",
    "\U0001f420",
    "\U0001f422",
    "\U0001f98b",
    "\U0001f33b",
    "\U0001f335",
    "\U0001f332",
    "\U0001f525",
    "\U0001f308",
    "\U0001f319",
    "\U0001f680",
    "\U0001f697",
    "\U0001f451",
    "\U0001f980",
)

#: Background phrase -> RGB (``None``: the plain white background, no phrase; "snow": a pale
#: blue ground with white flakes).
BACKGROUNDS: dict[str, tuple[int, int, int] | None] = {
    "": None,
    "on a blue background": (40, 90, 200),
    "on a green background": (50, 160, 70),
    "on a yellow background": (240, 210, 60),
    "on a pink background": (240, 150, 190),
    "on a black background": (10, 10, 10),
    "in the snow": (200, 215, 235),
}

#: Layout: (size word, position phrase) -> (scale of the image side, centre x in [0, 1]).
LAYOUTS: dict[tuple[str, str], tuple[float, float]] = {
    ("", ""): (0.84, 0.5),
    ("small", ""): (0.5, 0.5),
    ("small", "on the left"): (0.5, 0.28),
    ("small", "on the right"): (0.5, 0.72),
}

SIZE = 64  # pixels
_FONT_PX = 109  # Noto Color Emoji is a bitmap font with 109 px strikes only


def subject_name(ch: str) -> str:
    """The Unicode name of emoji ``ch`` in lower case ("fox face")."""
    return unicodedata.name(ch).lower()


def caption(ch: str, background: str = "", layout: tuple[str, str] = ("", "")) -> str:
    """The caption of ``ch`` drawn with ``background`` and ``layout`` ("a small fox face on the
    left in the snow")."""
    size, where = layout
    words = " ".join(w for w in (size, subject_name(ch)) if w)
    article = "an" if words[0] in "aeiou" else "a"
    return " ".join(w for w in (article, words, where, background) if w)


def font_path() -> Path:
    """Path of ``NotoColorEmoji.ttf``; ``FileNotFoundError`` naming the package otherwise."""
    for root in ("/usr/share/fonts", "/usr/local/share/fonts", str(Path.home() / ".fonts")):
        for path in sorted(Path(root).rglob("NotoColorEmoji.ttf")) if Path(root).exists() else ():
            return path
    raise FileNotFoundError(
        "NotoColorEmoji.ttf not found: install it with `apt-get install fonts-noto-color-emoji` "
        "(Debian/Ubuntu) to render the demo's training data"
    )


_GLYPHS: dict[str, Any] = {}


def _glyph(ch: str) -> PILImage.Image:
    """The RGBA glyph of ``ch`` cropped to its ink (cached)."""
    if ch not in _GLYPHS:
        from PIL import Image, ImageDraw, ImageFont

        font = ImageFont.truetype(str(font_path()), _FONT_PX)
        canvas = Image.new("RGBA", (2 * _FONT_PX, 2 * _FONT_PX), (0, 0, 0, 0))
        ImageDraw.Draw(canvas).text((8, 8), ch, font=font, embedded_color=True)
        box = canvas.getbbox()
        if box is None:
            raise ValueError(f"the emoji font has no glyph for {subject_name(ch)!r}")
        _GLYPHS[ch] = canvas.crop(box)
    return _GLYPHS[ch]


def _ground(background: str, seed: int) -> PILImage.Image:
    from PIL import Image, ImageDraw

    rgb = BACKGROUNDS[background]
    image = Image.new("RGB", (SIZE, SIZE), rgb or (255, 255, 255))
    if background == "in the snow":
        rng = random.Random(seed)
        draw = ImageDraw.Draw(image)
        draw.rectangle((0, int(SIZE * 0.78), SIZE, SIZE), fill=(250, 250, 255))
        for _ in range(26):
            x, y, r = rng.uniform(0, SIZE), rng.uniform(0, SIZE), rng.choice((1, 1, 2))
            draw.ellipse((x - r, y - r, x + r, y + r), fill=(255, 255, 255))
    return image


def render(
    ch: str, background: str = "", layout: tuple[str, str] = ("", ""), seed: int = 0
) -> PILImage.Image:
    """``ch`` as a 64x64 RGB image on ``background`` at ``layout`` (``seed``: the snow)."""
    from PIL import Image

    glyph = _glyph(ch)
    scale, cx = LAYOUTS[layout]
    side = SIZE * scale
    ratio = side / max(glyph.size)
    w, h = max(1, round(glyph.width * ratio)), max(1, round(glyph.height * ratio))
    small = glyph.resize((w, h), Image.Resampling.LANCZOS)
    image = _ground(background, seed)
    x, y = round(cx * SIZE - w / 2), round(SIZE / 2 - h / 2)
    image.paste(small, (x, y), small)
    return image


@dataclass(frozen=True)
class Sample:
    """One training image: subject, background, layout and its caption."""

    subject: str
    background: str
    layout: tuple[str, str]

    @property
    def caption(self) -> str:
        return caption(self.subject, self.background, self.layout)

    def image(self, seed: int = 0) -> PILImage.Image:
        return render(self.subject, self.background, self.layout, seed)


def samples(subjects: tuple[str, ...] = SUBJECTS) -> list[Sample]:
    """Every (subject, background, layout) combination, in a fixed order."""
    return [Sample(s, b, lay) for s in subjects for b in BACKGROUNDS for lay in LAYOUTS]


def to_tensor(image: PILImage.Image) -> torch.Tensor:
    """RGB image -> float ``[3, H, W]`` in [-1, 1]."""
    import numpy as np

    array = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32).copy())
    return array.permute(2, 0, 1) / 127.5 - 1.0


def reference_images(subjects: tuple[str, ...] = SUBJECTS) -> torch.Tensor:
    """The plain rendering (white background, full size, centred) of every subject: the
    references of the retrieval metric, ``[len(subjects), 3, 64, 64]`` in [-1, 1]."""
    return torch.stack([to_tensor(render(s)) for s in subjects])


def vocabulary() -> tuple[str, ...]:
    """The whole-word pieces of the demo tokenizer: every caption word, then the tiny
    tokenizers' common prompt words."""
    from .pipelines import _WORDS

    words: list[str] = []
    for s in samples():
        for w in s.caption.split():
            if w not in words:
                words.append(w)
    return tuple(words + [w for w in _WORDS if w not in words])


# ---------------------------------------------------------------------------------------------
# Components
# ---------------------------------------------------------------------------------------------

#: The DiT: 6 blocks of width 192 (4 heads of 48), patch 2 over a 16x16x4 latent.
DIT_CONFIG: dict[str, Any] = {
    "sample_size": 16,
    "patch_size": 2,
    "in_channels": 4,
    "out_channels": 4,
    "num_layers": 6,
    "num_attention_heads": 4,
    "attention_head_dim": 48,
    "cross_attention_dim": 192,
    "caption_channels": 128,
    "norm_type": "ada_norm_single",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "use_additional_conditions": False,
    "interpolation_scale": 1,
}

#: The VAE: three blocks (4x downsampling), 4 latent channels.
VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "block_out_channels": (32, 64, 64),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 16,
    "sample_size": SIZE,
}

#: DDPM training noise (PixArt-Sigma's betas) with v-prediction.
NOISE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "v_prediction",
}


def build_components(seed: int = 0) -> dict[str, Any]:
    """Untrained components of the demo ``PixArtSigmaPipeline`` (fixed ``seed``): tokenizer,
    T5 text encoder (2 layers, width 128), VAE, DiT and the DPM-Solver++ scheduler."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from .pipelines import _t5_config, _t5_tokenizer

    words = vocabulary()
    tokenizer = _t5_tokenizer(words)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        t5 = _t5_config(DIT_CONFIG["caption_channels"])
        t5["vocab_size"] = len(tokenizer)
        text_encoder = T5EncoderModel(T5Config(**t5))
        vae = AutoencoderKL(**VAE_CONFIG, scaling_factor=1.0)
        transformer = PixArtTransformer2DModel(**DIT_CONFIG)
    scheduler = DPMSolverMultistepScheduler(
        **NOISE,
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        lower_order_final=True,
        timestep_spacing="linspace",
    )
    return {
        "tokenizer": tokenizer,
        "text_encoder": text_encoder,
        "vae": vae,
        "transformer": transformer,
        "scheduler": scheduler,
    }


def demo_path() -> Path:
    """Directory of the committed trained pipeline (``save_pretrained`` format)."""
    return Path(__file__).resolve().parent / "demo" / "emoji-pixart"


# ---------------------------------------------------------------------------------------------
# The retrieval metric
# ---------------------------------------------------------------------------------------------

#: The fixed image distance: mean squared difference of 4x4 average-pooled images (16x16x3),
#: so a blurry but right picture stays nearer to its subject than a sharp wrong one.
POOL = 4


def image_distance(images: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
    """``[N, M]`` distances between ``images`` ``[N, 3, H, W]`` and ``refs`` ``[M, 3, H, W]``
    (both in the same range; pooled by :data:`POOL`)."""
    a = torch.nn.functional.avg_pool2d(images.float(), POOL).flatten(1)
    b = torch.nn.functional.avg_pool2d(refs.float(), POOL).flatten(1)
    return torch.cdist(a, b).pow(2) / a.shape[1]


def retrieval_accuracy(images: torch.Tensor, labels: torch.Tensor, refs: torch.Tensor) -> float:
    """Share of ``images`` whose nearest reference (:func:`image_distance`) is ``refs[label]``."""
    nearest = image_distance(images, refs).argmin(dim=1)
    return float((nearest == labels).float().mean())


def references_path() -> Path:
    """The committed strip of :func:`reference_images` (one 64x64 tile per subject, in order)."""
    return Path(__file__).resolve().parent / "demo" / "references.png"


def committed_references() -> torch.Tensor:
    """:func:`reference_images` read from :func:`references_path` (no font needed)."""
    from PIL import Image

    strip = to_tensor(Image.open(references_path()))
    return torch.stack(strip.split(SIZE, dim=2))


def write_references() -> None:
    """Render :func:`reference_images` into :func:`references_path`."""
    from PIL import Image

    strip = torch.cat(list(reference_images()), dim=2)
    array = ((strip.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
    references_path().parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(references_path())
