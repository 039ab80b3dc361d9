"""Probe of a VAE tune on the 16x16-latent `shapes` (2026-12-02), UNet untouched: the decoder
(and with enc_lr > 0 the encoder, the world renders' latents held to the base encoder's by
`anchor` x their squared error) learns to reconstruct the 8 instance star renders (seed 1, as
measure_personalization makes them) and their copies on the other backgrounds, beside 16 world
renders a step; outline-weighted loss, latent jitter up to 0.1, 300 steps, decoder lr 3e-4.

Measures: the base UNet's own latents for 300 full prompts (seed 5000, cached) through the tuned
decoder (gen_full), the round trip of 200 fresh yellow star renders by size (star_small,
star_large), of 400 fresh world renders (world_recon), and how far the world latents moved
(RMS change / their std).

    python docs/measurements/personalization/vae_probe.py base steps:0
    python docs/measurements/personalization/vae_probe.py E1 steps:300,enc_lr:1e-4,anchor:10
    python docs/measurements/personalization/vae_probe.py D1 steps:300,enc_lr:0
"""
import json, random, sys, time
from pathlib import Path
import numpy as np, torch
sys.path.insert(0, "scripts")
import sdlab
from measure_personalization import render_set
from sdlab.shapes.judge import is_right, judge, parse_prompt
from sdlab.eval.evaluate import draw_prompts
from sdlab.shapes.world import ALL_SHAPES, COLORS, render, sample_scene
from sdlab.train import data
from sdlab.train.base import images_to_tensor, outline_weighted_loss
from sdlab.train.personal import on_other_backgrounds, ImageSet
torch.set_num_threads(2); torch.manual_seed(0)
OUT = Path("runs/probe")
name = sys.argv[1]
kw = {k: float(v) for k, v in (i.split(":") for i in filter(None, (sys.argv[2] if len(sys.argv) > 2 else "").split(",")))}
steps, lr, enc_lr, anchor = int(kw.get("steps", 300)), kw.get("lr", 3e-4), kw.get("enc_lr", 1e-4), kw.get("anchor", 10.0)
vae = sdlab.load("shapes").components.vae.float()
vae0 = sdlab.load("shapes").components.vae.float().requires_grad_(False)
sf = vae.config.scaling_factor
prompts = draw_prompts(random.Random(5000), 300, "full")
lat_file = OUT / "latents16.pt"
if not lat_file.exists():
    pipe = sdlab.load("shapes"); store = []; orig = pipe._decode
    pipe._decode = lambda z: (store.append(z.detach().clone()), orig(z))[1]
    for k in range(0, 300, 50):
        pipe.generate(prompts[k:k + 50], seed=5000 + k)
    torch.save(torch.cat(store), lat_file)
gen_latents = torch.load(lat_file)

def decode(v, z):
    with torch.no_grad():
        x = v.decode(z.float() / sf).sample
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
def enc(v, px):
    with torch.no_grad():
        return data.encode_latents(v, px, flip=False)[:, 0]

rng = random.Random(777)
star_scenes = [sample_scene(rng, shapes=ALL_SHAPES, allow_held_out_combination=True, color="yellow", shape="star",
               background=rng.choice([c for c in COLORS if c != "yellow"])) for _ in range(200)]
world_scenes = [sample_scene(rng) for _ in range(400)]
star_px = images_to_tensor(np.stack([render(s) for s in star_scenes]))
world_px = images_to_tensor(np.stack([render(s) for s in world_scenes]))

def evaluate(v):
    r = {}
    imgs = np.concatenate([decode(v, gen_latents[k:k + 50]) for k in range(0, 300, 50)])
    r["gen_full"] = float(np.mean([all(is_right(judge(im), parse_prompt(p)).values()) for im, p in zip(imgs, prompts)]))
    imgs = decode(v, enc(v, star_px))
    st = [all(is_right(judge(im), {"shape": "star", "color": "yellow"}).values()) for im in imgs]
    r["star_small"] = float(np.mean([x for x, s in zip(st, star_scenes) if s.size == "small"]))
    r["star_large"] = float(np.mean([x for x, s in zip(st, star_scenes) if s.size == "large"]))
    imgs = decode(v, enc(v, world_px))
    r["world_recon"] = float(np.mean([all(is_right(judge(im), {"shape": s.shape, "color": s.color, "size": s.size,
        "position": s.position, "background": s.background}).values()) for im, s in zip(imgs, world_scenes)]))
    r["world_latent_shift"] = float((enc(v, world_px) - enc(vae0, world_px)).pow(2).mean().sqrt() / enc(vae0, world_px).std())
    return r

folder = render_set(OUT / "stars", "yellow", "star", {"blue"}, None, 1)
from PIL import Image
inst_px = images_to_tensor(np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.png"))]))
inst = ImageSet(enc(vae, inst_px)[:, None], [None] * 8, data.Sampler(8, 1, 3), inst_px[:, None])
inst_all = on_other_backgrounds(inst, vae).pixels[:, 0]
rs = random.Random(5)
keep_px = images_to_tensor(np.stack([render(sample_scene(rs)) for _ in range(256)]))
keep_lat0 = enc(vae0, keep_px)
t = time.time()
if steps:
    dec_params = list(vae.post_quant_conv.parameters()) + list(vae.decoder.parameters())
    enc_params = list(vae.encoder.parameters()) + list(vae.quant_conv.parameters())
    opt = torch.optim.AdamW([{"params": dec_params, "lr": lr}, {"params": enc_params, "lr": enc_lr}], weight_decay=1e-2)
    g = torch.Generator().manual_seed(0)
    for q in dec_params + enc_params:
        q.requires_grad_(True)
    vae.train()
    for step in range(steps):
        ii = torch.randint(0, len(inst_all), (8,), generator=g)
        ki = torch.randint(0, len(keep_px), (16,), generator=g)
        px = torch.cat([inst_all[ii], keep_px[ki]])
        z = vae.encode(px).latent_dist.mean
        lat = z * sf
        anchor_loss = (lat[8:] - keep_lat0[ki]).pow(2).mean()
        zn = z + 0.1 * torch.rand(z.shape[0], 1, 1, 1, generator=g) * torch.randn(z.shape, generator=g) / sf
        out = vae.decode(zn).sample
        loss = outline_weighted_loss(out, px, 4.0, 4.0) + anchor * anchor_loss
        opt.zero_grad(); loss.backward(); opt.step()
        if step % 50 == 0:
            print(step, float(loss), float(anchor_loss), flush=True)
    vae.eval()
r = evaluate(vae); r["kw"] = kw; r["seconds"] = round(time.time() - t)
print(name, json.dumps(r), flush=True)
res = OUT / "vae_results.json"
allr = json.loads(res.read_text()) if res.exists() else {}
allr[name] = r; res.write_text(json.dumps(allr, indent=1))
if len(sys.argv) > 3:
    torch.save(vae.state_dict(), sys.argv[3])
