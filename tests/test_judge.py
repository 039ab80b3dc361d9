"""The geometric judge and the evaluator, against real renders and fake pipelines (no model)."""
from __future__ import annotations

import csv
import itertools
import random
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image

from sdlab.eval import (
    draw_prompts, evaluate, frechet_distance, held_out_rate, judge_self_check,
    negative_prompt_effect, sweep,
)
from sdlab.shapes.judge import ATTRIBUTES, is_right, judge, parse_prompt
from sdlab.shapes.world import ALL_SHAPES, PALETTE, Scene, caption, render, sample_scene


def _scenes(n: int, seed: int) -> list[Scene]:
    rng = random.Random(seed)
    return [sample_scene(rng, shapes=ALL_SHAPES, allow_held_out_combination=True)
            for _ in range(n)]


def _attribute_accuracy(scenes: list[Scene], images: list[np.ndarray]) -> dict[str, float]:
    seen = [judge(img) for img in images]
    return {a: np.mean([getattr(j, a) == getattr(s, a) for j, s in zip(seen, scenes)])
            for a in ATTRIBUTES}


# ------------------------------------------------------------------------------------- the judge

def test_judge_reads_renders_of_all_shapes():
    scenes = _scenes(300, seed=1)
    assert set(s.shape for s in scenes) == set(ALL_SHAPES)
    accuracy = _attribute_accuracy(scenes, [render(s) for s in scenes])
    assert all(v >= 0.99 for v in accuracy.values()), accuracy


def test_judge_is_robust_to_noise():
    scenes = _scenes(300, seed=2)
    noise = np.random.default_rng(2)
    images = [np.clip(render(s) + noise.normal(0, 10, (64, 64, 3)), 0, 255).astype(np.uint8)
              for s in scenes]
    accuracy = _attribute_accuracy(scenes, images)
    assert all(v >= 0.97 for v in accuracy.values()), accuracy


def test_judge_takes_pil_images_and_other_sizes():
    scene = Scene("star", "yellow", "large", "center", "purple", 32, (32, 32))
    image = Image.fromarray(render(scene))
    assert judge(image).attributes() == judge(render(scene)).attributes()
    big = judge(image.resize((128, 128), Image.Resampling.NEAREST))
    assert (big.shape, big.color, big.size, big.position) == ("star", "yellow", "large", "center")


def test_flat_image_has_no_object_and_is_wrong():
    flat = np.full((64, 64, 3), PALETTE["white"], dtype=np.uint8)
    j = judge(flat)
    assert j.background == "white" and not j.found
    assert (j.shape, j.color, j.size, j.position) == (None, None, None, None)
    assert np.isfinite(j.features).all()
    right = is_right(j, parse_prompt("a small red circle in the center on a white background"))
    assert right == {"size": False, "color": False, "shape": False, "position": False,
                     "background": True}
    assert not judge(np.zeros((64, 64, 3), dtype=np.uint8)).found  # pure black, off-palette


def test_specks_are_ignored():
    scene = Scene("square", "red", "small", "top left", "white", 16, (18, 18))
    image = render(scene)
    image[50, 50] = PALETTE["blue"]  # one stray pixel far from the object
    j = judge(image)
    assert (j.shape, j.color, j.size, j.position) == ("square", "red", "small", "top left")


# ------------------------------------------------------------------------------------- prompts

def test_parse_prompt_round_trips_every_clause_combination():
    for scene in _scenes(40, seed=3):
        for size, position, background in itertools.product((False, True), repeat=3):
            text = caption(scene, size=size, position=position, background=background)
            stated = parse_prompt(text)
            expected = {"color": scene.color, "shape": scene.shape}
            expected |= {"size": scene.size} if size else {}
            expected |= {"position": scene.position} if position else {}
            expected |= {"background": scene.background} if background else {}
            assert stated == expected, text


def test_parse_prompt_articles_and_errors():
    assert parse_prompt("an orange ring in the bottom right on a white background") == {
        "color": "orange", "shape": "ring", "position": "bottom right", "background": "white"}
    assert parse_prompt("an orange square") == {"color": "orange", "shape": "square"}
    assert parse_prompt("A Large red circle.") == {"size": "large", "color": "red",
                                                   "shape": "circle"}
    for bad in ("a pink circle", "a red hexagon", "a red circle in the middle", "red circle",
                "a circle", "a red circle on a red background", ""):
        with pytest.raises(ValueError):
            parse_prompt(bad)


def test_draw_prompts_kinds():
    rng = random.Random(0)
    full = draw_prompts(rng, 200, "full")
    assert all(len(parse_prompt(p)) == 5 for p in full)
    assert all(len(parse_prompt(p)) == 2 for p in draw_prompts(rng, 50, "color_shape"))
    mixed = [parse_prompt(p) for p in draw_prompts(rng, 200, "mixed")]
    assert {len(s) for s in mixed} == {2, 3, 4, 5}
    for s in map(parse_prompt, full):
        assert (s["color"], s["shape"]) != ("green", "triangle")
        assert s["shape"] in ("circle", "square", "triangle") and s["color"] != s["background"]
    with pytest.raises(ValueError):
        draw_prompts(rng, 1, "some")


# --------------------------------------------------------------------------------------- frechet

def test_frechet_distance():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 14))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, a + 0.5) == pytest.approx(14 * 0.25, rel=1e-6)
    assert frechet_distance(a, rng.normal(scale=2.0, size=(200, 14))) > 5
    singular = np.zeros((20, 14))
    singular[:, 0] = np.arange(20)
    assert frechet_distance(singular, singular) == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------------------- fake pipelines

@dataclass
class _Params:
    prompt: str
    seed: int


@dataclass
class _Result:
    image: Image.Image
    params: _Params


class _FakePipe:
    """Renders, for each prompt, a real scene of what it states (faithful) or any scene (random);
    `blue_unless_negative` makes every image blue unless the negative prompt says "blue"."""

    def __init__(self, faithful: bool = True, blue_unless_negative: bool = False):
        self.faithful, self.blue_unless_negative = faithful, blue_unless_negative
        self.calls: list[dict] = []

    def generate(self, *, prompt, seed=0, negative_prompt="", **settings):
        self.calls.append({"n": len(prompt), "seed": seed, "negative_prompt": negative_prompt,
                           **settings})
        results = []
        for i, text in enumerate(prompt):
            rng = random.Random(seed + i)
            if self.blue_unless_negative:
                fixed = {"color": "blue"} if negative_prompt != "blue" else {"color": "red",
                                                                            "background": "white"}
            else:
                fixed = parse_prompt(text) if self.faithful else {}
            scene = sample_scene(rng, shapes=ALL_SHAPES, allow_held_out_combination=True, **fixed)
            results.append(_Result(Image.fromarray(render(scene)), _Params(text, seed + i)))
        return results


def test_evaluate_faithful_pipe_is_right_and_random_pipe_is_not():
    prompts = draw_prompts(random.Random(5), 60, "mixed")
    pipe = _FakePipe(faithful=True)
    good = evaluate(pipe, prompts, seed=100, chunk=25, steps=10, sampler=None)
    assert good.accuracy == 1.0 and good.n == 60
    assert set(good.attribute_accuracy) == set(ATTRIBUTES)
    assert all(v == 1.0 for v in good.attribute_accuracy.values())
    assert [c["n"] for c in pipe.calls] == [25, 25, 10]
    assert [c["seed"] for c in pipe.calls] == [100, 125, 150]
    assert all(c["steps"] == 10 and "sampler" not in c for c in pipe.calls)
    assert [r.seed for r in good.records] == list(range(100, 160))

    bad = evaluate(_FakePipe(faithful=False), prompts, seed=100)
    assert bad.accuracy < 0.3
    assert bad.frechet > good.frechet
    assert not all(r.ok for r in bad.records)
    assert "accuracy=" in bad.summary() and "records" in bad.to_dict()


def test_sweep_writes_csv_md_png(tmp_path):
    prompts = draw_prompts(random.Random(6), 8, "full")
    rows = sweep(_FakePipe(), prompts, "guidance", [1.0, 3.0], tmp_path, steps=5)
    assert [r.value for r in rows] == [1.0, 3.0] and all(r.accuracy == 1.0 for r in rows)
    with (tmp_path / "sweep_guidance_scale.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == 2 and float(table[1]["value"]) == 3.0
    assert "| guidance_scale |" in (tmp_path / "sweep_guidance_scale.md").read_text()
    assert (tmp_path / "sweep_guidance_scale.png").stat().st_size > 1000
    with pytest.raises(ValueError):
        sweep(_FakePipe(), prompts, "eta", [1], tmp_path)


def test_negative_prompt_and_held_out_checks():
    effect = negative_prompt_effect(_FakePipe(blue_unless_negative=True), n=6, seed=0)
    assert effect["blue_share_without"] == 1.0 and effect["blue_share_with"] == 0.0
    assert effect["relative_drop"] == 1.0
    held = held_out_rate(_FakePipe(), n=6, seed=0)
    assert held["rate"] == held["color_rate"] == held["shape_rate"] == 1.0


def test_judge_self_check():
    check = judge_self_check(n=50, seed=7)
    assert check["accuracy"] >= 0.99 and set(check["attribute_accuracy"]) == set(ATTRIBUTES)
