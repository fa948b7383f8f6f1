"""Model zoo: diffusers Diffusion Transformers built from configs with random weights.

``build_model(name, size)`` constructs a tiny (tests) or full-size (benchmarks) model and
``example_inputs(name, model)`` gives the kwargs of its forward call. No weights are downloaded.
``build_pipeline(name)`` (``pipelines.py``) wraps a tiny zoo transformer in a whole diffusers
pipeline (text encoders, tokenizers, VAE, scheduler), all built offline with random weights.
"""

if (
    __name__ == "models"
):  # a bare `import models` found this folder through the repository root on sys.path
    import runpy as _runpy
    from pathlib import Path as _Path

    _runpy.run_path(str(_Path(__file__).parents[1] / "xdit_compile" / "_shadow.py"))["step_aside"](
        __name__, __file__
    )
else:
    from .entry import SIZES, LatentSize, ZooEntry
    from .inputs import InputSpec
    from .pipelines import (
        PipelineInfo,
        build_pipeline,
        list_pipelines,
        pipeline_defaults,
        pipeline_info,
    )
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
        "PipelineInfo",
        "ZooEntry",
        "build_model",
        "build_pipeline",
        "example_inputs",
        "get_entry",
        "layer_overrides",
        "list_models",
        "list_pipelines",
        "pipeline_defaults",
        "pipeline_info",
        "token_frames",
        "token_rows",
    ]
