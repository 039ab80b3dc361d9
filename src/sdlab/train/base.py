"""The base recipe: train the embedded default model on the Shapes world from nothing.

Stages, each resumable and skipped once its output exists:
  1. data     render N scenes of the base training set (held-out shapes and green triangle excluded)
  2. vae      AutoencoderKL, 64x64 RGB -> 4 x 8 x 8 latents (4 x 16 x 16 with vae_channels of 3 levels)
  3. latents  encode every image once, so UNet steps never touch the VAE
  4. unet     UNet2DConditionModel + CLIPTextModel trained jointly, caption dropout for CFG, EMA
  5. export   a diffusers-format folder in fp16 safetensors, loadable like any SD folder

The noise schedule is SD's scaled-linear one rescaled to (almost) zero terminal SNR, with
v-prediction and trailing timesteps (Lin et al. 2023): at the last timestep the model sees pure
noise, so colour and layout are decided by the prompt rather than leaked from the initial noise.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from sdlab.errors import InputError
from sdlab.shapes.world import CANVAS, Scene, random_caption, render, tag_caption, sample_scene
from sdlab.train import loop

TERMINAL_ALPHA_BAR = 2.0**-24  # not exactly 0, so that sigma-based samplers stay finite


@dataclass
class BaseConfig:
    out_dir: str = "runs/shapes"
    seed: int = 0
    num_images: int = 20000
    # VAE
    vae_channels: tuple[int, ...] = (32, 64, 64, 64)
    vae_steps: int = 600
    vae_batch: int = 16
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    # the decoder stage's object and outline weights, in the VAE's own training (0: plain L1 + L2)
    vae_object_weight: float = 0.0
    vae_edge_weight: float = 0.0
    # decoder fine-tune on the frozen encoder's latents, objects weighted up (small shapes blur)
    decoder_steps: int = 1500
    decoder_lr: float = 3e-4
    decoder_object_weight: float = 4.0
    decoder_edge_weight: float = 4.0  # the object's outline decides its judged shape
    decoder_latent_noise: float = 0.15  # half the batches: z + N(0, (U*this)^2), U ~ U(0,1)
    # text encoder (CLIP architecture, CLIP's BPE vocabulary)
    text_hidden: int = 64
    text_layers: int = 3
    text_heads: int = 4
    # UNet
    unet_channels: tuple[int, ...] = (64, 128, 128)
    unet_layers_per_block: int = 1
    unet_attention_head_dim: int = 8
    # cross-attention per resolution level; None: every level but the lowest, as in SD
    unet_attention: tuple[bool, ...] | None = None
    unet_steps: int = 6000
    unet_batch: int = 64
    unet_lr: float = 5e-4
    caption_dropout: float = 0.1
    clause_keep: float = 0.5
    tag_caption_prob: float = 0.0  # share of captions that are tag lists (`blue, circle`)
    # extra loss weight on the latent cells around the object (a small shape is 4 of 64 cells).
    # Measured as a 1,500-step fine-tune at 4.0: small circles 0.60 -> 0.43, colour + shape
    # 0.83 -> 0.80 (docs/measurements/shapes/object-weight-ablation.json), so off by default
    unet_object_weight: float = 0.0
    # a model (name or folder) whose UNet and text encoder the UNet stage starts from instead of
    # random weights: a fine-tune of a trained model (its VAE must be this run's)
    unet_init: str | None = None
    # a model whose text encoder (only) the UNet stage starts from: a new UNet, words already learnt
    text_encoder_init: str | None = None
    ema_decay: float = 0.999
    checkpoint_minutes: float = 5.0
    # defaults written into the model for `sdlab generate`
    default_sampler: str = "dpm++_2m"
    default_steps: int = 20
    default_guidance_scale: float = 3.0
    default_guidance_cap: float | None = None  # guidance at most this below t = cap_below * 1000
    default_guidance_cap_below: float = 0.7
    name: str = "shapes"
    stages: tuple[str, ...] = ("data", "vae", "latents", "decoder", "unet", "export")

    @classmethod
    def from_file(cls, path: str | Path, **overrides) -> "BaseConfig":
        raw = json.loads(Path(path).read_text()) if path else {}
        raw.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise InputError(f"unknown config keys: {', '.join(sorted(unknown))}")
        for f in fields(cls):
            if f.name in raw and isinstance(getattr(cls, f.name, None), tuple):
                raw[f.name] = tuple(raw[f.name])
        return cls(**raw)


# --- the noise schedule ---------------------------------------------------------------------

def zero_snr_betas(num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                   beta_end: float = 0.012) -> list[float]:
    """SD's scaled-linear betas, rescaled so that the last timestep is (almost) pure noise."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    sqrt_ab = torch.cumprod(1 - betas, 0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    target_last = TERMINAL_ALPHA_BAR**0.5
    sqrt_ab = (sqrt_ab - last) * (first - target_last) / (first - last) + target_last
    ab = sqrt_ab**2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])
    return (1 - alphas).tolist()


def scheduler_config(num_train_timesteps: int = 1000) -> dict:
    return {
        "_class_name": "DDPMScheduler",
        "num_train_timesteps": num_train_timesteps,
        "beta_schedule": "linear",
        "trained_betas": zero_snr_betas(num_train_timesteps),
        "prediction_type": "v_prediction",
        "timestep_spacing": "trailing",
        "steps_offset": 0,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "variance_type": "fixed_small",
    }


# --- model constructors ---------------------------------------------------------------------

def make_vae(cfg: BaseConfig):
    from diffusers import AutoencoderKL
    n = len(cfg.vae_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                         block_out_channels=cfg.vae_channels, layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, sample_size=64,
                         norm_num_groups=16)


def make_text_encoder(cfg: BaseConfig):
    from transformers import CLIPTextConfig, CLIPTextModel
    config = CLIPTextConfig(vocab_size=49408, hidden_size=cfg.text_hidden,
                            intermediate_size=4 * cfg.text_hidden,
                            num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
                            max_position_embeddings=77, hidden_act="quick_gelu",
                            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
                            projection_dim=cfg.text_hidden)
    return CLIPTextModel(config)


def latent_size(cfg: BaseConfig) -> int:
    """The latents' side: each VAE level after the first halves the canvas."""
    return CANVAS // 2 ** (len(cfg.vae_channels) - 1)


def make_unet(cfg: BaseConfig):
    from diffusers import UNet2DConditionModel
    n = len(cfg.unet_channels)
    attention = cfg.unet_attention or (True,) * (n - 1) + (False,)
    if len(attention) != n:
        raise InputError(f"unet_attention has {len(attention)} levels, unet_channels {n}")
    return UNet2DConditionModel(
        sample_size=latent_size(cfg), in_channels=4, out_channels=4,
        block_out_channels=cfg.unet_channels, layers_per_block=cfg.unet_layers_per_block,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        cross_attention_dim=cfg.text_hidden, attention_head_dim=cfg.unet_attention_head_dim,
        norm_num_groups=32)


# --- stages ---------------------------------------------------------------------------------

def _accelerator():
    from accelerate import Accelerator
    return Accelerator()


def stage_data(cfg: BaseConfig, out: Path) -> None:
    path = out / "data.npz"
    if path.exists():
        return
    from tqdm.auto import tqdm
    rng = random.Random(cfg.seed)
    scenes = [sample_scene(rng) for _ in range(cfg.num_images)]
    images = np.stack([render(s) for s in tqdm(scenes, desc="render")])
    np.savez(path, images=images)
    (out / "scenes.json").write_text(json.dumps([asdict(s) for s in scenes]))


def load_scenes(out: Path) -> list[Scene]:
    return [Scene(**{**d, "center": tuple(d["center"])})
            for d in json.loads((out / "scenes.json").read_text())]


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def stage_vae(cfg: BaseConfig, out: Path, resume: bool) -> None:
    final = out / "vae"
    if (final / "config.json").exists():
        return
    accelerator = _accelerator()
    torch.manual_seed(cfg.seed)
    images = np.load(out / "data.npz")["images"]
    vae = accelerator.prepare(make_vae(cfg))
    gen = np.random.default_rng(cfg.seed + accelerator.process_index)

    def batches():
        while True:
            idx = gen.integers(0, len(images), cfg.vae_batch)
            yield images_to_tensor(images[idx]).to(accelerator.device)

    def loss_fn(x, step):
        model = accelerator.unwrap_model(vae)
        dist = model.encode(x).latent_dist
        recon = model.decode(dist.sample()).sample
        kl = dist.kl().mean()
        return (outline_weighted_loss(recon, x, cfg.vae_object_weight, cfg.vae_edge_weight)
                + cfg.vae_kl_weight * kl)

    lc = loop.LoopConfig(steps=cfg.vae_steps, out_dir=out / "vae_run", lr=cfg.vae_lr,
                         warmup_steps=50, cosine_decay=True, desc="vae",
                         checkpoint_minutes=cfg.checkpoint_minutes, resume=resume)
    loop.run(lc, accelerator, list(vae.parameters()), batches(), loss_fn)
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(vae)
        model.eval()
        with torch.no_grad():
            x = images_to_tensor(images[:512])
            z = torch.cat([model.encode(c).latent_dist.mean for c in x.split(128)])
            model.register_to_config(scaling_factor=float(1 / z.std()))
            recon = torch.cat([model.decode(c).sample for c in z.split(128)])
            err = ((recon.clamp(-1, 1) - x).abs() * 127.5).mean().item()
        model.save_pretrained(final)
        shapes = judged_shapes(recon, load_scenes(out)[: len(recon)])
        (out / "vae_report.json").write_text(json.dumps(
            {"mean_abs_error_0_255": err, "scaling_factor": float(1 / z.std()),
             "judged_shape_of_reconstructions": shapes}, indent=1))
        print(f"vae: mean absolute reconstruction error {err:.2f}/255, scaling factor {1 / z.std():.4f}, "
              f"shape judged right in reconstructions: {shapes}")
    accelerator.wait_for_everyone()


def judged_shapes(recon: torch.Tensor, scenes: list[Scene]) -> dict[str, float]:
    """Share of reconstructions whose shape the judge sees as the scene's, per size and shape:
    what the latents can carry at all (small shapes are what a coarse latent loses)."""
    from sdlab.shapes.judge import judge
    pixels = ((recon.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    right: dict[str, list[bool]] = {}
    for image, scene in zip(pixels, scenes):
        right.setdefault(f"{scene.size} {scene.shape}", []).append(judge(image).shape == scene.shape)
    return {k: round(sum(v) / len(v), 3) for k, v in sorted(right.items())}


def stage_latents(cfg: BaseConfig, out: Path) -> None:
    path = out / "latents.pt"
    if path.exists():
        return
    from diffusers import AutoencoderKL
    from tqdm.auto import tqdm
    vae = AutoencoderKL.from_pretrained(out / "vae").eval()
    images = np.load(out / "data.npz")["images"]
    chunks = []
    with torch.inference_mode():
        for i in tqdm(range(0, len(images), 256), desc="latents"):
            x = images_to_tensor(images[i : i + 256])
            chunks.append(vae.encode(x).latent_dist.mean * vae.config.scaling_factor)
    torch.save(torch.cat(chunks), path)


def stage_decoder(cfg: BaseConfig, out: Path, resume: bool) -> None:
    """Sharpen the decoder with the encoder frozen: latents (and so the UNet) stay valid, while
    the loss weights object pixels up, because small shapes are what an 8x8 latent blurs."""
    final = out / "vae_tuned"
    if cfg.decoder_steps == 0 or (final / "config.json").exists():
        return
    from diffusers import AutoencoderKL
    accelerator = _accelerator()
    torch.manual_seed(cfg.seed)
    vae = AutoencoderKL.from_pretrained(out / "vae")
    vae.encoder.requires_grad_(False)
    vae.quant_conv.requires_grad_(False)
    params = [p for p in vae.parameters() if p.requires_grad]
    vae = accelerator.prepare(vae)
    scaling = accelerator.unwrap_model(vae).config.scaling_factor
    latents = torch.load(out / "latents.pt") / scaling
    images = np.load(out / "data.npz")["images"]
    gen = np.random.default_rng(cfg.seed + 1 + accelerator.process_index)

    def batches():
        while True:
            idx = gen.integers(0, len(images), cfg.vae_batch)
            x = images_to_tensor(images[idx])
            yield latents[idx].to(accelerator.device), x.to(accelerator.device)

    def loss_fn(batch, step):
        z, x = batch
        # the UNet's latents are never exactly the encoder's: a decoder that has seen slightly
        # perturbed latents still draws clean outlines from them
        per_image = (z.shape[0], 1, 1, 1)
        sigma = torch.rand(per_image) * (torch.rand(per_image) < 0.5) * cfg.decoder_latent_noise / scaling
        z = z + sigma.to(z.device) * torch.randn_like(z)
        recon = accelerator.unwrap_model(vae).decode(z).sample
        return outline_weighted_loss(recon, x, cfg.decoder_object_weight, cfg.decoder_edge_weight)

    lc = loop.LoopConfig(steps=cfg.decoder_steps, out_dir=out / "decoder_run", lr=cfg.decoder_lr,
                         warmup_steps=20, cosine_decay=True, desc="decoder",
                         checkpoint_minutes=cfg.checkpoint_minutes, resume=resume)
    loop.run(lc, accelerator, params, batches(), loss_fn)
    if accelerator.is_main_process:
        accelerator.unwrap_model(vae).save_pretrained(final)
    accelerator.wait_for_everyone()


def outline_weighted_loss(recon: torch.Tensor, target: torch.Tensor, object_weight: float,
                          edge_weight: float) -> torch.Tensor:
    """L1 + L2 reconstruction error of two-tone images (one object on a plain background, which
    fills the corners), object pixels weighted 1 + object_weight and their outline edge_weight
    more: in a plain pixel loss a small shape's outline, which decides its judged shape, is
    almost nothing."""
    corner = target[:, :, :1, :1]
    is_object = ((target - corner).abs().amax(dim=1, keepdim=True) > 0.1).float()
    weight = 1 + object_weight * is_object + edge_weight * _outline(is_object)
    err = recon - target
    return (weight * (err.abs() + err.pow(2))).mean()


def _outline(mask: torch.Tensor) -> torch.Tensor:
    """Pixels within one pixel of a (B, 1, H, W) 0/1 mask's boundary."""
    grown = torch.nn.functional.max_pool2d(mask, 3, stride=1, padding=1)
    shrunk = -torch.nn.functional.max_pool2d(-mask, 3, stride=1, padding=1)
    return grown - shrunk


def trained_vae_dir(out: Path) -> Path:
    return out / "vae_tuned" if (out / "vae_tuned" / "config.json").exists() else out / "vae"


class CaptionTokens:
    """Tokenised captions, memoised: the grammar has only a few thousand distinct captions."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        missing = [c for c in set(captions) if c not in self.cache]
        if missing:
            ids = self.tokenizer(missing, padding="max_length", max_length=77, truncation=True,
                                 return_tensors="pt").input_ids
            self.cache.update(zip(missing, ids))
        return torch.stack([self.cache[c] for c in captions])


def _training_caption(scene, rng: random.Random, cfg: BaseConfig) -> str:
    """Empty (for classifier-free guidance), a tag list, or a caption from the spec's grammar."""
    u = rng.random()
    if u < cfg.caption_dropout:
        return ""
    if u < cfg.caption_dropout + cfg.tag_caption_prob:
        return tag_caption(scene, rng)
    return random_caption(scene, rng, cfg.clause_keep)


def object_cells(scenes: list[Scene], latent_size: int, margin: float = 3.0) -> torch.Tensor:
    """(N, 1, L, L): the share of each latent cell that lies within `margin` pixels of the
    scene's object box (1 inside, 0 far away), from the scene's geometry alone."""
    cell = CANVAS / latent_size
    edges = torch.arange(latent_size + 1, dtype=torch.float32) * cell
    half = torch.tensor([s.side / 2 + margin for s in scenes], dtype=torch.float32)[:, None]
    centers = torch.tensor([s.center for s in scenes], dtype=torch.float32)

    def overlap(c: torch.Tensor) -> torch.Tensor:  # (N, L): covered share of each cell along one axis
        lo, hi = (c[:, None] - half), (c[:, None] + half)
        return ((torch.minimum(hi, edges[1:]) - torch.maximum(lo, edges[:-1])).clamp(min=0) / cell)

    x, y = overlap(centers[:, 0]), overlap(centers[:, 1])
    return (y[:, :, None] * x[:, None, :])[:, None]


def stage_unet(cfg: BaseConfig, out: Path, resume: bool) -> None:
    final = out / "unet_ema"
    if (final / "unet" / "config.json").exists():
        return
    from diffusers import DDPMScheduler
    from transformers import CLIPTokenizer

    from sdlab.tokenizer import write_clip_tokenizer_files
    accelerator = _accelerator()
    torch.manual_seed(cfg.seed)
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer_files(out / "tokenizer"))
    tokens = CaptionTokens(tokenizer)
    latents = torch.load(out / "latents.pt")
    scenes = load_scenes(out)
    noise_scheduler = DDPMScheduler.from_config(scheduler_config())
    text_encoder_init = cfg.unet_init or cfg.text_encoder_init
    unet, text_encoder = accelerator.prepare(
        trained_part(cfg.unet_init, "unet") if cfg.unet_init else make_unet(cfg),
        trained_part(text_encoder_init, "text_encoder") if text_encoder_init else make_text_encoder(cfg))
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema = loop.EMA(params, cfg.ema_decay)
    accelerator.register_for_checkpointing(ema)
    rng = random.Random(cfg.seed * 1000 + accelerator.process_index)

    weight_maps = 1 + cfg.unet_object_weight * object_cells(scenes, latents.shape[-1])

    def batches():
        while True:
            idx = [rng.randrange(len(scenes)) for _ in range(cfg.unet_batch)]
            captions = [_training_caption(scenes[i], rng, cfg) for i in idx]
            yield (latents[idx].to(accelerator.device), tokens(captions).to(accelerator.device),
                   weight_maps[idx].to(accelerator.device))

    def loss_fn(batch, step):
        x0, ids, weight = batch
        noise = torch.randn_like(x0)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (x0.shape[0],),
                          device=x0.device)
        xt = noise_scheduler.add_noise(x0, noise, t)
        target = noise_scheduler.get_velocity(x0, noise, t)
        cond = text_encoder(ids)[0]
        pred = unet(xt, t, encoder_hidden_states=cond).sample
        # normalised by the mean weight, so the learning rate means the same with any weighting
        return (weight * (pred.float() - target.float()).pow(2)).mean() / weight.mean()

    lc = loop.LoopConfig(steps=cfg.unet_steps, out_dir=out / "unet_run", lr=cfg.unet_lr,
                         warmup_steps=200, cosine_decay=True, desc="unet",
                         checkpoint_minutes=cfg.checkpoint_minutes, resume=resume)
    hooks = loop.Hooks(after_step=lambda s: ema.update(params),
                       on_checkpoint=lambda s: _export_ema(cfg, out, accelerator, unet, text_encoder,
                                                           ema, out / "unet_latest"))
    loop.run(lc, accelerator, params, batches(), loss_fn, hooks)
    _export_ema(cfg, out, accelerator, unet, text_encoder, ema, final)


def trained_part(model: str, part: str):
    """A trained model's `unet` or `text_encoder` in fp32, to fine-tune."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from sdlab.components import resolve_model_path
    cls = {"unet": UNet2DConditionModel, "text_encoder": CLIPTextModel}[part]
    return cls.from_pretrained(resolve_model_path(model) / part).float()


def _export_ema(cfg, out, accelerator, unet, text_encoder, ema, dest: Path) -> None:
    """Write the EMA weights of UNet and text encoder (fp32) to dest, leaving training weights be."""
    if not accelerator.is_main_process:
        return
    import copy
    u, te = copy.deepcopy(accelerator.unwrap_model(unet)), copy.deepcopy(accelerator.unwrap_model(text_encoder))
    ema.copy_to(list(u.parameters()) + list(te.parameters()))
    u.save_pretrained(dest / "unet")
    te.save_pretrained(dest / "text_encoder")


def export_model_folder(cfg: BaseConfig, out: Path, weights: Path, dest: Path,
                        notes: dict | None = None) -> Path:
    """Assemble a diffusers-format SD folder (fp16 safetensors) from a run's parts."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from sdlab.tokenizer import write_clip_tokenizer_files
    dest.mkdir(parents=True, exist_ok=True)
    UNet2DConditionModel.from_pretrained(weights / "unet").half().save_pretrained(dest / "unet")
    CLIPTextModel.from_pretrained(weights / "text_encoder").half().save_pretrained(dest / "text_encoder")
    AutoencoderKL.from_pretrained(trained_vae_dir(out)).half().save_pretrained(dest / "vae")
    write_clip_tokenizer_files(dest / "tokenizer")
    (dest / "scheduler").mkdir(exist_ok=True)
    sched = scheduler_config()
    sched["_diffusers_version"] = "0.42.1"
    (dest / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=1))
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
             "feature_extractor": [None, None], "image_encoder": [None, None],
             "requires_safety_checker": False, "safety_checker": [None, None],
             "scheduler": ["diffusers", "DDPMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    (dest / "model_index.json").write_text(json.dumps(index, indent=2))
    defaults = {"sampler": cfg.default_sampler, "steps": cfg.default_steps,
                "guidance_scale": cfg.default_guidance_scale, "width": 64, "height": 64}
    if cfg.default_guidance_cap is not None:
        defaults.update(guidance_cap=cfg.default_guidance_cap,
                        guidance_cap_below=cfg.default_guidance_cap_below)
    # `stages` says which stages one invocation ran, not how the model was made
    recipe = {k: v for k, v in asdict(cfg).items() if k != "stages"}
    (dest / "sdlab.json").write_text(json.dumps({"name": cfg.name, "defaults": defaults,
                                                 "recipe": recipe, **(notes or {})}, indent=2))
    return dest


def train_base(cfg: BaseConfig, resume: bool = False) -> Path:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    timings = json.loads((out / "timings.json").read_text()) if (out / "timings.json").exists() else {}
    stage_fns = {"data": lambda: stage_data(cfg, out), "vae": lambda: stage_vae(cfg, out, resume),
                 "latents": lambda: stage_latents(cfg, out),
                 "decoder": lambda: stage_decoder(cfg, out, resume),
                 "unet": lambda: stage_unet(cfg, out, resume),
                 "export": lambda: export_model_folder(cfg, out, out / "unet_ema", out / "model")}
    for name in cfg.stages:
        start = time.time()
        stage_fns[name]()
        timings[name] = timings.get(name, 0) + time.time() - start
        if Path(out).exists():
            (out / "timings.json").write_text(json.dumps(timings, indent=2))
    return out / "model"


if __name__ == "__main__":  # python -m sdlab.train.base CONFIG [--resume]
    import sys
    train_base(BaseConfig.from_file(sys.argv[1] if len(sys.argv) > 1 else None),
               resume="--resume" in sys.argv)
