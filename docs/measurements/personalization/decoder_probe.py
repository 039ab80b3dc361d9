"""Probe of Dreambooth's decoder tune alone (UNet untouched), as dreambooth.py tunes it on the
small models (8 yellow star renders and their copies on the other backgrounds, 16 world renders a
step, latent jitter, outline-weighted loss, constant lr, 300 steps): how much does it cost the
world, and how well does it draw stars?

Measures, per variant: the base UNet's own latents for 300 full prompts (seed 5000, cached)
decoded by the tuned decoder and judged (gen_full; the base decoder: 0.907), the round trip of
200 fresh yellow star renders (star_recon, by size) and of 400 fresh world renders
(world_recon). Variants by argument, name=key:value,... (keys: tune()'s arguments):

    python docs/measurements/personalization/decoder_probe.py base A B=lr:1.5e-4 C=renders:32
    python docs/measurements/personalization/decoder_probe.py L1=lora:16,weights:none

Run from the repo root; writes runs/probe/results.json.
"""
import json, random, sys, time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, "scripts")
import sdlab
from measure_personalization import render_set
from sdlab.eval.evaluate import draw_prompts
from sdlab.shapes.judge import is_right, judge, parse_prompt
from sdlab.shapes.world import ALL_SHAPES, COLORS, render, sample_scene
from sdlab.train import data
from sdlab.train.base import images_to_tensor, outline_weighted_loss
from sdlab.train.personal import on_other_backgrounds, ImageSet

torch.set_num_threads(2)
torch.manual_seed(0)
OUT = Path("runs/probe")
OUT.mkdir(parents=True, exist_ok=True)
pipe = sdlab.load("shapes")


def fresh_vae():
    return sdlab.load("shapes").components.vae.float()


vae = pipe.components.vae.float()

# the base UNet's latents for 300 full prompts (seed 5000), cached
lat_file = OUT / "latents.pt"
prompts = draw_prompts(random.Random(5000), 300, "full")
if not lat_file.exists():
    store = []
    orig = pipe._decode
    pipe._decode = lambda z: (store.append(z.detach().clone()), orig(z))[1]
    for k in range(0, 300, 50):
        pipe.generate(prompts[k:k + 50], seed=5000 + k)
    pipe._decode = orig
    torch.save(torch.cat(store), lat_file)
gen_latents = torch.load(lat_file)
shift = getattr(vae.config, "shift_factor", None) or 0.0


def decode(z):
    with torch.no_grad():
        x = vae.decode(z.float() / vae.config.scaling_factor + shift).sample
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def encode(pixels):
    return data.encode_latents(vae, pixels, flip=False)[:, 0]


# fresh star renders (any background but yellow) and fresh world renders
rng = random.Random(777)
star_scenes = [sample_scene(rng, shapes=ALL_SHAPES, allow_held_out_combination=True, color="yellow",
                            shape="star", background=rng.choice([c for c in COLORS if c != "yellow"]))
               for _ in range(200)]
world_scenes = [sample_scene(rng) for _ in range(400)]
star_lat = encode(images_to_tensor(np.stack([render(s) for s in star_scenes])))
world_lat = encode(images_to_tensor(np.stack([render(s) for s in world_scenes])))


def scene_attrs(s):
    return {"shape": s.shape, "color": s.color, "size": s.size, "position": s.position,
            "background": s.background}


def evaluate():
    r = {}
    imgs = np.concatenate([decode(gen_latents[k:k + 50]) for k in range(0, 300, 50)])
    oks = [all(is_right(judge(im), parse_prompt(p)).values()) for im, p in zip(imgs, prompts)]
    r["gen_full"] = float(np.mean(oks))
    fails = {}
    for ok, p in zip(oks, prompts):
        if not ok:
            a = parse_prompt(p)
            key = f"{a['size']} {a['color']} {a['shape']}"
            fails[key] = fails.get(key, 0) + 1
    r["gen_fails"] = dict(sorted(fails.items(), key=lambda kv: -kv[1])[:8])
    imgs = decode(star_lat)
    st = [is_right(judge(im), {"shape": "star", "color": "yellow"}) for im in imgs]
    r["star_recon"] = float(np.mean([all(x.values()) for x in st]))
    r["star_recon_by_size"] = {sz: float(np.mean([all(x.values()) for x, s in zip(st, star_scenes)
                                                  if s.size == sz])) for sz in ("small", "large")}
    imgs = decode(world_lat)
    r["world_recon"] = float(np.mean([all(is_right(judge(im), scene_attrs(s)).values())
                                      for im, s in zip(imgs, world_scenes)]))
    return r


# the 8 instance images as measure_personalization makes them (seed 1, backgrounds not blue)
folder = render_set(OUT / "stars", "yellow", "star", {"blue"}, None, 1)
inst_pixels = torch.stack([im.pixels for im in data.load_folder(folder, 64)])  # as Session loads
inst = ImageSet(encode(inst_pixels)[:, None], [None] * 8, data.Sampler(8, 1, 3), inst_pixels[:, None])
decoded_inst = on_other_backgrounds(inst, vae)


def world_render_set(n, seed, yellow_share=0.0):
    rng = random.Random(seed)
    scenes = []
    for _ in range(n):
        if rng.random() < yellow_share:
            scenes.append(sample_scene(rng, color="yellow"))
        else:
            scenes.append(sample_scene(rng))
    px = images_to_tensor(np.stack([render(s) for s in scenes]))
    return encode(px), px


def tune(steps=300, lr=3e-4, renders=16, n_renders=256, inst_batch=8, noise=0.1, weights=(4.0, 4.0),
         inst_weight=1.0, yellow_share=0.0, seed=0, min_bbox=0, lora=0):
    global vae
    vae = fresh_vae()
    if lora:
        from peft import LoraConfig
        from sdlab.train.dreambooth import DECODER_LORA_TARGETS
        vae.requires_grad_(False)
        vae.add_adapter(LoraConfig(r=int(lora), lora_alpha=int(lora), init_lora_weights="gaussian",
                                   target_modules=DECODER_LORA_TARGETS))
    px = decoded_inst.pixels[:, 0]
    obj = (px - px[:, :, :1, :1]).abs().amax(1) > 0.1
    bbox = torch.tensor([max(int(m.any(0).sum()), int(m.any(1).sum())) for m in obj])
    keep_inst = torch.nonzero(bbox >= min_bbox)[:, 0]
    print("instance images kept", len(keep_inst), "of", len(px), flush=True)
    keep_lat, keep_px = world_render_set(int(n_renders), seed, yellow_share)
    params = list(vae.post_quant_conv.parameters()) + list(vae.decoder.parameters())
    if lora:
        params = [p for p in params if p.requires_grad]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    g = torch.Generator().manual_seed(seed)
    n_inst = decoded_inst.latents.shape[0]
    vae.train()
    for step in range(int(steps)):
        ii = keep_inst[torch.randint(0, len(keep_inst), (int(inst_batch),), generator=g)]
        ki = torch.randint(0, len(keep_lat), (int(renders),), generator=g)
        parts = [(decoded_inst.latents[ii, 0], decoded_inst.pixels[ii, 0], inst_weight),
                 (keep_lat[ki], keep_px[ki], 1.0)]
        loss = 0
        for lat, px, w in parts:
            z = lat.float() / vae.config.scaling_factor + shift
            sigma = noise * torch.rand(z.shape[0], 1, 1, 1, generator=g)
            z = z + sigma * torch.randn(z.shape, generator=g)
            out = vae.decode(z).sample
            l = outline_weighted_loss(out, px, *weights) if weights else torch.nn.functional.mse_loss(out, px)
            loss = loss + w * l * lat.shape[0]
        loss = loss / sum(p[0].shape[0] for p in parts)
        opt.zero_grad()
        loss.backward()
        opt.step()
    vae.eval()
    for p in params:
        p.requires_grad_(False)


results = {}
res_file = OUT / "results.json"
if res_file.exists():
    results = json.loads(res_file.read_text())
for arg in sys.argv[1:]:
    name, _, spec = arg.partition("=")
    kw = {}
    for item in filter(None, spec.split(",")):
        k, v = item.split(":")
        kw[k] = (None if v == "none" else float(v))
    if "weights" in kw:
        kw["weights"] = None if kw["weights"] is None else (kw["weights"], kw["weights"])
    t = time.time()
    if name != "base":
        tune(**kw)
    else:
        vae = fresh_vae()
    r = evaluate()
    r["kw"] = kw
    r["seconds"] = round(time.time() - t)
    results[name] = r
    print(name, json.dumps(r), flush=True)
    res_file.write_text(json.dumps(results, indent=1))
