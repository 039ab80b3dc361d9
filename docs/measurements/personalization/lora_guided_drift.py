"""How far a LoRA moves the UNet from the base one on the world prior's samples: conditional,
unconditional and guided (w = 5) predictions, mean squared difference at five noise levels."""
import copy, sys, glob, torch, numpy as np
from PIL import Image
from diffusers import DDPMScheduler
import sdlab
from sdlab.personalize import apply_personalization
torch.manual_seed(0); torch.set_num_threads(2)
lora = sys.argv[1]  # usage: lora_guided_drift.py LORA CLASS_IMAGES_DIR
pipe = sdlab.load("shapes", device="cpu")
c = pipe.components
base = copy.deepcopy(c.unet).eval()
apply_personalization(pipe, loras=[lora])
folder = glob.glob(sys.argv[2] + "/shapes-world-captions*")[0]  # a run's class-images folder
files = sorted(glob.glob(folder + "/*.png"))[:32]
caps = [open(f[:-4] + ".txt").read().strip() for f in files]
x = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB"))).permute(2,0,1).float()/127.5-1 for f in files])
sched = DDPMScheduler.from_config(c.scheduler_config)
with torch.no_grad():
    lat = c.vae.encode(x).latent_dist.mean * c.vae.config.scaling_factor
    cond = pipe.encoder.encode(caps)
    unc = pipe.encoder.encode([""] * len(caps))
    for tval in [100, 300, 500, 700, 900]:
        t = torch.full((len(lat),), tval)
        noise = torch.randn_like(lat)
        noisy = sched.add_noise(lat, noise, t)  # the model's own noise schedule
        bc = base(noisy, t, encoder_hidden_states=cond).sample
        bu = base(noisy, t, encoder_hidden_states=unc).sample
        lc = c.unet(noisy, t, encoder_hidden_states=cond).sample
        lu = c.unet(noisy, t, encoder_hidden_states=unc).sample
        m = lambda a: (a**2).mean().item()
        g = 5.0
        print(f"t={tval} |bc-bu|^2={m(bc-bu):.5f} cond drift={m(lc-bc):.5f} uncond drift={m(lu-bu):.5f} "
              f"guided drift={m((lu+g*(lc-lu))-(bu+g*(bc-bu))):.5f}")
