"""The renderer follows ../shared/shapes-spec.md to the letter."""
from __future__ import annotations

import random

import numpy as np
import pytest

from sdlab.errors import InputError
from sdlab.shapes.world import (
    ALL_SHAPES, PALETTE, POSITIONS, SIZES, Scene, caption, object_mask, random_caption, render,
    sample_scene, tag_caption,
)


def test_palette_values():
    assert PALETTE["red"] == (220, 30, 30) and PALETTE["orange"] == (245, 130, 20)
    assert PALETTE["yellow"] == (245, 225, 40) and PALETTE["green"] == (30, 170, 60)
    assert PALETTE["blue"] == (40, 80, 220) and PALETTE["purple"] == (140, 50, 190)
    assert PALETTE["white"] == (245, 245, 245) and PALETTE["black"] == (20, 20, 20)


def test_background_and_object_colours_are_exact():
    scene = Scene("square", "red", "large", "center", "blue", 32, (32, 32))
    img = render(scene)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert tuple(img[0, 0]) == PALETTE["blue"]
    assert tuple(img[32, 32]) == PALETTE["red"]


def test_square_bounding_box_and_centre():
    img = render(Scene("square", "white", "large", "top left", "black", 32, (18, 18)))
    covered = np.argwhere(img[..., 0] > 132)  # more than half covered
    (y0, x0), (y1, x1) = covered.min(0), covered.max(0)
    assert (x1 - x0 + 1, y1 - y0 + 1) == (32, 32)
    assert ((x0 + x1 + 1) / 2, (y0 + y1 + 1) / 2) == (18, 18)


def test_anti_aliasing_is_4x_box_average():
    # a square edge at a half pixel covers exactly half of the 4x4 block
    cover = object_mask("square", 15, (32, 32))
    assert cover.max() == 1.0 and set(np.unique(cover)) <= {0.0, 0.5, 0.25, 1.0}
    circle = object_mask("circle", 32, (32, 32))
    assert np.unique(circle).size > 5  # partial coverage along the rim
    assert abs(circle.sum() - np.pi * 16**2) < 4


def test_shapes_geometry():
    triangle = object_mask("triangle", 32, (32, 32))
    assert triangle[17:19, 31:33].mean() > 0.3 and triangle[17, 17] == 0  # apex at top middle
    assert triangle[47, 17:47].min() > 0.5  # base along the bottom
    ring = object_mask("ring", 32, (32, 32))
    assert ring[32, 32] == 0 and ring[32, 20] == 1  # hole of diameter size/2
    star = object_mask("star", 32, (32, 32))
    assert star[17, 32] > 0.2 and star[20, 20] == 0  # one point straight up
    assert 0.25 < star.sum() / 32**2 < 0.45


def test_jitter_ranges():
    rng = random.Random(0)
    scenes = [sample_scene(rng, shapes=ALL_SHAPES) for _ in range(2000)]
    for s in scenes:
        assert abs(s.side - SIZES[s.size]) <= 2
        px, py = POSITIONS[s.position]
        assert abs(s.center[0] - px) <= 3 and abs(s.center[1] - py) <= 3
        assert s.color != s.background
    assert {s.side - SIZES[s.size] for s in scenes} == {-2, -1, 0, 1, 2}


def test_held_out_rules():
    rng = random.Random(1)
    base = [sample_scene(rng) for _ in range(3000)]
    assert not any(s.color == "green" and s.shape == "triangle" for s in base)
    assert not any(s.shape in ("star", "ring") for s in base)
    with pytest.raises(InputError):
        sample_scene(rng, color="green", shape="triangle")
    s = sample_scene(rng, color="green", shape="triangle", allow_held_out_combination=True)
    assert (s.color, s.shape) == ("green", "triangle")


def test_captions():
    s = Scene("square", "orange", "small", "top left", "white", 16, (18, 18))
    assert caption(s) == "a small orange square in the top left on a white background"
    assert caption(s, size=False, position=False, background=False) == "an orange square"
    t = Scene("circle", "red", "large", "center", "orange", 32, (32, 32))
    assert caption(t, size=False, position=False) == "a red circle on an orange background"
    rng = random.Random(0)
    assert len({random_caption(t, rng) for _ in range(200)}) == 8  # every clause subset


def test_tag_captions_name_only_what_the_scene_has():
    t = Scene("circle", "red", "large", "center", "blue", 32, (32, 32))
    rng = random.Random(0)
    tags = [tag_caption(t, rng) for _ in range(500)]
    allowed = {"red", "circle", "large", "center", "blue background", "blue"}
    for text in tags:
        words = text.split(", ")
        assert 1 <= len(words) <= 3 and len(set(words)) == len(words)
        assert set(words) <= allowed, text
    assert "blue" in tags and "red" in tags  # a bare colour names object or background


def test_invalid_scene():
    with pytest.raises(InputError):
        Scene("hexagon", "red", "large", "center", "blue", 32, (32, 32))
    with pytest.raises(InputError):
        Scene("circle", "red", "large", "center", "red", 32, (32, 32))
