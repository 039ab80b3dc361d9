"""sdlab's own generation loop: txt2img, img2img and loopback over a model's components.

One denoising step = one batched UNet call on [uncond; cond] (classifier-free guidance), then each
image's own scheduler steps its own latent. Every image has its own CPU noise generator seeded
with seed+i and its own fresh scheduler, so an image depends only on its seed and settings --
never on the batch size, its place in the batch, or the device.
"""
from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdlab import samplers
from sdlab.components import Components
from sdlab.errors import InputError
from sdlab.images import format_infotext
from sdlab.prompts import PromptEncoder

MAX_SEED = 2**32 - 1


@dataclass
class GenerationParams:
    """Everything that determines one image; written into its PNG as A1111 infotext."""

    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    sampler: str
    guidance_scale: float
    width: int
    height: int
    model: str
    denoising_strength: float | None = None
    extras: dict[str, str] = field(default_factory=dict)  # LoRAs, embeddings, loop index ...

    def infotext(self) -> str:
        fields = {"Steps": self.steps, "Sampler": samplers.resolve(self.sampler).a1111_name,
                  "CFG scale": _number(self.guidance_scale), "Seed": self.seed,
                  "Size": f"{self.width}x{self.height}", "Model": self.model,
                  "Denoising strength": (None if self.denoising_strength is None
                                         else _number(self.denoising_strength)),
                  **self.extras}
        return format_infotext(self.prompt, self.negative_prompt, fields)

    def to_dict(self) -> dict:
        return asdict(self)


def _number(x: float) -> str:
    return f"{x:g}"


@dataclass
class Result:
    image: Image.Image
    params: GenerationParams
    pixels: np.ndarray | None = None  # float (height, width, 3) in [0, 1], before 8-bit rounding
    nsfw: bool = False
    interrupted: bool = False
    trajectory: list[Image.Image] | None = None


@dataclass
class Progress:
    """Reported after every denoising step of a run."""

    step: int  # steps done in the current batch
    total: int  # steps the current batch takes
    images_done: int  # images finished before the current batch
    batch_images: int
    images_total: int
    preview_latents: torch.Tensor | None = None  # predicted clean latents of the current batch

    @property
    def fraction(self) -> float:
        """Progress of the whole run in [0, 1]."""
        done = self.images_done + self.batch_images * self.step / max(1, self.total)
        return min(1.0, done / max(1, self.images_total))


@dataclass
class Settings:
    steps: int
    guidance_scale: float
    sampler: str
    width: int
    height: int
    guidance_cap: float | None = None  # see Defaults.guidance_cap
    guidance_cap_below: float = 0.7

    def guidance_at(self, t: float, num_train_timesteps: int) -> float:
        """The guidance scale of the step at timestep t."""
        if self.guidance_cap is not None and t < self.guidance_cap_below * num_train_timesteps:
            return min(self.guidance_scale, self.guidance_cap)
        return self.guidance_scale


@dataclass
class _Request:
    prompt: str
    negative_prompt: str
    seed: int
    init_image: Image.Image | None = None


ProgressFn = Callable[[Progress], None]
StopFn = Callable[[], bool]


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of the guidance weight (VDM / LCM), the input of a guidance-distilled
    UNet through its `time_cond_proj_dim`. As in diffusers' LCM pipeline, w is passed as
    guidance_scale - 1, so that w = 0 means no guidance."""
    w = w.float() * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device)
                      * -(np.log(10000.0) / (half - 1)))
    emb = w[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


def predicted_clean(model_input: torch.Tensor, model_output: torch.Tensor, alpha_bar: torch.Tensor,
                    prediction_type: str) -> torch.Tensor:
    """x0 from the UNet's output at a noisy input in DDPM scale (what scale_model_input returns)."""
    a = alpha_bar.to(model_input.dtype).view(-1, 1, 1, 1)
    if prediction_type == "v_prediction":
        return a.sqrt() * model_input - (1 - a).sqrt() * model_output
    if prediction_type == "epsilon":
        return (model_input - (1 - a).sqrt() * model_output) / a.sqrt()
    return model_output


class Pipeline:
    """Generation over loaded Components; safe to share across threads only one call at a time."""

    def __init__(self, components: Components):
        self.components = components
        self.encoder = PromptEncoder(components.tokenizer, components.text_encoder)
        self.infotext_extras: dict[str, str] = {}  # LoRAs, embeddings (sdlab.personalize)

    # --- public API -------------------------------------------------------------------------

    def generate(self, prompt: str | Sequence[str] = "", negative_prompt: str = "", *,
                 steps: int | None = None, guidance_scale: float | None = None,
                 sampler: str | None = None, seed: int | None = None, num_images: int = 1,
                 batch_size: int | None = None, width: int | None = None,
                 height: int | None = None, guidance_cap: float | None = None,
                 on_progress: ProgressFn | None = None, should_stop: StopFn | None = None,
                 trajectory: bool = False) -> list[Result]:
        """Text-to-image. A list of prompts gives num_images images of each; image k of the run
        uses seed + k (a random seed when seed is None or -1)."""
        settings = self.settings(steps, guidance_scale, sampler, width, height, guidance_cap)
        requests = self._requests(prompt, negative_prompt, seed, num_images)
        return self._run(requests, settings, None, batch_size, on_progress, should_stop, trajectory)

    def img2img(self, init_image: Image.Image | str | Path | Sequence[Image.Image],
                prompt: str | Sequence[str] = "", negative_prompt: str = "", *,
                strength: float = 0.75, steps: int | None = None,
                guidance_scale: float | None = None, sampler: str | None = None,
                seed: int | None = None, num_images: int = 1, batch_size: int | None = None,
                width: int | None = None, height: int | None = None,
                guidance_cap: float | None = None,
                on_progress: ProgressFn | None = None, should_stop: StopFn | None = None,
                trajectory: bool = False) -> list[Result]:
        """Image-to-image: the init image is encoded, noised to `strength` of the schedule and
        denoised with the prompt. strength 0 returns the (resized) input; 1 ignores it.
        The init image is scaled to cover width x height and centre-cropped (aspect kept).
        A list of init images gives one request per image (as loopback needs)."""
        settings = self.settings(steps, guidance_scale, sampler, width, height, guidance_cap)
        if not 0.0 <= float(strength) <= 1.0:
            raise InputError(f"strength must be between 0 and 1, got {strength}")
        inits = [prepare_init_image(im, settings.width, settings.height)
                 for im in (init_image if isinstance(init_image, (list, tuple)) else [init_image])]
        requests = self._requests(prompt, negative_prompt, seed, num_images)
        if len(inits) == 1:
            requests = [replace(r, init_image=inits[0]) for r in requests]
        elif len(inits) == len(requests):
            requests = [replace(r, init_image=im) for r, im in zip(requests, inits)]
        else:
            raise InputError(f"{len(inits)} init images for {len(requests)} images")
        return self._run(requests, settings, float(strength), batch_size, on_progress,
                         should_stop, trajectory)

    def loopback(self, init_image: Image.Image | str | Path, prompts: Sequence[str], *,
                 strength: float = 0.5, seed: int | None = None, num_images: int = 1,
                 **kwargs) -> list[list[Result]]:
        """Feed each output back in as the next input; loop k uses prompts[k] and seeds
        offset by k * num_images. Returns the results of every loop."""
        if not prompts:
            raise InputError("loopback needs at least one prompt")
        seed = _pick_seed(seed)
        results = self.img2img(init_image, prompts[0], strength=strength, seed=seed,
                               num_images=num_images, **kwargs)
        loops = [results]
        for k, prompt in enumerate(prompts[1:], start=1):
            results = self.img2img([r.image for r in results], [prompt] * len(results),
                                   strength=strength, seed=seed + k * num_images, **kwargs)
            loops.append(results)
        for k, results in enumerate(loops):
            for r in results:
                r.params.extras["Loopback"] = f"{k + 1}/{len(prompts)}"
        return loops

    def settings(self, steps: int | None = None, guidance_scale: float | None = None,
                 sampler: str | None = None, width: int | None = None,
                 height: int | None = None, guidance_cap: float | None = None) -> Settings:
        """Settings with the model's defaults filled in, validated (InputError if bad).
        guidance_cap None is the model's own; math.inf turns the cap off."""
        d = self.components.defaults
        if guidance_cap is None:
            guidance_cap = d.guidance_cap
        elif guidance_cap == math.inf:
            guidance_cap = None
        elif not guidance_cap >= 0:
            raise InputError(f"guidance cap must be >= 0, got {guidance_cap}")
        s = Settings(steps=d.steps if steps is None else steps,
                     guidance_scale=d.guidance_scale if guidance_scale is None else guidance_scale,
                     sampler=samplers.resolve(sampler or d.sampler).name,
                     width=d.width if width is None else width,
                     height=d.height if height is None else height,
                     guidance_cap=guidance_cap, guidance_cap_below=d.guidance_cap_below)
        if not isinstance(s.steps, int) or s.steps < 1:
            raise InputError(f"steps must be a whole number >= 1, got {s.steps}")
        # at as many steps as training timesteps, several diffusers schedulers index one past
        # their tables (steps_offset, final sigma): one fewer always works
        most = self.components.scheduler_config.get("num_train_timesteps", 1000) - 1
        if s.steps > most:
            raise InputError(f"steps must be at most {most} for this model, got {s.steps}")
        if s.guidance_scale < 0:
            raise InputError(f"guidance scale must be >= 0, got {s.guidance_scale}")
        multiple = self.components.vae_scale_factor * 2 ** (len(self.components.unet.config.block_out_channels) - 1)
        for name, value in (("width", s.width), ("height", s.height)):
            if not isinstance(value, int) or value < 8 or value % 8:
                raise InputError(f"{name} must be a positive multiple of 8, got {value}")
            if value % multiple:
                raise InputError(f"{name} must be a multiple of {multiple} for this model, got {value}")
        return s

    # --- the loop ---------------------------------------------------------------------------

    def _requests(self, prompt, negative_prompt, seed, num_images) -> list[_Request]:
        if not isinstance(num_images, int) or num_images < 1:
            raise InputError(f"number of images must be >= 1, got {num_images}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise InputError("no prompts given")
        negatives = ([negative_prompt] * len(prompts) if isinstance(negative_prompt, str)
                     else list(negative_prompt))
        if len(negatives) != len(prompts):
            raise InputError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        base = _pick_seed(seed)
        pairs = [(p, n) for p, n in zip(prompts, negatives) for _ in range(num_images)]
        return [_Request(p, n, (base + k) % (MAX_SEED + 1)) for k, (p, n) in enumerate(pairs)]

    def _run(self, requests: list[_Request], settings: Settings, strength: float | None,
             batch_size: int | None, on_progress: ProgressFn | None, should_stop: StopFn | None,
             trajectory: bool) -> list[Result]:
        batch_size = batch_size or len(requests)
        if batch_size < 1:
            raise InputError(f"batch size must be >= 1, got {batch_size}")
        results: list[Result] = []
        counter = _StepCounter(len(requests), on_progress)
        for start in range(0, len(requests), batch_size):
            batch = requests[start : start + batch_size]
            results += self._run_batch(batch, settings, strength, counter, should_stop, trajectory)
            if results and results[-1].interrupted:
                break
        return results

    @torch.inference_mode()
    def _run_batch(self, batch: list[_Request], s: Settings, strength: float | None,
                   counter: "_StepCounter", should_stop: StopFn | None,
                   trajectory: bool) -> list[Result]:
        c = self.components
        device, dtype = c.device, c.dtype
        gens = [torch.Generator("cpu").manual_seed(r.seed) for r in batch]
        shape = (1, c.unet.config.in_channels, s.height // c.vae_scale_factor,
                 s.width // c.vae_scale_factor)
        noise = torch.cat([torch.randn(shape, generator=g, dtype=torch.float32) for g in gens])
        noise = noise.to(device, dtype)
        scheds = [self._scheduler(s, r.seed) for r in batch]
        for sch in scheds:
            sch.set_timesteps(s.steps, device=device)
        timesteps = scheds[0].timesteps

        if strength is None:
            latents = noise * scheds[0].init_noise_sigma
        else:
            start = s.steps - min(int(s.steps * strength), s.steps)
            timesteps = timesteps[start * scheds[0].order :]
            if len(timesteps) == 0:  # strength 0: nothing to denoise, the input comes back
                return [self._result(r.init_image, r, s, strength,
                                     pixels=np.asarray(r.init_image, dtype=np.float32) / 255)
                        for r in batch]
            clean = self._encode_images([r.init_image for r in batch])
            for sch in scheds:
                if hasattr(sch, "set_begin_index"):
                    sch.set_begin_index(start * sch.order)
            latents = torch.cat([sch.add_noise(clean[i : i + 1], noise[i : i + 1], timesteps[:1])
                                 for i, sch in enumerate(scheds)])

        cond, uncond = self._embeddings([r.prompt for r in batch],
                                        [r.negative_prompt for r in batch], s.guidance_scale)
        if not samplers.resolve(s.sampler).stochastic:
            # a deterministic step is per-element arithmetic: one scheduler serves the batch
            # exactly as one per image would, without a Python loop per image and step
            scheds, gens = scheds[:1], gens[:1]
        latents, x0_steps, stopped = self._denoise(latents, timesteps, scheds, gens, cond, uncond,
                                                   s, counter, should_stop)
        final = x0_steps[-1] if stopped and x0_steps else latents
        pixels = self._decode(final)
        flags = self._safety_check(pixels)
        frames = self._trajectory_frames(x0_steps) if trajectory else None
        counter.batch_done(len(batch))
        return [self._result(to_pil(px), r, s, strength, pixels=px, nsfw=flags[i],
                             interrupted=stopped,
                             trajectory=None if frames is None else [f[i] for f in frames])
                for i, (px, r) in enumerate(zip(pixels, batch))]

    def _denoise(self, latents, timesteps, scheds, gens, cond, uncond, s: Settings, counter,
                 should_stop):
        c = self.components
        unet = c.unet
        use_cfg = uncond is not None
        num_train = c.scheduler_config.get("num_train_timesteps", 1000)
        cond_dim = unet.config.time_cond_proj_dim  # set: guidance-distilled, w is an input
        context = torch.cat([uncond, cond]) if use_cfg else cond
        step_kwargs = [self._step_kwargs(sch, g) for sch, g in zip(scheds, gens)]
        x0_steps: list[torch.Tensor] = []
        for t in timesteps:
            if should_stop is not None and should_stop():
                return latents, x0_steps, True
            per = latents.shape[0] // len(scheds)  # images per scheduler: 1, or the batch
            model_in = torch.cat([sch.scale_model_input(latents[i * per : (i + 1) * per], t)
                                  for i, sch in enumerate(scheds)])
            w = s.guidance_at(float(t), num_train)
            # a step guided at exactly 1 is the conditional prediction: one pass, not two
            guided = use_cfg and w != 1.0
            unet_in = torch.cat([model_in, model_in]) if guided else model_in
            timestep_cond = None
            if cond_dim is not None:  # this step's w, so that a guidance cap applies here too
                timestep_cond = guidance_embedding(
                    torch.full((unet_in.shape[0],), w - 1.0, device=latents.device),
                    cond_dim).to(latents.dtype)
            out = unet(unet_in, t, encoder_hidden_states=context if guided else cond,
                       timestep_cond=timestep_cond).sample
            if guided:
                out_uncond, out_cond = out.chunk(2)
                out = out_uncond + w * (out_cond - out_uncond)
            alphas_cumprod = scheds[0].alphas_cumprod
            alpha_bar = alphas_cumprod[min(int(round(float(t))), len(alphas_cumprod) - 1)]
            x0 = predicted_clean(model_in, out, alpha_bar.to(latents.device).expand(latents.shape[0]), c.prediction_type)
            x0_steps.append(x0)
            latents = torch.cat([sch.step(out[i * per : (i + 1) * per], t,
                                          latents[i * per : (i + 1) * per], **kw).prev_sample
                                 for i, (sch, kw) in enumerate(zip(scheds, step_kwargs))])
            counter.advance(len(timesteps), latents.shape[0], x0)
        return latents, x0_steps, False

    # --- pieces -----------------------------------------------------------------------------

    def _scheduler(self, s: Settings, seed: int):
        extra = {"noise_sampler_seed": seed} if s.sampler == "dpm++_sde_karras" else {}
        return samplers.make_scheduler(s.sampler, self.components.scheduler_config, **extra)

    @staticmethod
    def _step_kwargs(scheduler, generator) -> dict:
        accepted = samplers.step_params(type(scheduler))
        kwargs = {}
        if "generator" in accepted:
            kwargs["generator"] = generator
        if "eta" in accepted:
            kwargs["eta"] = 0.0
        return kwargs

    def _embeddings(self, prompts: list[str], negatives: list[str], guidance_scale: float):
        """Conditional and (when guidance is on) unconditional embeddings of equal length."""
        c = self.components
        cond = self.encoder.encode(prompts)
        guided = guidance_scale != 1.0 and c.unet.config.time_cond_proj_dim is None
        if not guided:
            return cond.to(c.dtype), None
        uncond = self.encoder.encode(negatives, min_chunks=cond.shape[1] // self.encoder.window)
        if uncond.shape[1] > cond.shape[1]:
            cond = self.encoder.encode(prompts, min_chunks=uncond.shape[1] // self.encoder.window)
        return cond.to(c.dtype), uncond.to(c.dtype)

    def _encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        c = self.components
        x = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)) for im in images])
        x = (x.permute(0, 3, 1, 2) / 127.5 - 1).to(c.device, c.dtype)
        latents = c.vae.encode(x).latent_dist.mean
        shift = getattr(c.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * c.vae.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> list[Image.Image]:
        return [to_pil(p) for p in self._decode(latents)]

    def _decode(self, latents: torch.Tensor) -> np.ndarray:
        """Float pixels in [0, 1], shape (batch, height, width, 3)."""
        c = self.components
        shift = getattr(c.vae.config, "shift_factor", None) or 0.0
        x = c.vae.decode(latents.to(c.dtype) / c.vae.config.scaling_factor + shift).sample
        return (x.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()

    def _trajectory_frames(self, x0_steps: list[torch.Tensor]) -> list[list[Image.Image]]:
        return [self.decode_latents(x0) for x0 in x0_steps]

    def _safety_check(self, pixels: np.ndarray) -> list[bool]:
        """Run the model's safety checker if it has one. It blacks out flagged images in place;
        the result carries nsfw=True and the CLI names it: never a silent black image."""
        c = self.components
        if c.safety_checker is None:
            return [False] * len(pixels)
        clip_input = c.feature_extractor([to_pil(p) for p in pixels],
                                         return_tensors="pt").pixel_values.to(c.device, c.dtype)
        checked, flags = c.safety_checker(images=pixels.copy(), clip_input=clip_input)
        for i, flagged in enumerate(flags):
            if flagged:
                pixels[i] = checked[i]
        return [bool(f) for f in flags]

    def _result(self, image, r: _Request, s: Settings, strength, **kw) -> Result:
        params = GenerationParams(prompt=r.prompt, negative_prompt=r.negative_prompt, seed=r.seed,
                                  steps=s.steps, sampler=s.sampler, guidance_scale=s.guidance_scale,
                                  width=s.width, height=s.height, model=self.components.name,
                                  denoising_strength=strength, extras=dict(self.infotext_extras))
        if s.guidance_cap is not None and s.guidance_cap < s.guidance_scale:
            params.extras["CFG cap"] = f"{s.guidance_cap:g} below t={s.guidance_cap_below:g}"
        return Result(image=image, params=params, **kw)


@dataclass
class _StepCounter:
    """Turns per-batch steps into run-wide progress for the on_progress callback."""

    images_total: int
    on_progress: ProgressFn | None
    images_done: int = 0
    batch_step: int = 0

    def advance(self, batch_steps: int, batch_images: int, preview: torch.Tensor) -> None:
        self.batch_step += 1
        if self.on_progress:
            self.on_progress(Progress(step=self.batch_step, total=batch_steps,
                                      images_done=self.images_done, batch_images=batch_images,
                                      images_total=self.images_total, preview_latents=preview))

    def batch_done(self, images: int) -> None:
        self.images_done += images
        self.batch_step = 0


def to_pil(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray((pixels * 255).round().astype(np.uint8))


def _pick_seed(seed: int | None) -> int:
    if seed is None or seed == -1:
        return random.randint(0, MAX_SEED)
    if not isinstance(seed, int) or seed < 0 or seed > MAX_SEED:
        raise InputError(f"seed must be a whole number in 0..{MAX_SEED} (or -1 for random), got {seed}")
    return seed


def prepare_init_image(image: Image.Image | str | Path, width: int, height: int) -> Image.Image:
    """RGB image scaled to cover width x height, then centre-cropped to exactly that size."""
    if not isinstance(image, Image.Image):
        try:
            with Image.open(image) as im:
                image = im.convert("RGB")
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read init image {image}: {e}") from e
    image = image.convert("RGB")
    if image.size == (width, height):
        return image
    scale = max(width / image.width, height / image.height)
    resized = image.resize((max(width, round(image.width * scale)),
                            max(height, round(image.height * scale))), Image.LANCZOS)
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    return resized.crop((left, top, left + width, top + height))
