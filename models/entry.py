"""The records of the model zoo: :class:`ZooEntry` (one model) and :class:`LatentSize` (the
default example-input geometry of one config size).

They live apart from the registry (``zoo.py``) so that every file of entries (``zoo.py``,
``zoo_joint.py``) can build them without importing the registry itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .inputs import InputBuilder

__all__ = ["SIZES", "LatentSize", "ZooEntry"]

#: The two config sizes every entry provides.
SIZES: tuple[str, ...] = ("tiny", "full")


@dataclass(frozen=True, kw_only=True)
class LatentSize:
    """Default example-input geometry of one config size, in latent pixels.

    ``height``/``width`` give token rows divisible by 4 (image models; video models at ``full``
    size use their published resolution); ``uneven_height``/``uneven_width`` give token rows
    divisible by neither 2 nor 4. ``frames`` is the video length in latent frames as the model
    sees them (``None`` for images; for Latte the model config's ``video_length`` is used
    instead) and ``uneven_frames`` the odd frame count of the uneven input (``None``: same as
    ``frames``). ``text_len`` is the main text sequence length (``None`` where the model has no
    text or fixes it in its config).
    """

    height: int
    width: int
    uneven_height: int
    uneven_width: int
    frames: int | None = None
    uneven_frames: int | None = None
    text_len: int | None = None


@dataclass(frozen=True, kw_only=True)
class ZooEntry:
    """One model of the zoo.

    ``tiny`` and ``full`` are constructor kwargs of the diffusers class ``cls_name``.
    ``input_builder`` makes ``example_inputs``; ``sizes`` holds the default input geometry per
    size; ``video`` marks video inputs (frames); ``layout`` names the dims of ``hidden_states``
    (``BCHW``, ``BCFHW``, ``BFCHW`` or ``BSC`` for packed ``[B, tokens, channels]`` latents);
    ``row_patch`` is the latent pixels per token row where it is not the config's
    ``patch_size`` (packed latents: 2); ``check_config`` (optional) rejects configs the class
    accepts but cannot run (raises ``ValueError``).
    """

    name: str
    cls_name: str
    tiny: dict[str, Any]
    full: dict[str, Any]
    description: str
    input_builder: InputBuilder
    sizes: dict[str, LatentSize]
    video: bool = False
    layout: str = "BCHW"
    row_patch: int | None = None
    check_config: Callable[[dict[str, Any]], None] | None = field(default=None, repr=False)
    group: str = "zoo"
    """``"zoo"``: verified by the test suite; ``"coverage"``: measured by
    ``benchmarks/coverage.py``."""
    uneven_config: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per size, config overrides that ``build_model(..., uneven=True)`` applies (for models
    whose uneven input needs another config, e.g. Latte's frame count is its video_length)."""
    # Pipeline facts the transformer's config does not state (the planner's zoo workloads):
    vae_spatial: int = 8
    """Pixels per latent pixel of the pipeline's VAE, per side."""
    vae_temporal: int = 4
    """Video frames per latent frame of the VAE (1: no temporal compression)."""
    cfg_in_batch: bool = True
    """The pipeline runs classifier-free guidance as two batch halves (guidance-distilled
    models do not)."""
    steps: int = 50
    """The pipeline's default denoising steps."""
    pipefusion_refused: str = ""
    """What PipeFusion's refusal of this model names (an op that mixes patches), or "" where
    ``pipefusion=2`` compiles with no sharding break (checked by tests/test_displaced_zoo.py for
    the ``"zoo"`` group)."""

    def config(self, size: str = "tiny") -> dict[str, Any]:
        """A fresh copy of the constructor kwargs of ``size`` (``"tiny"`` or ``"full"``)."""
        if size == "tiny":
            return dict(self.tiny)
        if size == "full":
            return dict(self.full)
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")

    def latent_size(self, size: str = "tiny") -> LatentSize:
        """Default input geometry of ``size``."""
        if size not in self.sizes:
            raise ValueError(f"size must be one of {SIZES}, got {size!r}")
        return self.sizes[size]
