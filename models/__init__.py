"""Model zoo: diffusers Diffusion Transformers built from configs with random weights.

``build_model(name, size)`` constructs a tiny (tests) or full-size (benchmarks) model and
``example_inputs(name, model)`` gives the kwargs of its forward call. No weights are downloaded.
"""

from .entry import SIZES, LatentSize, ZooEntry
from .inputs import InputSpec
from .zoo import (
    build_model,
    example_inputs,
    get_entry,
    layer_overrides,
    list_models,
    token_frames,
    token_rows,
)

__all__ = [
    "SIZES",
    "InputSpec",
    "LatentSize",
    "ZooEntry",
    "build_model",
    "example_inputs",
    "get_entry",
    "layer_overrides",
    "list_models",
    "token_frames",
    "token_rows",
]
