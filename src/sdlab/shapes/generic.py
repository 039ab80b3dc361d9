"""Generic shapes for training the VAE as a general image codec, outside the captioned world.

Stable Diffusion's VAE was trained on broad image data, so it can draw a concept the UNet has never
seen; that is what Dreambooth relies on. A VAE trained only on circles, squares and triangles turns
a star into a blob. These images are random polygons (convex and concave, 3 to 12 vertices, each
at its own radius) and rotated ellipses in palette colours. They carry no captions, and never the
spec's held-out shapes: no five-pointed star of inner ratio 0.45, no annulus (nothing has a hole).
"""
from __future__ import annotations

import math
import random

import numpy as np

from sdlab.shapes.world import CANVAS, COLORS, PALETTE, SUPERSAMPLE, STAR_INNER_RATIO, _inside_polygon


def random_polygon(rng: random.Random, cx: float, cy: float, radius: float) -> np.ndarray:
    """3-12 vertices at jittered angles, each at a radius drawn from [0.3, 1] * radius."""
    while True:
        n = rng.randint(3, 12)
        step = 2 * math.pi / n
        start = rng.uniform(0, 2 * math.pi)
        angles = np.array([start + i * step + rng.uniform(-0.3, 0.3) * step for i in range(n)])
        radii = np.array([radius * rng.uniform(0.3, 1.0) for _ in range(n)])
        if not _is_spec_star(n, radii):
            break
    return np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)


def _is_spec_star(n: int, radii: np.ndarray) -> bool:
    """A ten-vertex polygon alternating two radii near the star's ratio is redrawn, so the
    held-out shape stays held out even by chance."""
    if n != 10:
        return False
    outer, inner = radii[0::2], radii[1::2]
    if outer.mean() < inner.mean():
        outer, inner = inner, outer
    ratio = inner.mean() / outer.mean()
    return bool(outer.std() < 0.15 * outer.mean() and abs(ratio - STAR_INNER_RATIO) < 0.2)


def render_generic(rng: random.Random) -> np.ndarray:
    """One 64 x 64 x 3 uint8 image: a random polygon or ellipse on a solid palette background."""
    n = CANVAS * SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / SUPERSAMPLE
    x, y = np.meshgrid(coords, coords)
    color, background = rng.sample(COLORS, 2)
    side = rng.uniform(10, 40)
    cx, cy = rng.uniform(side / 2 + 2, CANVAS - side / 2 - 2), rng.uniform(side / 2 + 2, CANVAS - side / 2 - 2)
    if rng.random() < 0.75:
        hit = _inside_polygon(x, y, random_polygon(rng, cx, cy, side / 2))
    else:
        a, b = side / 2, side / 2 * rng.uniform(0.3, 1.0)
        theta = rng.uniform(0, math.pi)
        u = (x - cx) * math.cos(theta) + (y - cy) * math.sin(theta)
        v = -(x - cx) * math.sin(theta) + (y - cy) * math.cos(theta)
        hit = (u / a) ** 2 + (v / b) ** 2 <= 1
    cover = hit.reshape(CANVAS, SUPERSAMPLE, CANVAS, SUPERSAMPLE).mean(axis=(1, 3))[..., None]
    fg, bg = np.array(PALETTE[color], float), np.array(PALETTE[background], float)
    return np.rint(cover * fg + (1 - cover) * bg).astype(np.uint8)


def render_generic_set(n: int, seed: int) -> np.ndarray:
    rng = random.Random(seed)
    return np.stack([render_generic(rng) for _ in range(n)])
