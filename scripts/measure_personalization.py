"""Measure personalisation on the embedded Shapes model: can it learn what it never saw?

The base model never saw a green triangle (held-out combination) nor a star (held-out shape). From 8
rendered images each (varied size and position; backgrounds drawn from the colours the judged
prompts do NOT use, so `on a white/blue background` tests composition, not memory; with
`--star-backgrounds any` the stars' backgrounds may be blue too, as the issue's own test allows):

  textual inversion  <gt> (init: triangle)          judged on `a <gt> on a white background`
  Dreambooth         `a yellow sks`, prior preservation with `a yellow circle` (the nearest shape
                     the model knows, so that `yellow X` does not drift to stars)
                     judged on `a yellow sks`, `a yellow sks on a blue background`
  Dreambooth LoRA    the same, at the recipe's rank (--rank)

Each judged prompt gets --n images (seeds 0..n-1), judged by sdlab.shapes.judge against the
attributes of the equivalent plain caption (parse_prompt: `a green triangle on a white
background` -> colour, shape, background). The base model's full-caption accuracy
(sdlab.eval.evaluate on draw_prompts(rng, --eval-n, "full")) is measured before and after
Dreambooth / with the LoRA (does the model forget?). Also: adapter file sizes, training wall
times (Dreambooth's includes generating the class images; the LoRA run reuses them).

With `--captions sidecar` (default) each training image has a caption file stating its position
and background (`a large {} in the top left on a red background`), as a captioned run would;
`--captions none` trains on the bare token / instance prompt.

    python scripts/measure_personalization.py --model shapes --out runs/personalization
    python scripts/measure_personalization.py --quick ...   # a smoke run: few steps and images

Writes OUT/results.json and prints a table. Long: on 2 CPU cores about the three recipes'
default training times plus a few minutes of generation.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from sdlab.eval.evaluate import draw_prompts, evaluate
from sdlab.shapes.judge import is_right, judge, parse_prompt
from sdlab.shapes.world import ALL_SHAPES, COLORS, render, sample_scene

TRAIN_IMAGES = 8
TI_TOKEN, TI_INIT = "<gt>", "triangle"
INSTANCE_PROMPT, CLASS_PROMPT = "a yellow sks", "a yellow circle"


@dataclass
class Judged:
    """A prompt to generate and the plain caption whose attributes it should show."""

    name: str
    prompt: str
    plain: str


TI_PROMPTS = [Judged("green triangle on white", f"a {TI_TOKEN} on a white background",
                     "a green triangle on a white background")]
DB_PROMPTS = [Judged("yellow star", INSTANCE_PROMPT, "a yellow star"),
              Judged("yellow star on blue", f"{INSTANCE_PROMPT} on a blue background",
                     "a yellow star on a blue background")]
BASE_PROMPTS = [Judged(j.name, j.plain, j.plain) for j in TI_PROMPTS + DB_PROMPTS]


# --- data -----------------------------------------------------------------------------------

def render_set(folder: Path, color: str, shape: str, avoid: set[str], caption: str | None,
               seed: int) -> Path:
    """8 renders of one colour and shape, backgrounds outside `avoid`; optional caption files."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    backgrounds = [c for c in COLORS if c != color and c not in avoid]
    for i in range(TRAIN_IMAGES):
        scene = sample_scene(rng, shapes=ALL_SHAPES, allow_held_out_combination=True, color=color,
                             shape=shape, background=rng.choice(backgrounds))
        Image.fromarray(render(scene)).save(folder / f"{i:02d}.png")
        if caption:
            (folder / f"{i:02d}.txt").write_text(caption.format(
                size=scene.size, position=scene.position, background=scene.background,
                an="an" if scene.background[0] in "aeiou" else "a"))
    return folder


# --- judging --------------------------------------------------------------------------------

def judge_rates(pipe, prompts: list[Judged], n: int) -> dict[str, float]:
    """Share of n images (seeds 0..n-1) showing every attribute of the plain caption."""
    rates = {}
    for j in prompts:
        wanted = parse_prompt(j.plain)
        results = pipe.generate([j.prompt] * n, seed=0)
        ok = [all(is_right(judge(r.image), wanted).values()) for r in results]
        rates[j.name] = sum(ok) / n
    return rates


def full_accuracy(pipe, n: int, seed: int) -> float:
    prompts = draw_prompts(random.Random(seed), n, "full")
    return evaluate(pipe, prompts, seed=seed).accuracy


# --- runs -----------------------------------------------------------------------------------

def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def run_ti(args, data: Path, out: Path) -> dict:
    import sdlab
    from sdlab.personalize import apply_personalization
    from sdlab.train.textual_inversion import TextualInversionConfig, train_textual_inversion
    cfg = TextualInversionConfig(model=args.model, images=str(data), token=TI_TOKEN,
                                 init_token=TI_INIT, out=str(out / "ti" / "learned_embeds.safetensors"),
                                 steps=args.steps, seed=args.seed,
                                 validation_prompts=[j.prompt for j in TI_PROMPTS])
    path, seconds = timed(train_textual_inversion, cfg)
    pipe = sdlab.load(args.model, device=args.device)
    apply_personalization(pipe, embeddings=[str(path)])
    return {"train_seconds": seconds, "file": str(path), "file_bytes": path.stat().st_size,
            "rates": judge_rates(pipe, TI_PROMPTS, args.n), "steps": cfg.steps, "lr": cfg.lr}


def run_dreambooth(args, data: Path, out: Path, lora: bool) -> dict:
    import sdlab
    from sdlab.personalize import apply_personalization
    from sdlab.train.dreambooth import DreamboothConfig, train_dreambooth
    cfg = DreamboothConfig(model=args.model, images=str(data), instance_prompt=INSTANCE_PROMPT,
                           class_prompt=CLASS_PROMPT, prior_preservation=True, lora=lora, rank=args.rank,
                           out=str(out / ("lora" if lora else "dreambooth")), steps=args.steps,
                           lr=args.lr,
                           seed=args.seed, num_class_images=args.class_images,
                           class_data_dir=str(out / "class-images"),
                           validation_prompts=[j.prompt for j in DB_PROMPTS],
                           train_decoder=args.train_decoder,
                           train_text_encoder=args.train_text_encoder,
                           **{k: v for k, v in (("prior_loss_weight", args.prior_loss_weight),
                                                ("background_copies", args.background_copies),
                                                ("subject_size", args.subject_size),
                                                ("world_prior_teacher", args.world_prior_teacher),
                                                ("conv_rank", args.conv_rank))
                              if v is not None})  # None: the recipe's default
    path, seconds = timed(train_dreambooth, cfg)
    if lora:
        pipe = sdlab.load(args.model, device=args.device)
        apply_personalization(pipe, loras=[str(path)])
        size = path.stat().st_size
    else:
        pipe = sdlab.load(str(path), device=args.device)
        size = sum(f.stat().st_size for f in (path / "unet").iterdir())
    return {"train_seconds": seconds, "file": str(path), "file_bytes": size,
            "rates": judge_rates(pipe, DB_PROMPTS, args.n), "steps": cfg.steps, "lr": cfg.lr,
            "full_accuracy_after": full_accuracy(pipe, args.eval_n, args.seed)}


# --- report ---------------------------------------------------------------------------------

def table(results: dict) -> str:
    base = results["base"]
    rows = [("base model", base["rates"], base["full_accuracy"], None, None)]
    for key, label in (("ti", "textual inversion"), ("dreambooth", "dreambooth"),
                       ("lora", "dreambooth LoRA")):
        if key in results:
            r = results[key]
            rows.append((label, r["rates"], r.get("full_accuracy_after"), r["file_bytes"],
                         r["train_seconds"]))
    names = [j.name for j in TI_PROMPTS + DB_PROMPTS]
    head = f"{'':20}" + "".join(f"{n:>26}" for n in names) + f"{'full acc':>10}{'bytes':>12}{'train s':>9}"
    lines = [head]
    for label, rates, acc, size, seconds in rows:
        cells = "".join(f"{rates[n]:>26.2f}" if n in rates else f"{'-':>26}" for n in names)
        lines.append(f"{label:20}{cells}{_fmt(acc, '.3f'):>10}{_fmt(size, 'd'):>12}"
                     f"{_fmt(seconds, '.0f'):>9}")
    return "\n".join(lines)


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="shapes")
    p.add_argument("--out", default="runs/personalization")
    p.add_argument("--n", type=int, default=64, help="images per judged prompt")
    p.add_argument("--eval-n", type=int, default=256, help="prompts for full-caption accuracy")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the recipes')")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the recipes')")
    p.add_argument("--class-images", type=int, default=None)
    p.add_argument("--captions", choices=["sidecar", "none"], default="sidecar")
    p.add_argument("--star-backgrounds", choices=["not-blue", "any"], default="not-blue",
                   help="the star renders' backgrounds: never blue (composition, the default) or "
                        "any colour but yellow (as the issue's judge may draw them)")
    p.add_argument("--recipes", nargs="+", choices=["ti", "dreambooth", "lora"],
                   default=["ti", "dreambooth", "lora"])
    p.add_argument("--train-text-encoder", action="store_true",
                   help="Dreambooth's --train-text-encoder")
    p.add_argument("--background-copies", type=float, default=None,
                   help="Dreambooth's --background-copies (default: the recipe's)")
    p.add_argument("--subject-size", choices=["as-shown", "large", "both"], default=None,
                   help="Dreambooth's --subject-size (default: the recipe's)")
    p.add_argument("--world-prior-teacher", action=argparse.BooleanOptionalAction, default=None,
                   help="Dreambooth's --world-prior-teacher (default: the recipe's)")
    p.add_argument("--prior-loss-weight", type=float, default=None,
                   help="Dreambooth's --prior-loss-weight (default: the recipe's)")
    p.add_argument("--train-decoder", action=argparse.BooleanOptionalAction, default=None,
                   help="Dreambooth's decoder fine-tune (default: the recipe's)")
    p.add_argument("--rank", type=int, default=None,
                   help="LoRA rank of the UNet's adapters (default: the recipe's)")
    p.add_argument("--conv-rank", type=int, default=None,
                   help="LoRA rank of the UNet's convolution adapters (default: the recipe's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true", help="smoke run: 10 steps, 4 images, 8 prompts")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.n, args.eval_n, args.class_images = 10, 4, 8, 4
    import sdlab
    out = Path(args.out)
    sidecar = args.captions == "sidecar"
    triangles = render_set(out / "data" / "green-triangle", "green", "triangle", {"white"},
                           "a {size} {{}} in the {position} on {an} {background} background"
                           if sidecar else None,
                           args.seed)
    avoid = {"blue"} if args.star_backgrounds == "not-blue" else set()
    stars = render_set(out / "data" / "yellow-star", "yellow", "star", avoid,
                       "{{}} in the {position} on {an} {background} background" if sidecar else None,
                       args.seed + 1)

    base = sdlab.load(args.model, device=args.device)
    results: dict = {"settings": vars(args), "command": " ".join(sys.argv),
                     "base": {"rates": judge_rates(base, BASE_PROMPTS, args.n),
                              "full_accuracy": full_accuracy(base, args.eval_n, args.seed)}}
    del base
    if "ti" in args.recipes:
        results["ti"] = run_ti(args, triangles, out)
    if "dreambooth" in args.recipes:
        results["dreambooth"] = run_dreambooth(args, stars, out, lora=False)
    if "lora" in args.recipes:
        results["lora"] = run_dreambooth(args, stars, out, lora=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(table(results))
    print(f"wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
