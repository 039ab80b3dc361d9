"""The generation loop on tiny random components: equality with diffusers, seeds, samplers,
img2img, trajectory, safety checker, v-prediction."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

import sdlab
from sdlab.errors import InputError, ModelLoadError
from sdlab.samplers import SAMPLERS, resolve

from conftest import make_tiny_sd_folder


def test_txt2img_equals_diffusers_pipeline_ddim(tiny_model, tiny_pipe):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    ours = tiny_pipe.generate("a red circle", negative_prompt="blue", seed=11, steps=6,
                              sampler="ddim", guidance_scale=6.0, num_images=2)
    sd = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None,
                                                 requires_safety_checker=False)
    sd.scheduler = DDIMScheduler.from_config(sd.scheduler.config)
    sd.set_progress_bar_config(disable=True)
    gens = [torch.Generator("cpu").manual_seed(s) for s in (11, 12)]
    theirs = sd("a red circle", negative_prompt="blue", num_inference_steps=6, guidance_scale=6.0,
                num_images_per_prompt=2, generator=gens, output_type="np", height=32, width=32).images
    diff = np.abs(np.stack([r.pixels for r in ours]) - theirs).max()
    assert diff <= 1e-3, diff
    assert np.asarray(ours[0].image).std() > 0  # not a blank image


@pytest.mark.parametrize("sampler", ["ddim", "euler_a", "dpm++_2m", "dpm++_sde_karras", "ddpm"])
def test_image_depends_only_on_its_seed(tiny_pipe, sampler):
    batch = tiny_pipe.generate("a blue square", seed=100, steps=4, sampler=sampler, num_images=4,
                               batch_size=4)
    alone = tiny_pipe.generate("a blue square", seed=103, steps=4, sampler=sampler, num_images=1)
    assert [r.params.seed for r in batch] == [100, 101, 102, 103]
    diff = np.abs(np.asarray(batch[3].image, dtype=int) - np.asarray(alone[0].image, dtype=int)).max()
    assert diff <= 2
    split = tiny_pipe.generate("a blue square", seed=100, steps=4, sampler=sampler, num_images=4,
                               batch_size=3)
    assert np.abs(np.asarray(split[3].image, dtype=int) - np.asarray(batch[3].image, dtype=int)).max() <= 2
    assert np.abs(np.asarray(batch[0].image, dtype=int) - np.asarray(batch[1].image, dtype=int)).max() > 2


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_generates(tiny_pipe, name):
    [r] = tiny_pipe.generate("a green circle", seed=1, steps=3, sampler=name)
    assert r.image.size == (32, 32)
    assert np.isfinite(r.pixels).all()
    assert r.params.sampler == name


def test_a1111_sampler_names():
    assert resolve("DPM++ 2M Karras").name == "dpm++_2m_karras"
    assert resolve("Euler a").name == "euler_a"
    assert resolve("euler_a").name == "euler_a"
    assert resolve("PLMS").name == "pndm"
    with pytest.raises(InputError, match="valid: ddim"):
        resolve("nope")


def test_fresh_scheduler_each_time(tiny_pipe):
    a = tiny_pipe.generate("x", seed=3, steps=3, sampler="dpm++_2m")[0].pixels
    tiny_pipe.generate("y", seed=4, steps=5, sampler="dpm++_2m")
    b = tiny_pipe.generate("x", seed=3, steps=3, sampler="dpm++_2m")[0].pixels
    assert np.array_equal(a, b)


def test_guidance_and_negative_prompt_change_the_image(tiny_pipe):
    base = tiny_pipe.generate("a red circle", seed=5, steps=3, guidance_scale=7)[0].pixels
    other_g = tiny_pipe.generate("a red circle", seed=5, steps=3, guidance_scale=1)[0].pixels
    neg = tiny_pipe.generate("a red circle", "blue", seed=5, steps=3, guidance_scale=7)[0].pixels
    assert np.abs(base - other_g).max() > 1e-3
    assert np.abs(base - neg).max() > 1e-3


def test_guidance_cap_applies_only_at_low_noise(tiny_pipe):
    from sdlab.generate import Settings
    s = Settings(steps=4, guidance_scale=5, sampler="ddim", width=32, height=32,
                 guidance_cap=1.5, guidance_cap_below=0.7)
    assert [s.guidance_at(t, 1000) for t in (999, 700, 699, 0)] == [5, 5, 1.5, 1.5]
    assert Settings(4, 1, "ddim", 32, 32, guidance_cap=1.5).guidance_at(0, 1000) == 1
    d = tiny_pipe.components.defaults
    plain = tiny_pipe.generate("a red circle", seed=5, steps=3, guidance_scale=7)[0]
    try:
        d.guidance_cap = 7  # a cap at the scale changes nothing
        assert np.array_equal(tiny_pipe.generate("a red circle", seed=5, steps=3,
                                                 guidance_scale=7)[0].pixels, plain.pixels)
        d.guidance_cap, d.guidance_cap_below = 1.0, 1.0  # capped at every step: as guidance 1
        batches: list[int] = []
        hook = tiny_pipe.components.unet.register_forward_pre_hook(
            lambda module, args: batches.append(args[0].shape[0]))
        try:
            capped = tiny_pipe.generate("a red circle", seed=5, steps=3, guidance_scale=7)[0]
        finally:
            hook.remove()
        assert batches == [1, 1, 1]  # a step guided at 1 skips the unconditional pass
        unguided = tiny_pipe.generate("a red circle", seed=5, steps=3, guidance_scale=1)[0]
        assert np.array_equal(capped.pixels, unguided.pixels)
        assert "CFG cap: 1 below t=1" in capped.params.infotext()
        # per call: math.inf turns the model's cap off, a number replaces it
        off = tiny_pipe.generate("a red circle", seed=5, steps=3, guidance_scale=7,
                                 guidance_cap=math.inf)[0]
        assert np.array_equal(off.pixels, plain.pixels) and "CFG cap" not in off.params.infotext()
        d.guidance_cap = None
        again = tiny_pipe.generate("a red circle", seed=5, steps=3, guidance_scale=7,
                                   guidance_cap=1.0)[0]
        assert np.abs(again.pixels - capped.pixels).max() < 1e-6
        with pytest.raises(InputError):
            tiny_pipe.settings(guidance_cap=-1)
    finally:
        d.guidance_cap, d.guidance_cap_below = None, 0.7


def test_empty_prompt_is_unconditional(tiny_pipe):
    [r] = tiny_pipe.generate("", seed=2, steps=2)
    assert r.params.prompt == ""


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": 0}, "steps"), ({"guidance_scale": -1.0}, "guidance"), ({"width": 30}, "width"),
    ({"height": 36}, "height"), ({"sampler": "bogus"}, "sampler"), ({"num_images": 0}, "images"),
    ({"seed": -5}, "seed"), ({"steps": 1000}, "at most 999"),
])
def test_bad_settings_raise_one_clear_error(tiny_pipe, kwargs, message):
    with pytest.raises(InputError, match=message):
        tiny_pipe.generate("x", **kwargs)


@pytest.mark.parametrize("sampler", ["ddim"])
def test_most_steps_allowed_work(tiny_pipe, sampler):
    """At 1000 steps DDIM (and PNDM, DDPM, DPM++ 2M) index past diffusers' tables on a
    steps_offset=1 model; 999 works."""
    [result] = tiny_pipe.generate("x", seed=1, steps=999, sampler=sampler)
    assert np.isfinite(result.pixels).all()


def test_img2img_strength_bounds(tiny_pipe):
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    [same] = tiny_pipe.img2img(init, "a circle", strength=0.0, seed=1, steps=4)
    assert np.array_equal(np.asarray(same.image), np.asarray(init))
    [half] = tiny_pipe.img2img(init, "a circle", strength=0.5, seed=1, steps=4)
    assert half.params.denoising_strength == 0.5
    with pytest.raises(InputError, match="strength"):
        tiny_pipe.img2img(init, "a circle", strength=1.5)
    with pytest.raises(InputError, match="init image"):
        tiny_pipe.img2img("/nonexistent.png", "a circle")


def test_img2img_strength_one_ignores_input_on_zero_snr_model(tmp_path):
    """With a zero-terminal-SNR schedule (the embedded model's), strength 1 starts from pure
    noise, so two different init images give the same output."""
    import json

    from sdlab.train.base import scheduler_config
    path = make_tiny_sd_folder(tmp_path / "vpred", prediction_type="v_prediction")
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config()))
    pipe = sdlab.load(str(path), device="cpu")
    assert pipe.components.prediction_type == "v_prediction"
    black = Image.new("RGB", (32, 32), "black")
    white = Image.new("RGB", (32, 32), "white")
    a = pipe.img2img(black, "x", strength=1.0, seed=9, steps=4, sampler="euler")[0].pixels
    b = pipe.img2img(white, "x", strength=1.0, seed=9, steps=4, sampler="euler")[0].pixels
    ignored = np.abs(a - b).mean()
    assert np.abs(a - b).max() < 2e-3
    c = pipe.img2img(black, "x", strength=0.3, seed=9, steps=4, sampler="euler")[0].pixels
    d = pipe.img2img(white, "x", strength=0.3, seed=9, steps=4, sampler="euler")[0].pixels
    assert np.abs(c - d).mean() > 20 * ignored  # at 0.3 the input still shows through


def test_init_image_is_cover_resized_and_centre_cropped():
    from sdlab.generate import prepare_init_image
    wide = Image.new("RGB", (128, 64), "red")
    wide.paste(Image.new("RGB", (32, 64), "blue"), (0, 0))  # a blue strip on the left
    out = prepare_init_image(wide, 32, 32)
    assert out.size == (32, 32)
    assert np.asarray(out)[:, :, 2].max() < 100  # the left strip is cropped away


def test_loopback_feeds_outputs_back(tiny_pipe):
    init = Image.new("RGB", (32, 32), "white")
    loops = tiny_pipe.loopback(init, ["a red circle", "a blue square"], strength=0.5, seed=3, steps=4)
    assert len(loops) == 2 and len(loops[1]) == 1
    assert loops[1][0].params.prompt == "a blue square"
    assert loops[1][0].params.seed == 4
    assert loops[1][0].params.extras["Loopback"] == "2/2"


def test_trajectory_has_a_frame_per_step(tiny_pipe):
    [r] = tiny_pipe.generate("a circle", seed=1, steps=5, trajectory=True)
    assert r.trajectory is not None and len(r.trajectory) == 5
    assert r.trajectory[-1].size == r.image.size


def test_progress_and_interrupt(tiny_pipe):
    events = []
    tiny_pipe.generate("a", seed=1, steps=3, num_images=2, batch_size=1, on_progress=events.append)
    fractions = [e.fraction for e in events]
    assert len(events) == 6 and fractions == sorted(fractions) and fractions[-1] == 1.0
    calls = {"n": 0}

    def stop_after_two() -> bool:
        calls["n"] += 1
        return calls["n"] > 2

    results = tiny_pipe.generate("a", seed=1, steps=5, num_images=3, batch_size=1,
                                 should_stop=stop_after_two)
    assert len(results) == 1 and results[0].interrupted


def test_long_prompt_is_chunked_not_cut(tiny_pipe):
    enc = tiny_pipe.encoder
    long_prompt = ", ".join(["a red circle on a blue background"] * 12)  # ~100 tokens
    emb = enc.encode([long_prompt])
    assert emb.shape[1] == 2 * 77
    short = enc.encode(["a red circle"])
    assert short.shape[1] == 77
    [r] = tiny_pipe.generate(long_prompt, seed=1, steps=2)  # uncond padded to the same length
    assert r.image.size == (32, 32)


def test_emphasis_changes_embedding(tiny_pipe):
    enc = tiny_pipe.encoder
    plain = enc.encode(["a red circle"])
    weighted = enc.encode(["a (red:1.5) circle"])
    assert plain.shape == weighted.shape
    assert not torch.allclose(plain, weighted)
    assert torch.allclose(plain.mean(), weighted.mean(), atol=1e-5)  # A1111 restores the mean


def test_safety_checker_flags_and_can_be_disabled(tmp_path):
    path = make_tiny_sd_folder(tmp_path / "with-checker", safety_checker=True)
    pipe = sdlab.load(str(path), device="cpu")
    assert pipe.components.safety_checker is not None
    [r] = pipe.generate("x", seed=1, steps=2)
    assert r.nsfw and np.asarray(r.image).max() == 0
    off = sdlab.load(str(path), device="cpu", safety_checker=False)
    [r2] = off.generate("x", seed=1, steps=2)
    assert not r2.nsfw and np.asarray(r2.image).max() > 0


def test_broken_models_give_one_line_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        sdlab.load(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="model_index.json"):
        sdlab.load(str(tmp_path / "empty"))
    partial = make_tiny_sd_folder(tmp_path / "partial")
    import shutil
    shutil.rmtree(partial / "vae")
    with pytest.raises(ModelLoadError, match="missing vae"):
        sdlab.load(str(partial))
    broken = make_tiny_sd_folder(tmp_path / "broken")
    (broken / "unet" / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="broken"):
        sdlab.load(str(broken))


def test_device_independent_noise(tiny_pipe):
    """Noise is drawn on the CPU per image: the same seed gives the same initial latents
    whatever the batch (checked directly on the generator contract)."""
    g1 = torch.Generator("cpu").manual_seed(7)
    a = torch.randn((1, 4, 4, 4), generator=g1)
    g2 = torch.Generator("cpu").manual_seed(7)
    b = torch.randn((1, 4, 4, 4), generator=g2)
    assert torch.equal(a, b)


def test_cli_guidance_cap_flag_and_from_image_round_trip(tmp_path, capsys):
    from sdlab.cli import main
    from sdlab.images import parse_infotext, read_infotext
    model = make_tiny_sd_folder(tmp_path / "model")
    common = ["--model", str(model), "--steps", "3", "--seed", "2", "--guidance-scale", "5"]
    assert main(["generate", "a red circle", *common, "--guidance-cap", "1.5",
                 "--out", str(tmp_path / "capped")]) == 0
    [png] = (tmp_path / "capped").glob("*.png")
    assert parse_infotext(read_infotext(png))["CFG cap"] == "1.5 below t=0.7"
    assert main(["generate", "a red circle", *common, "--guidance-cap", "off",
                 "--out", str(tmp_path / "plain")]) == 0
    [plain] = (tmp_path / "plain").glob("*.png")
    assert "CFG cap" not in parse_infotext(read_infotext(plain))
    assert not np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(plain)))
    # --from reproduces each image exactly, its cap (or its absence) included
    for source, out in ((png, "again_capped"), (plain, "again_plain")):
        assert main(["generate", "--from", str(source), "--model", str(model),
                     "--out", str(tmp_path / out)]) == 0
        [copy] = (tmp_path / out).glob("*.png")
        assert np.array_equal(np.asarray(Image.open(copy)), np.asarray(Image.open(source)))
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "a red circle", *common, "--guidance-cap", "lots"])
    assert exit_info.value.code == 2
    assert "expected a number or 'off'" in capsys.readouterr().err
