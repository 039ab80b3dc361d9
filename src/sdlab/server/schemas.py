"""Request and response shapes of the AUTOMATIC1111-compatible API (`/sdapi/v1/...`).

Field names and defaults follow A1111 so its clients (webuiapi, scripts, UIs) work unchanged.
Fields A1111 has and sdlab does not use (hires fix, restore_faces, scripts ...) are accepted and
echoed back in `parameters`, never an error: clients send them all. Unset sizes, steps and
guidance fall back to the loaded model's own defaults rather than A1111's 512 px / 50 steps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sdlab.errors import InputError

MAX_SEED = 2**32 - 1
MAX_SIDE = 8192
MAX_PROMPT_CHARS = 20_000
MAX_IMAGE_B64_CHARS = 64 * 1024 * 1024

# A1111's "scheduler" (since 1.9) picks the sigma schedule separately from the sampler.
PLAIN_SCHEDULERS = {"", "automatic", "uniform", "normal", "default"}
KARRAS_SCHEDULERS = {"karras"}


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; keeps one client from stalling the queue or the memory."""

    max_pixels: int = 1024 * 1024  # width * height of one image
    max_batch: int = 16  # images per request (batch_size * n_iter)
    max_steps: int = 150
    max_queue: int = 256  # requests waiting; more get 503
    max_init_pixels: int = 8192 * 8192  # decoded size of an uploaded init image


class GenerationRequest(BaseModel):
    """Fields shared by txt2img and img2img."""

    model_config = ConfigDict(extra="allow")

    prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    styles: list[str] = Field(default_factory=list)
    seed: int = Field(-1, ge=-1, le=MAX_SEED, description="-1 for a random seed")
    subseed: int = -1
    subseed_strength: float = 0.0
    sampler_name: str | None = Field(None, description="A1111 or sdlab name; see /samplers")
    sampler_index: str | None = Field(None, description="deprecated alias of sampler_name")
    scheduler: str | None = Field(None, description="automatic, uniform or karras")
    batch_size: int = Field(1, ge=1, description="images per UNet batch")
    n_iter: int = Field(1, ge=1, description="batches")
    steps: int | None = Field(None, ge=1, description="default: the model's")
    cfg_scale: float | None = Field(None, ge=0, le=100, description="default: the model's")
    width: int | None = Field(None, ge=8, le=MAX_SIDE, multiple_of=8)
    height: int | None = Field(None, ge=8, le=MAX_SIDE, multiple_of=8)
    override_settings: dict[str, Any] = Field(
        default_factory=dict, description='e.g. {"sd_model_checkpoint": "shapes"}')
    override_settings_restore_afterwards: bool = True
    send_images: bool = True
    save_images: bool = False

    @field_validator("sampler_name", "sampler_index")
    @classmethod
    def _known_sampler(cls, value: str | None) -> str | None:
        if value:
            from sdlab.samplers import resolve
            resolve(value)  # InputError (a ValueError) names the valid samplers
        return value

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, value: str | None) -> str | None:
        if value and value.strip().lower() not in PLAIN_SCHEDULERS | KARRAS_SCHEDULERS:
            raise ValueError(f"unknown scheduler {value!r}; valid: automatic, uniform, karras")
        return value

    def sampler(self) -> str | None:
        """The sdlab sampler name (None: the model's default), scheduler "karras" applied."""
        from sdlab.samplers import resolve
        name = self.sampler_name or self.sampler_index
        if not name:
            return None
        sampler = resolve(name)
        if (self.scheduler or "").strip().lower() in KARRAS_SCHEDULERS and "karras" not in sampler.name:
            try:
                return resolve(sampler.name + "_karras").name
            except InputError:
                raise InputError(f"sampler {name!r} has no Karras variant") from None
        return sampler.name

    def checkpoint(self) -> str | None:
        value = self.override_settings.get("sd_model_checkpoint")
        return str(value) if value else None

    @property
    def num_images(self) -> int:
        return self.batch_size * self.n_iter


class Txt2ImgRequest(GenerationRequest):
    denoising_strength: float | None = Field(None, ge=0, le=1, description="hires fix only")


class Img2ImgRequest(GenerationRequest):
    init_images: list[str] = Field(
        min_length=1, description="base64 images, raw or as data: URLs; one for all images, "
                                  "or one per image")
    resize_mode: int = Field(0, ge=0, le=2, description="0 stretch, 1 crop, 2 fill")
    denoising_strength: float = Field(0.75, ge=0, le=1)
    include_init_images: bool = False

    @field_validator("init_images")
    @classmethod
    def _not_huge(cls, images: list[str]) -> list[str]:
        for image in images:
            if len(image) > MAX_IMAGE_B64_CHARS:
                raise ValueError(f"an init image is over {MAX_IMAGE_B64_CHARS // 2**20} MiB of base64")
        return images


class ImageResponse(BaseModel):
    images: list[str] = Field(description="base64 PNGs carrying the A1111 `parameters` chunk")
    parameters: dict[str, Any]
    info: str = Field(description="JSON string: seed, all_seeds, infotexts, ...")


class ProgressState(BaseModel):
    skipped: bool = False
    interrupted: bool = False
    stopping_generation: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    queue_size: int = Field(0, description="requests waiting behind the running one")


class ProgressResponse(BaseModel):
    progress: float = Field(ge=0, le=1)
    eta_relative: float
    state: ProgressState
    current_image: str | None = None
    textinfo: str | None = None
    current_task: str | None = None


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, Any]


class SDModelItem(BaseModel):
    title: str
    model_name: str
    hash: str | None
    sha256: str | None
    filename: str
    config: str | None = None


class PNGInfoRequest(BaseModel):
    image: str = Field(max_length=MAX_IMAGE_B64_CHARS)


class PNGInfoResponse(BaseModel):
    info: str
    items: dict[str, Any]
    parameters: dict[str, Any]


class EmbeddingsResponse(BaseModel):
    loaded: dict[str, Any]
    skipped: dict[str, Any]
