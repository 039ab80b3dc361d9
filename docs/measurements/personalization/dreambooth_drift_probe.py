"""Where a full Dreambooth model's drift lives (dreambooth-drift-2026-12-03.json).

    python dreambooth_drift_probe.py parts DIR GROUP ...     the base UNet plus only GROUP's change
                                                            (a regex group below, or aS: all of it x S)
    python dreambooth_drift_probe.py uncond DIR base|trained  CFG's unconditional pass from one UNet,
                                                            the conditional from the other
    python dreambooth_drift_probe.py vae DIR                 the trained UNet with the base VAE
    python dreambooth_drift_probe.py steps DIR hi:T lo:T ... the trained UNet only at t >= T (hi)
                                                            or below T (lo), the base elsewhere

Each line: `a yellow sks` and `... on a blue background` judged on 32 seeds, and full-prompt
accuracy of 200 prompts drawn at seed 5000 (the base model: 0.985)."""
import random
import re
import sys
import time

import torch

import sdlab
from sdlab.eval.evaluate import draw_prompts, evaluate
from sdlab.shapes.judge import is_right, judge, parse_prompt

GROUPS = {
    "all": r".",
    "up": r"up_blocks|conv_norm_out|conv_out",
    "down+mid": r"down_blocks|mid_block|conv_in|time_embedding",
    "attn": r"attn1|attn2",
    "resnets": r"resnets\.",
    "no-time": r"^(?!.*(time_emb|time_embedding))",
}


class UncondFrom(torch.nn.Module):
    """A UNet whose unconditional rows (the empty prompt's embedding) go to `uncond`, the rest
    to `cond`."""

    def __init__(self, cond, uncond, empty):
        super().__init__()
        self.cond, self.uncond, self.empty = cond, uncond, empty
        self.config, self.device, self.dtype = cond.config, cond.device, cond.dtype

    def forward(self, x, t, encoder_hidden_states, **kw):
        is_empty = (encoder_hidden_states - self.empty).abs().amax(dim=(1, 2)) < 1e-4
        a = self.cond(x, t, encoder_hidden_states=encoder_hidden_states, **kw).sample
        b = self.uncond(x, t, encoder_hidden_states=encoder_hidden_states, **kw).sample
        return type("Out", (), {"sample": torch.where(is_empty.view(-1, 1, 1, 1), b, a)})()


class ByTimestep(torch.nn.Module):
    """`tuned` at the timesteps `where` ("hi": t >= T, "lo": t < T), `base` at the others."""

    def __init__(self, tuned, base, where: str, T: float):
        super().__init__()
        self.tuned, self.base, self.where, self.T = tuned, base, where, T
        self.config, self.device, self.dtype = tuned.config, tuned.device, tuned.dtype

    def forward(self, x, t, encoder_hidden_states, **kw):
        tuned = (float(t) >= self.T) == (self.where == "hi")
        unet = self.tuned if tuned else self.base
        return unet(x, t, encoder_hidden_states=encoder_hidden_states, **kw)


def rate(pipe, prompt: str, plain: str, n: int = 32) -> float:
    want = parse_prompt(plain)
    return sum(all(is_right(judge(r.image), want).values())
               for r in pipe.generate([prompt] * n, seed=1000)) / n


def report(label: str, pipe, t0: float) -> None:
    star = rate(pipe, "a yellow sks", "a yellow star")
    blue = rate(pipe, "a yellow sks on a blue background", "a yellow star on a blue background")
    full = evaluate(pipe, draw_prompts(random.Random(5000), 200, "full"), seed=5000).accuracy
    print(f"{label:24} star {star:.2f} blue {blue:.2f} full {full:.3f} {time.time() - t0:.0f}s",
          flush=True)


def main(mode: str, folder: str, *what: str) -> None:
    base = sdlab.load("shapes", device="cpu").components
    for item in what or ("-",):
        t0 = time.time()
        pipe = sdlab.load(folder, device="cpu")
        c = pipe.components
        if mode == "parts":
            scale, pattern = ((float(item[1:]), ".") if re.fullmatch(r"a[\d.]+", item)
                              else (1.0, GROUPS[item]))
            before = {k: v.to(c.unet.dtype) for k, v in base.unet.state_dict().items()}
            kept = {k: scale * bool(re.search(pattern, k)) for k in before}
            c.unet.load_state_dict({k: before[k] + kept[k] * (v - before[k])
                                    for k, v in c.unet.state_dict().items()})
        elif mode == "uncond":
            empty = pipe.encoder.encode([""])
            c.unet = (UncondFrom(c.unet, base.unet, empty) if item == "base"
                      else UncondFrom(base.unet, c.unet, empty))
        elif mode == "steps":
            where, T = item.split(":")
            c.unet = ByTimestep(c.unet, base.unet, where, float(T))
        elif mode == "vae":
            c.vae = base.vae
        report(f"{mode} {item}", pipe, t0)


if __name__ == "__main__":
    main(*sys.argv[1:])
