"""The Shapes world (../shared/shapes-spec.md): rendering, captions, datasets and a judge."""
from sdlab.shapes.world import (
    BASE_SHAPES, COLORS, HELD_OUT_SHAPES, PALETTE, POSITIONS, SIZES, Scene, caption, render,
    sample_scene,
)

__all__ = ["BASE_SHAPES", "COLORS", "HELD_OUT_SHAPES", "PALETTE", "POSITIONS", "SIZES", "Scene",
           "caption", "render", "sample_scene"]
