"""Measure the embedded model: the numbers in its model card and the README.

    python scripts/measure_base.py --model shapes --n 300 --out docs/measurements/shapes

Prompt accuracy on full and colour+shape prompts at the defaults, guidance / steps / sampler
sweeps (tables + plots), the negative-prompt effect, the held-out green triangle, and speed.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import sdlab
from sdlab.components import quiet_library_logs
from sdlab.eval import draw_prompts, evaluate, held_out_rate, negative_prompt_effect, sweep


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--out", default="docs/measurements/shapes")
    ap.add_argument("--sweeps", action="store_true")
    ap.add_argument("--seed", type=int, default=1000)
    args = ap.parse_args()
    quiet_library_logs()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = sdlab.load(args.model, device="cpu")
    d = pipe.components.defaults
    results: dict = {"model": args.model, "defaults": vars(d), "n": args.n}
    full = draw_prompts(random.Random(args.seed), args.n, "full")
    short = draw_prompts(random.Random(args.seed + 1), args.n, "color_shape")
    for name, prompts in (("full", full), ("color_shape", short)):
        r = evaluate(pipe, prompts, seed=args.seed)
        results[name] = r.to_dict(with_records=False)
        print(f"{name:<12} {r.summary()}", flush=True)
    r1 = evaluate(pipe, full, seed=args.seed, guidance_scale=1.0)
    results["full_guidance_1"] = r1.to_dict(with_records=False)
    print(f"full, guidance 1: {r1.summary()}", flush=True)
    results["negative_prompt"] = negative_prompt_effect(pipe, args.n, seed=args.seed)
    print("negative prompt:", results["negative_prompt"], flush=True)
    results["held_out"] = held_out_rate(pipe, args.n, seed=args.seed)
    print("green triangle:", results["held_out"], flush=True)
    start = time.perf_counter()
    for _ in range(3):
        pipe.generate("a red circle", seed=0, num_images=8)
    results["seconds_per_8_images"] = (time.perf_counter() - start) / 3
    print(f"8 images at defaults: {results['seconds_per_8_images']:.2f} s", flush=True)
    if args.sweeps:
        sub = full[: max(100, args.n // 2)]
        for setting, values in (("guidance_scale", [1, 2, 3, 5, 7.5, 10]),
                                ("steps", [4, 8, 12, 20, 30, 50]),
                                ("sampler", ["ddim", "euler", "euler_a", "dpm++_2m",
                                             "dpm++_2m_karras", "unipc", "heun"])):
            rows = sweep(pipe, sub, setting, values, out, seed=args.seed)
            results[f"sweep_{setting}"] = [r.flat() for r in rows]
            print(setting, [(r.value, round(r.accuracy, 3)) for r in rows], flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
