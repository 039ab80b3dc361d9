"""The Shapes world exactly as ../shared/shapes-spec.md fixes it.

Rendering samples every pixel centre of a 4x (256 x 256) canvas against the exact geometry of the
object, then averages each 4 x 4 block: the spec's anti-aliasing, with no drawing-library rounding.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

import numpy as np

from sdlab.errors import InputError

CANVAS = 64
SUPERSAMPLE = 4

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 130, 20),
    "yellow": (245, 225, 40),
    "green": (30, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 50, 190),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLORS = tuple(PALETTE)
SIZES: dict[str, int] = {"small": 16, "large": 32}
SIZE_JITTER = 2
POSITIONS: dict[str, tuple[int, int]] = {
    "center": (32, 32),
    "top left": (18, 18),
    "top right": (46, 18),
    "bottom left": (18, 46),
    "bottom right": (46, 46),
}
POSITION_JITTER = 3
BASE_SHAPES = ("circle", "square", "triangle")
HELD_OUT_SHAPES = ("star", "ring")
ALL_SHAPES = BASE_SHAPES + HELD_OUT_SHAPES
HELD_OUT_COMBINATION = ("green", "triangle")
STAR_INNER_RATIO = 0.45


@dataclass(frozen=True)
class Scene:
    """One image of the world: its named attributes and the jittered geometry actually drawn."""

    shape: str
    color: str
    size: str
    position: str
    background: str
    side: int  # bounding-box side in pixels, jitter included
    center: tuple[int, int]  # bounding-box centre (x, y), jitter included

    def __post_init__(self) -> None:
        if self.shape not in ALL_SHAPES:
            raise InputError(f"unknown shape {self.shape!r}; valid: {', '.join(ALL_SHAPES)}")
        for c in (self.color, self.background):
            if c not in PALETTE:
                raise InputError(f"unknown colour {c!r}; valid: {', '.join(COLORS)}")
        if self.color == self.background:
            raise InputError("object and background must differ in colour")


def sample_scene(rng: random.Random, *, shapes: tuple[str, ...] = BASE_SHAPES,
                 allow_held_out_combination: bool = False, **fixed: str) -> Scene:
    """Draw a scene uniformly over the attributes not given in `fixed`, with the spec's jitter."""
    while True:
        shape = fixed.get("shape") or rng.choice(shapes)
        color = fixed.get("color") or rng.choice(COLORS)
        background = fixed.get("background") or rng.choice([c for c in COLORS if c != color])
        if color == background:
            raise InputError("object and background must differ in colour")
        if not allow_held_out_combination and (color, shape) == HELD_OUT_COMBINATION:
            if "color" in fixed and "shape" in fixed:
                raise InputError("green triangle is held out of the base training set")
            continue
        size = fixed.get("size") or rng.choice(tuple(SIZES))
        position = fixed.get("position") or rng.choice(tuple(POSITIONS))
        side = SIZES[size] + rng.randint(-SIZE_JITTER, SIZE_JITTER)
        px, py = POSITIONS[position]
        center = (px + rng.randint(-POSITION_JITTER, POSITION_JITTER),
                  py + rng.randint(-POSITION_JITTER, POSITION_JITTER))
        return Scene(shape, color, size, position, background, side, center)


def _star_vertices(cx: float, cy: float, outer: float) -> np.ndarray:
    inner = STAR_INNER_RATIO * outer
    angles = -math.pi / 2 + np.arange(10) * math.pi / 5  # first point straight up (y grows down)
    radii = np.where(np.arange(10) % 2 == 0, outer, inner)
    return np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)


def _inside_polygon(x: np.ndarray, y: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Even-odd ray casting, vectorised over points."""
    inside = np.zeros(x.shape, dtype=bool)
    for (x1, y1), (x2, y2) in zip(vertices, np.roll(vertices, -1, axis=0)):
        crosses = (y1 > y) != (y2 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at_y = x1 + (y - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (x < x_at_y)
    return inside


def object_mask(shape: str, side: float, center: tuple[float, float], *,
                canvas: int = CANVAS, supersample: int = SUPERSAMPLE) -> np.ndarray:
    """Coverage of the object in [0, 1] per output pixel (anti-aliased by supersampling)."""
    n = canvas * supersample
    coords = (np.arange(n) + 0.5) / supersample  # pixel centres of the 4x canvas, in 64-px units
    x, y = np.meshgrid(coords, coords)
    cx, cy = center
    half = side / 2
    dx, dy = x - cx, y - cy
    if shape == "circle":
        hit = dx**2 + dy**2 <= half**2
    elif shape == "square":
        hit = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    elif shape == "triangle":
        top, bottom = cy - half, cy + half
        hit = (y >= top) & (y <= bottom) & (np.abs(dx) <= (y - top) / side * half)
    elif shape == "star":
        hit = _inside_polygon(x, y, _star_vertices(cx, cy, half))
    elif shape == "ring":
        r2 = dx**2 + dy**2
        hit = (r2 <= half**2) & (r2 >= (half / 2) ** 2)
    else:
        raise InputError(f"unknown shape {shape!r}")
    return hit.reshape(canvas, supersample, canvas, supersample).mean(axis=(1, 3))


def render(scene: Scene) -> np.ndarray:
    """The scene as a 64 x 64 x 3 uint8 sRGB array."""
    cover = object_mask(scene.shape, scene.side, scene.center)[..., None]
    fg = np.array(PALETTE[scene.color], dtype=np.float64)
    bg = np.array(PALETTE[scene.background], dtype=np.float64)
    return np.rint(cover * fg + (1 - cover) * bg).astype(np.uint8)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene, *, size: bool = True, position: bool = True,
            background: bool = True) -> str:
    """`a {size} {color} {shape} in the {position} on a {background} background`, clauses optional."""
    noun_phrase = " ".join(([scene.size] if size else []) + [scene.color, scene.shape])
    text = f"{_article(noun_phrase)} {noun_phrase}"
    if position:
        text += f" in the {scene.position}"
    if background:
        text += f" on {_article(scene.background)} {scene.background} background"
    return text


def random_caption(scene: Scene, rng: random.Random, keep: float = 0.5) -> str:
    """A caption keeping each optional clause with probability `keep` (the grammar's variety)."""
    return caption(scene, size=rng.random() < keep, position=rng.random() < keep,
                   background=rng.random() < keep)


def tag_caption(scene: Scene, rng: random.Random) -> str:
    """A few of the scene's words as a comma-separated tag list, in random order (`blue, circle`,
    `small, red background`). Outside the spec's grammar on purpose: it teaches the model what a
    lone word means, which is what a negative prompt such as `blue` is. A bare colour may name
    the background too, so that `blue` means blue anywhere in the image."""
    background = f"{scene.background} background" if rng.random() < 0.5 else scene.background
    words = [scene.color, scene.shape, scene.size, scene.position, background]
    picked = rng.sample(words, rng.randint(1, 3))
    return ", ".join(picked)


def with_jitter_removed(scene: Scene) -> Scene:
    """The same scene at its nominal size and position (used by tests and diagrams)."""
    return replace(scene, side=SIZES[scene.size], center=POSITIONS[scene.position])
