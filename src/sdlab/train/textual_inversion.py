"""Textual inversion: learn the embedding of a new token (one or more vectors) from a few images.

    sdlab train textual-inversion --model shapes --images DIR --token "<gt>" --init-token triangle

Only the new token's rows of the text encoder's embedding table learn: every other parameter is
frozen, the gradient of the other rows is masked (so clipping sees only the new rows) and, after
each optimiser step, the other rows are put back exactly (AdamW's weight decay would move them).
The result is `learned_embeds.safetensors` in diffusers' format ({token: (N, dim) tensor}), which
`--embedding FILE` loads (and diffusers' load_textual_inversion too).

Training prompts come from caption templates, `{}` being the token: "a {}" for the small Shapes
models (their text encoder knows only the caption grammar `a [size] colour shape ...`; there
one-object images are captioned with their background and copied onto the other backgrounds,
see BACKGROUND_CAPTIONS), and
"a {}", "{}", "an image of a {}", "a photo of a {}" for real models; `--caption-template`
(repeatable) replaces them, and a caption file beside an image (`img.txt`) is used for that image.
An N-vector token `<x>` is `<x> <x>_1 ... <x>_{N-1}` in the tokenizer; prompts only say `<x>`.

Defaults (see sdlab.train.personal): 400 steps, lr 5e-3, batch 16 on the small models;
2000 steps, lr 5e-4, batch 1 on 512 px models.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdlab import personalize
from sdlab.errors import InputError
from sdlab.train.personal import Session, TrainConfig, format_caption, on_other_backgrounds

SMALL_TEMPLATES = ("a {}",)
PHOTO_TEMPLATES = ("a {}", "{}", "an image of a {}", "a photo of a {}")
EMBEDDING_FILE = "learned_embeds.safetensors"
# On the small models each two-tone image (without a caption file) is captioned by its background
# and also shown on every other palette background: with `a {}` alone the token absorbs the
# training images' backgrounds and `a <gt> on a white background` fights it (measured, 32 seeds:
# 0.41 right with `a {}`, 0.66 with background captions, 0.875 with the copies too).
BACKGROUND_CAPTIONS = {"small": "a {{}} on {an} {background} background", "sd": None}


@dataclass
class TextualInversionConfig(TrainConfig):
    token: str = ""
    init_token: str = ""
    vectors: int | None = None  # None: by model size (personal.TI_VECTORS)
    caption_templates: list[str] = field(default_factory=list)  # empty: by model size

    def check(self) -> None:
        super().check()
        if not self.token or not self.init_token:
            raise InputError("textual inversion needs --token and --init-token")
        if self.vectors is not None and self.vectors < 1:
            raise InputError(f"vectors must be >= 1, got {self.vectors}")
        for t in self.caption_templates:
            if "{}" not in t:
                raise InputError(f"caption template {t!r} has no {{}} for the token")


def default_out(token: str) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", token.lower()).strip("-") or "token"
    return Path("runs") / f"ti-{slug}" / EMBEDDING_FILE


def init_vectors(session: Session, init_token: str, n: int) -> torch.Tensor:
    """Vector i starts as the embedding of the init word's token i (cycling), as A1111 does."""
    ids = session.components.tokenizer(init_token, add_special_tokens=False).input_ids
    if not ids:
        raise InputError(f"init token {init_token!r} is empty after tokenising")
    table = session.components.text_encoder.get_input_embeddings().weight
    return torch.stack([table[ids[i % len(ids)]] for i in range(n)]).detach().clone()


def train_textual_inversion(cfg: TextualInversionConfig) -> Path:
    """Train and write the embedding; returns its path."""
    cfg.check()
    out_file = Path(cfg.out) if cfg.out else default_out(cfg.token)
    if out_file.suffix not in (".safetensors", ".bin"):
        out_file = out_file / EMBEDDING_FILE
    cfg.out = str(out_file)
    s = Session(cfg, "textual_inversion", out_file.parent)
    images = s.load_images(cfg.images)
    if not cfg.caption_templates and BACKGROUND_CAPTIONS[s.scale]:
        images = on_other_backgrounds(images, s.components.vae, BACKGROUND_CAPTIONS[s.scale])
    te = s.components.text_encoder

    tok = personalize.expanding_tokenizer(s.pipe)
    start = init_vectors(s, cfg.init_token, cfg.vectors)
    ids = personalize.add_tokens(tok, te, cfg.token, cfg.vectors)
    tok.register(cfg.token, cfg.vectors)
    table = te.get_input_embeddings()
    with torch.no_grad():
        table.weight[ids] = start.to(table.weight.dtype)
    frozen = table.weight.detach().clone()
    learn = torch.zeros(table.num_embeddings, dtype=torch.bool, device=frozen.device)
    learn[ids] = True

    s.freeze(s.components.unet)
    te.requires_grad_(False)
    table.weight.requires_grad_(True)
    table.weight.register_hook(lambda g: g * learn[:, None].to(g.dtype))
    if cfg.gradient_checkpointing:
        te.gradient_checkpointing_enable()
        s.components.unet.enable_gradient_checkpointing()
    te.train()
    te_p = s.accelerator.prepare(te)

    templates = cfg.caption_templates or list(SMALL_TEMPLATES if s.scale == "small" else PHOTO_TEMPLATES)

    def make_batch(step: int):
        latents, picks = s.batch(images, step, cfg.batch_size)
        rng = random.Random(f"{cfg.seed}/captions/{step}/{s.accelerator.process_index}")
        prompts = [format_caption(images.captions[i], cfg.token, rng.choice(templates).format(cfg.token))
                   for i in picks]
        return latents, prompts

    def loss_fn(batch, step: int) -> torch.Tensor:
        latents, prompts = batch
        cond = te_p(s.token_ids(prompts))[0]
        return s.diffusion_loss(s.components.unet, latents, cond, step).mean()

    @torch.no_grad()
    def restore_other_rows(step: int) -> None:
        table.weight[~learn] = frozen[~learn]

    def save(step: int | None = None) -> None:
        if s.accelerator.is_main_process:
            save_embedding(out_file, cfg.token, table.weight[ids])

    s.train([table.weight], make_batch, loss_fn, validation_prompts(cfg),
            after_step=restore_other_rows, on_checkpoint=save)
    save()
    s.validate("final", validation_prompts(cfg))
    return out_file


def validation_prompts(cfg: TextualInversionConfig) -> list[str]:
    return cfg.validation_prompts or [f"a {cfg.token}"]


def save_embedding(path: Path, token: str, vectors: torch.Tensor) -> None:
    from safetensors.torch import save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({token: vectors.detach().float().cpu().contiguous()}, str(path))
