"""The base recipe end to end at toy size: single process with --resume, and two processes
under `accelerate launch`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import sdlab
from sdlab.tokenizer import write_clip_tokenizer_files

TINY = {"num_images": 48, "vae_channels": [16, 16], "vae_steps": 3, "vae_batch": 4,
        "decoder_steps": 2, "text_hidden": 32, "text_layers": 1, "text_heads": 2,
        "unet_channels": [32, 32], "unet_steps": 3, "unet_batch": 4, "checkpoint_minutes": 100}


def _config(tmp_path: Path, **extra) -> Path:
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({**TINY, "out_dir": str(tmp_path / "run"), **extra}))
    return path


def _sdlab(*args: str, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = (launcher or [sys.executable, "-m"]) + ["sdlab.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)


def test_train_base_writes_a_loadable_model_and_resumes(tmp_path):
    cfg = _config(tmp_path)
    r = _sdlab("train", "base", "--config", str(cfg))
    assert r.returncode == 0, r.stderr[-2000:]
    model = tmp_path / "run" / "model"
    assert (model / "model_index.json").exists()
    pipe = sdlab.load(str(model), device="cpu")
    assert pipe.components.prediction_type == "v_prediction"
    assert pipe.components.defaults.width == 64
    [result] = pipe.generate("a red circle", seed=0, steps=2)
    assert result.image.size == (64, 64)
    losses = (tmp_path / "run" / "unet_run" / "loss.jsonl").read_text().splitlines()
    assert json.loads(losses[-1])["step"] == 3
    # resume: a longer run continues from the saved step instead of starting over
    cfg2 = _config(tmp_path, unet_steps=5, stages=["unet"])
    (tmp_path / "run" / "unet_ema" / "unet" / "config.json").unlink()
    r = _sdlab("train", "base", "--config", str(cfg2), "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stdout + r.stderr
    steps = [json.loads(line)["step"] for line in
             (tmp_path / "run" / "unet_run" / "loss.jsonl").read_text().splitlines()]
    assert steps[-1] == 5 and steps.count(3) == 1
    # fine-tune: the UNet stage starts from a trained model's UNet and text encoder
    import shutil
    from diffusers import UNet2DConditionModel
    init = shutil.copytree(model, tmp_path / "init")
    moved = UNet2DConditionModel.from_pretrained(init / "unet")
    for p in moved.parameters():  # unlike any fresh or briefly trained UNet
        p.data += 0.1
    moved.save_pretrained(init / "unet")
    for done in ("unet_ema", "unet_run"):
        shutil.rmtree(tmp_path / "run" / done)
    cfg3 = _config(tmp_path, stages=["unet", "export"], unet_init=str(init), unet_lr=1e-9,
                   tag_caption_prob=0.5, unet_object_weight=4.0, default_guidance_cap=1.5, default_guidance_cap_below=0.6)
    r = _sdlab("train", "base", "--config", str(cfg3))
    assert r.returncode == 0, r.stderr[-2000:]
    tuned, start = (sdlab.load(str(m), device="cpu").components for m in (model, init))
    for a, b in ((tuned.unet, start.unet), (tuned.text_encoder, start.text_encoder)):
        diffs = [(p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters())]
        assert max(diffs) < 1e-3  # 3 steps at lr 1e-9 from the init, not from random weights
    assert (tuned.defaults.guidance_cap, tuned.defaults.guidance_cap_below) == (1.5, 0.6)
    # a new UNet (its own levels: not the init's) beside a trained model's text encoder
    for done in ("unet_ema", "unet_run"):
        shutil.rmtree(tmp_path / "run" / done)
    cfg4 = _config(tmp_path, stages=["unet", "export"], text_encoder_init=str(init), unet_lr=1e-9,
                   unet_attention=[False, True])
    r = _sdlab("train", "base", "--config", str(cfg4))
    assert r.returncode == 0, r.stderr[-2000:]
    fresh = sdlab.load(str(model), device="cpu").components
    assert fresh.unet.config.down_block_types == ["DownBlock2D", "CrossAttnDownBlock2D"]
    te_diff = max((p - q).abs().max().item() for p, q in
                  zip(fresh.text_encoder.parameters(), start.text_encoder.parameters()))
    assert te_diff < 1e-3


def test_unet_levels_follow_the_config():
    from sdlab.errors import InputError
    from sdlab.train.base import BaseConfig, make_unet
    cfg = BaseConfig(vae_channels=(16, 16, 16), unet_channels=(32, 32, 32), text_hidden=32,
                     unet_attention=(False, True, False))
    unet = make_unet(cfg)
    assert unet.config.sample_size == 16  # a 3-level VAE: 64 / 4
    assert list(unet.config.down_block_types) == ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
    assert list(unet.config.up_block_types) == ["UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
    default = make_unet(BaseConfig(unet_channels=(32, 32), text_hidden=32))  # SD's layout
    assert default.config.sample_size == 8
    assert list(default.config.down_block_types) == ["CrossAttnDownBlock2D", "DownBlock2D"]
    with pytest.raises(InputError, match="2 levels"):
        make_unet(BaseConfig(unet_channels=(32, 32, 32), unet_attention=(True, False)))


def test_object_cells_cover_the_object_box_and_its_margin():
    from sdlab.shapes.world import Scene
    from sdlab.train.base import object_cells
    # box x 12..28, y 4..20; with the 3 px margin x 9..31, y 1..23
    scenes = [Scene("circle", "red", "small", "top left", "blue", 16, (20, 12)),
              Scene("square", "red", "large", "center", "blue", 32, (32, 32))]
    cells = object_cells(scenes, 8)
    assert cells.shape == (2, 1, 8, 8)
    small = cells[0, 0]
    assert small[1, 2] == 1.0 and abs(small[0, 1].item() - (7 / 8) ** 2) < 1e-6
    assert small[:, 4:].sum() == 0 and small[3:].sum() == 0  # nothing far from the object
    assert abs(cells[1, 0].sum().item() - 38 ** 2 / 64) < 1e-4  # (32 + 2 * 3)^2 px in 8x8 cells


def test_outline_weighted_loss_counts_the_outline_most():
    import torch
    from sdlab.train.base import outline_weighted_loss
    target = -torch.ones(1, 3, 16, 16)  # black background
    target[:, :, 4:12, 4:12] = 1.0  # a white square
    def cost(y: int, x: int) -> float:  # the loss of one wrong pixel
        recon = target.clone()
        recon[:, :, y, x] -= 0.5
        return outline_weighted_loss(recon, target, 4.0, 4.0).item()
    background, inside, edge = cost(0, 0), cost(8, 8), cost(4, 8)
    assert outline_weighted_loss(target, target, 4.0, 4.0).item() == 0
    assert abs(inside / background - 5) < 1e-4 and abs(edge / background - 9) < 1e-4


def test_two_processes_under_accelerate(tmp_path):
    cfg = _config(tmp_path, stages=["data", "vae"])
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2",
                "--cpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "-m"]
    r = _sdlab("train", "base", "--config", str(cfg), launcher=launcher)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "run" / "vae" / "config.json").exists()


def test_clip_tokenizer_handles_any_text(tmp_path):
    from transformers import CLIPTokenizer
    tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer_files(tmp_path / "tok"))
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    for text in ["a yellow sks", "<my-token> on a zqxj background", "ünïcödé 😀"]:
        ids = tok(text).input_ids
        assert ids[0] == 49406 and ids[-1] == 49407 and len(ids) > 3


def test_bad_config_is_a_one_line_error(tmp_path):
    cfg = tmp_path / "bad.json"
    cfg.write_text(json.dumps({"unet_stepz": 3}))
    r = _sdlab("train", "base", "--config", str(cfg))
    assert r.returncode == 2 and "unknown config keys: unet_stepz" in r.stderr
