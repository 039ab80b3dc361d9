"""The `sdlab` command line. Heavy libraries load inside the commands, so `sdlab --help` is fast.

Every user error (bad setting, unreadable file, missing model) is one line on stderr and exit
code 2, with nothing half-written: settings are validated and the output folder checked before
any work, and images are written only once they exist.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import time
from pathlib import Path

EXIT_USAGE = 2

# Commands whose code lives with their feature: module path -> its add_parser(subparsers).
FEATURE_COMMANDS = ("sdlab.shapes.cli", "sdlab.train.cli", "sdlab.eval.cli", "sdlab.server.cli",
                    "sdlab.train.distill_cli")


class UsageError(Exception):
    pass


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="shapes",
                   help="embedded name (shapes, shapes-fast), diffusers folder, .safetensors/.ckpt "
                        "file or cached hub id (default: shapes)")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", default="auto", help="auto (fp16 on GPU, fp32 on CPU), fp32, fp16, bf16")
    p.add_argument("--embedding", action="append", default=[], metavar="FILE",
                   help="textual-inversion embedding to load (repeatable; diffusers or A1111 format)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="LoRA to apply with a weight (repeatable; diffusers or kohya format)")
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"],
                   help="override the model's prediction type (single-file SD 2.x 768-v models)")
    p.add_argument("--no-safety-checker", action="store_true",
                   help="do not run the model's safety checker")


def _guidance_cap(text: str) -> float:
    if text.lower() in ("off", "none"):
        return math.inf
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'off', got {text!r}") from None


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--guidance-scale", "--cfg-scale", type=float, default=None,
                   help="classifier-free guidance scale (default: the model's)")
    p.add_argument("--guidance-cap", type=_guidance_cap, default=None, metavar="SCALE|off",
                   help="guidance at low noise (the last part of sampling) is at most SCALE; "
                        "'off' guides every step at --guidance-scale (default: the model's)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    p.add_argument("--sampler", default=None, help="sampler name (see `sdlab samplers`)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--num-images", "-n", type=int, default=1, help="images per prompt")
    p.add_argument("--batch-size", type=int, default=None, help="images per UNet batch")
    p.add_argument("--seed", type=int, default=None, help="image i uses seed+i (default: random)")
    p.add_argument("--out", default="outputs", help="output folder (default: outputs)")
    p.add_argument("--manifest", default=None, metavar="FILE.jsonl",
                   help="append one JSON line per image")
    p.add_argument("--save-trajectory", action="store_true",
                   help="also write a grid and GIF of the predicted clean image at every step")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdlab", description="Stable Diffusion, taken apart.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="text-to-image")
    g.add_argument("prompt", nargs="?", default=None)
    g.add_argument("--prompts-file", default=None, help="one prompt per line")
    g.add_argument("--from", dest="from_image", default=None, metavar="IMAGE",
                   help="regenerate from a PNG's parameters (flags given override them)")
    add_model_arguments(g)
    add_sampling_arguments(g)
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("img2img", help="image-to-image (and loopback)")
    i.add_argument("init", help="init image")
    i.add_argument("prompt", nargs="?", default="")
    i.add_argument("--strength", type=float, default=0.75,
                   help="0 returns the input, 1 ignores it (default 0.75)")
    i.add_argument("--loops", type=int, default=1, help="feed each output back in N times")
    i.add_argument("--loop-prompts", nargs="+", default=None, help="one prompt per loop")
    add_model_arguments(i)
    add_sampling_arguments(i)
    i.set_defaults(func=cmd_img2img)

    info = sub.add_parser("info", help="print the generation parameters stored in a PNG")
    info.add_argument("image")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=cmd_info)

    s = sub.add_parser("samplers", help="list the samplers")
    s.set_defaults(func=cmd_samplers)

    b = sub.add_parser("bench", help="time sdlab against diffusers' pipeline on the same weights")
    b.add_argument("--model", default="shapes")
    b.add_argument("--device", default="auto")
    b.add_argument("--dtype", default="auto")
    b.add_argument("--images", type=int, default=8, help="images per timed run")
    b.add_argument("--steps", type=int, default=None)
    b.add_argument("--sampler", default=None)
    b.add_argument("--repeats", type=int, default=5)
    b.add_argument("--compare-steps", type=int, default=None, metavar="N",
                   help="also time generation at N steps (e.g. a 50-step teacher)")
    b.set_defaults(func=cmd_bench)

    for module_name in FEATURE_COMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from sdlab.errors import SdlabError
    try:
        return args.func(args) or 0
    except (SdlabError, UsageError) as e:
        print(f"sdlab: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("sdlab: interrupted", file=sys.stderr)
        return 130


# --- generate / img2img ---------------------------------------------------------------------

def load_pipeline(args):
    from sdlab import load
    from sdlab.components import quiet_library_logs
    quiet_library_logs()
    pipe = load(args.model, device=args.device, dtype=args.dtype,
                safety_checker=not args.no_safety_checker, prediction_type=args.prediction_type)
    if args.embedding or args.lora:
        from sdlab.personalize import apply_personalization
        apply_personalization(pipe, embeddings=args.embedding, loras=args.lora)
    return pipe


def check_output_folder(path: str | Path) -> Path:
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create output folder {out}: {e.strerror}") from e
    if not os.access(out, os.W_OK):
        raise UsageError(f"output folder {out} is not writable")
    return out


def _prompts(args) -> list[str]:
    if args.prompts_file:
        try:
            lines = Path(args.prompts_file).read_text().splitlines()
        except OSError as e:
            raise UsageError(f"cannot read prompts file {args.prompts_file}: {e.strerror}") from e
        prompts = [line.strip() for line in lines if line.strip()]
        if not prompts:
            raise UsageError(f"prompts file {args.prompts_file} has no prompts")
        return prompts
    return [args.prompt or ""]


def _apply_from_image(args) -> None:
    """Fill unset flags from a PNG's infotext (sdlab generate --from IMAGE)."""
    from sdlab.images import parse_infotext, read_infotext
    try:
        text = read_infotext(args.from_image)
    except OSError as e:
        raise UsageError(f"cannot read image {args.from_image}: {e}") from e
    if not text:
        raise UsageError(f"{args.from_image} carries no generation parameters")
    p = parse_infotext(text)
    width, height = (int(v) for v in p.get("Size", "0x0").split("x"))
    fill = {"prompt": p.get("Prompt"), "negative_prompt": p.get("Negative prompt"),
            "steps": int(p["Steps"]) if "Steps" in p else None, "sampler": p.get("Sampler"),
            "guidance_scale": float(p["CFG scale"]) if "CFG scale" in p else None,
            "seed": int(p["Seed"]) if "Seed" in p else None,
            "width": width or None, "height": height or None,
            # no cap in the infotext: every step was guided at the CFG scale
            "guidance_cap": float(p["CFG cap"].split()[0]) if "CFG cap" in p else math.inf}
    for key, value in fill.items():
        if getattr(args, key) is None and value is not None:
            setattr(args, key, value)
    if args.model == "shapes" and p.get("Model") and p["Model"] != "shapes":
        args.model = p["Model"]


def _sampling_kwargs(args) -> dict:
    return dict(steps=args.steps, guidance_scale=args.guidance_scale, sampler=args.sampler,
                width=args.width, height=args.height, guidance_cap=args.guidance_cap, seed=args.seed,
                num_images=args.num_images, batch_size=args.batch_size)


def _validate_common(args) -> None:
    if args.num_images < 1:
        raise UsageError(f"--num-images must be >= 1, got {args.num_images}")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")


def cmd_generate(args) -> int:
    if args.from_image:
        _apply_from_image(args)
    _validate_common(args)
    prompts = _prompts(args)
    out = check_output_folder(args.out)
    pipe = load_pipeline(args)
    kwargs = _sampling_kwargs(args)
    pipe.settings(kwargs["steps"], kwargs["guidance_scale"], kwargs["sampler"], kwargs["width"],
                  kwargs["height"], kwargs["guidance_cap"])  # validate before loading anything else
    with _progress_bar(len(prompts) * args.num_images) as on_progress:
        results = pipe.generate(prompts, args.negative_prompt or "", on_progress=on_progress,
                                trajectory=args.save_trajectory, **kwargs)
    _write_results(results, out, args)
    return 0


def cmd_img2img(args) -> int:
    _validate_common(args)
    if args.loops < 1:
        raise UsageError(f"--loops must be >= 1, got {args.loops}")
    if args.loop_prompts and len(args.loop_prompts) != args.loops:
        if args.loops == 1:
            args.loops = len(args.loop_prompts)
        else:
            raise UsageError(f"--loop-prompts gives {len(args.loop_prompts)} prompts for {args.loops} loops")
    from sdlab.generate import prepare_init_image
    from sdlab.errors import InputError
    if not 0 <= args.strength <= 1:
        raise InputError(f"--strength must be between 0 and 1, got {args.strength}")
    out = check_output_folder(args.out)
    pipe = load_pipeline(args)
    s = pipe.settings(args.steps, args.guidance_scale, args.sampler, args.width, args.height,
                      args.guidance_cap)
    init = prepare_init_image(args.init, s.width, s.height)
    kwargs = _sampling_kwargs(args)
    negative = args.negative_prompt or ""
    with _progress_bar(args.num_images * args.loops) as on_progress:
        if args.loops == 1:
            results = pipe.img2img(init, args.prompt, negative, strength=args.strength,
                                   on_progress=on_progress, trajectory=args.save_trajectory, **kwargs)
        else:
            prompts = args.loop_prompts or [args.prompt] * args.loops
            seed, n = kwargs.pop("seed"), kwargs.pop("num_images")
            loops = pipe.loopback(init, prompts, strength=args.strength, seed=seed, num_images=n,
                                  negative_prompt=negative, on_progress=on_progress, **kwargs)
            results = [r for loop in loops for r in loop]
    _write_results(results, out, args)
    return 0


class _progress_bar:
    """A tqdm bar over images, fed by the pipeline's per-step progress."""

    def __init__(self, images: int):
        self.images = images

    def __enter__(self):
        from tqdm.auto import tqdm
        self.bar = tqdm(total=100, desc="generating", unit="%", dynamic_ncols=True,
                        bar_format="{l_bar}{bar}| {n:.0f}% [{elapsed}<{remaining}]",
                        disable=None)
        self.done = 0.0

        def on_progress(p) -> None:
            value = 100 * p.fraction
            self.bar.update(max(0.0, value - self.done))
            self.done = max(self.done, value)
        return on_progress

    def __exit__(self, *exc):
        self.bar.close()
        return False


def _next_index(out: Path) -> int:
    numbers = [int(p.name.split("-")[0]) for p in out.glob("*.png") if p.name.split("-")[0].isdigit()]
    return max(numbers, default=-1) + 1


def _write_results(results, out: Path, args) -> None:
    from sdlab.images import grid, save_gif, save_png
    index = _next_index(out)
    records = []
    for k, r in enumerate(results):
        path = out / f"{index + k:05d}-{r.params.seed}.png"
        save_png(r.image, path, r.params.infotext())
        record = {"prompt": r.params.prompt, "negative_prompt": r.params.negative_prompt,
                  "seed": r.params.seed, "sampler": r.params.sampler, "steps": r.params.steps,
                  "guidance_scale": r.params.guidance_scale, "width": r.params.width,
                  "height": r.params.height, "model": r.params.model, "path": str(path)}
        if r.params.denoising_strength is not None:
            record["denoising_strength"] = r.params.denoising_strength
        if r.nsfw:
            record["nsfw"] = True
            print(f"sdlab: safety checker flagged {path} (blacked out)", file=sys.stderr)
        if r.interrupted:
            record["interrupted"] = True
        if r.trajectory:
            scale = max(1, 256 // r.image.width)
            traj_grid = out / f"{index + k:05d}-{r.params.seed}-trajectory.png"
            grid(r.trajectory, cols=min(10, len(r.trajectory)), scale=scale).save(traj_grid)
            gif = save_gif(r.trajectory, out / f"{index + k:05d}-{r.params.seed}-trajectory.gif",
                           scale=scale)
            record["trajectory"] = [str(traj_grid), str(gif)]
        records.append(record)
        print(f"wrote {path}")
    if args.manifest:
        with open(args.manifest, "a") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")


# --- info / samplers / bench ----------------------------------------------------------------

def cmd_info(args) -> int:
    from sdlab.images import parse_infotext, read_infotext
    try:
        text = read_infotext(args.image)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read image {args.image}: {e}") from e
    if not text:
        raise UsageError(f"{args.image} carries no generation parameters")
    print(json.dumps(parse_infotext(text), indent=2) if args.json else text)
    return 0


def cmd_samplers(args) -> int:
    from sdlab.samplers import describe
    rows = describe()
    width = max(len(r[0]) for r in rows) + 2
    width_a = max(len(r[1]) for r in rows) + 2
    print(f"{'name':<{width}}{'A1111 name':<{width_a}}scheduler")
    for name, a1111, cls in rows:
        print(f"{name:<{width}}{a1111:<{width_a}}{cls}")
    return 0


def cmd_bench(args) -> int:
    from sdlab.bench import run_bench
    run_bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
