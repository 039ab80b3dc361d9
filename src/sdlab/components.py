"""Load any Stable Diffusion model into one Components object.

`model` may be: an embedded model name (`shapes`, `shapes-fast`), a diffusers-format folder
(model_index.json with unet, vae, text_encoder, tokenizer, scheduler), a single-file SD 1.x/2.x
checkpoint (.safetensors / .ckpt), or a hub id found in the local Hugging Face cache. Nothing is
ever downloaded.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdlab.errors import ModelLoadError

EMBEDDED_DIR = Path(__file__).parent / "models"
EMBEDDED_MODELS = ("shapes", "shapes-fast")
REQUIRED_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")


@dataclass
class Defaults:
    """Settings a model generates best with; sdlab.json in the model folder may override them."""

    sampler: str = "dpm++_2m"
    steps: int = 25
    guidance_scale: float = 7.5
    width: int = 512
    height: int = 512
    guidance_embedding: bool = False  # distilled students take w as an input, not two passes
    # guidance in a limited interval (Kynkaanniemi et al. 2024): below this share of the training
    # timesteps (low noise, where shapes get their edges) guidance is at most guidance_cap
    guidance_cap: float | None = None
    guidance_cap_below: float = 0.7


@dataclass
class Components:
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler_config: dict
    name: str
    source: str
    defaults: Defaults = field(default_factory=Defaults)
    safety_checker: Any = None
    feature_extractor: Any = None

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ModelLoadError(f"unknown device {device!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' asked for, but no CUDA GPU is available")
    return dev


def pick_dtype(device: torch.device, dtype: str | torch.dtype | None) -> torch.dtype:
    """fp16 on a GPU by default, fp32 on the CPU (half precision is slow there)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    table = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
             "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype not in table:
        raise ModelLoadError(f"unknown dtype {dtype!r}; valid: fp32, fp16, bf16")
    return table[dtype]


def resolve_model_path(model: str) -> Path:
    """Where `model` lives on disk; ModelLoadError naming what is missing otherwise."""
    if model in EMBEDDED_MODELS:
        path = EMBEDDED_DIR / model
        if not (path / "model_index.json").exists():
            raise ModelLoadError(f"embedded model {model!r} is not in this install ({path})")
        return path
    path = Path(model).expanduser()
    if path.exists():
        return path
    if model.count("/") == 1 and not model.startswith((".", "/")):
        from sdlab.single_file import resolve_hub_id
        cached = resolve_hub_id(model)
        if cached is not None:
            return cached
        raise ModelLoadError(f"model {model!r}: no such path, and not in the local Hugging Face cache")
    raise ModelLoadError(f"model {model!r} not found (a folder, a .safetensors/.ckpt file, "
                         f"a cached hub id, or one of: {', '.join(EMBEDDED_MODELS)})")


def load(model: str = "shapes", device: str = "auto", dtype: str | torch.dtype | None = None,
         safety_checker: bool = True, prediction_type: str | None = None) -> Components:
    dev = pick_device(device)
    torch_dtype = pick_dtype(dev, dtype)
    path = resolve_model_path(model)
    quiet_library_logs()
    if path.is_file():
        if path.suffix not in SINGLE_FILE_SUFFIXES:
            raise ModelLoadError(f"{path}: not a model folder or a .safetensors/.ckpt checkpoint")
        from sdlab.single_file import load_single_file
        parts = load_single_file(path, prediction_type=prediction_type, torch_dtype=torch_dtype)
        comps = Components(parts["unet"], parts["vae"], parts["text_encoder"], parts["tokenizer"],
                           parts["scheduler_config"], name=path.stem, source=str(path))
    else:
        comps = _load_folder(path, torch_dtype, safety_checker, model)
        if prediction_type:
            comps.scheduler_config["prediction_type"] = prediction_type
    for module in (comps.unet, comps.vae, comps.text_encoder, comps.safety_checker):
        if module is not None:
            module.to(dev).eval().requires_grad_(False)
    if dev.type == "cuda":
        comps.unet.to(memory_format=torch.channels_last)
    if comps.defaults.width == Defaults.width and "sdlab.json" not in _listing(path):
        size = comps.unet.config.sample_size * comps.vae_scale_factor
        comps.defaults.width = comps.defaults.height = int(size)
    return comps


def _listing(path: Path) -> set[str]:
    return {p.name for p in path.iterdir()} if path.is_dir() else set()


def _load_folder(path: Path, dtype: torch.dtype, want_safety: bool, model: str) -> Components:
    index_file = path / "model_index.json"
    if not index_file.exists():
        raise ModelLoadError(f"{path}: no model_index.json (not a diffusers-format model folder)")
    index = json.loads(index_file.read_text())
    missing = [p for p in REQUIRED_PARTS if not (path / p).is_dir()]
    if missing:
        raise ModelLoadError(f"{path}: missing {', '.join(missing)} (a Stable Diffusion folder "
                             f"needs {', '.join(REQUIRED_PARTS)})")
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    try:
        unet = UNet2DConditionModel.from_pretrained(path / "unet", torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(path / "vae", torch_dtype=dtype)
        text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", torch_dtype=dtype)
        tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer")
        config_file = path / "scheduler" / "scheduler_config.json"
        scheduler_config = json.loads(config_file.read_text())
    except (OSError, ValueError, json.JSONDecodeError, RuntimeError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"{path}: broken model part: {first_line}") from e
    safety, extractor = None, None
    if want_safety and index.get("safety_checker", [None, None])[0] and (path / "safety_checker").is_dir():
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor
        safety = StableDiffusionSafetyChecker.from_pretrained(path / "safety_checker", torch_dtype=dtype)
        extractor = CLIPImageProcessor.from_pretrained(path / "feature_extractor")
    defaults = Defaults()
    meta_file = path / "sdlab.json"
    name = model if model in EMBEDDED_MODELS else path.name
    if meta_file.exists():
        meta = json.loads(meta_file.read_text())
        defaults = Defaults(**{**vars(defaults), **meta.get("defaults", {})})
        name = meta.get("name", name)
    return Components(unet, vae, text_encoder, tokenizer, scheduler_config, name=name,
                      source=str(path), defaults=defaults, safety_checker=safety,
                      feature_extractor=extractor)


def quiet_library_logs() -> None:
    """diffusers/transformers print loading chatter and progress bars for local loads."""
    for lib in ("diffusers", "transformers"):
        logging.getLogger(lib).setLevel(logging.ERROR)
    try:
        from diffusers.utils import logging as dlog
        dlog.disable_progress_bar()
        from transformers.utils import logging as tlog
        tlog.disable_progress_bar()
    except ImportError:  # older versions
        pass
