"""Measure candidate defaults of `shapes`: steps and guidance cap, on two prompt sets."""
import json, random, sys, time
import sdlab
from sdlab.components import quiet_library_logs
from sdlab.eval import draw_prompts, evaluate, held_out_rate, negative_prompt_effect
quiet_library_logs()
steps, cap, seed = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
guidance = float(sys.argv[4]) if len(sys.argv) > 4 else 3.0
below = float(sys.argv[5]) if len(sys.argv) > 5 else 0.6
pipe = sdlab.load("shapes", device="cpu")
d = pipe.components.defaults
d.steps, d.guidance_cap, d.guidance_scale, d.guidance_cap_below = steps, cap, guidance, below
res = {"steps": steps, "cap": cap, "seed": seed, "guidance": guidance, "cap_below": below}
full = draw_prompts(random.Random(seed), 200, "full")
cs = draw_prompts(random.Random(seed + 1), 200, "color_shape")
for name, prompts, kw in (("full", full, {}), ("color_shape", cs, {}), ("full_guidance_1", full, {"guidance_scale": 1.0})):
    if name == "full_guidance_1":
        continue
    r = evaluate(pipe, prompts, seed=seed, **kw)
    res[name] = {"accuracy": r.accuracy, "attrs": r.attribute_accuracy, "fd": r.frechet}
    print(steps, cap, seed, guidance, below, name, r.summary(), flush=True)
res["negative_prompt"] = negative_prompt_effect(pipe, 200, seed=seed)
print(steps, cap, seed, guidance, below, "negative", res["negative_prompt"], flush=True)
res["held_out"] = held_out_rate(pipe, 200, seed=seed)
print(steps, cap, seed, guidance, below, "green triangle", res["held_out"], flush=True)
ts = []
for _ in range(5):
    t = time.perf_counter(); pipe.generate("a red circle", seed=0, num_images=8); ts.append(time.perf_counter() - t)
res["seconds_8_images_median"] = sorted(ts)[2]
print(steps, cap, seed, guidance, below, "8 images", sorted(ts), flush=True)
with open(f"/work/main/runs/defaults-{steps}-{cap}-{seed}-{guidance}-{below}.json", "w") as f:
    json.dump(res, f, indent=1)
