"""Export diffusers components to the original (LDM / CompVis) single-file Stable Diffusion layout.

The reverse of what `sdlab.single_file` (and diffusers' `from_single_file`) read: the key names of
`scripts/convert_diffusers_to_original_stable_diffusion.py`, but derived from the state dict itself
(any number of levels / layers per block), so tiny test models export as well as full-size ones.

Layouts written:
- UNet under `model.diffusion_model.`, VAE under `first_stage_model.` (attention weights as 1x1 convs).
- SD 1.x text encoder (OpenAI CLIP) under `cond_stage_model.transformer.text_model.`.
- SD 2.x text encoder (OpenCLIP) under `cond_stage_model.model.`: fused q/k/v `in_proj_*`, an identity
  `text_projection`, CLIP's `logit_scale`, and one zero placeholder resblock at the end, because SD 2.x reads OpenCLIP's
  penultimate layer: an N-layer diffusers encoder is the first N of N+1 OpenCLIP resblocks.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."

_UNET_FIXED = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0",
                "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_VAE_ATTN = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}
_OPEN_CLIP_LAYER = {"layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.", "mlp.fc1.": "mlp.c_fc.",
                    "mlp.fc2.": "mlp.c_proj.", "self_attn.out_proj.": "attn.out_proj."}


def _state_dict(module_or_sd) -> dict[str, Tensor]:
    if isinstance(module_or_sd, Mapping):
        return dict(module_or_sd)
    return module_or_sd.state_dict()


def _count(sd: Mapping[str, Tensor], pattern: str) -> int:
    """How many distinct indices `{}` takes in keys matching `pattern` (e.g. 'down_blocks.0.resnets.{}.')."""
    regex = re.compile(re.escape(pattern).replace(r"\{\}", r"(\d+)"))
    return len({m.group(1) for k in sd if (m := regex.match(k))})


# ----------------------------------------------------------------------------------------- UNet
def _unet_key(key: str, per_level: int, up_has_attn: set[int]) -> str:
    """One diffusers UNet key -> its LDM name (without prefix); ValueError for keys SD 1/2 lack."""
    for new, old in _UNET_FIXED.items():
        if key.startswith(new):
            return old + key[len(new):]
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = per_level * level + j + 1
        return f"input_blocks.{index}.0.{_resnet_suffix(rest)}" if kind == "resnets" \
            else f"input_blocks.{index}.1.{rest}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{per_level * (int(m[1]) + 1)}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet_suffix(m[2])}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = per_level * level + j
        return f"output_blocks.{index}.0.{_resnet_suffix(rest)}" if kind == "resnets" \
            else f"output_blocks.{index}.1.{rest}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        level = int(m[1])
        slot = 2 if level in up_has_attn else 1  # after the attention when the block has one
        return f"output_blocks.{per_level * level + per_level - 1}.{slot}.conv.{m[2]}"
    raise ValueError(f"UNet key {key!r} has no place in the SD 1.x/2.x single-file layout")


def _resnet_suffix(rest: str) -> str:
    name, _, tail = rest.partition(".")
    return f"{_UNET_RESNET.get(name, name)}.{tail}"


def unet_to_ldm(unet) -> dict[str, Tensor]:
    """Diffusers UNet2DConditionModel weights -> `model.diffusion_model.*` keys."""
    sd = _state_dict(unet)
    per_level = _count(sd, "down_blocks.0.resnets.{}.") + 1  # resnets + the downsampler / up-block extra
    up_has_attn = {i for i in range(_count(sd, "up_blocks.{}.")) if _count(sd, f"up_blocks.{i}.attentions.{{}}.")}
    return {UNET_PREFIX + _unet_key(k, per_level, up_has_attn): v for k, v in sd.items()}


# ------------------------------------------------------------------------------------------ VAE
def _vae_key(key: str, levels: int) -> str:
    """One diffusers AutoencoderKL key -> its LDM name (without prefix)."""
    key = key.replace("conv_norm_out.", "norm_out.")
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.*)", key):
        return f"encoder.down.{m[1]}.downsample.{m[2]}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        level = levels - 1 - int(m[1])  # LDM numbers decoder levels from the full-resolution end
        return f"decoder.up.{level}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key):
        return f"decoder.up.{levels - 1 - int(m[1])}.upsample.{m[2]}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", key):
        rest = m[2]
        for new, old in _VAE_ATTN.items():
            if rest.startswith(new):
                rest = old + rest[len(new):]
        return f"{m[1]}.mid.attn_1.{rest}"
    if re.match(r"(encoder|decoder)\.(conv_in|conv_out|norm_out)\.|(post_)?quant_conv\.", key):
        return key
    raise ValueError(f"VAE key {key!r} has no place in the SD 1.x/2.x single-file layout")


def vae_to_ldm(vae) -> dict[str, Tensor]:
    """Diffusers AutoencoderKL weights -> `first_stage_model.*` keys (mid attention as 1x1 convs)."""
    sd = _state_dict(vae)
    levels = _count(sd, "decoder.up_blocks.{}.")
    out = {}
    for key, value in sd.items():
        new = _vae_key(key, levels)
        if ".mid.attn_1." in new and new.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out[VAE_PREFIX + new] = value
    return out


# --------------------------------------------------------------------------------- text encoder
def _text_sd(text_encoder) -> dict[str, Tensor]:
    """CLIPTextModel weights named as in transformers 4.x (`text_model.` prefix), which SD files use."""
    sd = _state_dict(text_encoder)
    out = {}
    for k, v in sd.items():
        if k.endswith("position_ids"):
            continue
        out[k if k.startswith(("text_model.", "text_projection")) else "text_model." + k] = v
    return out


def clip_to_ldm(text_encoder) -> dict[str, Tensor]:
    """SD 1.x: OpenAI CLIP weights -> `cond_stage_model.transformer.text_model.*` keys."""
    return {CLIP_PREFIX + k: v for k, v in _text_sd(text_encoder).items()}


def open_clip_to_ldm(text_encoder) -> dict[str, Tensor]:
    """SD 2.x: CLIP-format weights -> OpenCLIP `cond_stage_model.model.*` keys (see module docstring)."""
    sd = {k.removeprefix("text_model."): v for k, v in _text_sd(text_encoder).items()}
    hidden = sd["embeddings.token_embedding.weight"].shape[1]
    dtype = sd["embeddings.token_embedding.weight"].dtype
    out = {
        "token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
        "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
        "ln_final.weight": sd.pop("final_layer_norm.weight"),
        "ln_final.bias": sd.pop("final_layer_norm.bias"),
        "text_projection": torch.eye(hidden, dtype=dtype),
        "logit_scale": torch.tensor(math.log(100.0), dtype=dtype),  # CLIP's trained value (ln 100); unused by SD
    }
    sd.pop("text_projection.weight", None)
    layers = _count(sd, "encoder.layers.{}.")
    for i in range(layers):
        p = f"encoder.layers.{i}."
        for kind in ("weight", "bias"):
            qkv = [sd.pop(f"{p}self_attn.{n}_proj.{kind}") for n in ("q", "k", "v")]
            out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(qkv)
    for key, value in sd.items():
        m = re.match(r"encoder\.layers\.(\d+)\.(.*)", key)
        if not m:
            raise ValueError(f"text encoder key {key!r} has no place in the OpenCLIP layout")
        rest = m[2]
        for new, old in _OPEN_CLIP_LAYER.items():
            rest = rest.replace(new, old)
        out[f"transformer.resblocks.{m[1]}.{rest}"] = value
    out.update(_placeholder_resblock(out, layers))
    return {OPEN_CLIP_PREFIX + k: v for k, v in out.items()}


def _placeholder_resblock(out: dict[str, Tensor], index: int) -> dict[str, Tensor]:
    """Zeros shaped like resblock 0: the last OpenCLIP layer, which SD 2.x never runs."""
    return {k.replace("resblocks.0.", f"resblocks.{index}.", 1): torch.zeros_like(v)
            for k, v in out.items() if k.startswith("transformer.resblocks.0.")}


def text_encoder_family(text_encoder) -> str:
    """'sd2' for OpenCLIP-style encoders (GELU, as SD 2.x's), 'sd1' for OpenAI CLIP (quick GELU)."""
    act = getattr(getattr(text_encoder, "config", None), "hidden_act", "quick_gelu")
    return "sd2" if act == "gelu" else "sd1"


# ------------------------------------------------------------------------------------------ all
def diffusers_to_ldm(unet, vae, text_encoder, *, family: str | None = None) -> dict[str, Tensor]:
    """One single-file SD state dict from diffusers components (modules or their state dicts).

    family: 'sd1' (CLIP text encoder) or 'sd2' (OpenCLIP); None picks it from the text
    encoder's activation (see `text_encoder_family`).
    """
    family = family or text_encoder_family(text_encoder)
    if family not in ("sd1", "sd2"):
        raise ValueError(f"family must be 'sd1' or 'sd2', got {family!r}")
    text = open_clip_to_ldm(text_encoder) if family == "sd2" else clip_to_ldm(text_encoder)
    return {**unet_to_ldm(unet), **vae_to_ldm(vae), **text}


def sidecar_config(unet, vae, text_encoder, *, prediction_type: str | None = None) -> dict:
    """The settings a checkpoint's tensor shapes cannot tell (attention heads, sizes, activation...).

    Written as `<stem>.json` next to an exported file, `sdlab.single_file.load_single_file` reads
    it back, so models whose heads differ from SD's conventions still round-trip.
    """
    u, v, t = unet.config, vae.config, text_encoder.config
    config = {
        "unet": {"attention_head_dim": _plain(u.attention_head_dim), "sample_size": u.sample_size,
                 "upcast_attention": u.upcast_attention, "norm_num_groups": u.norm_num_groups},
        "vae": {"sample_size": v.sample_size, "scaling_factor": v.scaling_factor,
                "norm_num_groups": v.norm_num_groups},
        "text_encoder": {"num_attention_heads": t.num_attention_heads, "hidden_act": t.hidden_act},
    }
    if prediction_type:
        config["prediction_type"] = prediction_type
    return config


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def save_single_file(path: str | Path, unet, vae, text_encoder, *, family: str | None = None,
                     prediction_type: str | None = None, sidecar: bool = True) -> Path:
    """Write a single-file checkpoint (.safetensors, or torch.save for .ckpt/.pt) plus its sidecar."""
    path = Path(path)
    sd = {k: v.detach().contiguous() for k, v in diffusers_to_ldm(unet, vae, text_encoder, family=family).items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(sd, str(path))
    else:
        torch.save({"state_dict": sd}, path)
    if sidecar:
        config = sidecar_config(unet, vae, text_encoder, prediction_type=prediction_type)
        path.with_suffix(".json").write_text(json.dumps(config, indent=2))
    return path
