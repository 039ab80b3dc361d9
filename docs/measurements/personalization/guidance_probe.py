"""How a Dreambooth model's star rates (and, with --full, full-prompt accuracy) move with the
guidance scale and the guidance cap: background-copies-2026-12-02.json beside this file.

    python docs/measurements/personalization/guidance_probe.py runs/p42/dreambooth 5/2 7.5/3 7.5/inf --full
"""
from __future__ import annotations

import argparse
import collections
import random

import sdlab
from sdlab.eval.evaluate import draw_prompts, evaluate
from sdlab.shapes.judge import is_right, judge, parse_prompt

PROMPTS = {"a yellow sks on a blue background": "a yellow star on a blue background",
           "a yellow sks": "a yellow star"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("settings", nargs="+", help="W/CAP pairs (cap 'inf': none)")
    p.add_argument("--n", type=int, default=48, help="seeds per prompt (0..n-1)")
    p.add_argument("--full", action="store_true", help="also 256 full prompts (seed 0)")
    args = p.parse_args()
    pipe = sdlab.load(args.model)
    for spec in args.settings:
        w, cap = (float(x) for x in spec.split("/"))
        st = {"guidance_scale": w, "guidance_cap": cap}
        line = f"w {w:g} cap {cap:g}"
        if args.full:
            prompts = draw_prompts(random.Random(0), 256, "full")
            line += f" | full {evaluate(pipe, prompts, seed=0, **st).accuracy:.3f}"
        for prompt, plain in PROMPTS.items():
            wanted = parse_prompt(plain)
            seen = [judge(r.image) for r in pipe.generate([prompt] * args.n, seed=0, **st)]
            rate = sum(all(is_right(j, wanted).values()) for j in seen) / args.n
            sizes = collections.Counter(j.size for j in seen)
            line += f" | {prompt!r} {rate:.2f} (sizes {dict(sizes)})"
        print(line, flush=True)


if __name__ == "__main__":
    main()
