"""Which of a LoRA's adapters carry the star and which the drift: each subset of its keys (the
decoder's vae.* keys always kept) judged on `a yellow sks` (32 seeds from 1000) and on 200 full
prompts (seed 5000). Usage: lora_subsets.py LORA [GROUP ...]"""
import random, re, sys, time, tempfile
from safetensors.torch import load_file, save_file
from safetensors import safe_open
import sdlab
from sdlab.personalize import apply_personalization
from sdlab.eval.evaluate import draw_prompts, evaluate
from sdlab.shapes.judge import is_right, judge, parse_prompt
lora = sys.argv[1]
sd = load_file(lora)
with safe_open(lora, "pt") as f:
    meta = f.metadata()
GROUPS = {
    "all": r".",
    "no-unet": r"^vae\.",
    "attn1": r"attn1\.|^vae\.",
    "attn2": r"attn2\.|^vae\.",
    "proj+ff": r"proj_in|proj_out|\.ff\.|^vae\.",
    "resnet conv": r"conv1|conv2|conv_shortcut|^vae\.",
    "time_emb": r"time_emb_proj|^vae\.",
    "all but resnets": r"^vae\.|^(?!.*(conv1|conv2|conv_shortcut|time_emb_proj))",
    "all but time_emb": r"^(?!.*time_emb_proj)",
    "up blocks": r"^vae\.|up_blocks",
    "down+mid": r"^vae\.|down_blocks|mid_block",
    "up 0": r"^vae\.|up_blocks\.0\.", "up 1": r"^vae\.|up_blocks\.1\.",
    "up 2": r"^vae\.|up_blocks\.2\.", "up 3": r"^vae\.|up_blocks\.3\.",
    "up 1-3": r"^vae\.|up_blocks\.[123]\.", "up 0-2": r"^vae\.|up_blocks\.[012]\.",
    "up 2-3": r"^vae\.|up_blocks\.[23]\.",
}
only = sys.argv[2:] or list(GROUPS)
for name in only:
    pat = GROUPS[name]
    keep = {k: v for k, v in sd.items() if re.search(pat, k)}
    path = f"{tempfile.gettempdir()}/lora-subset-{name.replace(' ', '_').replace('+','_')}.safetensors"
    save_file(keep, path, metadata=meta)
    t0 = time.time()
    pipe = sdlab.load("shapes", device="cpu")
    apply_personalization(pipe, loras=[path])
    res = pipe.generate(["a yellow sks"] * 32, seed=1000)
    star = sum(all(is_right(judge(x.image), parse_prompt("a yellow star")).values()) for x in res) / 32
    rep = evaluate(pipe, draw_prompts(random.Random(5000), 200, "full"), seed=5000)
    print(f"{name:18} keys {len(keep):4d}  star {star:.2f}  full {rep.accuracy:.3f}  {time.time()-t0:.0f}s", flush=True)
