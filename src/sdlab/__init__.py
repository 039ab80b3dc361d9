"""sdlab: Stable Diffusion taken apart and put back together.

    import sdlab
    pipe = sdlab.load("shapes")                 # or a model folder, .safetensors, hub id
    [result] = pipe.generate("a red circle on a white background", seed=1)
    result.image.save("circle.png")
"""
from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from sdlab.generate import Pipeline


def load(model: str = "shapes", device: str = "auto", dtype: str | None = None, *,
         safety_checker: bool = True, prediction_type: str | None = None) -> "Pipeline":
    """Load a model (embedded name, diffusers folder, single-file checkpoint or cached hub id)
    and return a Pipeline with generate(), img2img() and loopback()."""
    from sdlab.components import load as load_components
    from sdlab.generate import Pipeline
    return Pipeline(load_components(model, device=device, dtype=dtype,
                                    safety_checker=safety_checker, prediction_type=prediction_type))
