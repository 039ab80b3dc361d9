"""Dreambooth: fine-tune a model on a few images of a subject named by a rare word, fully or as a
LoRA.

    sdlab train dreambooth --model shapes --images DIR --instance-prompt "a yellow sks" --out DIR
        [--class-prompt "a yellow circle" --prior-preservation] [--train-text-encoder]
        [--lora [--rank R] [--conv-rank R]]

Full fine-tuning trains the UNet (and with --train-text-encoder the text encoder) and writes a
diffusers-format model folder: everything of the source model is copied except the trained parts,
which are saved (in --save-dtype, fp16 by default), and sdlab.json names the new model after its
folder, keeping the source's generation defaults. `--model DIR` then loads it.

With --lora, peft adapters of rank R (alpha = R, so scale 1) are trained on the UNet's attention
projections (to_q, to_k, to_v, to_out.0) and, with --train-text-encoder, on the text encoder's
(q_proj, k_proj, v_proj, out_proj); the base weights stay frozen, and one small file,
`pytorch_lora_weights.safetensors`, is written in diffusers' key format (what
StableDiffusionLoraLoaderMixin.save_lora_weights writes), loadable with `--lora FILE[:WEIGHT]`
and by diffusers' load_lora_weights.

Prior preservation (--prior-preservation with --class-prompt): the model first generates
--num-class-images images of the class prompt itself; each step then adds a batch of them, with
the class prompt, to the loss (times --prior-loss-weight), so the class keeps its meaning. They are
cached in a folder keyed by the model (path and weights' size and time), prompt, count and seed:
under --class-data-dir, else $SDLAB_CACHE or ~/.cache/sdlab, in class-images/.

On the small models (--train-decoder, on by default there; see DECODER) the VAE decoder learns
too, to reconstruct the instance images and renders of the world: a full run saves the tuned
`vae/`, a LoRA run adds decoder adapters to its file under `vae.` keys. There, prior preservation
also replays captioned renders of random Shapes scenes (--world-prior, see WORLD_PRIOR), and
LoRA adapters (rank 8 by default, 4 on convolutions) cover the convolutions as well as the
attention of the UNet's up blocks (UNET_LORA_TARGETS_SMALL, UNET_LORA_BLOCKS,
LORA_CONV_RANK_SHARE).

Defaults (see sdlab.train.personal): small models 300 steps, batch 8 (+8 class, +16 world
renders with prior preservation), lr 1e-4 full /
1e-3 LoRA, 64 class images; 512 px models 400 steps lr 5e-6 full, 500 steps lr 1e-4 LoRA, batch 1,
100 class images.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sdlab.errors import InputError
from sdlab.shapes.world import random_caption, render, sample_scene
from sdlab.train import data
from sdlab.train.base import images_to_tensor, object_cells, outline_weighted_loss
from sdlab.train.personal import (CLASS_IMAGES, SUBJECT_SIZES, ImageSet, Session, TrainConfig,
                                 format_caption, on_other_backgrounds, resized_subjects,
                                 with_background_captions)

LORA_FILE = "pytorch_lora_weights.safetensors"
UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# On the small models attention adapters alone cannot draw a new shape (measured: `a yellow sks`
# 0.06 of seeds; 0.34-0.38 with these), so the ResNet convolutions and the transformer blocks'
# projections get adapters too; rank 4 on all of them is about 0.5 MB in fp16, rank 8 about 1 MB.
UNET_LORA_CONVS = ("conv1", "conv2", "conv_shortcut")
UNET_LORA_TARGETS_SMALL = (UNET_LORA_TARGETS + ["proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
                           + list(UNET_LORA_CONVS) + ["time_emb_proj"])
# ... and only in the UNet's up blocks: there the star is drawn and the down and middle blocks'
# adapters add drift. Measured by keeping subsets of a trained LoRA's keys (seed-1 star set; `a
# yellow sks` on 32 seeds, 200 full prompts at seed 5000, base 0.985): all 0.81 / 0.860, up blocks
# 0.81 / 0.870, down and middle 0.03 / 0.975, ResNet convolutions 0.28 / 0.845, all but them 0.00
# / 0.950. Trained on the up blocks only, star / on blue / full after (64 seeds, 256 prompts):
# seed 0 0.95 / 0.95 / 0.883 against 0.97 / 0.97 / 0.883 on every block, seed 1 0.94 / 0.69 /
# 0.910 against 0.92 / 0.75 / 0.879; on 200 other prompts 0.890 vs 0.875 and 0.860 vs 0.860; a
# 0.99 MB file against 1.38 MB. Up blocks 1-3 only: 0.91 / 0.61 / 0.887 (seed 1)
# (lora-blocks-2026-12-03.json in docs/measurements/personalization).
UNET_LORA_BLOCKS = "up_blocks"
# ... and there the convolutions' adapters have half the rank of the others (--conv-rank; kohya's
# LoCon conv_dim): they draw the star but also move every prompt, as they do not read the text.
# Measured on the seed-1 star set (star / on blue / full drop on the script's 256 prompts / on 200
# other prompts): rank 8 everywhere 0.94 / 0.69 / 0.082 / 0.125, convolutions at rank 4 0.92 /
# 0.59 / 0.070 / 0.095 (lora-world-renders-2026-12-03.json in docs/measurements/personalization).
LORA_CONV_RANK_SHARE = {"small": 0.5, "sd": 1.0}
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
TRAINED_PARTS = ("unet", "text_encoder")
SAVE_DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}
DONE_FILE = "done.json"
# The embedded models' VAE saw only the Shapes world's base shapes: it cannot draw a star (measured:
# 0 of 100 star renders come back from encode -> decode judged as stars), so no UNet training can
# teach one. SD's VAE, trained on everything, needs no such help. On small models Dreambooth also
# fine-tunes the VAE decoder (encoder frozen, so latents keep their meaning) to reconstruct the
# instance images and, so that it forgets nothing else, DECODER_RENDERS renders of random Shapes
# scenes, two for each instance image in a batch; latents jittered as the UNet's outputs are.
# Measured without such a set: base full-prompt accuracy 0.86 -> 0.38. Renders rather than the
# model's own samples (which carry its decoder's rounding of small squares) and no class images
# there: measured on 128 seeds and 300 full prompts (base 0.907), full runs `a yellow sks` 0.72
# vs 0.56, on blue 0.77 vs 0.55, full-prompt accuracy after 0.727 vs 0.693; LoRA 0.65 vs 0.38,
# 0.53 vs 0.41, 0.740 vs 0.703 (docs/measurements/personalization/decoder-renders-2026-12-02.json).
# Keeping the decoder frozen and training the UNet on decoder-inverted latents instead (gradient
# descent on the latents through the decoder, which then draws 5 of the 8 instance stars) drew
# blobs: `a yellow sks` 0.00 (measured with caption files, where the shipped recipe itself drew
# 0.06; docs/measurements/personalization/dreambooth-decoder-ablations-2026-12-01.json).
DECODER = {"small": True, "sd": False}
DECODER_RENDERS = 256
# With the base UNet's latents a lower decoder lr keeps more of the world (300 full prompts: 0.84 at
# 1e-4-1.5e-4, 0.77 at 3e-4, 0.80 at 3e-4 with no instance image at all), but the full recipe at
# 1.5e-4, where the decoder draws the tuned UNet's latents, measured level or worse (full 0.71 vs
# 0.727, star 0.66 vs 0.72 on 128 seeds; decoder-lr-2026-12-02.json there).
DECODER_LR = 3e-4
DECODER_LATENT_NOISE = 0.1
DECODER_STREAM = 1  # the decoder's noise: its own stream of Session.generator
# A full run's decoder loss weights object pixels x5 and their outline x5 more, as the base
# recipe's decoder stage does (a plain MSE barely sees a small shape's outline). Measured (64
# seeds): `a yellow sks` 0.53 -> 0.58, on blue 0.59 -> 0.73, base full accuracy after 0.62 -> 0.64.
# The LoRA decoder adapters keep the plain MSE: with the weighting they drew no star at all
# (0.02 / 0.00, against 0.41 / 0.44).
DECODER_OUTLINE_WEIGHTS = {"small": (4.0, 4.0), "sd": None}
# The Shapes models' instance images are two-tone (one object on one background): the decoder also
# sees them on every other palette background, so that it draws the subject on backgrounds the
# few images never showed (measured: `a yellow sks on a blue background` 0.00 -> 0.19, LoRA
# 0.00 -> 0.22). Showing the UNet those copies too, captioned with their background, measured
# worse (`a yellow sks` 0.03), and so did RGB channel permutations for the decoder (0.00). On the
# 16x16-latent model with subjects as shown, the UNet copies (--background-copies: the share of
# the UNet's instance batch drawn from them) were a trade, not a fix. Measured (64 seeds; full
# accuracy on 256 prompts, base 0.980): none, star 0.91, on blue 0.03, full after 0.883; all
# copies 0.78 / 0.41 / 0.844 (64 class images) and 0.64 / 0.48 / 0.828 (256); without copies the
# model binds size to background (its large training stars were on red) and draws small
# pentagons on blue (background-copies-2026-12-02.json in docs/measurements/personalization).
# With the subject shown large (SUBJECT_SIZE) a quarter of copies became a default
# (BACKGROUND_COPIES). The decoder is not the limit: this tune alone brings small stars' round
# trip from 0 to 0.82 (large 1.00), and letting the encoder learn too (world latents anchored)
# measured level (star 0.86, on blue 0.11; vae-probe-2026-12-02.json).
DECODER_BACKGROUNDS = True
# The small models' UNet binds the subject's size to the backgrounds it was shown on: from 8 star
# renders whose large stars were on red, `a yellow sks on a blue background` drew small
# five-cornered blobs (judged circles). There the UNet sees each two-tone instance image's
# object at large size (small ones doubled about their centre; --subject-size large).
# Measured (64 seeds, 256 full prompts, base 0.980): star / on blue / full after: as shown
# 0.91 / 0.03 / 0.871-0.883; both sizes (each image and its other-size copy) 0.84 / 0.42 /
# 0.852, still drawing 50 of 64 small on blue; large 0.95 / 0.97 / 0.863
# (subject-size-2026-12-02.json in docs/measurements/personalization). A real model's subject
# fills its photos; SD keeps the images as shown.
SUBJECT_SIZE = {"small": "large", "sd": "as-shown"}
# With the subject large, a quarter of the UNet's instance batch drawn from its copies on every
# other background (captioned with it; --background-copies) binds the subject to no background.
# Measured (64 seeds, 256 full prompts; two sets of 8 star renders, seeds 0 and 1, base 0.980 /
# 0.992): star / on blue / full after 0.89 / 0.92 / 0.891 and 0.86 / 0.55 / 0.930 without,
# 0.97 / 0.98 / 0.891 and 0.95 / 0.70 / 0.895 with (background-copies-large-2026-12-02.json).
# Without the resize (subjects as shown) the copies had cost the bare prompt instead (0.91 ->
# 0.78 and 0.64 with the whole batch copies, see DECODER_BACKGROUNDS).
BACKGROUND_COPIES = {"small": 0.25, "sd": 0.0}
# Prior preservation on the small models also replays random scenes of the Shapes world with
# their captions: the class prompt alone keeps `a yellow circle` but lets every other prompt
# drift (measured with the base VAE: full-prompt accuracy 0.86 -> 0.57 from the tuned UNet;
# 0.69-0.75 with the model's own samples of random captions, which these renders replaced).
WORLD_PRIOR = {"small": True, "sd": False}
# ... and there the UNet matches the base UNet's own prediction for the world's noisy latents
# rather than their sampled noise: the whole function, not one noisy draw of it, so it keeps
# more of what it drew (the drift is the UNet's: it rounds small squares and triangles).
# Measured with the subject large (64 seeds, 256 full prompts, base 0.980): star / on blue / full
# after 1.00 / 0.94 / 0.879 against 0.95 / 0.97 / 0.863; half the lr instead: 0.88 / 0.80 / 0.879
# (subject-size-2026-12-02.json).
WORLD_PRIOR_TEACHER = {"small": True, "sd": False}
# With the teacher's targets the inputs need not be the model's samples: WORLD_RENDERS encoded
# renders (no generation, so more of them), WORLD_SMALL_SHARE of them forced to a small object
# (three quarters small in all), where every drift showed (small squares and triangles drawn as
# circles), and WORLD_BATCH_SHARE x the batch of them each step. LoRA, seed-1 star set, conv
# adapters at rank 4 (star / on blue / drop on the script's 256 prompts / on 200 other prompts):
# 64 samples, x1: 0.92 / 0.59 / 0.070 / 0.095; 512 renders x1: 0.94 / 0.66 / 0.101 / 0.125; x2:
# 0.94 / 0.95 / 0.078 / 0.110; x2 and half of them small: 0.97 / 0.88 / 0.078 / 0.095; seed 0
# 0.95 / 0.89 / 0.078 / 0.100 against 0.95 / 0.95 / 0.098 / 0.095 before. Full Dreambooth
# measured level: seed 0 0.95 / 0.92 / 0.101 / 0.140 against 0.97 / 0.98 / 0.090 / 0.135, seed 1
# 0.92 / 0.92 / 0.098 / 0.145 against 0.95 / 0.70 / 0.098 / 0.130
# (lora-world-renders-2026-12-03.json in docs/measurements/personalization)
WORLD_RENDERS = 512
WORLD_SMALL_SHARE = 0.5
WORLD_BATCH_SHARE = 2
# No single change tried lowered full fine-tuning's drift and kept the star (a decay to the base
# weights or object weights lost both, teacher or noise targets, only the up blocks training or low
# timesteps only kept both; see dreambooth-drift-2026-12-03.json): it lives in the UNet's up blocks,
# below t = 500, in a change its conditional and unconditional predictions share. Two changes
# together lowered it and kept the star: WORLD_UNCOND_SHARE of the renders captioned with the empty
# prompt (so the unconditional prediction, which guidance subtracts, is anchored too) and their loss
# weighted 1 + WORLD_OBJECT_WEIGHT x the object's latent cells (a small shape is a few of 256 cells,
# all the failures were small shapes). Star / on blue / drop on 256 / on 200 other prompts, seed 0:
# 0.95 / 0.92 / 0.101 / 0.140 -> 0.89 / 0.94 / 0.070 / 0.085; seed 1: 0.92 / 0.92 / 0.098 / 0.145 ->
# 0.92 / 0.95 / 0.070 / 0.045. Alone each lost the star or kept the drift: 0.98 / 1.00 / 0.109 /
# 0.135 and (at 8x) 0.45 / 0.39 / 0.082 / 0.115.
# LoRA keeps the recipe it was measured with (neither).
WORLD_UNCOND_SHARE = {"full": 0.25, "lora": 0.0}
WORLD_OBJECT_WEIGHT = {"full": 3.0, "lora": 0.0}
# With the teacher's targets a prior loss weight of 2 kept more again: 0.89 / 0.92 / 0.891 against
# 1.00 / 0.94 / 0.879 at weight 1 (one run each; before the teacher, weight 2 measured no better)
PRIOR_LOSS_WEIGHT = {"small": 2.0, "sd": 1.0}
# On the small models one-object instance images without caption files are captioned
# `INSTANCE_PROMPT on a BACKGROUND background` half the time, so the instance prompt need not
# carry the backgrounds the images happened to have (as for textual inversion)
BACKGROUND_CAPTIONS = {"small": "{{}} on {an} {background} background", "sd": None}
# With --lora the decoder gets adapters too, of this rank, on every conv and attention projection
# of its blocks; they go into the LoRA file under `vae.` keys (read by sdlab; diffusers' loader
# knows only unet./text_encoder.)
DECODER_LORA_RANK = 16
DECODER_LORA_TARGETS = (r"(post_quant_conv|decoder\.conv_in|decoder\.conv_out"
                        r"|decoder\..*\.(conv1|conv2|conv|conv_shortcut|to_q|to_k|to_v|to_out\.0))")


@dataclass
class DreamboothConfig(TrainConfig):
    instance_prompt: str = ""
    class_prompt: str | None = None
    prior_preservation: bool = False
    num_class_images: int | None = None  # None: by model size
    prior_loss_weight: float | None = None  # None: by model size (see PRIOR_LOSS_WEIGHT)
    train_text_encoder: bool = False
    lora: bool = False
    rank: int | None = None  # None: by model size (personal.LORA_RANK)
    conv_rank: int | None = None  # None: by model size (LORA_CONV_RANK_SHARE of rank)
    class_data_dir: str | None = None
    save_dtype: str = "fp16"
    train_decoder: bool | None = None  # None: on for small models (see DECODER)
    decoder_lr: float | None = None
    world_prior: bool | None = None  # None: on for small models with prior preservation (WORLD_PRIOR)
    world_prior_teacher: bool | None = None  # None: as WORLD_PRIOR_TEACHER
    background_copies: float | None = None  # None: by model size (see BACKGROUND_COPIES)
    subject_size: str | None = None  # None: by model size (see SUBJECT_SIZE)

    def check(self) -> None:
        super().check()
        if not self.instance_prompt:
            raise InputError("dreambooth needs --instance-prompt")
        if not self.out:
            raise InputError("dreambooth needs --out DIR")
        if self.prior_preservation and not self.class_prompt:
            raise InputError("--prior-preservation needs --class-prompt")
        if self.num_class_images is not None and self.num_class_images < 1:
            raise InputError(f"num-class-images must be >= 1, got {self.num_class_images}")
        if self.rank is not None and self.rank < 1:
            raise InputError(f"rank must be >= 1, got {self.rank}")
        if self.conv_rank is not None and self.conv_rank < 1:
            raise InputError(f"conv rank must be >= 1, got {self.conv_rank}")
        if self.prior_loss_weight is not None and self.prior_loss_weight < 0:
            raise InputError(f"prior loss weight must be >= 0, got {self.prior_loss_weight}")
        if self.decoder_lr is not None and self.decoder_lr <= 0:
            raise InputError(f"decoder lr must be > 0, got {self.decoder_lr}")
        if self.background_copies is not None and not 0.0 <= self.background_copies <= 1.0:
            raise InputError(f"background copies must be between 0 and 1, got "
                             f"{self.background_copies}")
        if self.subject_size is not None and self.subject_size not in SUBJECT_SIZES:
            raise InputError(f"subject size must be one of {', '.join(SUBJECT_SIZES)}, "
                             f"got {self.subject_size!r}")
        if self.save_dtype not in SAVE_DTYPES:
            raise InputError(f"save dtype must be one of {', '.join(SAVE_DTYPES)}")


# --- class images ---------------------------------------------------------------------------

def cache_root(cfg: DreamboothConfig) -> Path:
    if cfg.class_data_dir:
        return Path(cfg.class_data_dir)
    xdg = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    base = os.environ.get("SDLAB_CACHE") or xdg / "sdlab"
    return Path(base) / "class-images"


def model_stamp(model: str) -> dict:
    """What identifies a model's weights: its path and the size and time of its UNet files."""
    from sdlab.components import resolve_model_path
    path = resolve_model_path(model).resolve()
    files = sorted((path / "unet").iterdir()) if path.is_dir() else [path]
    return {"path": str(path), "files": [(f.name, f.stat().st_size, f.stat().st_mtime_ns)
                                         for f in files if f.is_file()]}


def class_folder(cfg: DreamboothConfig, n: int, prompt: str | None = None) -> Path:
    prompt = cfg.class_prompt if prompt is None else prompt
    key = json.dumps({"model": model_stamp(cfg.model), "prompt": prompt, "n": n,
                      "seed": cfg.seed}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40] or "unconditional"
    return cache_root(cfg) / f"{slug}-{n}-{digest}"


def ensure_class_images(s: Session, cfg: DreamboothConfig) -> Path:
    """Generate (once; the main process) images of the class prompt with the untrained model."""
    n = cfg.num_class_images or CLASS_IMAGES[s.scale]
    folder = class_folder(cfg, n)
    _generate_once(s, cfg, folder, [cfg.class_prompt] * n, {"prompt": cfg.class_prompt},
                   "class images")
    return folder


def world_renders(s: Session, n: int, name: str = "world renders",
                  small_share: float = 0.0) -> ImageSet:
    """`n` renders of random Shapes scenes, their encoder latents and captions (each optional
    clause kept half the time), drawn from a generator named `name`; `small_share` of the scenes
    are forced to a small object (the others drawn at either size). The small models'
    preservation sets: for the decoder true shapes as targets (the model's own samples carry its
    decoder's rounding of small squares), for the UNet the world it was trained on (WORLD_PRIOR)."""
    rng = random.Random(f"{s.cfg.seed}/{name}")
    scenes = [sample_scene(rng, **({"size": "small"} if rng.random() < small_share else {}))
              for _ in range(n)]
    captions = [random_caption(scene, rng, keep=0.5) for scene in scenes]
    pixels = images_to_tensor(np.stack([render(scene) for scene in scenes]))
    if pixels.shape[-1] != s.cfg.resolution:  # a small model of another size (tests)
        pixels = torch.nn.functional.interpolate(pixels, size=s.cfg.resolution, mode="area")
    latents = data.encode_latents(s.components.vae, pixels, flip=False)
    return ImageSet(latents, captions, data.Sampler(n, 1, s.cfg.seed + 4), pixels[:, None],
                    object_cells(scenes, latents.shape[-1]))


def _generate_once(s: Session, cfg: DreamboothConfig, folder: Path, prompts: list[str],
                   record: dict, desc: str) -> None:
    """One image per prompt (image k at seed + k) into folder, unless done.json says it is
    there; the main process generates, the others wait."""
    if s.accelerator.is_main_process and not (folder / DONE_FILE).exists():
        from tqdm.auto import tqdm

        from sdlab.images import save_png
        folder.mkdir(parents=True, exist_ok=True)
        batch = max(4, cfg.batch_size)
        for start in tqdm(range(0, len(prompts), batch), desc=desc, dynamic_ncols=True):
            with s.accelerator.autocast():
                results = s.pipe.generate(prompts[start:start + batch], seed=cfg.seed + start)
            for k, r in enumerate(results):
                save_png(r.image, folder / f"{start + k:05d}.png", r.params.infotext())
        (folder / DONE_FILE).write_text(json.dumps({"model": cfg.model, **record,
                                                    "n": len(prompts), "seed": cfg.seed}))
    s.accelerator.wait_for_everyone()


# --- models ---------------------------------------------------------------------------------

def unet_lora_targets(scale: str) -> list[str] | str:
    """peft's target_modules: module names, or on the small models a pattern of them inside the
    UNet's up blocks (see UNET_LORA_BLOCKS)."""
    if scale == "sd":
        return UNET_LORA_TARGETS
    names = "|".join(re.escape(t) for t in UNET_LORA_TARGETS_SMALL)
    return rf"{UNET_LORA_BLOCKS}\..*\.({names})"


def conv_rank_pattern(cfg: DreamboothConfig) -> dict[str, int]:
    """peft's rank_pattern (and alpha_pattern: scale 1) for the UNet's convolutions."""
    return {} if cfg.conv_rank == cfg.rank else {name: cfg.conv_rank for name in UNET_LORA_CONVS}


def prepare_models(s: Session, cfg: DreamboothConfig) -> list[torch.nn.Module]:
    """Set which weights learn (full or LoRA); returns the modules that train."""
    from peft import LoraConfig
    c = s.components
    trained = [c.unet] + ([c.text_encoder] if cfg.train_text_encoder else [])
    s.freeze(*[m for m in (c.unet, c.text_encoder) if m not in trained])
    for module, targets in zip(trained, (unet_lora_targets(s.scale), TEXT_LORA_TARGETS)):
        if cfg.lora:
            module.requires_grad_(False)
            pattern = conv_rank_pattern(cfg) if module is c.unet else {}
            module.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.rank, init_lora_weights="gaussian",
                                          target_modules=targets, rank_pattern=pattern,
                                          alpha_pattern=pattern))
        else:
            module.requires_grad_(True)
        module.train()
    if cfg.gradient_checkpointing:
        c.unet.enable_gradient_checkpointing()
        if cfg.train_text_encoder:
            c.text_encoder.gradient_checkpointing_enable()
    return trained


def prepare_decoder(s: Session, cfg: DreamboothConfig) -> list[torch.nn.Module]:
    """The VAE's decoder side learns (see DECODER), fully or as a LoRA; its encoder stays frozen."""
    from peft import LoraConfig
    vae = s.components.vae
    vae.requires_grad_(False)
    parts = [vae.post_quant_conv, vae.decoder]
    if cfg.lora:
        vae.add_adapter(LoraConfig(r=DECODER_LORA_RANK, lora_alpha=DECODER_LORA_RANK,
                                   init_lora_weights="gaussian", target_modules=DECODER_LORA_TARGETS))
    for part in parts:
        part.train()
        if not cfg.lora:
            part.requires_grad_(True)
    return parts


def decoder_loss(s: Session, latents: torch.Tensor, pixels: torch.Tensor, step: int) -> torch.Tensor:
    """Reconstruction error of the decoded (jittered) training latents against their images."""
    vae = s.components.vae
    gen = s.generator(step, DECODER_STREAM)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    z = latents.float() / vae.config.scaling_factor + shift
    sigma = DECODER_LATENT_NOISE * torch.rand(z.shape[0], 1, 1, 1, generator=gen)
    z = z + (sigma * torch.randn(z.shape, generator=gen)).to(z.device)
    with s.accelerator.autocast():
        decoded = vae.decode(z).sample
    weights = DECODER_OUTLINE_WEIGHTS[s.scale]
    if weights is None or s.cfg.lora:
        return torch.nn.functional.mse_loss(decoded.float(), pixels.float())
    return outline_weighted_loss(decoded.float(), pixels.float(), *weights)


def fill_dreambooth_defaults(cfg: DreamboothConfig, scale: str) -> None:
    """The settings left to the recipe (None), by model size."""
    if cfg.train_decoder is None:
        cfg.train_decoder = DECODER[scale]
    if cfg.world_prior is None:
        cfg.world_prior = WORLD_PRIOR[scale] and cfg.prior_preservation
    if cfg.world_prior_teacher is None:
        cfg.world_prior_teacher = WORLD_PRIOR_TEACHER[scale]
    if cfg.prior_loss_weight is None:
        cfg.prior_loss_weight = PRIOR_LOSS_WEIGHT[scale]
    if cfg.lora and cfg.conv_rank is None:
        cfg.conv_rank = max(1, round(cfg.rank * LORA_CONV_RANK_SHARE[scale]))
    cfg.decoder_lr = cfg.decoder_lr or DECODER_LR
    cfg.subject_size = cfg.subject_size or SUBJECT_SIZE[scale]
    if cfg.background_copies is None:
        cfg.background_copies = BACKGROUND_COPIES[scale]


# --- batches --------------------------------------------------------------------------------

def prompts_for(images: ImageSet, picks: list[int], prompt: str, rng: random.Random,
                captioned: ImageSet | None = None) -> list[str]:
    """The picked images' captions (the prompt where none). With `captioned` (small models'
    instance images) its captions, from a caption file or the background, half the time and the
    bare prompt otherwise, as the base recipe keeps each clause: always kept, `a yellow sks`
    alone fell back to the class (star 0.56 -> 0.19 of seeds)."""
    if captioned is None:
        return [format_caption(images.captions[i], prompt, prompt) for i in picks]
    rich = [format_caption(captioned.captions[i], prompt, prompt) for i in picks]
    return [r if rng.random() < 0.5 else prompt for r in rich]


@dataclass
class DreamboothBatch:
    latents: torch.Tensor  # instance batch, then class images, then world renders
    prompts: list[str]
    world_weights: torch.Tensor | None  # per-cell loss weights of the world renders
    decoder: tuple[torch.Tensor, torch.Tensor] | None  # (latents, pixels) the decoder redraws


@dataclass
class DreamboothData:
    """What each step trains on. `instance_parts`: (images, how many, their captioned version)
    making up the instance batch; `decoded`: (images, how many) the decoder reconstructs, none
    when it does not learn."""

    cfg: DreamboothConfig
    instance_parts: list[tuple[ImageSet | None, int, ImageSet | None]]
    prior: ImageSet | None  # class images
    world: ImageSet | None  # world renders (see WORLD_PRIOR)
    world_batch: int  # renders a step; 0 without them
    uncond_share: float  # see WORLD_UNCOND_SHARE
    object_weight: float  # see WORLD_OBJECT_WEIGHT
    decoded: list[tuple[ImageSet | None, int]]

    def batch(self, s: Session, step: int) -> DreamboothBatch:
        cfg = self.cfg
        rng = random.Random(f"{cfg.seed}/background/{step}/{s.accelerator.process_index}")
        parts, prompts, world_weights = [], [], None
        for images, n, captioned in self.instance_parts:
            if n:
                more, picks = s.batch(images, step, n)
                parts.append(more)
                prompts += prompts_for(images, picks, cfg.instance_prompt, rng, captioned)
        if self.prior is not None:
            more, picks = s.batch(self.prior, step, cfg.batch_size)
            parts.append(more)
            prompts += prompts_for(self.prior, picks, cfg.class_prompt, rng)
        if self.world is not None:  # last in the batch, where the loss looks for it
            more, picks = s.batch(self.world, step, self.world_batch)
            parts.append(more)
            prompts += ["" if rng.random() < self.uncond_share else p
                        for p in prompts_for(self.world, picks, "", rng)]
            if self.object_weight:
                world_weights = 1 + self.object_weight * self.world.object_cells[picks]
        decoder = None
        if self.decoded:
            decoder = (torch.cat([s.batch(images, step, n)[0] for images, n in self.decoded]),
                       torch.cat([s.batch_pixels(images, step, n) for images, n in self.decoded]))
        return DreamboothBatch(torch.cat(parts), prompts, world_weights, decoder)


def dreambooth_data(s: Session, cfg: DreamboothConfig) -> DreamboothData:
    """Load and encode everything the steps draw from (class images generated first, with the
    untrained model)."""
    instance = s.load_images(cfg.images)
    prior = (s.load_images(ensure_class_images(s, cfg), seed_offset=1)
             if cfg.prior_preservation else None)
    world = (world_renders(s, WORLD_RENDERS, "unet world renders", WORLD_SMALL_SHARE)
             if cfg.world_prior else None)
    kind = "lora" if cfg.lora else "full"
    # the UNet's instance batch: the images (their subjects resized, see SUBJECT_SIZE) and
    # --background-copies of it their copies on every other background (captioned with it).
    # Class images captioned by background too measured level (star 0.59, on blue 0.50; 0.53,
    # 0.59 without)
    template = BACKGROUND_CAPTIONS[s.scale]
    n_copies = round(cfg.background_copies * cfg.batch_size)
    shown = instance
    shown_captioned = with_background_captions(instance, template) if template else None
    if cfg.subject_size != "as-shown":
        shown = shown_captioned = resized_subjects(instance, s.components.vae, cfg.subject_size,
                                                   template)
    copies = on_other_backgrounds(shown, s.components.vae, template) if n_copies else None
    instance_parts = [(shown, cfg.batch_size - n_copies, shown_captioned),
                      (copies, n_copies, copies)]
    decoded = []
    if cfg.train_decoder:
        # half the instance batch (the images as given, on every background, see
        # DECODER_BACKGROUNDS) and twice as many renders of the world, so that the decoder
        # forgets nothing else (see DECODER_RENDERS). Decoding is most of a step's cost: the
        # full instance batch took 2.07 s a step against 1.26 s (0.60 s with no decoder tune)
        # and measured level (star 0.91 / 0.91, on blue 0.03 / 0.03, full after 0.883 / 0.871;
        # 688 s vs 417 s)
        shown_to_decoder = instance
        if DECODER_BACKGROUNDS and s.scale == "small":
            # the UNet's copies are these very images when the subjects were not resized
            shown_to_decoder = (copies if copies is not None and shown is instance
                                else on_other_backgrounds(instance, s.components.vae, template))
        decoded = [(shown_to_decoder, max(1, cfg.batch_size // 2)),
                   (world_renders(s, DECODER_RENDERS), cfg.batch_size)]
    world_batch = WORLD_BATCH_SHARE * cfg.batch_size if world is not None else 0
    return DreamboothData(cfg, instance_parts, prior, world, world_batch,
                          WORLD_UNCOND_SHARE[kind], WORLD_OBJECT_WEIGHT[kind], decoded)


# --- training -------------------------------------------------------------------------------

def make_optimizer(cfg: DreamboothConfig, trained: list[torch.nn.Module],
                   decoder: list[torch.nn.Module]) -> tuple[list, torch.optim.Optimizer]:
    """AdamW over what learns, the decoder at its own rate; returns (parameters, optimizer)."""
    model_params = [p for m in trained for p in m.parameters() if p.requires_grad]
    decoder_params = [p for m in decoder for p in m.parameters() if p.requires_grad]
    groups = [{"params": model_params}] + (
        [{"params": decoder_params, "lr": cfg.decoder_lr}] if decoder_params else [])
    return model_params + decoder_params, torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=1e-2)


def train_dreambooth(cfg: DreamboothConfig) -> Path:
    """Train; returns the model folder (full) or the LoRA file."""
    cfg.check()
    out = Path(cfg.out)
    s = Session(cfg, "lora" if cfg.lora else "dreambooth", out)
    _check_out_is_not_source(cfg)
    fill_dreambooth_defaults(cfg, s.scale)
    if s.accelerator.is_main_process:
        s.write_record()  # again, with the recipe's defaults resolved
    steps_data = dreambooth_data(s, cfg)
    # a frozen copy of the UNet as it was, taken before any adapter is added (see WORLD_PRIOR_TEACHER)
    teacher = (copy.deepcopy(s.components.unet).requires_grad_(False).eval()
               if steps_data.world is not None and cfg.world_prior_teacher else None)
    trained = prepare_models(s, cfg)
    decoder = prepare_decoder(s, cfg) if cfg.train_decoder else []
    params, optimizer = make_optimizer(cfg, trained, decoder)
    prepared = s.accelerator.prepare(*trained, *decoder)
    prepared = list(prepared) if isinstance(prepared, (list, tuple)) else [prepared]
    unet = prepared[0]
    te = prepared[1] if cfg.train_text_encoder else s.components.text_encoder

    def loss_fn(batch: DreamboothBatch, step: int) -> torch.Tensor:
        with torch.set_grad_enabled(cfg.train_text_encoder):
            cond = te(s.token_ids(batch.prompts))[0]
        first_world = len(batch.latents) - steps_data.world_batch
        per_sample = s.diffusion_loss(unet, batch.latents, cond, step,
                                      (teacher, first_world) if teacher else None,
                                      batch.world_weights)
        n = cfg.batch_size
        loss = per_sample[:n].mean()
        if len(per_sample) > n:  # class images, then the world's renders
            loss = loss + cfg.prior_loss_weight * per_sample[n:].mean()
        if batch.decoder is not None:
            loss = loss + decoder_loss(s, *batch.decoder, step)
        return loss

    def save_lora_checkpoint(step: int) -> None:
        if cfg.lora and s.accelerator.is_main_process:
            save_lora(s, cfg, out)

    prompts = cfg.validation_prompts or [cfg.instance_prompt]
    s.train(params, lambda step: steps_data.batch(s, step), loss_fn, prompts,
            on_checkpoint=save_lora_checkpoint, optimizer=optimizer)
    s.validate("final", prompts)
    if not s.accelerator.is_main_process:
        return out / LORA_FILE if cfg.lora else out
    if cfg.lora:
        return save_lora(s, cfg, out)
    return export_model_folder(s, cfg, out)


def _check_out_is_not_source(cfg: DreamboothConfig) -> None:
    from sdlab.components import resolve_model_path
    source = resolve_model_path(cfg.model).resolve()
    if Path(cfg.out).resolve() == source:
        raise InputError(f"--out {cfg.out} is the source model's folder; choose another")


# --- outputs --------------------------------------------------------------------------------

def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(dtype).cpu().contiguous() for k, v in state.items()}


def save_lora(s: Session, cfg: DreamboothConfig, out: Path) -> Path:
    """One safetensors file in diffusers' LoRA key format (unet.* and text_encoder.* keys)."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    dtype = SAVE_DTYPES[cfg.save_dtype]
    c = s.components
    unet_state = _one_key_format(convert_state_dict_to_diffusers(get_peft_model_state_dict(c.unet)))
    layers = {"unet_lora_layers": _cast(unet_state, dtype)}
    pattern = conv_rank_pattern(cfg)
    meta = {"unet_lora_adapter_metadata": {"r": cfg.rank, "lora_alpha": cfg.rank,
                                           "target_modules": unet_lora_targets(s.scale),
                                           "rank_pattern": pattern, "alpha_pattern": pattern}}
    if cfg.train_text_encoder:
        state = convert_state_dict_to_diffusers(get_peft_model_state_dict(c.text_encoder))
        if not hasattr(c.text_encoder, "text_model"):  # transformers 5; files keep SD's names
            state = {f"text_model.{k}": v for k, v in state.items()}
        layers["text_encoder_lora_layers"] = _cast(state, dtype)
        meta["text_encoder_lora_adapter_metadata"] = {"r": cfg.rank, "lora_alpha": cfg.rank,
                                                      "target_modules": TEXT_LORA_TARGETS}
    StableDiffusionLoraLoaderMixin.save_lora_weights(out, weight_name=LORA_FILE, **layers, **meta)
    if cfg.train_decoder:
        _append_tensors(out / LORA_FILE, {f"vae.{k}": v for k, v in _cast(
            convert_state_dict_to_diffusers(get_peft_model_state_dict(c.vae)), dtype).items()})
    return out / LORA_FILE


def _one_key_format(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """convert_state_dict_to_diffusers renames attention adapters only (`lora.down`), leaving
    convolutions as peft's `lora_A`; diffusers' loader then ignores part of a mixed file."""
    return {k.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up."): v
            for k, v in state.items()}


def _append_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    save_file({**load_file(str(path)), **tensors}, str(path), metadata=metadata)


def export_model_folder(s: Session, cfg: DreamboothConfig, out: Path) -> Path:
    """A diffusers-format folder: the source's parts copied, the trained ones saved."""
    from sdlab.components import resolve_model_path
    source = resolve_model_path(cfg.model)
    c = s.components
    dtype = SAVE_DTYPES[cfg.save_dtype]
    out.mkdir(parents=True, exist_ok=True)
    trained = {"unet": c.unet, "text_encoder": c.text_encoder if cfg.train_text_encoder else None,
               "vae": c.vae if cfg.train_decoder else None}
    if source.is_dir():
        _copy_parts(source, out, skip={name for name, m in trained.items() if m is not None})
    else:
        _write_parts_from_components(s, out)
        trained["text_encoder"] = c.text_encoder
    for name, module in trained.items():
        if module is not None:
            module.to(dtype).save_pretrained(out / name)
    _write_sdlab_json(s, cfg, source, out)
    return out


def _copy_parts(source: Path, out: Path, skip: set[str]) -> None:
    """model_index.json and the parts it names (not a source run's checkpoints or logs)."""
    index = json.loads((source / "model_index.json").read_text())
    parts = [name for name, value in index.items()
             if isinstance(value, list) and value and value[0] and (source / name).is_dir()]
    for name in parts:
        if name not in skip:
            shutil.copytree(source / name, out / name, dirs_exist_ok=True)
    shutil.copy2(source / "model_index.json", out / "model_index.json")


def _write_parts_from_components(s: Session, out: Path) -> None:
    """For a single-file source: the frozen parts saved from memory, with a model_index.json."""
    c = s.components
    c.vae.save_pretrained(out / "vae")
    getattr(c.tokenizer, "_tokenizer", c.tokenizer).save_pretrained(out / "tokenizer")
    (out / "scheduler").mkdir(exist_ok=True)
    config = {k: v for k, v in c.scheduler_config.items()}
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(config, indent=1))
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
             "feature_extractor": [None, None], "safety_checker": [None, None],
             "requires_safety_checker": False,
             "scheduler": ["diffusers", config.get("_class_name", "DDIMScheduler")],
             "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (out / "model_index.json").write_text(json.dumps(index, indent=2))


def _write_sdlab_json(s: Session, cfg: DreamboothConfig, source: Path, out: Path) -> None:
    """The source's sdlab.json (or its defaults) with the new name and how it was made."""
    from dataclasses import asdict
    meta_file = source / "sdlab.json" if source.is_dir() else None
    meta = json.loads(meta_file.read_text()) if meta_file and meta_file.exists() else {}
    meta["defaults"] = meta.get("defaults") or asdict(s.components.defaults)
    meta["name"] = out.name
    meta["personalization"] = {"recipe": "dreambooth", "source": cfg.model,
                               "instance_prompt": cfg.instance_prompt,
                               "class_prompt": cfg.class_prompt if cfg.prior_preservation else None,
                               "steps": cfg.steps, "lr": cfg.lr,
                               "train_text_encoder": cfg.train_text_encoder,
                               "train_decoder": cfg.train_decoder}
    (out / "sdlab.json").write_text(json.dumps(meta, indent=2))
