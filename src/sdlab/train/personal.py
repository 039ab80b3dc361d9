"""What textual inversion and Dreambooth (full or LoRA) share: common settings, defaults by model
size, the accelerate session, the diffusion loss, validation grids and the run record.

Defaults depend on the model's size, read from its resolution (the model's default width):

  recipe              small (<= 128 px: the embedded Shapes models)   real (SD 1.x/2.x, 512 px)
  textual inversion   400 steps, lr 5e-3, batch 16, 2 vectors         2000 steps, lr 5e-4, batch 1, 1 vector
  dreambooth          300 steps, lr 1e-4, batch 8 (+8 class +16 world) 400 steps, lr 5e-6, batch 1
  dreambooth --lora   300 steps, lr 1e-3, batch 8 (+8 class +16 world) 500 steps, lr 1e-4, batch 1
  LoRA rank (UNet)    8 (4 on convolutions)                           4
  class images        64 (+512 world renders, with prior preservation) 100
  dreambooth decoder  VAE decoder tuned too (lr 3e-4; LoRA rank 16)   off (SD's VAE draws anything)
  LoRA targets        up blocks: attention, projections, ResNet convs attention (to_q/k/v/out)
  background captions one-object images without a caption file  off
                      captioned `... on a BG background` (TI: always,
                      plus copies on the other backgrounds; Dreambooth:
                      half the time)
  dreambooth subject  two-tone images' objects shown large            as shown
  world prior target  the base UNet's prediction (teacher)            (no world prior)
  world prior, full   a quarter captioned ``; objects' cells 4x weight (no world prior)
  prior loss weight   2                                               1

The real-model column is the usual one (diffusers' examples). The small column keeps each recipe
well under 10 minutes on 2 CPU cores for the 64x64 model: the base recipe's UNet + text encoder
steps cost about 12 ms per image there, so 400 x 16 or 300 x 16 images are 1-2 minutes, plus
model loading and, for prior preservation, generating 64 class images once (estimates;
scripts/measure_personalization.py records the real training wall times).
`--resolution` defaults to the model's own; `--mixed-precision fp16|bf16` and
`--gradient-checkpointing` are for GPUs. Frozen models run in the mixed-precision dtype, trained
weights stay fp32 (accelerate autocasts), the VAE stays fp32 (it only encodes the training images
once and decodes validation images).

Every run folder gets `command.txt` (the exact command line), `config.json` (every setting,
defaults resolved), `loss.jsonl`, `checkpoint/` (for `--resume`) and `validation-STEP.png` grids
(one row per validation prompt, fixed seeds, so grids of different steps compare).
"""
from __future__ import annotations

import itertools
import json
import shlex
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdlab.errors import InputError
from sdlab.train import data, loop

SMALL_MAX_RESOLUTION = 128
MIXED_PRECISION = ("no", "fp16", "bf16")


@dataclass(frozen=True)
class Hyper:
    steps: int
    lr: float
    batch_size: int


DEFAULTS: dict[str, dict[str, Hyper]] = {
    "textual_inversion": {"small": Hyper(400, 5e-3, 16), "sd": Hyper(2000, 5e-4, 1)},
    "dreambooth": {"small": Hyper(300, 1e-4, 8), "sd": Hyper(400, 5e-6, 1)},
    "lora": {"small": Hyper(300, 1e-3, 8), "sd": Hyper(500, 1e-4, 1)},
}
CLASS_IMAGES = {"small": 64, "sd": 100}
# The Shapes grammar names an object in two words ("green triangle") and the small text encoder
# reads words by position: a one-vector token shifts "on a white background" to a place no
# caption had it, and the clause is ignored (measured: 0.0-0.13 of images right on `a <gt> on a
# white background` with 1 vector, 0.66 with 2).
TI_VECTORS = {"small": 2, "sd": 1}
# Dreambooth LoRA's rank on the UNet. On the small models rank 8 against 4 (one run each, two
# measurements: 64 / 128 seeds): `a yellow sks on a blue background` 0.69 / 0.74 vs 0.55 / 0.53,
# `a yellow sks` 0.56 / 0.61 vs 0.58 / 0.65, full accuracy after 0.71 / 0.727 vs 0.71 / 0.740; file
# 1.46 vs 0.98 MB (docs/measurements/personalization/lora-rank-2026-12-02.json).
LORA_RANK = {"small": 8, "sd": 4}


@dataclass
class TrainConfig:
    """Settings every personalisation recipe has; None means 'the default for this model'."""

    model: str = "shapes"
    images: str = ""
    out: str = ""
    steps: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    resolution: int | None = None
    flip: bool = False
    repeats: int = 1
    seed: int = 0
    resume: bool = False
    validation_prompts: list[str] = field(default_factory=list)
    validate_every: int = 0  # 0: one grid at the end only
    validation_images: int = 4
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"
    checkpoint_minutes: float = 5.0
    log_every: int = 10
    command: str = ""  # the command line, for command.txt (the CLI fills it in)

    def check(self) -> None:
        for name in ("steps", "batch_size", "resolution"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InputError(f"{name.replace('_', '-')} must be >= 1, got {value}")
        if self.lr is not None and self.lr <= 0:
            raise InputError(f"lr must be > 0, got {self.lr}")
        if self.repeats < 1:
            raise InputError(f"repeats must be >= 1, got {self.repeats}")
        if self.validate_every < 0:
            raise InputError(f"validate-every must be >= 0, got {self.validate_every}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise InputError(f"mixed precision must be one of {', '.join(MIXED_PRECISION)}")


def model_scale(components) -> str:
    """'small' for the embedded 64 px models (and anything up to 128 px), else 'sd'."""
    return "small" if components.defaults.width <= SMALL_MAX_RESOLUTION else "sd"


def fill_defaults(cfg: TrainConfig, recipe: str, components) -> str:
    scale = model_scale(components)
    hyper = DEFAULTS[recipe][scale]
    cfg.steps = cfg.steps or hyper.steps
    cfg.lr = cfg.lr or hyper.lr
    cfg.batch_size = cfg.batch_size or hyper.batch_size
    cfg.resolution = cfg.resolution or components.defaults.width
    if getattr(cfg, "vectors", 0) is None:  # textual inversion: see TI_VECTORS
        cfg.vectors = TI_VECTORS[scale]
    if getattr(cfg, "rank", 0) is None:  # Dreambooth LoRA: see LORA_RANK
        cfg.rank = LORA_RANK[scale]
    return scale


@dataclass
class ImageSet:
    """Training images as cached latents, their captions (None: the recipe's prompt), a sampler."""

    latents: torch.Tensor  # (N, views, C, h, w)
    captions: list[str | None]
    sampler: data.Sampler
    pixels: torch.Tensor  # (N, views, 3, H, W) in [-1, 1]: what a decoder fine-tune reconstructs
    object_cells: torch.Tensor | None = None  # (N, 1, h, w), renders only: see object_cells


def _palette() -> tuple[list[str], torch.Tensor]:
    from sdlab.shapes.world import PALETTE
    return list(PALETTE), torch.tensor(list(PALETTE.values()), dtype=torch.float32) / 127.5 - 1


@dataclass
class TwoTone:
    """One object on one flat palette background: palette indices, the object's colour and its
    coverage (1, H, W) in [0, 1] (anti-aliased edges partly covered)."""

    fg_k: int
    bg_k: int
    fg: torch.Tensor
    cover: torch.Tensor

    def on(self, background: torch.Tensor, cover: torch.Tensor | None = None) -> torch.Tensor:
        """The object (or another coverage of its colour) on `background`."""
        cover = self.cover if cover is None else cover
        return cover * self.fg[:, None, None] + (1 - cover) * background[:, None, None]


def _two_tone(x: torch.Tensor, palette: torch.Tensor) -> TwoTone | None:
    """The image as one object on one flat palette background (anti-aliased edges allowed),
    else None."""
    bg = x[:, 0, 0]
    dist = (x - bg[:, None, None]).norm(dim=0)
    fg = x[:, dist == dist.max()][:, 0]
    axis = fg - bg
    cover = ((x - bg[:, None, None]) * axis[:, None, None]).sum(0) / axis.dot(axis).clamp_min(1e-6)
    fg_k, bg_k = (int((palette - c).norm(dim=1).argmin()) for c in (fg, bg))
    seen = TwoTone(fg_k, bg_k, fg, cover.clamp(0, 1)[None])
    return None if (seen.on(bg) - x).abs().max() > 0.1 else seen


def _background_caption(template: str | None, name: str) -> str | None:
    return template.format(an="an" if name[0] in "aeiou" else "a", background=name) if template else None


def with_background_captions(images: ImageSet, template: str) -> ImageSet:
    """The same images, each two-tone one without a caption file captioned by its background's
    palette name through `template` (`{{}} on {an} {background} background`)."""
    names, palette = _palette()
    captions = list(images.captions)
    for i, x in enumerate(images.pixels[:, 0]):
        seen = _two_tone(x, palette) if captions[i] is None else None
        if seen is not None:
            captions[i] = _background_caption(template, names[seen.bg_k])
    return ImageSet(images.latents, captions, images.sampler, images.pixels)


def on_other_backgrounds(images: ImageSet, vae, caption: str | None = None) -> ImageSet:
    """The images plus, for each two-tone one, its copies on every other palette background
    (anti-aliased edges re-blended), encoded by the (frozen) VAE.

    With `caption` (a template such as `a {{}} on {an} {background} background`), each two-tone
    image without a caption file is captioned with its background's palette name, and so is
    each copy: the learned token then need not carry the background."""
    names, palette = _palette()
    views = images.pixels.shape[1]
    pixels = images.pixels.flatten(0, 1)  # (N * views, 3, H, W)
    out, captions = [pixels], [images.captions[i // views] for i in range(len(pixels))]
    for i, x in enumerate(pixels):
        seen = _two_tone(x, palette)
        if seen is None:
            continue
        if captions[i] is None:
            captions[i] = _background_caption(caption, names[seen.bg_k])
        others = [k for k in range(len(palette)) if k not in (seen.fg_k, seen.bg_k)]
        out += [seen.on(palette[k])[None] for k in others]
        captions += [_background_caption(caption, names[k]) for k in others]
    return _encoded(torch.cat(out), captions, images, vae, seed_offset=3)


def _encoded(pixels: torch.Tensor, captions: list[str | None], source: ImageSet, vae,
             seed_offset: int) -> ImageSet:
    """A new ImageSet of (N, 3, H, W) pixels, encoded by the (frozen) VAE, one view each."""
    latents = data.encode_latents(vae, pixels, flip=False)
    sampler = data.Sampler(len(pixels), source.sampler.repeats, source.sampler.seed + seed_offset)
    return ImageSet(latents, captions, sampler, pixels[:, None])


def _at_other_size(cover: torch.Tensor, large_from: float) -> tuple[torch.Tensor, bool]:
    """The object's coverage (1, H, W) scaled about its centre to the other size: doubled if its
    box is smaller than `large_from` of the image's side, else halved; kept inside the image.
    Also whether it was small."""
    import torch.nn.functional as F
    _, height, width = cover.shape
    rows, cols = (torch.nonzero(cover[0].amax(dim=d) > 0.02)[:, 0] for d in (1, 0))
    top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    small = max(bottom - top, right - left) < large_from * width
    factor = 2.0 if small else 0.5
    patch = cover[None, :, top:bottom, left:right]
    h, w = max(1, round(patch.shape[2] * factor)), max(1, round(patch.shape[3] * factor))
    patch = F.interpolate(patch, size=(h, w), mode="bilinear", antialias=True,
                          align_corners=False)[0]
    # the anti-aliased edge widens by the factor: steepen it back to a rendered edge's width
    patch = ((patch - 0.5) * max(1.0, factor) + 0.5).clamp(0, 1)
    h, w = min(h, height), min(w, width)
    y = min(max(0, round((top + bottom) / 2 - h / 2)), height - h)
    x = min(max(0, round((left + right) / 2 - w / 2)), width - w)
    out = torch.zeros_like(cover)
    out[:, y:y + h, x:x + w] = patch[:, :h, :w]
    return out, small


# the Shapes world's size threshold: an object's box is `large` from 24 px of 64
LARGE_FROM = 24 / 64
SUBJECT_SIZES = ("as-shown", "large", "both")


def resized_subjects(images: ImageSet, vae, size: str, caption: str | None = None) -> ImageSet:
    """The images with each two-tone one's object at `size`: `large` (a small object doubled
    about its centre, a large one kept) or `both` (the images plus a copy of each two-tone one
    at the other size: small doubled, large halved); encoded by the (frozen) VAE. Captions as in
    on_other_backgrounds. Other images are kept as they are."""
    if size not in SUBJECT_SIZES[1:]:
        raise ValueError(f"size must be one of {SUBJECT_SIZES[1:]}, got {size!r}")
    names, palette = _palette()
    views = images.pixels.shape[1]
    pixels = images.pixels.flatten(0, 1)
    out, captions = [], [images.captions[i // views] for i in range(len(pixels))]
    copies, copy_captions = [], []
    for i, x in enumerate(pixels):
        seen = _two_tone(x, palette)
        if seen is None:
            out.append(x)
            continue
        if captions[i] is None:
            captions[i] = _background_caption(caption, names[seen.bg_k])
        resized, small = _at_other_size(seen.cover, LARGE_FROM)
        other = seen.on(x[:, 0, 0], resized)
        out.append(other if size == "large" and small else x)
        if size == "both":
            copies.append(other)
            copy_captions.append(captions[i])
    return _encoded(torch.stack(out + copies), captions + copy_captions, images, vae, seed_offset=4)


def command_line() -> str:
    return shlex.join(sys.argv)


class Session:
    """One training run: accelerator, the model's components, a Pipeline over them (validation,
    class images), the noise scheduler and the run folder."""

    def __init__(self, cfg: TrainConfig, recipe: str, out_dir: Path):
        from accelerate import Accelerator
        from accelerate.utils import set_seed
        from diffusers import DDPMScheduler

        from sdlab.components import load, quiet_library_logs
        from sdlab.generate import Pipeline
        cfg.check()
        data.check_readable(data.list_images(cfg.images))  # bad images fail before the model loads
        quiet_library_logs()
        self.cfg, self.recipe, self.out_dir = cfg, recipe, Path(out_dir)
        self.accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
        set_seed(cfg.seed)
        self.components = load(cfg.model, device=str(self.accelerator.device), dtype="fp32",
                               safety_checker=False)
        self.scale = fill_defaults(cfg, recipe, self.components)
        self.pipe = Pipeline(self.components)
        self.noise_scheduler = DDPMScheduler.from_config(self.components.scheduler_config)
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
            cfg.mixed_precision, torch.float32)
        if self.accelerator.is_main_process:
            self.write_record()

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def write_record(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "command.txt").write_text((self.cfg.command or command_line()) + "\n")
        record = {"recipe": self.recipe, "model_scale": self.scale, **asdict(self.cfg)}
        (self.out_dir / "config.json").write_text(json.dumps(record, indent=2))

    # --- data ---------------------------------------------------------------------------------

    def load_images(self, folder: str | Path, seed_offset: int = 0) -> ImageSet:
        images = data.load_folder(folder, self.cfg.resolution)
        pixels = torch.stack([im.pixels for im in images])
        latents = data.encode_latents(self.components.vae, pixels, self.cfg.flip)
        sampler = data.Sampler(len(images), self.cfg.repeats, self.cfg.seed + seed_offset,
                               views=latents.shape[1])
        views = torch.stack([pixels, pixels.flip(-1)] if self.cfg.flip else [pixels], dim=1)
        return ImageSet(latents, [im.caption for im in images], sampler, views)

    def batch(self, images: ImageSet, step: int, size: int) -> tuple[torch.Tensor, list[int]]:
        """This process's latents at `step` and the indices of their images."""
        picks = self._picks(images, step, size)
        latents = torch.stack([images.latents[i, v] for i, v in picks])
        return latents.to(self.device), [i for i, _ in picks]

    def batch_pixels(self, images: ImageSet, step: int, size: int) -> torch.Tensor:
        """The pixels of the images `batch` returns latents of at the same step."""
        picks = self._picks(images, step, size)
        return torch.stack([images.pixels[i, v] for i, v in picks]).to(self.device)

    def _picks(self, images: ImageSet, step: int, size: int) -> list[tuple[int, int]]:
        a = self.accelerator
        return images.sampler.indices(step, size, a.process_index, a.num_processes)

    def freeze(self, *modules: torch.nn.Module) -> None:
        """Frozen models run in the mixed-precision dtype (the VAE stays fp32)."""
        for m in modules:
            m.requires_grad_(False).eval().to(self.weight_dtype)

    def token_ids(self, prompts: list[str]) -> torch.Tensor:
        tok = self.components.tokenizer
        return tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids.to(self.device)

    # --- loss ---------------------------------------------------------------------------------

    def generator(self, step: int, *stream: int) -> torch.Generator:
        """A CPU generator seeded by (seed, step, process, *stream), so that a resumed run draws
        what an uninterrupted one would have. Integers only: Python salts the hash of a str
        differently in every process."""
        key = (self.cfg.seed, step, self.accelerator.process_index, *stream)
        return torch.Generator().manual_seed(hash(key) % 2**63)

    def diffusion_loss(self, unet, latents: torch.Tensor, cond: torch.Tensor, step: int,
                       teacher: tuple[torch.nn.Module, int] | None = None,
                       last_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample MSE of the UNet's prediction (epsilon, v or x0, as the model was trained).
        With `teacher` (a frozen UNet, index k), samples from k on are matched to the teacher's
        prediction for the same noisy latents instead of to the sampled noise. `last_weights`
        (m, 1, h, w) weight the squared errors of the last m samples cell by cell.

        Noise and timesteps come from `self.generator(step)`."""
        sched = self.noise_scheduler
        gen = self.generator(step)
        noise = torch.randn(latents.shape, generator=gen).to(latents.device)
        t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],),
                          generator=gen).to(latents.device)
        noisy = sched.add_noise(latents, noise, t)
        kind = self.components.prediction_type
        target = (sched.get_velocity(latents, noise, t) if kind == "v_prediction"
                  else latents if kind == "sample" else noise)
        with self.accelerator.autocast():
            pred = unet(noisy, t, encoder_hidden_states=cond).sample
            if teacher is not None:
                model, k = teacher
                with torch.no_grad():
                    taught = model(noisy[k:], t[k:], encoder_hidden_states=cond[k:].detach()).sample
                target = torch.cat([target[:k].to(taught.dtype), taught])
        err = (pred.float() - target.float()) ** 2
        if last_weights is not None:
            m = len(last_weights)
            err = torch.cat([err[:-m], err[-m:] * last_weights.to(err.device)])
        return err.mean(dim=(1, 2, 3))

    # --- validation ---------------------------------------------------------------------------

    def validate(self, step: int | str, prompts: list[str]) -> Path | None:
        """A grid (one row per prompt, validation_images seeds) as validation-STEP.png."""
        a = self.accelerator
        if not a.is_main_process or not prompts or self.cfg.validation_images < 1:
            return None
        from sdlab.images import grid
        c = self.components
        modes = [(m, m.training) for m in (c.unet, c.text_encoder)]
        for m, _ in modes:
            m.eval()
        with self.accelerator.autocast():
            results = self.pipe.generate(prompts, seed=self.cfg.seed,
                                         num_images=self.cfg.validation_images)
        for m, was_training in modes:
            m.train(was_training)
        images = [r.image for r in results]
        name = f"validation-{step:06d}.png" if isinstance(step, int) else f"validation-{step}.png"
        path = self.out_dir / name
        grid(images, cols=self.cfg.validation_images, scale=max(1, 256 // images[0].width)).save(path)
        return path

    # --- the loop -----------------------------------------------------------------------------

    def first_step(self) -> int:
        state = self.out_dir / loop.CHECKPOINT_DIR / loop.STATE_FILE
        if self.cfg.resume and state.exists():
            return int(json.loads(state.read_text())["step"])
        return 0

    def train(self, params: list[torch.nn.Parameter], make_batch: Callable[[int], Any],
              loss_fn: Callable[[Any, int], torch.Tensor], validation_prompts: list[str],
              after_step: Callable[[int], None] | None = None,
              on_checkpoint: Callable[[int], None] | None = None,
              optimizer: torch.optim.Optimizer | None = None) -> int:
        """loop.run with batches made per step (exact --resume) and periodic validation grids."""
        cfg = self.cfg
        batches = (make_batch(step) for step in itertools.count(self.first_step()))
        config = loop.LoopConfig(steps=cfg.steps, out_dir=self.out_dir, lr=cfg.lr,
                                 checkpoint_minutes=cfg.checkpoint_minutes, log_every=cfg.log_every,
                                 desc=self.recipe.replace("_", " "), resume=cfg.resume)
        hooks = loop.Hooks(after_step=after_step, every_n=cfg.validate_every,
                           every_n_fn=lambda step: self.validate(step, validation_prompts),
                           on_checkpoint=on_checkpoint)
        return loop.run(config, self.accelerator, params, batches, loss_fn, hooks, optimizer)


def format_caption(template: str | None, fill: str, fallback: str) -> str:
    """A caption file's text with `{}` replaced by `fill`; `fallback` where there is no file."""
    if template is None:
        return fallback
    return template.replace("{}", fill) if "{}" in template else template
