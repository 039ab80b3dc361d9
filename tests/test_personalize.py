"""Personalisation on tiny random models: textual inversion, Dreambooth (full and LoRA), loading
embeddings and LoRAs of sdlab's, diffusers', A1111's and kohya's formats, errors and --resume."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import sdlab
from sdlab import personalize
from sdlab.errors import InputError, ModelLoadError
from sdlab.train import data
from sdlab.train.dreambooth import DreamboothConfig, class_folder, train_dreambooth
from sdlab.train.textual_inversion import TextualInversionConfig, train_textual_inversion

from conftest import make_tiny_sd_folder

VOCAB = 49408  # CLIP's; the tiny text encoder has its embedding table


# --- fixtures -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny model of our own (Dreambooth copies it) that generates in 2 steps by default."""
    path = make_tiny_sd_folder(tmp_path_factory.mktemp("p") / "tiny-p")
    (path / "sdlab.json").write_text(json.dumps(
        {"name": "tiny-p", "defaults": {"steps": 2, "width": 32, "height": 32}}))
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Three images of different sizes and formats, a caption file and a non-image file."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i, (size, suffix) in enumerate([((40, 60), ".png"), ((50, 50), ".jpg"), ((70, 30), ".png")]):
        Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(folder / f"{i}{suffix}")
    (folder / "0.txt").write_text("a {} on a blue background")
    (folder / "notes.md").write_text("not an image")
    return folder


def common(model, images, out, **kw) -> dict:
    return {"model": str(model), "images": str(images), "out": str(out), "batch_size": 2,
            "validation_images": 0, "log_every": 1, **kw}


@pytest.fixture(scope="module")
def ti_run(model, images, tmp_path_factory):
    out = tmp_path_factory.mktemp("ti") / "learned_embeds.safetensors"
    cfg = TextualInversionConfig(**common(model, images, out, steps=2, validation_images=1),
                                 token="<x>", init_token="cat", vectors=2)
    return cfg, train_textual_inversion(cfg)


@pytest.fixture(scope="module")
def lora_run(model, images, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    cfg = DreamboothConfig(**common(model, images, root / "out", steps=1, lr=1e-2),
                           instance_prompt="a sks", lora=True, rank=2, train_text_encoder=True,
                           prior_preservation=True, class_prompt="a dog", num_class_images=2,
                           class_data_dir=str(root / "class"))
    return cfg, train_dreambooth(cfg)


def pixels(pipe, prompt="a <x> sks", seed=3) -> np.ndarray:
    return pipe.generate(prompt, seed=seed)[0].pixels


# --- textual inversion ----------------------------------------------------------------------

def test_ti_learns_only_the_new_rows(model, ti_run):
    cfg, out = ti_run
    assert out.name == "learned_embeds.safetensors"
    saved = load_file(str(out))
    assert list(saved) == ["<x>"] and saved["<x>"].shape == (2, 32)

    base = load_file(str(model / "text_encoder" / "model.safetensors"))
    trained = load_file(str(out.parent / "checkpoint" / "model.safetensors"))
    table = "embeddings.token_embedding.weight"
    assert trained[table].shape == (VOCAB + 2, 32)
    assert torch.equal(trained[table][:VOCAB], base[table])
    assert all(torch.equal(trained[k], base[k]) for k in base if k != table)
    cat = base[table][2368]  # "cat</w>": both vectors start from it
    assert torch.equal(trained[table][VOCAB:], saved["<x>"])
    assert not torch.allclose(saved["<x>"], cat.expand(2, -1))

    for name in ("command.txt", "config.json", "loss.jsonl", "validation-final.png"):
        assert (out.parent / name).exists(), name
    config = json.loads((out.parent / "config.json").read_text())
    assert config["steps"] == 2 and config["model_scale"] == "small" and config["resolution"] == 32


def test_ti_embedding_loads_and_changes_generation(model, ti_run, tmp_path):
    _, out = ti_run
    pipe = sdlab.load(str(model), device="cpu")
    personalize.apply_personalization(pipe, embeddings=[str(out)], loras=[])
    assert pipe.encoder.tokenize("a <x> cat").ids[0][:5] == [49406, 320, VOCAB, VOCAB + 1, 2368]
    learned = pipe.generate("a <x>", seed=3)
    assert "TI hashes" in learned[0].params.infotext()

    untrained = sdlab.load(str(model), device="cpu")
    cat = untrained.components.text_encoder.get_input_embeddings().weight[2368].detach()
    save_file({"<x>": cat.expand(2, -1).contiguous()}, str(tmp_path / "init.safetensors"))
    personalize.apply_personalization(untrained, embeddings=[str(tmp_path / "init.safetensors")])
    assert np.abs(learned[0].pixels - pixels(untrained, "a <x>")).max() > 1e-4


def test_a1111_embeddings_load(model, tmp_path):
    pipe = sdlab.load(str(model), device="cpu")
    pt, st = torch.randn(3, 32), torch.randn(1, 32)
    torch.save({"string_to_param": {"*": torch.nn.Parameter(pt)}, "name": "x", "step": 100},
               tmp_path / "myemb.pt")
    save_file({"emb_params": st}, str(tmp_path / "otheremb.safetensors"))
    personalize.apply_personalization(
        pipe, embeddings=[str(tmp_path / "myemb.pt"), f"{tmp_path / 'otheremb.safetensors'}:<o>"])
    tok = pipe.components.tokenizer
    ids = pipe.encoder.tokenize("myemb and (<o>:1.2)").ids[0]
    names = tok.convert_ids_to_tokens(ids[1:6])
    assert names == ["myemb", "myemb_1", "myemb_2", "and</w>", "<o>"]
    table = pipe.components.text_encoder.get_input_embeddings().weight
    assert torch.equal(table[ids[1:4]], pt) and torch.equal(table[ids[5]], st[0])

    save_file({"emb_params": st}, str(tmp_path / "cat.safetensors"))
    with pytest.raises(InputError, match="already in the tokenizer's vocabulary"):
        personalize.apply_personalization(pipe, embeddings=[str(tmp_path / "cat.safetensors")])
    save_file({"<w>": torch.randn(1, 768)}, str(tmp_path / "wide.safetensors"))
    with pytest.raises(ModelLoadError, match="size 768"):
        personalize.apply_personalization(pipe, embeddings=[str(tmp_path / "wide.safetensors")])


def test_resume_continues_exactly(model, images, tmp_path):
    def run(out, steps, resume=False):
        cfg = TextualInversionConfig(**common(model, images, out / "e.safetensors", steps=steps),
                                     token="<r>", init_token="dog", resume=resume)
        return load_file(str(train_textual_inversion(cfg)))["<r>"]

    straight = run(tmp_path / "a", 2)
    run(tmp_path / "b", 1)
    state = json.loads((tmp_path / "b" / "checkpoint" / "loop_state.json").read_text())
    assert state["step"] == 1
    resumed = run(tmp_path / "b", 2, resume=True)
    assert torch.allclose(straight, resumed, atol=1e-6)
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "loss.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


# --- LoRA -----------------------------------------------------------------------------------

def test_lora_file_loads_with_a_weight(model, lora_run):
    cfg, out = lora_run
    assert out.name == "pytorch_lora_weights.safetensors"
    assert out.stat().st_size < 400_000
    with safe_open(str(out), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("unet.") and ".to_q.lora.down.weight" in k for k in keys)
    # a small model: the ResNet convolutions get adapters too (UNET_LORA_TARGETS_SMALL), all of
    # them in the up blocks (UNET_LORA_BLOCKS)
    assert any(k.startswith("unet.up_blocks.") and ".resnets.0.conv1.lora" in k for k in keys)
    assert not any(k.startswith(("unet.down_blocks.", "unet.mid_block.")) for k in keys)
    # ... at half the rank of the others there (LORA_CONV_RANK_SHARE): rank 2, convolutions 1
    with safe_open(str(out), "pt") as f:
        ranks = {k.split(".lora")[0].rsplit(".", 1)[-1]: f.get_slice(k).get_shape()[0]
                 for k in keys if k.startswith("unet.") and k.endswith(".lora.down.weight")}
    assert ranks.get("conv1") == ranks.get("conv2") == 1 and ranks.get("to_q") == 2, ranks
    assert any(k.startswith("text_encoder.text_model.encoder.") for k in keys)
    # a small model: the VAE decoder is adapted too (sdlab.train.dreambooth.DECODER)
    assert any(k.startswith("vae.decoder.") and ".conv1.lora" in k for k in keys)
    assert not any(k.startswith("vae.encoder.") for k in keys)

    pipe = sdlab.load(str(model), device="cpu")
    base = pixels(pipe, "a sks")
    personalize.apply_personalization(pipe, loras=[f"{out}:0"])
    assert np.array_equal(pixels(pipe, "a sks"), base)
    personalize.apply_personalization(pipe, loras=[f"{out}:1.5"])
    result = pipe.generate("a sks", seed=3)[0]
    assert np.abs(result.pixels - base).max() > 1e-4
    assert 'Lora: "out:0, out:1.5"' in result.params.infotext()


def _fused_by_diffusers(model, lora_file, weight):
    from diffusers import StableDiffusionPipeline
    sd = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    sd.load_lora_weights(str(lora_file))
    sd.fuse_lora(lora_scale=weight)
    return {k.replace(".base_layer", ""): v for k, v in sd.unet.state_dict().items() if "lora_" not in k}


def test_kohya_lora_loads_as_diffusers_fuses_it(model, tmp_path):
    pipe = sdlab.load(str(model), device="cpu")
    unet, te = pipe.components.unet, pipe.components.text_encoder
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    k = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    te_q = "encoder.layers.0.self_attn.q_proj"
    gen = torch.Generator().manual_seed(0)
    state, expected = {}, {}
    for prefix, name, module in [("lora_unet_", q, unet), ("lora_unet_", k, unet),
                                 ("lora_te_text_model_", te_q, te)]:
        w = module.get_submodule(name).weight
        key = prefix + name.replace(".", "_")
        down, up = torch.randn(2, w.shape[1], generator=gen), torch.randn(w.shape[0], 2, generator=gen)
        state |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                  f"{key}.alpha": torch.tensor(1.0)}
        expected[(id(module), name)] = w.detach() + 0.8 * 0.5 * up @ down
    save_file(state, str(tmp_path / "kohya.safetensors"))
    personalize.apply_personalization(pipe, loras=[f"{tmp_path / 'kohya.safetensors'}:0.8"])
    for module, name in [(unet, q), (unet, k), (te, te_q)]:
        assert torch.allclose(module.get_submodule(name).weight, expected[(id(module), name)], atol=1e-6)

    # diffusers 0.42 cannot read kohya text-encoder keys: compare the UNet part only
    save_file({k: v for k, v in state.items() if k.startswith("lora_unet_")},
              str(tmp_path / "kohya-unet.safetensors"))
    theirs = _fused_by_diffusers(model, tmp_path / "kohya-unet.safetensors", 0.8)
    for key, value in unet.state_dict().items():
        assert torch.allclose(value, theirs[key], atol=1e-5), key

    bad = {"lora_unet_no_such_layer.lora_down.weight": torch.zeros(2, 4),
           "lora_unet_no_such_layer.lora_up.weight": torch.zeros(4, 2)}
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ModelLoadError, match="not in this model"):
        personalize.apply_personalization(pipe, loras=[str(tmp_path / "bad.safetensors")])


def test_our_lora_fuses_as_diffusers_does(model, lora_run):
    _, out = lora_run
    ours = sdlab.load(str(model), device="cpu")
    personalize.apply_personalization(ours, loras=[f"{out}:0.7"])
    theirs = _fused_by_diffusers(model, out, 0.7)
    for key, value in ours.components.unet.state_dict().items():
        assert torch.allclose(value, theirs[key], atol=1e-5), key


def test_class_images_are_generated_once_and_cached(lora_run):
    cfg, _ = lora_run
    folder = class_folder(cfg, 2)
    assert sorted(p.name for p in folder.iterdir()) == ["00000.png", "00001.png", "done.json"]
    assert "a dog" in Image.open(folder / "00000.png").info["parameters"]
    # only the class prompt's: the small models' world prior renders its scenes (WORLD_PRIOR)
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]


# --- Dreambooth -----------------------------------------------------------------------------

def test_dreambooth_writes_a_loadable_model(model, images, tmp_path):
    out = tmp_path / "dog-model"
    cfg = DreamboothConfig(**common(model, images, out, steps=1, lr=1e-3),
                           instance_prompt="a sks", train_text_encoder=True)
    assert train_dreambooth(cfg) == out
    tuned = sdlab.load(str(out), device="cpu")
    assert tuned.components.name == "dog-model"
    assert tuned.components.defaults.steps == 2
    with safe_open(str(out / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16
    base = pixels(sdlab.load(str(model), device="cpu"), "a sks")
    assert np.abs(pixels(tuned, "a sks") - base).max() > 1e-4
    assert (out / "command.txt").exists()
    config = json.loads((out / "config.json").read_text())  # the recipe's defaults, resolved
    assert (config["subject_size"], config["prior_loss_weight"], config["train_decoder"],
            config["background_copies"]) == ("large", 2.0, True, 0.25)  # the tiny model is small
    assert json.loads((out / "sdlab.json").read_text())["personalization"]["instance_prompt"] == "a sks"


def test_dreambooth_decoder_learns_on_small_models_encoder_stays(model, images, tmp_path):
    def vae_state(path):
        return load_file(str(path / "vae" / "diffusion_pytorch_model.safetensors"))
    source = vae_state(model)
    for train_decoder in (None, False):  # None: the default, on for a 32 px model
        out = tmp_path / f"db-{train_decoder}"
        cfg = DreamboothConfig(**common(model, images, out, steps=2, lr=1e-3, decoder_lr=1e-2),
                               instance_prompt="a sks", train_decoder=train_decoder)
        train_dreambooth(cfg)
        tuned = vae_state(out)
        changed = {k for k in source if not torch.equal(source[k].to(tuned[k].dtype), tuned[k])}
        if train_decoder is None:
            assert changed and all(k.startswith(("decoder.", "post_quant_conv.")) for k in changed)
            assert json.loads((out / "sdlab.json").read_text())["personalization"]["train_decoder"]
        else:
            assert not changed


# --- data and errors ------------------------------------------------------------------------

def test_images_are_cropped_and_captioned(images):
    loaded = data.load_folder(images, 16)
    assert [im.path.name for im in loaded] == ["0.png", "1.jpg", "2.png"]
    assert all(im.pixels.shape == (3, 16, 16) for im in loaded)
    assert loaded[0].caption == "a {} on a blue background" and loaded[1].caption is None
    sampler = data.Sampler(3, repeats=2, seed=1)
    epoch = [i for step in range(3) for i, _ in sampler.indices(step, 2)]
    assert sorted(epoch) == [0, 0, 1, 1, 2, 2]
    assert sampler.indices(5, 2) == data.Sampler(3, repeats=2, seed=1).indices(5, 2)


def test_bad_image_folders_are_one_line_errors(model, tmp_path, capsys):
    from sdlab.cli import main
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no images in"):
        data.list_images(empty)
    broken = tmp_path / "broken"
    broken.mkdir()
    Image.new("RGB", (8, 8)).save(broken / "good.png")
    (broken / "bad.png").write_bytes(b"not a png at all")
    with pytest.raises(InputError, match="bad.png"):
        data.load_folder(broken, 16)

    for folder, needle in [(empty, "no images in"), (broken, "bad.png")]:
        code = main(["train", "textual-inversion", "--model", str(model), "--images", str(folder),
                     "--token", "<q>", "--init-token", "cat", "--out", str(tmp_path / "q.safetensors")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and needle in err, err


def test_cli_generate_loads_embedding_and_lora(model, ti_run, lora_run, tmp_path):
    from sdlab.cli import main
    from sdlab.images import parse_infotext, read_infotext
    _, embedding = ti_run
    _, lora = lora_run
    code = main(["generate", "a <x> sks", "--model", str(model), "--embedding", str(embedding),
                 "--lora", f"{lora}:0.5", "--seed", "1", "--out", str(tmp_path)])
    assert code == 0
    [png] = tmp_path.glob("*.png")
    info = parse_infotext(read_infotext(png))
    assert info["Lora"] == "out:0.5" and info["TI hashes"].startswith("<x>: ")


def test_server_loads_embedding_and_lora(model, ti_run, lora_run):
    import base64
    import io

    from fastapi.testclient import TestClient

    from sdlab.images import parse_infotext
    from sdlab.server.app import create_app
    _, embedding = ti_run
    _, lora = lora_run
    request = {"prompt": "a <x> sks", "steps": 2, "seed": 1, "width": 32, "height": 32,
               "sampler_name": "Euler", "cfg_scale": 5}

    def generate(app) -> tuple[np.ndarray, dict]:
        with TestClient(app) as client:
            body = client.post("/sdapi/v1/txt2img", json=request).json()
            listed = client.get("/sdapi/v1/embeddings").json()
        image = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))
        return np.asarray(image.convert("RGB")), {"info": json.loads(body["info"]), "listed": listed}

    plain, plain_meta = generate(create_app(str(model), device="cpu"))
    served, meta = generate(create_app(str(model), device="cpu", embeddings=[str(embedding)],
                                       loras=[f"{lora}:0.5"]))
    assert plain_meta["listed"]["loaded"] == {}
    assert meta["listed"]["loaded"]["<x>"]["vectors"] == 2 and meta["listed"]["loaded"]["<x>"]["shape"] == 32
    infotext = parse_infotext(meta["info"]["infotexts"][0])
    assert infotext["Lora"] == "out:0.5" and infotext["TI hashes"].startswith("<x>: ")
    assert np.abs(served.astype(int) - plain.astype(int)).max() > 0

    cli_pipe = sdlab.load(str(model), device="cpu")
    personalize.apply_personalization(cli_pipe, embeddings=[str(embedding)], loras=[f"{lora}:0.5"])
    same = cli_pipe.generate("a <x> sks", seed=1, steps=2, width=32, height=32, sampler="euler",
                             guidance_scale=5)[0].image
    same = np.asarray(same.convert("RGB")).astype(int)
    assert np.abs(same - served.astype(int)).max() <= 1  # the server runs the CLI's pipeline



def test_two_tone_images_on_every_other_palette_background(model):
    from sdlab.shapes.world import PALETTE, Scene, render
    from sdlab.train.personal import ImageSet, on_other_backgrounds, with_background_captions
    star = render(Scene("star", "yellow", "large", "center", "red", 32, (32, 32)))
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    pixels_ = torch.stack([data.to_tensor(Image.fromarray(a)) for a in (star, noise)])[:, None]
    images = ImageSet(torch.zeros(2, 1, 4, 8, 8), [None, None], data.Sampler(2), pixels_)
    variants = on_other_backgrounds(images, sdlab.load(str(model), device="cpu").components.vae)
    # the two originals, then the star on the 6 colours that are neither yellow nor red
    assert variants.pixels.shape[:2] == (8, 1) and variants.latents.shape[:2] == (8, 1)
    as_uint8 = ((variants.pixels[:, 0] + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    corners = [tuple(int(v) for v in img[0, 0]) for img in as_uint8[2:]]
    assert sorted(corners) == sorted(c for name, c in PALETTE.items() if name not in ("yellow", "red"))
    inside = star.astype(int)[32, 32]
    assert all(np.abs(img[32, 32].astype(int) - inside).max() <= 1 for img in as_uint8[2:])
    edge = (star[..., 1].astype(int) - PALETTE["red"][1]) / (PALETTE["yellow"][1] - PALETTE["red"][1])
    mixed = (edge > 0.1) & (edge < 0.9)  # anti-aliased edge pixels keep their coverage
    others = [name for name in PALETTE if name not in ("yellow", "red")]  # in palette order
    blue = as_uint8[2 + others.index("blue")]
    expect = edge[..., None] * np.array(PALETTE["yellow"]) + (1 - edge[..., None]) * np.array(PALETTE["blue"])
    assert mixed.any() and np.abs(blue[mixed] - expect[mixed]).max() <= 3
    assert variants.captions == [None] * 8  # no caption template: the recipe's prompt
    # with a template (textual inversion): every two-tone image is captioned by its background
    captioned = on_other_backgrounds(images, sdlab.load(str(model), device="cpu").components.vae,
                                     caption="a {{}} on {an} {background} background")
    assert captioned.captions[:2] == ["a {} on a red background", None]
    assert captioned.captions[2 + others.index("orange")] == "a {} on an orange background"
    assert [c.split()[-2] for c in captioned.captions[2:]] == others
    # Dreambooth's instance images: captioned in place, no copies
    in_place = with_background_captions(images, "{{}} on {an} {background} background")
    assert in_place.captions == ["{} on a red background", None] and in_place.latents is images.latents


def test_two_tone_subjects_resized_large_or_to_both_sizes(model):
    from sdlab.shapes.judge import judge
    from sdlab.shapes.world import Scene, render
    from sdlab.train.personal import ImageSet, resized_subjects
    scenes = [Scene("star", "yellow", "small", "top left", "red", 16, (16, 16)),
              Scene("star", "yellow", "large", "bottom right", "green", 33, (48, 48)),
              Scene("triangle", "white", "small", "center", "blue", 14, (32, 32))]
    renders = [render(s) for s in scenes]
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    pixels_ = torch.stack([data.to_tensor(Image.fromarray(a)) for a in renders + [noise]])[:, None]
    images = ImageSet(torch.zeros(4, 1, 4, 8, 8), [None] * 4, data.Sampler(4), pixels_)
    vae = sdlab.load(str(model), device="cpu").components.vae

    def judged(pixels: torch.Tensor) -> list:
        as_uint8 = ((pixels[:, 0] + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        return [judge(a) for a in as_uint8]
    large = resized_subjects(images, vae, "large", "{{}} on {an} {background} background")
    assert large.pixels.shape[:2] == (4, 1) and large.latents.shape[:2] == (4, 1)
    for scene, seen in zip(scenes, judged(large.pixels[:3])):
        assert (seen.shape, seen.color, seen.background, seen.size) == (
            scene.shape, scene.color, scene.background, "large")
    assert torch.equal(large.pixels[1], pixels_[1]) and torch.equal(large.pixels[3], pixels_[3])
    assert large.captions == ["{} on a red background", "{} on a green background",
                              "{} on a blue background", None]
    both = resized_subjects(images, vae, "both")
    assert both.pixels.shape[:2] == (7, 1)  # the four images, then a copy of each two-tone one
    assert torch.equal(both.pixels[:4], pixels_)
    assert [s.size for s in judged(both.pixels[4:])] == ["large", "small", "large"]
    assert both.captions == [None] * 7
    with pytest.raises(InputError, match="subject size"):
        DreamboothConfig(model="m", images="i", out="o", instance_prompt="a sks",
                         subject_size="huge").check()


def test_world_renders_are_the_decoder_and_unet_preservation_sets(model):
    from types import SimpleNamespace

    from sdlab.shapes.world import PALETTE
    from sdlab.train.dreambooth import world_renders
    vae = sdlab.load(str(model), device="cpu").components.vae
    session = SimpleNamespace(cfg=SimpleNamespace(seed=0, resolution=32),
                              components=SimpleNamespace(vae=vae))
    renders = world_renders(session, 4)
    assert renders.pixels.shape == (4, 1, 3, 32, 32) and renders.latents.shape[:3] == (4, 1, 4)
    corners = ((renders.pixels[:, 0, :, 0, 0] + 1) * 127.5).round().int().tolist()
    assert all(tuple(c) in PALETTE.values() for c in corners)  # plain palette backgrounds
    assert torch.equal(world_renders(session, 4).pixels, renders.pixels)  # seeded
    # the UNet's world prior: captioned, most objects small (WORLD_SMALL_SHARE)
    small = world_renders(session, 64, "unet", small_share=0.5)
    assert all(c.startswith(("a ", "an ")) for c in small.captions)
    sizes = [c.split()[1] for c in small.captions if c.split()[1] in ("small", "large")]
    assert sizes.count("small") > 2 * sizes.count("large"), sizes
    # each render's object cells (the full recipe's loss weights, WORLD_OBJECT_WEIGHT): some, not all
    cells = small.object_cells
    assert cells.shape == (64, 1, *small.latents.shape[-2:])
    assert ((cells.flatten(1) > 0).sum(1) > 0).all() and (cells.flatten(1).mean(1) < 0.5).all()


def test_training_noise_is_the_same_in_every_process():
    """Session.generator's seeds are integers only: Python salts a str's hash per process, which
    had given the decoder's noise (so any rerun or resumed run) a different draw every time."""
    code = ("from types import SimpleNamespace as N; from sdlab.train.personal import Session; "
            "from sdlab.train.dreambooth import DECODER_STREAM; "
            "s = N(cfg=N(seed=3), accelerator=N(process_index=0)); "
            "print(Session.generator(s, 7).initial_seed(), "
            "Session.generator(s, 7, DECODER_STREAM).initial_seed())")
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": salt}).stdout
            for salt in ("1", "2")}
    assert len(runs) == 1
    unet_seed, decoder_seed = runs.pop().split()
    assert unet_seed != decoder_seed


def test_lora_rank_defaults_by_model_size():
    from types import SimpleNamespace

    from sdlab.train.personal import fill_defaults

    def filled(width: int, **kw) -> DreamboothConfig:
        cfg = DreamboothConfig(model="m", images="i", out="o", instance_prompt="a sks", lora=True, **kw)
        fill_defaults(cfg, "lora", SimpleNamespace(defaults=SimpleNamespace(width=width)))
        return cfg
    assert filled(64).rank == 8 and filled(512).rank == 4
    assert filled(64, rank=2).rank == 2
    from sdlab.train.dreambooth import fill_dreambooth_defaults
    for width, rank, conv_rank, scale in ((64, None, 4, "small"), (64, 3, 2, "small"),
                                          (64, 1, 1, "small"), (512, None, 4, "sd")):
        cfg = filled(width, rank=rank)
        fill_dreambooth_defaults(cfg, scale)
        assert cfg.conv_rank == conv_rank, (width, rank)


def test_background_copies_show_the_unet_the_subject_on_other_backgrounds(model, tmp_path,
                                                                           monkeypatch):
    from sdlab.shapes.world import Scene, render
    from sdlab.train.personal import Session
    folder = tmp_path / "stars"
    folder.mkdir()
    for i, center in enumerate([(24, 24), (40, 36)]):  # at the tiny model's 32 px: no resampling
        star = Image.fromarray(render(Scene("star", "yellow", "large", "center", "red", 32, center)))
        star.resize((32, 32), Image.BOX).save(folder / f"{i}.png")
    seen: list[str] = []
    token_ids = Session.token_ids

    def recording(session, prompts):
        seen.extend(prompts)
        return token_ids(session, prompts)
    monkeypatch.setattr(Session, "token_ids", recording)
    backgrounds = {}
    for share in (0.0, 1.0):
        seen.clear()
        cfg = DreamboothConfig(**common(model, folder, tmp_path / f"db-{share}", steps=3,
                                        batch_size=4, lr=1e-3),
                               instance_prompt="a sks", background_copies=share)
        train_dreambooth(cfg)
        backgrounds[share] = {p.split()[-2] for p in seen if p.endswith("background")}
    assert backgrounds[0.0] == {"red"}  # the images' own background only
    assert len(backgrounds[1.0] - {"red"}) >= 2  # copies on other palette backgrounds
    with pytest.raises(InputError, match="background copies"):
        DreamboothConfig(model="m", images="i", out="o", instance_prompt="a sks",
                         background_copies=1.5).check()


def test_world_prior_teacher_targets_are_the_frozen_unets_predictions(model):
    import copy
    from types import SimpleNamespace

    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    from sdlab.train.personal import Session
    components = sdlab.load(str(model), device="cpu").components
    unet = components.unet
    session = SimpleNamespace(noise_scheduler=DDPMScheduler(num_train_timesteps=1000),
                              cfg=SimpleNamespace(seed=0), accelerator=Accelerator(cpu=True),
                              components=SimpleNamespace(prediction_type="epsilon"))
    session.generator = lambda step, *stream: Session.generator(session, step, *stream)
    latents = torch.randn(4, unet.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = torch.randn(4, 77, unet.config.cross_attention_dim)
    plain = Session.diffusion_loss(session, unet, latents, cond, step=0)
    taught = Session.diffusion_loss(session, unet, latents, cond, step=0,
                                    teacher=(copy.deepcopy(unet), 2))
    assert torch.equal(taught[:2], plain[:2])  # before k: the sampled noise is the target
    assert taught[2:].abs().max() < 1e-10 < plain[2:].min()  # from k: the teacher's prediction
    # cell weights for the last samples scale their squared errors there
    weights = torch.ones(2, 1, 8, 8)
    weights[0, :, :4] = 3.0
    weighted = Session.diffusion_loss(session, unet, latents, cond, step=0, last_weights=weights)
    assert torch.equal(weighted[:2], plain[:2]) and torch.allclose(weighted[3], plain[3])
    assert weighted[2] > 1.5 * plain[2]
