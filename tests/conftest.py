"""Tiny random Stable Diffusion components, built in the test session (no downloads)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # tiny models: one thread is fastest, and immune to a busy machine


def make_tiny_sd_folder(path: Path, *, prediction_type: str = "epsilon", seed: int = 0,
                        sample_size: int = 16, safety_checker: bool = False,
                        time_cond_proj_dim: int | None = None) -> Path:
    """A diffusers-format SD folder with tiny random weights (the shape of SD 1.x)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from sdlab.tokenizer import write_clip_tokenizer_files
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=32, time_cond_proj_dim=time_cond_proj_dim)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        block_out_channels=(32, 64), layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, sample_size=sample_size * 2,
                        norm_num_groups=32)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406,
        eos_token_id=49407, pad_token_id=49407))
    path.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(path / "unet")
    vae.save_pretrained(path / "vae")
    text_encoder.save_pretrained(path / "text_encoder")
    write_clip_tokenizer_files(path / "tokenizer")
    CLIPTokenizer.from_pretrained(path / "tokenizer")  # fail early if unreadable
    DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                  prediction_type=prediction_type).save_pretrained(path / "scheduler")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
             "feature_extractor": [None, None], "safety_checker": [None, None],
             "image_encoder": [None, None], "requires_safety_checker": False,
             "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    if safety_checker:
        _add_tiny_safety_checker(path, index)
    (path / "model_index.json").write_text(json.dumps(index))
    return path


def _add_tiny_safety_checker(path: Path, index: dict) -> None:
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor
    config = CLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4,
                                     "num_hidden_layers": 2, "vocab_size": 1000},
                        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4,
                                       "num_hidden_layers": 2, "image_size": 32, "patch_size": 4},
                        projection_dim=32)
    checker = StableDiffusionSafetyChecker(config)
    # thresholds below any cosine similarity: every image is flagged
    checker.concept_embeds_weights.data.fill_(-10.0)
    checker.save_pretrained(path / "safety_checker")
    CLIPImageProcessor(crop_size=32, size=32).save_pretrained(path / "feature_extractor")
    index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
    index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_sd_folder(tmp_path_factory.mktemp("tiny") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_pipe(tiny_model):
    import sdlab
    return sdlab.load(str(tiny_model), device="cpu")
