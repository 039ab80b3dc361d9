"""The shipped models themselves (`shapes` and its distilled `shapes-fast`): they load through
the generic loader, and their defaults draw what prompts ask for (a self-check of the committed
weights, judged by the geometric judge)."""
from __future__ import annotations

import random

import pytest

import sdlab
from sdlab.eval import draw_prompts, evaluate
from sdlab.shapes.judge import is_right, judge, parse_prompt


@pytest.fixture(scope="module")
def shapes():
    return sdlab.load("shapes", device="cpu")


def test_embedded_model_defaults_draw_large_shapes_right(shapes):
    pipe = shapes
    d = pipe.components.defaults
    assert (d.width, d.height) == (64, 64) and d.guidance_cap is not None
    prompts = ["a large red circle in the center on a white background",
               "a large blue square in the top left on a yellow background",
               "a large black triangle in the bottom right on a green background",
               "a large orange circle in the top right on a purple background"]
    results = pipe.generate(prompts, seed=0)
    right = [all(is_right(judge(r.pixels), parse_prompt(p)).values())
             for r, p in zip(results, prompts)]
    # measured: large shapes on full prompts are right in well over 0.9 of images
    assert sum(right) >= 3, right
    assert "CFG cap: 2 below t=0.5" in results[0].params.infotext()


def test_embedded_model_follows_random_full_prompts(shapes):
    pipe = shapes
    prompts = draw_prompts(random.Random(5), 24, "full")
    # measured on 200 prompts: 0.985-0.99; 24 prompts swing by about +-0.07
    accuracy = evaluate(pipe, prompts, seed=0).accuracy
    assert accuracy >= 0.8, accuracy


def test_embedded_fast_model_draws_in_four_single_pass_steps():
    pipe = sdlab.load("shapes-fast", device="cpu")
    d = pipe.components.defaults
    assert pipe.components.unet.config.time_cond_proj_dim is not None
    assert (d.sampler, d.steps, d.guidance_embedding) == ("ddim", 4, True)
    calls = []
    hook = pipe.components.unet.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        pipe.generate(["a red circle", "a blue square", "a white triangle"], seed=0)
    finally:
        hook.remove()
    assert calls == [3] * 4  # 4 steps, one pass each: the batch is not doubled for guidance
    # measured on 200 full prompts: 0.99 and 0.98 (two prompt sets)
    accuracy = evaluate(pipe, draw_prompts(random.Random(5), 24, "full"), seed=0).accuracy
    assert accuracy >= 0.8, accuracy
