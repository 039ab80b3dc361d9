"""Few-step students of a trained model: guided distillation and latent consistency distillation.

Guided distillation (Meng et al. 2022, "On distillation of guided diffusion models"):
  stage 1  a student UNet with a guidance input (`time_cond_proj_dim`, fed the embedding of w - 1
           exactly as `sdlab.generate` feeds it) learns the classifier-free-guided teacher output
           (two teacher passes: uncond + w (cond - uncond)) in one pass, for w ~ U[w_min, w_max].
  stage 2  progressive distillation (Salimans & Ho 2022): each round halves the DDIM step count;
           the new student (initialised from the previous one, which is now the teacher) learns to
           do in one DDIM step what the teacher does in two. Every round is kept as a model folder.
Consistency distillation (LCM, Luo et al. 2023): a student with the same guidance input learns
  f(z_t) = c_skip z_t + c_out x0(z_t) that agrees with an EMA target network one skipping-step
  DDIM-with-CFG solver step further down; sampled with diffusers' LCMScheduler.

Everything runs on the shared training loop (`sdlab.train.loop`: accelerate, progress, checkpoints,
--resume). Every phase writes a diffusers-format folder that `sdlab.load` reads, whose sdlab.json
picks the sampler, steps and guidance scale the student was trained for.

Notation: w is the guidance scale as `sdlab generate --guidance-scale` uses it (1 = no guidance).
All x0 arithmetic is in the DDPM scale that the UNet sees, with the model's own alpha_bar table,
so the students match diffusers' DDIM and LCM schedulers step for step.
"""
from __future__ import annotations

import copy
import json
import random
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import Tensor

from sdlab import samplers
from sdlab.errors import InputError
from sdlab.generate import guidance_embedding
from sdlab.train import loop

POOL_FILE = "pool.pt"
TRAIN_DIR = "train"  # checkpoints and loss logs of each phase, under the run folder


# --- configs --------------------------------------------------------------------------------

@dataclass
class DistillConfig:
    """What both methods share: the teacher, the data, the guidance range, the optimiser."""

    model: str = "shapes"
    out_dir: str = "runs/distill"
    batch_size: int = 32
    lr: float = 1e-4
    warmup_steps: int = 20
    w_min: float = 1.0
    w_max: float = 8.0
    default_guidance: float | None = None  # None: the teacher's default, clipped to the range
    cond_dim: int = 256  # width of the guidance embedding (the UNet's time_cond_proj_dim)
    cond_lr_scale: float = 10.0  # lr multiplier of the new, zero-initialised guidance projection
    prompts_file: str | None = None  # generic models: one prompt a line
    images: str | None = None  # generic models: start points for noising (else teacher samples)
    pool_size: int = 2048  # clean latents held for noising (Shapes scenes / images / samples)
    caption_keep: float = 0.5  # Shapes: each optional caption clause kept with this chance
    seed: int = 0
    checkpoint_minutes: float = 5.0
    log_every: int = 10
    save_dtype: str = "fp16"
    name: str | None = None  # the final student's name (sdlab.json); default from the teacher

    @classmethod
    def from_dict(cls, raw: dict) -> "DistillConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys: {', '.join(sorted(unknown))}")
        return cls(**{k: v for k, v in raw.items() if v is not None})

    def validate(self) -> None:
        if not 0 <= self.w_min <= self.w_max:
            raise ValueError(f"need 0 <= w_min <= w_max, got {self.w_min}, {self.w_max}")
        if self.batch_size < 1 or self.pool_size < 1:
            raise ValueError("batch size and pool size must be >= 1")
        if self.save_dtype not in ("fp16", "fp32"):
            raise ValueError(f"save dtype must be fp16 or fp32, got {self.save_dtype!r}")


@dataclass
class GuidedConfig(DistillConfig):
    stage1_steps: int = 400
    start_steps: int = 32  # DDIM steps of the stage-1 model, the teacher of the first round
    end_steps: int = 4  # DDIM steps of the last round's student
    steps_per_round: int = 300
    ema_decay: float = 0.99  # exported weights are an EMA of the student; 0 turns it off
    # a guidance-distilled model (name or folder) whose UNet stage 1 starts from instead of the
    # teacher's: re-distilling after the teacher was fine-tuned, its guidance input already learned
    student_init: str | None = None

    def round_steps(self) -> list[int]:
        """Student step counts of the rounds: start/2, start/4, ..., end."""
        ratio = self.start_steps // self.end_steps
        if self.start_steps % self.end_steps or ratio & (ratio - 1):
            raise ValueError(f"start steps {self.start_steps} is not end steps "
                             f"{self.end_steps} times a power of two")
        return [self.start_steps >> k for k in range(1, ratio.bit_length())]

    def validate(self) -> None:
        super().validate()
        if self.end_steps < 1 or self.start_steps < self.end_steps:
            raise ValueError("need 1 <= end steps <= start steps")
        self.round_steps()


@dataclass
class LCMConfig(DistillConfig):
    steps: int = 800
    solver_steps: int = 50  # the DDIM solver's grid; skipping step = T / solver_steps timesteps
    target_decay: float = 0.95  # EMA of the target network
    loss: str = "huber"  # or "l2"
    huber_c: float = 1e-3
    default_steps: int = 4

    def validate(self) -> None:
        super().validate()
        if self.loss not in ("huber", "l2"):
            raise ValueError(f"loss must be huber or l2, got {self.loss!r}")
        if not 1 <= self.default_steps <= self.solver_steps:
            raise ValueError("need 1 <= default steps <= solver steps")


# --- the noise schedule and DDIM arithmetic -------------------------------------------------

class Schedule:
    """The model's alpha_bar table, taken from the DDIM scheduler the Pipeline samples with, so
    that a step computed here is the step diffusers takes."""

    def __init__(self, scheduler_config: dict, device: torch.device | str = "cpu"):
        ddim = samplers.make_scheduler("ddim", scheduler_config)
        self.config = dict(scheduler_config)
        self.num_train_timesteps = int(ddim.config.num_train_timesteps)
        self.prediction_type = ddim.config.prediction_type
        self.alphas_cumprod = ddim.alphas_cumprod.float().to(device)
        self.final_alpha_bar = torch.as_tensor(ddim.final_alpha_cumprod).float().to(device)

    def alpha_bar(self, t: Tensor) -> Tensor:
        """alpha_bar per sample as (B, 1, 1, 1); t < 0 is past the end (DDIM's final alpha)."""
        ab = torch.where(t >= 0, self.alphas_cumprod[t.clamp(min=0)], self.final_alpha_bar)
        return ab.view(-1, 1, 1, 1)

    def snr(self, t: Tensor) -> Tensor:
        ab = self.alpha_bar(t)
        return ab / (1 - ab)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        ab = self.alpha_bar(t)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def split(self, z: Tensor, out: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(x0, eps) implied by the model output `out` at z_t, in the exact form of its
        parameterisation (the forms diffusers' DDIM step uses)."""
        ab = self.alpha_bar(t)
        a, s = ab.sqrt(), (1 - ab).sqrt()
        if self.prediction_type == "v_prediction":
            return a * z - s * out, s * z + a * out
        if self.prediction_type == "epsilon":
            return (z - s * out) / a, out
        if self.prediction_type == "sample":
            return out, (z - a * out) / s
        raise ValueError(f"unknown prediction type {self.prediction_type!r}")

    def ddim_step(self, z: Tensor, out: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
        """Deterministic DDIM (eta 0) from t to t_next given the model output at (z, t)."""
        x0, eps = self.split(z, out, t)
        ab_next = self.alpha_bar(t_next)
        return ab_next.sqrt() * x0 + (1 - ab_next).sqrt() * eps

    def progressive_target(self, z: Tensor, z_next: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
        """Salimans & Ho's x0 target: the x0 with which ONE DDIM step from z (at t) lands exactly
        on z_next (at t_next), where the teacher's two steps landed.

        One step gives a_n x0 + (s_n / s_t)(z - a_t x0); solve it for x0 = z_next.
        """
        ab_t, ab_n = self.alpha_bar(t), self.alpha_bar(t_next)
        ratio = (1 - ab_n).sqrt() / (1 - ab_t).sqrt()
        return (z_next - ratio * z) / (ab_n.sqrt() - ratio * ab_t.sqrt())

    def x0_loss(self, z: Tensor, out: Tensor, t: Tensor, x0_target: Tensor) -> Tensor:
        """Error of the x0 implied by `out`, weighted by truncated SNR max(SNR, 1): an x0 loss at
        high noise (where an epsilon loss would weigh nothing) and an epsilon loss at low noise."""
        x0, _ = self.split(z, out, t)
        weight = self.snr(t).clamp(min=1.0)
        return (weight * (x0.float() - x0_target.float()) ** 2).mean()


@dataclass
class StepGrid:
    """The jumps a student is trained on, as tensors of timesteps: from t to t_next, and for
    progressive distillation the teacher's stop in between (t_mid)."""

    t: Tensor
    t_next: Tensor
    t_mid: Tensor | None = None

    def sample(self, n: int, device) -> tuple[Tensor, Tensor, Tensor | None]:
        i = torch.randint(len(self.t), (n,))
        mid = None if self.t_mid is None else self.t_mid[i].to(device)
        return self.t[i].to(device), self.t_next[i].to(device), mid


def ddim_jumps(scheduler_config: dict, steps: int) -> tuple[list[int], list[int]]:
    """(t, t_next) of an N-step DDIM run exactly as diffusers' DDIMScheduler walks it:
    its own timestep spacing, and t_next = t - T // N (negative: the final, clean alpha)."""
    sched = samplers.make_scheduler("ddim", scheduler_config)
    sched.set_timesteps(steps)
    ts = [int(t) for t in sched.timesteps]
    jump = sched.config.num_train_timesteps // steps
    return ts, [t - jump for t in ts]


def progressive_grid(scheduler_config: dict, student_steps: int) -> StepGrid:
    """The student's N-step jumps, each split at a timestep of the teacher's 2N-step grid (the
    points the teacher was trained at) so that the teacher takes two DDIM steps per jump."""
    ts, nexts = ddim_jumps(scheduler_config, student_steps)
    teacher_ts, _ = ddim_jumps(scheduler_config, 2 * student_steps)
    mids = []
    for t, t_next in zip(ts, nexts):
        inside = [u for u in teacher_ts if t_next < u < t]
        if inside:
            mids.append(min(inside, key=lambda u: abs(u - (t + t_next) / 2)))
        elif t - t_next >= 2:
            mids.append((t + t_next) // 2)
        else:
            raise ValueError(f"{student_steps} steps: a jump of one timestep cannot be halved")
    return StepGrid(torch.tensor(ts), torch.tensor(nexts), torch.tensor(mids))


def consistency_grid(num_train_timesteps: int, solver_steps: int) -> StepGrid:
    """LCM's skipping-step solver grid: t = k-1, 2k-1, ..., T-1 with k = T // solver_steps (the
    timesteps LCMScheduler samples from) and t_next = t - k (-1 at the clean end)."""
    k = num_train_timesteps // solver_steps
    t = torch.arange(1, solver_steps + 1) * k - 1
    return StepGrid(t, t - k)


# --- UNets ----------------------------------------------------------------------------------

def unet_config(unet) -> dict:
    return getattr(unet, "module", unet).config  # through a DDP wrapper


def guided_output(unet, z: Tensor, t: Tensor, cond: Tensor, uncond: Tensor | None,
                  w: Tensor) -> Tensor:
    """The output `sdlab.generate` samples with at guidance w: one pass with the guidance
    embedding of w - 1 for a distilled UNet; otherwise classifier-free guidance, both halves in
    one batched call."""
    dim = unet_config(unet).time_cond_proj_dim
    if dim is not None:
        cond_emb = guidance_embedding(w - 1.0, dim).to(z.dtype)
        return unet(z, t, encoder_hidden_states=cond, timestep_cond=cond_emb).sample
    if uncond is None:
        raise ValueError("a UNet without a guidance input needs the unconditional embeddings")
    out_uncond, out_cond = unet(torch.cat([z, z]), torch.cat([t, t]),
                                encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
    return out_uncond + w.view(-1, 1, 1, 1).to(z.dtype) * (out_cond - out_uncond)


def make_guidance_student(teacher_unet, cond_dim: int):
    """The teacher's UNet plus a guidance input. The new projection starts at zero, so the
    student starts as exactly the teacher's conditional model for every w."""
    from diffusers import UNet2DConditionModel
    config = dict(unet_config(teacher_unet))
    if config.get("time_cond_proj_dim") is not None:
        student = copy.deepcopy(teacher_unet)
    else:
        student = UNet2DConditionModel.from_config({**config, "time_cond_proj_dim": cond_dim})
        missing, unexpected = student.load_state_dict(teacher_unet.state_dict(), strict=False)
        if unexpected or set(missing) != {"time_embedding.cond_proj.weight"}:
            raise RuntimeError(f"student/teacher mismatch: missing {missing}, "
                               f"unexpected {unexpected}")
        torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
        student.to(teacher_unet.device)
        if student.dtype != teacher_unet.dtype:
            student.type(teacher_unet.dtype)  # not .to(dtype): diffusers warns on every cast
    return student.train().requires_grad_(True)


@torch.no_grad()
def ema_update(target: torch.nn.Module, online: torch.nn.Module, decay: float) -> None:
    """target <- decay * target + (1 - decay) * online (LCM's target network, no warm-up)."""
    torch._foreach_lerp_([p.data for p in target.parameters()],
                         [p.data for p in online.parameters()], 1.0 - decay)


def load_unet(folder: Path, device) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32)
    return unet.to(device).eval().requires_grad_(False)


# --- training data --------------------------------------------------------------------------

@dataclass
class Pool:
    """Clean latents to noise, with the prompts to pair them with: each latent's own Shapes scene
    (a fresh random caption of it each time), its own caption, or prompts drawn independently."""

    latents: Tensor
    scenes: list | None = None  # sdlab.shapes.world.Scene per latent
    captions: list[str] | None = None  # one per latent
    prompts: list[str] | None = None  # unpaired: drawn uniformly

    def draw(self, rng: random.Random, n: int, keep: float) -> tuple[list[int], list[str]]:
        from sdlab.shapes.world import random_caption
        idx = [rng.randrange(len(self.latents)) for _ in range(n)]
        if self.scenes is not None:
            return idx, [random_caption(self.scenes[i], rng, keep) for i in idx]
        if self.captions is not None:
            return idx, [self.captions[i] for i in idx]
        return idx, [rng.choice(self.prompts) for _ in idx]

    def state(self) -> dict:
        return {"latents": self.latents, "captions": self.captions, "prompts": self.prompts,
                "scenes": None if self.scenes is None else [asdict(s) for s in self.scenes]}

    @classmethod
    def from_state(cls, state: dict) -> "Pool":
        from sdlab.shapes.world import Scene
        scenes = state.get("scenes")
        if scenes is not None:
            scenes = [Scene(**{**d, "center": tuple(d["center"])}) for d in scenes]
        return cls(state["latents"], scenes, state.get("captions"), state.get("prompts"))


def read_prompts(path: str | Path) -> list[str]:
    prompts = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {path} has no prompts")
    return prompts


@torch.no_grad()
def encode_images(components, images: list) -> Tensor:
    """VAE latents (scaled as the UNet sees them) of PIL images at the model's size."""
    from sdlab.generate import Pipeline, prepare_init_image
    pipe = Pipeline(components)
    w, h = components.defaults.width, components.defaults.height
    images = [prepare_init_image(im, w, h) for im in images]
    return torch.cat([pipe._encode_images(images[i:i + 64]).float().cpu()
                      for i in range(0, len(images), 64)])


def build_pool(cfg: DistillConfig, teacher) -> Pool:
    """Shapes (no prompts file, no images): rendered scenes; --images: those images, captioned by
    their .txt side files or by the prompts file; prompts file only: the teacher's own samples."""
    from PIL import Image
    rng = random.Random(cfg.seed)
    if cfg.images:
        files = sorted(p for p in Path(cfg.images).iterdir()
                       if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
        if not files:
            raise ValueError(f"no images in {cfg.images}")
        sides = [p.with_suffix(".txt") for p in files]
        captions = ([s.read_text().strip() for s in sides] if all(s.exists() for s in sides)
                    else None)
        if captions is None and not cfg.prompts_file:
            raise ValueError("--images needs a .txt caption beside every image or --prompts-file")
        latents = encode_images(teacher, [Image.open(p).convert("RGB") for p in files])
        return Pool(latents, captions=captions,
                    prompts=None if captions else read_prompts(cfg.prompts_file))
    if cfg.prompts_file:
        from sdlab.generate import Pipeline
        prompts = read_prompts(cfg.prompts_file)
        chosen = [rng.choice(prompts) for _ in range(cfg.pool_size)]
        results = Pipeline(teacher).generate(chosen, seed=cfg.seed, batch_size=32)
        return Pool(encode_images(teacher, [r.image for r in results]), captions=chosen)
    from sdlab.shapes.world import render, sample_scene
    scenes = [sample_scene(rng) for _ in range(cfg.pool_size)]
    latents = encode_images(teacher, [Image.fromarray(render(s)) for s in scenes])
    return Pool(latents, scenes=scenes)


def load_or_build_pool(cfg: DistillConfig, teacher, out: Path) -> Pool:
    """The run's pool, built once (by the main process first, when there are several)."""
    from accelerate import PartialState
    path = out / POOL_FILE
    with PartialState().main_process_first():
        if path.exists():
            return Pool.from_state(torch.load(path, weights_only=False))
        pool = build_pool(cfg, teacher)
        tmp = path.with_suffix(".tmp")
        torch.save(pool.state(), tmp)
        tmp.replace(path)
        return pool


class CaptionEmbeddings:
    """Prompt embeddings exactly as the Pipeline computes them (each 77-token chunk encoded on its
    own, shorter prompts padded with the empty chunk), memoised per caption: the Shapes grammar
    has only a few thousand captions, and encoding is a good part of a small model's step."""

    def __init__(self, encoder, max_bytes: int = 512 * 2**20):
        self.encoder, self.max_bytes, self.bytes = encoder, max_bytes, 0
        self.cache: dict[str, Tensor] = {}
        self.empty_chunk = encoder.encode([""])[0].clone()  # clone: a normal tensor, not inference

    def __call__(self, captions: list[str]) -> Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in self.cache]
        fresh = {}
        if missing:
            for caption, emb in zip(missing, self.encoder.encode(missing)):
                chunks = len(self.encoder.tokenize(caption).ids)
                fresh[caption] = emb[: chunks * self.encoder.window].clone()
            if self.bytes < self.max_bytes:
                self.cache.update(fresh)
                self.bytes += sum(e.numel() * e.element_size() for e in fresh.values())
        embs = [self.cache[c] if c in self.cache else fresh[c] for c in captions]
        length = max(len(e) for e in embs)
        return torch.stack([self.pad(e, length) for e in embs])

    def pad(self, emb: Tensor, length: int) -> Tensor:
        extra = (length - len(emb)) // len(self.empty_chunk)
        return torch.cat([emb] + [self.empty_chunk] * extra)


@dataclass
class Batch:
    x0: Tensor
    cond: Tensor
    uncond: Tensor
    w: Tensor


def batches(pool: Pool, embed: CaptionEmbeddings, cfg: DistillConfig, seed: int,
            device) -> Iterator[Batch]:
    """Endless batches: latents, their prompts' embeddings, the empty prompt's (as long), and a
    guidance scale per sample, w ~ U[w_min, w_max]."""
    rng = random.Random(seed)
    while True:
        idx, captions = pool.draw(rng, cfg.batch_size, cfg.caption_keep)
        cond = embed(captions)
        uncond = embed.pad(embed.empty_chunk, cond.shape[1]).expand(len(idx), -1, -1)
        w = torch.tensor([rng.uniform(cfg.w_min, cfg.w_max) for _ in idx])
        yield Batch(pool.latents[idx].to(device), cond.to(device), uncond.to(device), w.to(device))


# --- losses ---------------------------------------------------------------------------------

LossFn = Callable[[Batch, int], Tensor]


def _noised(schedule: Schedule, batch: Batch, t: Tensor) -> Tensor:
    return schedule.add_noise(batch.x0, torch.randn_like(batch.x0), t)


def guidance_loss(student, teacher_unet, schedule: Schedule) -> LossFn:
    """Stage 1: match the CFG-guided teacher's x0 at a uniformly drawn timestep, in one pass."""
    def loss_fn(batch: Batch, step: int) -> Tensor:
        t = torch.randint(0, schedule.num_train_timesteps, (len(batch.x0),), device=batch.x0.device)
        z = _noised(schedule, batch, t)
        with torch.no_grad():
            teacher_out = guided_output(teacher_unet, z, t, batch.cond, batch.uncond, batch.w)
            x0_target, _ = schedule.split(z, teacher_out, t)
        out = guided_output(student, z, t, batch.cond, None, batch.w)
        return schedule.x0_loss(z, out, t, x0_target)
    return loss_fn


def progressive_loss(student, teacher_unet, schedule: Schedule, grid: StepGrid) -> LossFn:
    """Stage 2: one student DDIM step must land where two teacher DDIM steps land."""
    def loss_fn(batch: Batch, step: int) -> Tensor:
        t, t_next, t_mid = grid.sample(len(batch.x0), batch.x0.device)
        z = _noised(schedule, batch, t)
        with torch.no_grad():
            z_mid = schedule.ddim_step(
                z, guided_output(teacher_unet, z, t, batch.cond, batch.uncond, batch.w), t, t_mid)
            z_next = schedule.ddim_step(
                z_mid, guided_output(teacher_unet, z_mid, t_mid, batch.cond, batch.uncond, batch.w),
                t_mid, t_next)
            x0_target = schedule.progressive_target(z, z_next, t, t_next)
        out = guided_output(student, z, t, batch.cond, None, batch.w)
        return schedule.x0_loss(z, out, t, x0_target)
    return loss_fn


class BoundaryCondition:
    """LCM's consistency function f(z, t) = c_skip(t) z + c_out(t) x0(z, t), with the scalings
    taken from the LCMScheduler the student is sampled with (so training and sampling agree)."""

    def __init__(self, scheduler_config: dict, schedule: Schedule):
        self.lcm = samplers.make_scheduler("lcm", scheduler_config)
        self.schedule = schedule

    def __call__(self, z: Tensor, out: Tensor, t: Tensor) -> Tensor:
        # the clean end (t < 0) is t = 0: c_skip = 1, c_out = 0, f is the identity there
        c_skip, c_out = self.lcm.get_scalings_for_boundary_condition_discrete(
            t.clamp(min=0).float())
        x0, _ = self.schedule.split(z, out, t)
        return c_skip.view(-1, 1, 1, 1) * z + c_out.view(-1, 1, 1, 1) * x0


def consistency_loss(student, target_unet, teacher_unet, schedule: Schedule, grid: StepGrid,
                     boundary: BoundaryCondition, cfg: LCMConfig) -> LossFn:
    """LCM: f_student(z_t) must agree with f_target(z_{t-k}), where z_{t-k} is one DDIM step of
    the CFG-guided teacher from z_t (the augmented PF-ODE solver with skipping step k)."""
    def loss_fn(batch: Batch, step: int) -> Tensor:
        t, t_prev, _ = grid.sample(len(batch.x0), batch.x0.device)
        z = _noised(schedule, batch, t)
        pred = boundary(z, guided_output(student, z, t, batch.cond, None, batch.w), t)
        with torch.no_grad():
            teacher_out = guided_output(teacher_unet, z, t, batch.cond, batch.uncond, batch.w)
            z_prev = schedule.ddim_step(z, teacher_out, t, t_prev)
            target_out = guided_output(target_unet, z_prev, t_prev.clamp(min=0), batch.cond,
                                       None, batch.w)
            target = boundary(z_prev, target_out, t_prev)
        diff2 = (pred.float() - target.float()) ** 2
        if cfg.loss == "huber":
            return (torch.sqrt(diff2 + cfg.huber_c**2) - cfg.huber_c).mean()
        return diff2.mean()
    return loss_fn


# --- one training phase ---------------------------------------------------------------------

@dataclass
class Phase:
    """One student to train and export: stage1, round_<steps> or lcm."""

    name: str
    steps: int
    ema_decay: float = 0.0
    cond_lr_scale: float = 1.0  # lr multiplier of a freshly zero-initialised guidance projection


def make_optimizer(student, lr: float, cond_lr_scale: float) -> torch.optim.Optimizer:
    """AdamW as the loop makes it, with the guidance projection in its own group: it starts at
    zero, and at the base rate it would take most of a short run to matter at all."""
    named = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    new = [p for n, p in named if "time_embedding.cond_proj" in n]
    rest = [p for n, p in named if "time_embedding.cond_proj" not in n]
    groups = [{"params": rest, "lr": lr}]
    if new:
        groups.append({"params": new, "lr": lr * cond_lr_scale})
    return torch.optim.AdamW(groups, lr=lr, weight_decay=1e-2)


def train_phase(cfg: DistillConfig, phase: Phase, student, teacher, pool: Pool,
                make_loss: Callable[[torch.nn.Module], LossFn], resume: bool,
                target: torch.nn.Module | None = None, target_decay: float = 0.0):
    """Train `student` on the shared loop; returns the weights to export (the EMA when on) and
    the accelerator. A target network (LCM) is checkpointed with the rest and follows the
    student by EMA after every step."""
    from accelerate import Accelerator

    from sdlab.prompts import PromptEncoder
    accelerator = Accelerator()
    torch.manual_seed(cfg.seed)
    student = accelerator.prepare(student)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = make_optimizer(student, cfg.lr, phase.cond_lr_scale)
    ema = loop.EMA(params, phase.ema_decay) if phase.ema_decay else None
    for state in (ema, target):
        if state is not None:
            accelerator.register_for_checkpointing(state)

    def after_step(step: int) -> None:
        if ema is not None:
            ema.update(params)
        if target is not None:
            ema_update(target, accelerator.unwrap_model(student), target_decay)

    embed = CaptionEmbeddings(PromptEncoder(teacher.tokenizer, teacher.text_encoder))
    data = batches(pool, embed, cfg, cfg.seed * 1000 + accelerator.process_index,
                   accelerator.device)
    config = loop.LoopConfig(steps=phase.steps, out_dir=Path(cfg.out_dir) / TRAIN_DIR / phase.name,
                             lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                             checkpoint_minutes=cfg.checkpoint_minutes,
                             log_every=cfg.log_every, desc=f"distill {phase.name}", resume=resume)
    loop.run(config, accelerator, params, data, make_loss(student),
             loop.Hooks(after_step=after_step), optimizer=optimizer)
    trained = copy.deepcopy(accelerator.unwrap_model(student)).eval().requires_grad_(False)
    if ema is not None:
        ema.copy_to(list(trained.parameters()))
    return trained, accelerator


# --- model folders --------------------------------------------------------------------------

def default_guidance(cfg: DistillConfig, teacher) -> float:
    w = teacher.defaults.guidance_scale if cfg.default_guidance is None else cfg.default_guidance
    return float(min(max(w, cfg.w_min), cfg.w_max))


def export_student(teacher, unet, dest: Path, *, defaults: dict, notes: dict,
                   save_dtype: str = "fp16", scheduler_extra: dict | None = None) -> Path:
    """A diffusers-format folder: the student's UNet and the teacher's other parts, with
    sdlab.json defaults that make `sdlab generate --model dest` sample the way it was trained.
    Written beside dest and renamed, so a folder that exists is complete."""
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    source = Path(teacher.source)
    for part in ("vae", "text_encoder", "tokenizer", "safety_checker", "feature_extractor"):
        if source.is_dir() and (source / part).is_dir():
            shutil.copytree(source / part, tmp / part)
        elif part in ("vae", "text_encoder", "tokenizer"):
            getattr(teacher, part).save_pretrained(tmp / part)
    dtype = torch.float16 if save_dtype == "fp16" else torch.float32
    copy.deepcopy(unet).cpu().type(dtype).save_pretrained(tmp / "unet")
    (tmp / "scheduler").mkdir()
    sched = {**teacher.scheduler_config, **(scheduler_extra or {})}
    (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=1))
    index_file = source / "model_index.json"
    index = (json.loads(index_file.read_text()) if source.is_dir() and index_file.exists()
             else _default_index(sched))
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    meta = {"name": notes.pop("name"), "defaults": {**defaults, "guidance_embedding": True},
            "distill": notes}
    (tmp / "sdlab.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def _default_index(sched: dict) -> dict:
    return {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
            "feature_extractor": [None, None], "image_encoder": [None, None],
            "requires_safety_checker": False, "safety_checker": [None, None],
            "scheduler": ["diffusers", sched.get("_class_name", "DDIMScheduler")],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}


def _finish(accelerator, teacher, unet, dest: Path, **kwargs) -> None:
    if accelerator.is_main_process:
        export_student(teacher, unet, dest, **kwargs)
    accelerator.wait_for_everyone()


def _size_defaults(teacher) -> dict:
    return {"width": teacher.defaults.width, "height": teacher.defaults.height}


# --- the two methods ------------------------------------------------------------------------

def load_teacher(model: str):
    from accelerate import PartialState

    from sdlab.components import load
    return load(model, device=str(PartialState().device), dtype=torch.float32, safety_checker=False)


def _prepare_run(cfg: DistillConfig, method: str):
    cfg.validate()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{method}_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    teacher = load_teacher(cfg.model)
    schedule = Schedule(teacher.scheduler_config, teacher.device)
    pool = load_or_build_pool(cfg, teacher, out)
    return out, teacher, schedule, pool


def _notes(cfg: DistillConfig, teacher, method: str, name: str, **extra) -> dict:
    return {"name": name, "method": method, "teacher": teacher.name,
            "teacher_source": teacher.source, "config": asdict(cfg), **extra}


def stage1_student(cfg: GuidedConfig, teacher):
    """The teacher's UNet with a zero guidance input, or (student_init) an earlier student's
    UNet, which must be the teacher's architecture plus a guidance input."""
    if not cfg.student_init:
        return make_guidance_student(teacher.unet, cfg.cond_dim)
    from sdlab.components import resolve_model_path
    init = load_unet(resolve_model_path(cfg.student_init), teacher.device)
    ours, theirs = ({k: v for k, v in unet_config(u).items() if not k.startswith("_")}
                    for u in (init, teacher.unet))
    if ours.pop("time_cond_proj_dim", None) is None:
        raise InputError(f"student init {cfg.student_init} has no guidance input "
                         "(time_cond_proj_dim); give a guidance-distilled model")
    theirs.pop("time_cond_proj_dim", None)
    differ = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
    if differ:
        raise InputError(f"student init {cfg.student_init} is not the teacher's architecture "
                         f"(differs in {', '.join(differ)})")
    return make_guidance_student(init, cfg.cond_dim)


def distill_guided(cfg: GuidedConfig, resume: bool = False) -> Path:
    """Stage 1, then one progressive-distillation round per halving; returns the last round's
    folder. A phase whose folder exists is skipped; --resume continues an interrupted phase
    from its last checkpoint."""
    out, teacher, schedule, pool = _prepare_run(cfg, "guided")
    w_default = default_guidance(cfg, teacher)
    name = cfg.name or f"{teacher.name}-guided"
    folder = out / "stage1"
    if not (folder / "sdlab.json").exists():
        student = stage1_student(cfg, teacher)
        # a warm start's guidance projection is trained already: no extra learning rate for it
        cond_lr_scale = 1.0 if cfg.student_init else cfg.cond_lr_scale
        trained, acc = train_phase(
            cfg, Phase("stage1", cfg.stage1_steps, cfg.ema_decay, cond_lr_scale), student,
            teacher, pool, lambda s: guidance_loss(s, teacher.unet, schedule), resume)
        _finish(acc, teacher, trained, folder, save_dtype=cfg.save_dtype,
                defaults={"sampler": "ddim", "steps": cfg.start_steps, "guidance_scale": w_default,
                          **_size_defaults(teacher)},
                notes=_notes(cfg, teacher, "guidance distillation (stage 1)",
                             f"{name}-stage1", train_steps=cfg.stage1_steps))
    for steps in cfg.round_steps():
        previous, folder = folder, out / f"round_{steps}"
        if (folder / "sdlab.json").exists():
            continue
        round_teacher = load_unet(previous, teacher.device)
        student = copy.deepcopy(round_teacher).train().requires_grad_(True)
        grid = progressive_grid(teacher.scheduler_config, steps)
        trained, acc = train_phase(
            cfg, Phase(f"round_{steps}", cfg.steps_per_round, cfg.ema_decay), student, teacher,
            pool, lambda s: progressive_loss(s, round_teacher, schedule, grid), resume)
        _finish(acc, teacher, trained, folder, save_dtype=cfg.save_dtype,
                defaults={"sampler": "ddim", "steps": steps, "guidance_scale": w_default,
                          **_size_defaults(teacher)},
                notes=_notes(cfg, teacher, "progressive distillation",
                             name if steps == cfg.end_steps else f"{name}-{steps}",
                             round_teacher=str(previous), train_steps=cfg.steps_per_round))
    return folder


def distill_lcm(cfg: LCMConfig, resume: bool = False) -> Path:
    """Latent consistency distillation into out/model (skipped if it exists)."""
    out, teacher, schedule, pool = _prepare_run(cfg, "lcm")
    folder = out / "model"
    if (folder / "sdlab.json").exists():
        return folder
    # LCMScheduler samples from the solver's grid only when original_inference_steps matches it
    sched_config = {**teacher.scheduler_config, "original_inference_steps": cfg.solver_steps}
    student = make_guidance_student(teacher.unet, cfg.cond_dim)
    target = copy.deepcopy(student).eval().requires_grad_(False)
    grid = consistency_grid(schedule.num_train_timesteps, cfg.solver_steps)
    boundary = BoundaryCondition(sched_config, schedule)
    trained, acc = train_phase(
        cfg, Phase("lcm", cfg.steps, cond_lr_scale=cfg.cond_lr_scale), student, teacher, pool,
        lambda s: consistency_loss(s, target, teacher.unet, schedule, grid, boundary, cfg),
        resume, target=target, target_decay=cfg.target_decay)
    _finish(acc, teacher, trained, folder, save_dtype=cfg.save_dtype,
            scheduler_extra={"original_inference_steps": cfg.solver_steps},
            defaults={"sampler": "lcm", "steps": cfg.default_steps,
                      "guidance_scale": default_guidance(cfg, teacher), **_size_defaults(teacher)},
            notes=_notes(cfg, teacher, "latent consistency distillation",
                         cfg.name or f"{teacher.name}-lcm", train_steps=cfg.steps))
    return folder
