"""Guided (progressive) distillation and LCM on tiny random components: the maths, the student at
initialisation, a few training steps of each phase, the exported folders and --resume."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_sd_folder


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """A tiny teacher with the base recipe's schedule: zero terminal SNR, v-prediction, trailing."""
    from sdlab.train.base import scheduler_config
    path = make_tiny_sd_folder(tmp_path_factory.mktemp("distill") / "teacher",
                               prediction_type="v_prediction", sample_size=8)
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config()))
    (path / "sdlab.json").write_text(json.dumps({"name": "tiny", "defaults": {
        "sampler": "ddim", "steps": 8, "guidance_scale": 3.0, "width": 16, "height": 16}}))
    return path


@pytest.fixture(scope="module")
def teacher(teacher_dir):
    from sdlab.components import load
    return load(str(teacher_dir), device="cpu")


def _tiny(cls, out: Path, teacher_dir: Path, **kw):
    return cls(model=str(teacher_dir), out_dir=str(out), batch_size=2, pool_size=4, cond_dim=16,
               checkpoint_minutes=60, log_every=1, **kw)


# --- maths ----------------------------------------------------------------------------------

def test_progressive_target_one_step_lands_where_two_teacher_steps_land():
    from sdlab.train.base import scheduler_config
    from sdlab.train.distill import Schedule, progressive_grid
    torch.manual_seed(0)
    schedule = Schedule(scheduler_config())
    grid = progressive_grid(scheduler_config(), 4)
    n = len(grid.t)
    z = torch.randn(n, 4, 8, 8)
    out1, out2 = torch.randn(n, 4, 8, 8), torch.randn(n, 4, 8, 8)  # any "teacher" outputs
    z_mid = schedule.ddim_step(z, out1, grid.t, grid.t_mid)
    z_next = schedule.ddim_step(z_mid, out2, grid.t_mid, grid.t_next)
    x0 = schedule.progressive_target(z, z_next, grid.t, grid.t_next)
    # the student output that predicts this x0, taken one DDIM step
    ab = schedule.alpha_bar(grid.t)
    v = (ab.sqrt() * z - x0) / (1 - ab).sqrt()
    assert torch.allclose(schedule.ddim_step(z, v, grid.t, grid.t_next), z_next, atol=1e-4)
    # the jumps are diffusers' 4-step trailing DDIM; the midpoints its 8-step grid
    assert grid.t.tolist() == [999, 749, 499, 249] and grid.t_next.tolist() == [749, 499, 249, -1]
    assert grid.t_mid.tolist() == [874, 624, 374, 124]


def test_ddim_step_is_diffusers_ddim_step():
    """The step the targets are built with is the step the Pipeline samples with."""
    from sdlab import samplers
    from sdlab.train.base import scheduler_config
    from sdlab.train.distill import Schedule, ddim_jumps
    torch.manual_seed(0)
    config = scheduler_config()
    schedule = Schedule(config)
    sched = samplers.make_scheduler("ddim", config)
    sched.set_timesteps(4)
    ts, nexts = ddim_jumps(config, 4)
    z = torch.randn(1, 4, 8, 8)
    for t, t_next in zip(ts, nexts):
        out = torch.randn_like(z)
        ours = schedule.ddim_step(z, out, torch.tensor([t]), torch.tensor([t_next]))
        theirs = sched.step(out, t, z, eta=0.0).prev_sample
        assert torch.allclose(ours, theirs, atol=1e-5)
        z = theirs


def test_lcm_scheduler_uses_the_model_schedule_and_the_solver_grid():
    from sdlab import samplers
    from sdlab.train.base import scheduler_config
    from sdlab.train.distill import Schedule, consistency_grid
    config = {**scheduler_config(), "original_inference_steps": 50}
    lcm = samplers.make_scheduler("lcm", config)
    assert lcm.config.prediction_type == "v_prediction"
    assert torch.allclose(lcm.alphas_cumprod, Schedule(config).alphas_cumprod)
    grid = consistency_grid(1000, 50)
    for steps in (1, 2, 4, 8):
        lcm.set_timesteps(steps)
        assert set(lcm.timesteps.tolist()) <= set(grid.t.tolist())
        assert lcm.timesteps[0] == 999  # zero-SNR: the first step sees pure noise


# --- the student at initialisation -------------------------------------------------------

def test_stage1_student_starts_as_the_teachers_conditional_model(teacher):
    from sdlab.prompts import PromptEncoder
    from sdlab.train.distill import guided_output, make_guidance_student
    student = make_guidance_student(teacher.unet, 16).eval()
    assert student.config.time_cond_proj_dim == 16
    cond = PromptEncoder(teacher.tokenizer, teacher.text_encoder).encode(["a red circle"] * 2)
    z, t = torch.randn(2, 4, 8, 8), torch.tensor([999, 300])
    with torch.no_grad():
        expected = teacher.unet(z, t, encoder_hidden_states=cond).sample
        for w in (1.0, 7.5):
            got = guided_output(student, z, t, cond, None, torch.full((2,), w))
            assert torch.allclose(got, expected, atol=1e-5)


def test_memoised_caption_embeddings_are_the_pipelines(teacher):
    from sdlab.prompts import PromptEncoder
    from sdlab.train.distill import CaptionEmbeddings
    encoder = PromptEncoder(teacher.tokenizer, teacher.text_encoder)
    embed = CaptionEmbeddings(encoder)
    captions = ["a red circle", " ".join(["a large blue square"] * 20), "a red circle"]
    for _ in range(2):  # encoded, then from the cache
        assert torch.allclose(embed(captions), encoder.encode(captions), atol=1e-6)


# --- training, export, generation, resume ------------------------------------------------

def test_guided_distillation_cli_writes_loadable_students(teacher_dir, tmp_path, capsys):
    import sdlab
    from sdlab.cli import main
    out = tmp_path / "run"
    args = ["distill", "guided", "--model", str(teacher_dir), "--out", str(out), "--rounds", "1",
            "--end-steps", "2", "--stage1-steps", "2", "--steps-per-round", "2",
            "--batch-size", "2", "--pool-size", "4", "--cond-dim", "16",
            "--default-guidance", "2.5"]
    assert main(args) == 0
    final = out / "round_2"
    assert str(final) in capsys.readouterr().out
    for folder, steps in (("stage1", 4), ("round_2", 2)):
        meta = json.loads((out / folder / "sdlab.json").read_text())
        assert meta["defaults"]["sampler"] == "ddim" and meta["defaults"]["steps"] == steps
        assert meta["defaults"]["guidance_scale"] == 2.5
    losses = (out / "train" / "round_2" / "loss.jsonl").read_text().splitlines()
    assert json.loads(losses[-1])["step"] == 2
    assert all(torch.isfinite(torch.tensor(json.loads(line)["loss"])) for line in losses)

    pipe = sdlab.load(str(final), device="cpu")
    assert pipe.components.unet.config.time_cond_proj_dim == 16
    assert pipe.components.name == "tiny-guided"
    [result] = pipe.generate("a red circle", seed=0)
    assert result.params.sampler == "ddim" and result.params.steps == 2
    assert result.params.guidance_scale == 2.5 and result.image.size == (16, 16)
    # the Pipeline feeds w through the guidance input (a few steps barely move it from zero)
    torch.nn.init.normal_(pipe.components.unet.time_embedding.cond_proj.weight, std=0.1)
    [guided] = pipe.generate("a red circle", seed=0)
    [plain] = pipe.generate("a red circle", seed=0, guidance_scale=1.0)
    assert abs(guided.pixels - plain.pixels).max() > 1e-3
    # a guidance cap reaches the guidance input step by step: w 3 at t=999, 1.5 at t=499
    import math
    [capped] = pipe.generate("a red circle", seed=0, guidance_scale=3.0, guidance_cap=1.5)
    [strong] = pipe.generate("a red circle", seed=0, guidance_scale=3.0, guidance_cap=math.inf)
    assert abs(capped.pixels - strong.pixels).max() > 1e-3
    assert abs(capped.pixels - guided.pixels).max() > 1e-3

    # a finished run resumed: every phase's folder exists, nothing is retrained
    stamp = (final / "unet").stat().st_mtime_ns
    assert main(args + ["--resume"]) == 0
    assert (final / "unet").stat().st_mtime_ns == stamp
    assert main(["distill", "guided", "--model", str(teacher_dir), "--out", str(out),
                 "--start-steps", "6", "--end-steps", "4"]) == 2  # not a power-of-two ratio

    # warm start: stage 1 starts from a trained student (here one with a moved guidance input)
    from diffusers import UNet2DConditionModel
    init = UNet2DConditionModel.from_pretrained(out / "stage1" / "unet")
    torch.nn.init.normal_(init.time_embedding.cond_proj.weight, std=0.1)
    init.save_pretrained(out / "stage1" / "unet")
    warm = tmp_path / "warm"
    again = ["distill", "guided", "--model", str(teacher_dir), "--rounds", "0", "--end-steps", "2",
             "--stage1-steps", "2", "--batch-size", "2", "--pool-size", "4", "--cond-dim", "16",
             "--lr", "1e-9"]
    assert main(again + ["--out", str(warm), "--student-init", str(out / "stage1")]) == 0
    started = UNet2DConditionModel.from_pretrained(warm / "stage1" / "unet")
    diff = (started.time_embedding.cond_proj.weight - init.time_embedding.cond_proj.weight).abs()
    assert diff.max() < 1e-3  # fp16 export of the init, not a zero projection
    # the teacher itself has no guidance input: one clear error
    assert main(again + ["--out", str(tmp_path / "bad"), "--student-init", str(teacher_dir)]) == 2


def test_lcm_distillation_and_resume(teacher_dir, tmp_path):
    import sdlab
    from sdlab.train.distill import LCMConfig, distill_lcm
    run = tmp_path / "run"
    final = distill_lcm(_tiny(LCMConfig, run, teacher_dir, steps=2))
    meta = json.loads((final / "sdlab.json").read_text())
    assert meta["defaults"]["sampler"] == "lcm" and meta["defaults"]["steps"] == 4
    assert meta["defaults"]["guidance_scale"] == 3.0  # the teacher's default
    pipe = sdlab.load(str(final), device="cpu")
    [result] = pipe.generate("a blue square", seed=1)
    assert result.params.sampler == "lcm" and result.params.steps == 4

    # an interrupted run: the checkpoint exists, the export does not; resume trains on from it
    before = (run / "train" / "lcm" / "loss.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in before] == [1, 2]
    import shutil
    shutil.rmtree(final)
    distill_lcm(_tiny(LCMConfig, run, teacher_dir, steps=4), resume=True)
    after = (run / "train" / "lcm" / "loss.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in after] == [1, 2, 3, 4]
    assert (final / "sdlab.json").exists()
