"""Guidance scale / interval-guidance cap settings side by side, on the same prompts and seeds:
full-prompt and colour+shape accuracy, and the share of `a circle` images with blue without and
with `--negative-prompt blue`. One JSON line per setting. The shapes model's defaults were
chosen with it (docs/measurements/shapes/shapes16-2026-12-02.json).

    python scripts/sweep_guidance.py shapes 1000 200 3,1.5,0.5 4,1.5,0.5 5,2,0.5
        # model, prompt/image seed, prompts per set, then GUIDANCE,CAP,CAP_BELOW per setting
"""
from __future__ import annotations

import dataclasses
import json
import random
import sys

import sdlab
from sdlab.components import quiet_library_logs
from sdlab.eval import draw_prompts, evaluate, negative_prompt_effect


def main() -> None:
    if len(sys.argv) < 5:
        sys.exit(__doc__)
    model, seed, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    settings = [tuple(map(float, s.split(","))) for s in sys.argv[4:]]
    quiet_library_logs()
    pipe = sdlab.load(model, device="cpu")
    full = draw_prompts(random.Random(seed), n, "full")
    color_shape = draw_prompts(random.Random(seed + 1), n, "color_shape")
    defaults = pipe.components.defaults
    for guidance, cap, below in settings:
        # the cap's start is a model default, not a generate() argument
        pipe.components.defaults = dataclasses.replace(defaults, guidance_cap_below=below)
        kw = {"guidance_scale": guidance, "guidance_cap": cap}
        negative = negative_prompt_effect(pipe, n, seed=seed, **kw)
        print(json.dumps({"g": guidance, "cap": cap, "below": below,
                          "full": evaluate(pipe, full, seed=seed, **kw).accuracy,
                          "color_shape": evaluate(pipe, color_shape, seed=seed, **kw).accuracy,
                          "blue_without": negative["blue_share_without"],
                          "blue_with": negative["blue_share_with"],
                          "drop": negative["relative_drop"]}), flush=True)


if __name__ == "__main__":
    main()
