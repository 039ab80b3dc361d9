"""Load single-file Stable Diffusion 1.x / 2.x checkpoints (original LDM key layout), offline.

Nothing is downloaded: the UNet, VAE and text-encoder configs are read off the checkpoint's own
tensor shapes (so tiny test checkpoints load as well as full-size ones), the tokenizer is built
from the CLIP vocabulary shipped with sdlab, and the scheduler config is SD's standard one.

What tensor shapes cannot tell comes, in this order, from: the caller's arguments; a sidecar file
next to the checkpoint (`<stem>.json` as written by `sdlab.ldm_keys.save_single_file`, or the
original LDM `<stem>.yaml` config that AUTOMATIC1111 also reads); SD's own conventions:

- UNet attention heads: SD 2.x uses 64-wide heads (channels/64 heads per level); SD 1.x uses 8
  heads everywhere, which is also diffusers' default, so tiny test UNets built with defaults load
  right. SD 2.x levels whose width is not a multiple of 64 (tiny models) fall back to 8 heads.
- Text encoder heads: hidden/64, true of every released CLIP / OpenCLIP text tower. A hidden size
  that is not a multiple of 64 (a tiny test model) gets 8-wide heads (hidden/8), the convention of
  diffusers' tiny test models; anything else needs the sidecar.
- Prediction type: epsilon for SD 1.x (unless the file has a `v_pred` marker key). For SD 2.x, as
  diffusers and ComfyUI guess: 2.0-base (global_step 875000) and inpainting models are epsilon; a
  full-size UNet is v-prediction when its last transformer's norm1 bias is spread out (std > 0.09,
  ComfyUI's test), epsilon otherwise; without that tensor, v-prediction. Pass `prediction_type`
  (or a sidecar) to be sure.
"""
from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from sdlab.errors import ModelLoadError
from sdlab.ldm_keys import CLIP_PREFIX, OPEN_CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX
from sdlab.tokenizer import MAX_LENGTH, write_clip_tokenizer_files

PREDICTION_TYPES = ("epsilon", "v_prediction")
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
SDXL_CONTEXT_DIMS = (2048, 1280)  # base, refiner
VAE_SCALING_FACTOR = 0.18215
SD2_V_NORM_KEY = UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
SD2_BASE_GLOBAL_STEP = 875000

# Shapes cannot tell these; they are what SD 1.x (OpenAI CLIP ViT-L/14) and SD 2.x (OpenCLIP ViT-H/14) use.
# Token ids are those of the tokenizer sdlab ships (<|startoftext|> 49406, <|endoftext|> 49407; SD 2 pads with "!", 0).
TEXT_ENCODER_DEFAULTS = {
    "sd1": {"hidden_act": "quick_gelu", "projection_dim": 768, "pad_token_id": 49407},
    "sd2": {"hidden_act": "gelu", "projection_dim": 512, "pad_token_id": 0},
}
TEXT_ENCODER_COMMON = {"bos_token_id": 49406, "eos_token_id": 49407, "layer_norm_eps": 1e-5}


# --------------------------------------------------------------------------------- reading files
def read_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors of a .safetensors / .ckpt file, and its non-tensor extras (e.g. global_step)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelLoadError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise ModelLoadError(f"{path} is a folder, not a single-file checkpoint")
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        state_dict, extras = _read_safetensors(path), {}
    else:
        state_dict, extras = _read_torch(path)
    if not state_dict:
        raise ModelLoadError(f"{path}: no tensors in this file")
    return state_dict, extras


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ModelLoadError(f"{path}: not a valid .safetensors file ({_first_line(e)})") from e


def _read_torch(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """torch.load with weights_only=True: a checkpoint holding arbitrary pickled objects is refused."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types here (UnpicklingError, RuntimeError, EOFError...)
        raise ModelLoadError(f"{path}: not a PyTorch checkpoint, or one holding objects other than "
                             f"weights, which sdlab will not unpickle ({_first_line(e)})") from e
    if not isinstance(obj, Mapping):
        raise ModelLoadError(f"{path}: holds a {type(obj).__name__}, not a dict of weights")
    extras = {k: v for k, v in obj.items() if not isinstance(v, (Tensor, Mapping))}
    while isinstance(obj.get("state_dict"), Mapping):  # PyTorch Lightning wraps the weights
        obj = obj["state_dict"]
    return {k: v for k, v in obj.items() if isinstance(v, Tensor)}, extras


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def read_sidecar(path: str | Path) -> dict[str, Any]:
    """Settings next to a checkpoint: `<stem>.json` (sdlab's), else `<stem>.yaml` (the original LDM config)."""
    path = Path(path)
    json_file, yaml_file = path.with_suffix(".json"), path.with_suffix(".yaml")
    if json_file.is_file():
        try:
            return json.loads(json_file.read_text())
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{json_file}: not valid JSON ({e})") from e
    if yaml_file.is_file():
        return _settings_from_ldm_yaml(yaml_file)
    return {}


def _settings_from_ldm_yaml(yaml_file: Path) -> dict[str, Any]:
    """The few settings of an original LDM config (v2-inference-v.yaml etc.) that shapes cannot tell."""
    import yaml
    try:
        params = (yaml.safe_load(yaml_file.read_text()) or {})["model"]["params"]
    except (yaml.YAMLError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{yaml_file}: not an LDM model config ({_first_line(e)})") from e
    settings: dict[str, Any] = {"unet": {}}
    if params.get("parameterization") == "v":
        settings["prediction_type"] = "v_prediction"
    elif params.get("parameterization") == "eps":
        settings["prediction_type"] = "epsilon"
    unet = (params.get("unet_config") or {}).get("params") or {}
    if unet.get("num_heads", -1) not in (-1, None):
        settings["unet"]["attention_head_dim"] = unet["num_heads"]
    elif unet.get("num_head_channels", -1) not in (-1, None):
        settings["unet"]["head_channels"] = unet["num_head_channels"]
    return settings


# --------------------------------------------------------------------------------- detection
def _keys_under(state_dict: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _cross_attention_dim(unet: Mapping[str, Tensor]) -> int | None:
    for key, value in unet.items():
        if key.endswith("attn2.to_k.weight"):
            return int(value.shape[1])
    return None


def _diffusers_model_type(state_dict: Mapping[str, Tensor]) -> str | None:
    """diffusers' own guess at the model type, or None when its heuristics trip on this dict."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    try:
        return infer_diffusers_model_type(state_dict)
    except (KeyError, ValueError, AttributeError, IndexError, TypeError):
        return None


def _is_sdxl(state_dict: Mapping[str, Tensor]) -> bool:
    if any(k.startswith("conditioner.embedders.") for k in state_dict):
        return True
    if _diffusers_model_type(state_dict) in ("xl_base", "xl_refiner", "xl_inpaint", "playground-v2-5"):
        return True
    unet = _keys_under(state_dict, UNET_PREFIX)
    return "label_emb.0.0.weight" in unet and _cross_attention_dim(unet) in SDXL_CONTEXT_DIMS


def detect_family(state_dict: Mapping[str, Tensor]) -> str:
    """'sd1' (OpenAI CLIP text encoder) or 'sd2' (OpenCLIP); ModelLoadError for SDXL or unknown layouts."""
    if _is_sdxl(state_dict):
        raise ModelLoadError("SDXL checkpoints are not supported (sdlab loads SD 1.x and 2.x single files)")
    if UNET_PREFIX + "input_blocks.0.0.weight" not in state_dict:
        guess = _diffusers_model_type(state_dict)
        hint = f"; diffusers would guess {guess!r}" if guess not in (None, "v1") else ""
        raise ModelLoadError(f"not an SD 1.x/2.x checkpoint: no {UNET_PREFIX}input_blocks.0.0.weight "
                             f"(the original LDM UNet layout){hint}")
    if any(k.startswith(OPEN_CLIP_PREFIX) for k in state_dict):
        return "sd2"
    if any(k.startswith(CLIP_PREFIX) for k in state_dict):
        return "sd1"
    raise ModelLoadError(f"no text encoder in this checkpoint (no {CLIP_PREFIX}* or {OPEN_CLIP_PREFIX}* keys)")


def detect_prediction_type(state_dict: Mapping[str, Tensor], family: str | None = None, *,
                           global_step: int | None = None) -> str:
    """'epsilon' or 'v_prediction' guessed from the weights (see the module docstring)."""
    family = family or detect_family(state_dict)
    if "v_pred" in state_dict:
        return "v_prediction"
    if family != "sd2":
        return "epsilon"
    if global_step == SD2_BASE_GLOBAL_STEP:
        return "epsilon"
    conv_in = state_dict.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None and conv_in.shape[1] != 4:  # SD 2 inpainting / depth models
        return "epsilon"
    bias = state_dict.get(SD2_V_NORM_KEY)
    if bias is not None:
        return "v_prediction" if torch.std(bias.float(), unbiased=False) > 0.09 else "epsilon"
    return "v_prediction"


# --------------------------------------------------------------------------------- configs
def _indices(sd: Mapping[str, Tensor], prefix: str) -> list[int]:
    """Sorted distinct integers that follow `prefix` in the keys (block / layer numbers)."""
    found = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return sorted(found)


def _transformer_depth(unet: Mapping[str, Tensor], block: str) -> int:
    return len(_indices(unet, f"{block}.transformer_blocks."))


def unet_config_from_ldm(state_dict: Mapping[str, Tensor], family: str,
                         overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """UNet2DConditionModel config read off `model.diffusion_model.*` shapes."""
    unet = _keys_under(state_dict, UNET_PREFIX)
    n_in = len(_indices(unet, "input_blocks."))
    down = [i for i in _indices(unet, "input_blocks.") if f"input_blocks.{i}.0.op.weight" in unet]
    levels = len(down) + 1
    if n_in < 2 or (n_in - levels) % levels:
        raise ModelLoadError(f"unknown UNet layout: {n_in} input blocks, {len(down)} downsamplers")
    per_level = (n_in - levels) // levels + 1  # resnets per level, plus the downsampler slot
    first = [1 + per_level * lv for lv in range(levels)]  # first resnet of each level
    channels = [int(unet[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0]) for i in first]
    down_attn = [f"input_blocks.{i}.1.proj_in.weight" in unet for i in first]
    up_attn = [f"output_blocks.{per_level * lv}.1.proj_in.weight" in unet for lv in range(levels)]
    if "middle_block.1.proj_in.weight" not in unet or "label_emb.0.0.weight" in unet:
        raise ModelLoadError("unsupported UNet layout (no mid-block attention, or class embeddings)")
    depths = {_transformer_depth(unet, f"input_blocks.{i}.1") for i, a in zip(first, down_attn) if a}
    depths.add(_transformer_depth(unet, "middle_block.1"))
    if len(depths) != 1:
        raise ModelLoadError(f"unsupported UNet layout: transformer depths {sorted(depths)} differ per level")
    proj_in = unet["middle_block.1.proj_in.weight"]
    config = {
        "sample_size": 64,
        "in_channels": int(unet["input_blocks.0.0.weight"].shape[1]),
        "out_channels": int(unet["out.2.weight"].shape[0]),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attn],
        "block_out_channels": channels,
        "layers_per_block": per_level - 1,
        "cross_attention_dim": _cross_attention_dim(unet),
        "transformer_layers_per_block": depths.pop(),
        "use_linear_projection": proj_in.ndim == 2,
        "attention_head_dim": _unet_heads(channels, family, None),
    }
    time_dim = int(unet["time_embed.0.weight"].shape[0])
    if time_dim != 4 * channels[0]:
        config["time_embedding_dim"] = time_dim
    overrides = dict(overrides or {})
    if "head_channels" in overrides:  # from an LDM yaml's num_head_channels
        config["attention_head_dim"] = _unet_heads(channels, family, overrides.pop("head_channels"))
    config.update(overrides)
    return config


def _unet_heads(channels: list[int], family: str, head_channels: int | None) -> int | list[int]:
    """Heads per level: fixed-width heads (SD 2.x: 64 channels) where widths allow, else SD 1.x's 8."""
    width = head_channels or (64 if family == "sd2" else None)
    if width and all(c % width == 0 for c in channels):
        return [c // width for c in channels]
    return 8


def vae_config_from_ldm(state_dict: Mapping[str, Tensor],
                        overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """AutoencoderKL config read off `first_stage_model.*` shapes."""
    vae = _keys_under(state_dict, VAE_PREFIX)
    if "encoder.conv_in.weight" not in vae or "decoder.conv_in.weight" not in vae:
        raise ModelLoadError(f"no VAE in this checkpoint (no {VAE_PREFIX}encoder/decoder weights)")
    levels = _indices(vae, "encoder.down.")
    channels = [int(vae[f"encoder.down.{lv}.block.0.conv1.weight"].shape[0]) for lv in levels]
    config = {
        "in_channels": int(vae["encoder.conv_in.weight"].shape[1]),
        "out_channels": int(vae["decoder.conv_out.weight"].shape[0]),
        "down_block_types": ["DownEncoderBlock2D"] * len(channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(channels),
        "block_out_channels": channels,
        "layers_per_block": len(_indices(vae, "encoder.down.0.block.")),
        "latent_channels": int(vae["decoder.conv_in.weight"].shape[1]),
        "scaling_factor": VAE_SCALING_FACTOR,
        "use_quant_conv": "quant_conv.weight" in vae,
        "use_post_quant_conv": "post_quant_conv.weight" in vae,
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in vae,
    }
    config.update(overrides or {})
    return config


def text_encoder_config_from_weights(weights: Mapping[str, Tensor], family: str,
                                     overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """CLIPTextConfig kwargs from CLIP-format weights (keys without the `text_model.` prefix)."""
    vocab, hidden = weights["embeddings.token_embedding.weight"].shape
    config = {
        **TEXT_ENCODER_DEFAULTS[family], **TEXT_ENCODER_COMMON,
        "vocab_size": int(vocab),
        "hidden_size": int(hidden),
        "intermediate_size": int(weights["encoder.layers.0.mlp.fc1.weight"].shape[0]),
        "num_hidden_layers": len(_indices(weights, "encoder.layers.")),
        "num_attention_heads": hidden // 64 if hidden % 64 == 0 else max(hidden // 8, 1),
        "max_position_embeddings": int(weights["embeddings.position_embedding.weight"].shape[0]),
    }
    config.update(overrides or {})
    return config


def scheduler_config(prediction_type: str = "epsilon", family: str = "sd1") -> dict[str, Any]:
    """SD's training schedule (scaled_linear 0.00085..0.012, 1000 steps), as its scheduler_config.json."""
    return {
        "_class_name": "DDIMScheduler" if family == "sd2" else "PNDMScheduler",
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "trained_betas": None,
        "prediction_type": prediction_type,
        "steps_offset": 1,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "clip_sample": False,
        "timestep_spacing": "leading",
    }


# --------------------------------------------------------------------------------- weights
def _text_weights(state_dict: Mapping[str, Tensor], family: str) -> dict[str, Tensor]:
    """Text encoder weights in CLIPTextModel naming (no `text_model.` prefix), either family."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
    if family == "sd1":
        weights = convert_ldm_clip_checkpoint(state_dict)
    else:
        weights = _open_clip_weights(state_dict, convert_open_clip_checkpoint)
    weights = {k.removeprefix("text_model."): v for k, v in weights.items() if not k.endswith("position_ids")}
    if "embeddings.token_embedding.weight" not in weights or "encoder.layers.0.mlp.fc1.weight" not in weights:
        raise ModelLoadError("text encoder weights incomplete: no token embedding or no layer 0")
    return weights


def _open_clip_weights(state_dict: Mapping[str, Tensor], convert) -> dict[str, Tensor]:
    """OpenCLIP -> CLIP naming, keeping all but the last resblock (SD 2.x reads the penultimate layer)."""
    hidden = state_dict[OPEN_CLIP_PREFIX + "token_embedding.weight"].shape[1]
    last = len(_indices(state_dict, OPEN_CLIP_PREFIX + "transformer.resblocks.")) - 1
    if last < 1:
        raise ModelLoadError("OpenCLIP text encoder has fewer than 2 resblocks (SD 2.x uses the penultimate)")
    stub = SimpleNamespace(config=SimpleNamespace(hidden_size=hidden))  # the helper only reads hidden_size
    weights = convert(stub, dict(state_dict), prefix=OPEN_CLIP_PREFIX)
    dropped = f"text_model.encoder.layers.{last}."
    return {k: v for k, v in weights.items() if not k.startswith(dropped) and k != "text_projection.weight"}


def _empty_weights():
    """Build modules without allocating/initialising parameters (they are replaced by the checkpoint's)."""
    try:
        from accelerate import init_empty_weights
    except ImportError:
        return nullcontext()
    return init_empty_weights()


def _fill(model: torch.nn.Module, weights: Mapping[str, Tensor], what: str, dtype: torch.dtype) -> torch.nn.Module:
    """Load `weights` as `dtype` into `model`, every parameter required; ModelLoadError naming gaps or misfits."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    wrong = [k for k in expected if k in weights and weights[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        problems = [f"{name}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                    for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                    if keys]
        raise ModelLoadError(f"{what} weights do not fit the layout read from the checkpoint ({'; '.join(problems)})")
    cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
    model.load_state_dict(cast, strict=True, assign=True)  # assign: the empty (meta) parameters are replaced
    return model


def _build_unet(state_dict, config, dtype):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    weights = convert_ldm_unet_checkpoint(state_dict, config)
    with _empty_weights():
        unet = UNet2DConditionModel(**config)
    return _fill(unet, weights, "UNet", dtype)


def _build_vae(state_dict, config, dtype):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    weights = convert_ldm_vae_checkpoint(_keys_with_prefix(state_dict, VAE_PREFIX), config)
    with _empty_weights():
        vae = AutoencoderKL(**config)
    return _fill(vae, weights, "VAE", dtype)


def _keys_with_prefix(state_dict: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k: v for k, v in state_dict.items() if k.startswith(prefix)}


def _build_text_encoder(weights, config, dtype):
    from transformers import CLIPTextConfig, CLIPTextModel
    with _empty_weights():
        model = CLIPTextModel(CLIPTextConfig(**config))
    if any(k.startswith("text_model.") for k in model.state_dict()):  # transformers < 5.6 nests the model
        weights = {"text_model." + k: v for k, v in weights.items()}
    return _fill(model, weights, "text encoder", dtype)


# --------------------------------------------------------------------------------- tokenizer
def write_tokenizer_files(out_dir: str | Path, family: str = "sd1", model_max_length: int = MAX_LENGTH) -> Path:
    """CLIP tokenizer files for SD 1.x (pads with <|endoftext|>) or SD 2.x (OpenCLIP pads with '!', id 0)."""
    out = write_clip_tokenizer_files(out_dir)
    pad = "!" if family == "sd2" else "<|endoftext|>"
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        data = json.loads((out / name).read_text())
        data["pad_token"] = pad
        if "model_max_length" in data:
            data["model_max_length"] = model_max_length
        (out / name).write_text(json.dumps(data, indent=2))
    return out


def load_tokenizer(family: str = "sd1", model_max_length: int = MAX_LENGTH):
    """A CLIPTokenizer built offline from the vocabulary shipped with sdlab."""
    from transformers import CLIPTokenizer
    with tempfile.TemporaryDirectory(prefix="sdlab-tokenizer-") as tmp:
        folder = write_tokenizer_files(tmp, family, model_max_length)
        return CLIPTokenizer.from_pretrained(str(folder))


# --------------------------------------------------------------------------------- public entry
def load_single_file(path: str | Path, *, prediction_type: str | None = None,
                     torch_dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """unet, vae, text_encoder, tokenizer and scheduler_config from one SD 1.x/2.x checkpoint file."""
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    state_dict, extras = read_checkpoint(path)
    family = detect_family(state_dict)
    sidecar = read_sidecar(path)
    global_step = _int(extras.get("global_step"))
    prediction = (prediction_type or sidecar.get("prediction_type")
                  or detect_prediction_type(state_dict, family, global_step=global_step))
    try:
        parts = _build_models(state_dict, family, prediction, sidecar, torch_dtype)
    except ModelLoadError:
        raise
    except (TypeError, ValueError, RuntimeError, KeyError) as e:  # a layout our shape reading did not foresee
        raise ModelLoadError(f"{path}: unknown checkpoint layout ({type(e).__name__}: {_first_line(e)})") from e
    max_length = parts["text_encoder"].config.max_position_embeddings
    return {**parts, "tokenizer": load_tokenizer(family, max_length),
            "scheduler_config": scheduler_config(prediction, family)}


def _build_models(state_dict: Mapping[str, Tensor], family: str, prediction: str,
                  sidecar: Mapping[str, Any], dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    """The three networks, configs read off the shapes and completed by the sidecar / SD defaults."""
    unet_config = unet_config_from_ldm(state_dict, family,
                                       _unet_defaults(family, prediction) | sidecar.get("unet", {}))
    vae_config = vae_config_from_ldm(state_dict, sidecar.get("vae"))
    latent_scale = 2 ** (len(vae_config["block_out_channels"]) - 1)
    vae_config.setdefault("sample_size", unet_config["sample_size"] * latent_scale)
    text_weights = _text_weights(state_dict, family)
    text_config = text_encoder_config_from_weights(text_weights, family, sidecar.get("text_encoder"))
    return {
        "unet": _build_unet(state_dict, unet_config, dtype).eval(),
        "vae": _build_vae(state_dict, vae_config, dtype).eval(),
        "text_encoder": _build_text_encoder(text_weights, text_config, dtype).eval(),
    }


def _unet_defaults(family: str, prediction_type: str) -> dict[str, Any]:
    """SD 2.x v-prediction models are the 768px ones and want attention upcast in fp16."""
    if family == "sd2" and prediction_type == "v_prediction":
        return {"sample_size": 96, "upcast_attention": True}
    return {"sample_size": 64}


def _int(value) -> int | None:
    if isinstance(value, Tensor) and value.numel() == 1:
        return int(value.item())
    return value if isinstance(value, int) else None


# --------------------------------------------------------------------------------- hub cache
def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (not when huggingface_hub was imported)."""
    import os
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.environ["HUGGINGFACE_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def resolve_hub_id(repo_id: str, *, revision: str | None = None) -> Path | None:
    """The cached diffusers snapshot folder for `repo_id` (has model_index.json), or None. Never downloads."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=hub_cache_dir(), local_files_only=True)
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError, OSError, ValueError):
        return None
    folder = Path(folder)
    return folder if (folder / "model_index.json").is_file() else None
