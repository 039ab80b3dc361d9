"""Single-file SD checkpoints: export tiny random pipelines to the LDM layout and load them back."""
from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import save_file

from sdlab.errors import ModelLoadError
from sdlab.ldm_keys import diffusers_to_ldm, save_single_file
from sdlab.single_file import detect_family, detect_prediction_type, load_single_file, resolve_hub_id

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


def tiny_pipeline(family: str = "sd1", text_heads: int = 4, unet_heads: int = 8):
    """Random tiny UNet / VAE / text encoder; 'sd2' has linear projections and a GELU (OpenCLIP) encoder."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, sample_size=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=unet_heads, use_linear_projection=family == "sd2")
    vae = diffusers.AutoencoderKL(
        block_out_channels=(32, 64), latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=text_heads,
        vocab_size=49408, hidden_act="gelu" if family == "sd2" else "quick_gelu"))
    for module in (unet, vae, text_encoder):
        module.eval()
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder}


@pytest.fixture(scope="module")
def sd1():
    return tiny_pipeline("sd1")


@pytest.fixture(scope="module")
def sd2():
    return tiny_pipeline("sd2")


def write(path, state_dict, **extras):
    tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
    if path.suffix == ".safetensors":
        save_file(tensors, str(path))
    else:
        torch.save({"state_dict": tensors, **extras}, path)
    return path


def assert_same_weights(original, loaded):
    for name in ("unet", "vae", "text_encoder"):
        a, b = original[name].state_dict(), loaded[name].state_dict()
        assert a.keys() == b.keys(), name
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert not different, f"{name}: {different[:5]}"


@torch.no_grad()
def assert_same_outputs(original, loaded):
    torch.manual_seed(1)
    sample, context = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 32)
    ours = original["unet"](sample, 10, encoder_hidden_states=context).sample
    theirs = loaded["unet"](sample, 10, encoder_hidden_states=context).sample
    # the weights are bit-identical (assert_same_weights); CPU kernels may still pick a different
    # summation order for two model instances, so outputs are compared to float32 precision
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    ids = loaded["tokenizer"]("a photo of sks", padding="max_length", max_length=77, return_tensors="pt").input_ids
    torch.testing.assert_close(original["text_encoder"](ids)[0], loaded["text_encoder"](ids)[0],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_sd1_round_trip(sd1, tmp_path, suffix):
    path = write(tmp_path / f"tiny{suffix}", diffusers_to_ldm(**sd1))
    loaded = load_single_file(path)
    assert_same_weights(sd1, loaded)
    assert_same_outputs(sd1, loaded)
    assert loaded["tokenizer"].pad_token == "<|endoftext|>"
    config = loaded["scheduler_config"]
    assert config["prediction_type"] == "epsilon"
    assert (config["beta_start"], config["beta_end"], config["steps_offset"]) == (0.00085, 0.012, 1)


def test_sd1_layout_keys(sd1):
    sd = diffusers_to_ldm(**sd1)
    assert "model.diffusion_model.input_blocks.1.1.proj_in.weight" in sd
    assert "model.diffusion_model.output_blocks.1.1.conv.weight" in sd  # upsampler of an attention-free block
    assert sd["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in sd
    assert detect_family(sd) == "sd1"


def test_sd2_open_clip_round_trip(sd2, tmp_path):
    sd = diffusers_to_ldm(**sd2)
    assert detect_family(sd) == "sd2"
    assert "cond_stage_model.model.transformer.resblocks.2.attn.in_proj_weight" in sd  # placeholder last layer
    loaded = load_single_file(write(tmp_path / "tiny2.safetensors", sd))
    assert_same_weights(sd2, loaded)
    assert_same_outputs(sd2, loaded)
    assert loaded["tokenizer"].pad_token == "!" and loaded["tokenizer"].pad_token_id == 0
    assert loaded["scheduler_config"]["prediction_type"] == "v_prediction"
    assert loaded["unet"].config.use_linear_projection


def test_prediction_type_override_and_hints(sd2, tmp_path):
    sd = diffusers_to_ldm(**sd2)
    path = write(tmp_path / "base.ckpt", sd, global_step=875000)  # SD 2.0-base's step: epsilon
    assert load_single_file(path)["scheduler_config"]["prediction_type"] == "epsilon"
    forced = load_single_file(path, prediction_type="v_prediction", torch_dtype=torch.float16)
    assert forced["scheduler_config"]["prediction_type"] == "v_prediction"
    assert forced["unet"].dtype == forced["text_encoder"].dtype == torch.float16
    assert detect_prediction_type({**sd, "v_pred": torch.zeros(0)}) == "v_prediction"
    (tmp_path / "base.yaml").write_text("model:\n  params:\n    parameterization: v\n")
    assert load_single_file(path)["scheduler_config"]["prediction_type"] == "v_prediction"
    with pytest.raises(ValueError):
        load_single_file(path, prediction_type="sample")


def test_sidecar_carries_what_shapes_cannot(tmp_path):
    odd = tiny_pipeline("sd1", text_heads=2, unet_heads=4)  # not SD's conventions: needs the sidecar
    path = save_single_file(tmp_path / "odd.safetensors", **odd)
    assert json.loads(path.with_suffix(".json").read_text())["text_encoder"]["num_attention_heads"] == 2
    loaded = load_single_file(path)
    assert loaded["text_encoder"].config.num_attention_heads == 2
    assert loaded["unet"].config.sample_size == 8
    assert_same_outputs(odd, loaded)
    path.with_suffix(".json").unlink()
    assert load_single_file(path)["text_encoder"].config.num_attention_heads == 4  # the tiny default


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_single_file(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("name", ["x.safetensors", "x.ckpt"])
def test_not_a_checkpoint(tmp_path, name):
    (tmp_path / name).write_text("hello, I am a text file\n")
    with pytest.raises(ModelLoadError, match="not a"):
        load_single_file(tmp_path / name)


def test_sdxl_is_refused(tmp_path):
    sdxl = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
            "conditioner.embedders.1.model.positional_embedding": torch.zeros(77, 1280),
            "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": torch.zeros(1280)}
    with pytest.raises(ValueError, match="SDXL"):
        detect_family(sdxl)
    with pytest.raises(ModelLoadError, match="SDXL"):
        load_single_file(write(tmp_path / "xl.safetensors", sdxl))


def test_unknown_layout(tmp_path):
    with pytest.raises(ModelLoadError, match="input_blocks"):
        load_single_file(write(tmp_path / "other.safetensors", {"linear.weight": torch.zeros(2, 2)}))


def test_resolve_hub_id_reads_only_the_local_cache(tmp_path, monkeypatch):
    hub = tmp_path / "hf_home" / "hub"
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    assert resolve_hub_id("org/name") is None
    repo = hub / "models--org--name"
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot.name)
    assert resolve_hub_id("org/name") is None  # cached, but not a diffusers folder
    (snapshot / "model_index.json").write_text("{}")
    assert resolve_hub_id("org/name") == snapshot
    assert resolve_hub_id("org/other") is None
    assert resolve_hub_id("not a repo id!") is None
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(hub.parent))  # HF_HOME/hub is the cache when HF_HUB_CACHE is unset
    assert resolve_hub_id("org/name") == snapshot
