"""`sdlab serve`: the A1111-compatible API driven by a real client (webuiapi), the FIFO queue under
load, progress and interrupt, bad input, and the API key. Uses the tiny random model."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from sdlab.server.schemas import Limits

API = "/sdapi/v1"
SDLAB = Path(sys.executable).parent / "sdlab"
LIMITS = Limits(max_pixels=64 * 64, max_batch=8, max_steps=1000)


class LiveServer:
    """uvicorn on 127.0.0.1 and a free port, in a background thread."""

    def __init__(self, app):
        import uvicorn
        self.app = app
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.time() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny model is far faster on one thread than two fighting over a busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_app(tiny_model, tiny_pipe, **kwargs):
    from sdlab.server.app import create_app
    kwargs.setdefault("limits", LIMITS)
    return create_app(str(tiny_model), pipeline_factory=lambda spec: tiny_pipe, **kwargs)


@pytest.fixture(scope="module")
def server(tiny_model, tiny_pipe):
    with LiveServer(make_app(tiny_model, tiny_pipe)) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


@pytest.fixture()
def webui(server):
    import webuiapi
    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler a", steps=2)


def png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def txt2img(client, **fields) -> dict:
    r = client.post(API + "/txt2img", json={"prompt": "a red circle", "steps": 2, **fields})
    assert r.status_code == 200, r.text
    return r.json()


# --- API shape ------------------------------------------------------------------------------

def test_txt2img_shape_and_png_infotext(client):
    body = txt2img(client, seed=7, batch_size=2, negative_prompt="blue", cfg_scale=5,
                   sampler_name="DPM++ 2M Karras", width=32, height=24)
    assert set(body) == {"images", "parameters", "info"}
    assert body["parameters"]["seed"] == 7 and body["parameters"]["batch_size"] == 2
    info = json.loads(body["info"])
    assert info["seed"] == 7 and info["all_seeds"] == [7, 8]
    assert info["prompt"] == "a red circle" and info["all_prompts"] == ["a red circle"] * 2
    assert (info["sampler_name"], info["steps"], info["cfg_scale"]) == ("DPM++ 2M Karras", 2, 5)
    assert (info["width"], info["height"]) == (32, 24)
    assert len(body["images"]) == 2 and len(info["infotexts"]) == 2
    for b64, infotext in zip(body["images"], info["infotexts"]):
        image = png(b64)
        assert image.size == (32, 24)
        assert image.info["parameters"] == infotext
        assert "Negative prompt: blue" in infotext and "Sampler: DPM++ 2M Karras" in infotext


def test_random_seed_is_reported(client):
    info = json.loads(txt2img(client, seed=-1)["info"])
    assert 0 <= info["seed"] < 2**32 and f"Seed: {info['seed']}" in info["infotexts"][0]


def test_listing_endpoints(client, tiny_pipe):
    samplers = client.get(API + "/samplers").json()
    names = {s["name"] for s in samplers}
    assert {"Euler a", "DPM++ 2M", "DDIM"} <= names
    assert all(set(s) == {"name", "aliases", "options"} for s in samplers)
    [model] = [m for m in client.get(API + "/sd-models").json()
               if m["model_name"] == tiny_pipe.components.name]
    assert set(model) == {"title", "model_name", "hash", "sha256", "filename", "config"}
    assert len(model["sha256"]) == 64 and model["hash"] == model["sha256"][:10]
    assert model["title"] == f"{model['model_name']} [{model['hash']}]"
    assert client.get(API + "/embeddings").json() == {"loaded": {}, "skipped": {}}
    options = client.get(API + "/options").json()
    assert options["sd_model_checkpoint"] == model["title"]
    assert client.get("/docs").status_code == 200
    assert "/sdapi/v1/txt2img" in client.get("/openapi.json").json()["paths"]


def test_webuiapi_txt2img_img2img_png_info(webui, tiny_pipe):
    out = webui.txt2img(prompt="a blue square", seed=3, cfg_scale=5, width=32, height=32)
    assert out.image.size == (32, 32)
    assert out.info["seed"] == 3 and out.info["sampler_name"] == "Euler a"
    assert out.parameters["prompt"] == "a blue square"

    again = webui.img2img(images=[out.image], prompt="a blue square", denoising_strength=0.5,
                          seed=4, width=32, height=32)
    assert again.image.size == (32, 32)
    assert again.info["denoising_strength"] == 0.5
    assert "Denoising strength: 0.5" in again.info["infotexts"][0]
    assert again.parameters["init_images"] is None  # not echoed, as in A1111

    info = webui.png_info(out.image)  # sent as a data: URL
    assert info.info == out.info["infotexts"][0]
    assert info.json["parameters"]["Seed"] == "3" and info.json["parameters"]["Size-1"] == "32"

    assert any(s["name"] == "DDIM" for s in webui.get_samplers())
    name = tiny_pipe.components.name
    webui.set_options({"sd_model_checkpoint": name})
    assert webui.get_options()["sd_model_checkpoint"].startswith(name)


def test_img2img_modes_and_raw_base64(client):
    src = Image.new("RGB", (48, 16), "red")
    buf = io.BytesIO()
    src.save(buf, format="PNG")
    raw = base64.b64encode(buf.getvalue()).decode()
    for mode in (0, 1, 2):
        r = client.post(API + "/img2img", json={"init_images": [raw], "resize_mode": mode,
                                                 "steps": 2, "denoising_strength": 0.0,
                                                 "width": 32, "height": 32})
        assert r.status_code == 200, r.text
        out = np.asarray(png(r.json()["images"][0]).convert("RGB"))
        assert out.shape == (32, 32, 3)
        if mode == 1:  # crop: all red
            assert (out[..., 0] > 200).all()
        else:  # stretch and fill keep the whole (red) image too
            assert (out[..., 0] > 200).mean() > 0.9


# --- queue, progress, interrupt -------------------------------------------------------------

def test_progress_and_interrupt_with_webuiapi(server, webui, client):
    import webuiapi
    runner = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler")
    with ThreadPoolExecutor(1) as pool:
        started = time.time()
        pending = pool.submit(runner.txt2img, prompt="a long one", steps=500, seed=1,
                              width=32, height=32)
        progress = None
        while time.time() - started < 60 and not pending.done():
            progress = webui.get_progress()
            if progress["state"]["sampling_step"] >= 2 and progress["current_image"]:
                break
            time.sleep(0.05)
        assert 0 < progress["progress"] < 1, progress
        assert progress["state"]["sampling_steps"] == 500
        assert progress["state"]["job_count"] == 1 and not progress["state"]["interrupted"]
        assert png(progress["current_image"]).size == (32, 32)
        assert webui.interrupt() == {}
        result = pending.result(timeout=60)
    assert result.info["interrupted"] is True
    assert len(result.images) == 1 and result.image.size == (32, 32)
    assert "Steps: 500" in result.info["infotexts"][0]
    idle = webui.get_progress()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0
    assert len(txt2img(client, seed=1)["images"]) == 1  # the next job runs normally


def test_fifty_concurrent_requests(server, client):
    """Every request answered, each with its own seed; /progress stays responsive meanwhile;
    a seed gives the same image in the crowd as alone."""
    async def burst():
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as c:
            latencies = []

            async def poll():
                while True:
                    t = time.perf_counter()
                    r = await c.get(API + "/progress", params={"skip_current_image": True})
                    assert r.status_code == 200
                    latencies.append(time.perf_counter() - t)
                    await asyncio.sleep(0.05)

            poller = asyncio.create_task(poll())
            requests = [c.post(API + "/txt2img", json={"prompt": f"shape {i % 3}", "seed": 100 + i,
                                                        "steps": 2, "sampler_name": "Euler a"})
                        for i in range(50)]
            responses = await asyncio.gather(*requests)
            poller.cancel()
            return responses, latencies

    started = time.time()
    responses, latencies = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 50
    seeds = [json.loads(r.json()["info"])["seed"] for r in responses]
    assert seeds == [100 + i for i in range(50)]
    assert max(latencies) < 3.0, f"/progress blocked for {max(latencies):.2f}s"
    lone = txt2img(client, prompt="shape 2", seed=117, sampler_name="Euler a")
    assert lone["images"][0] == responses[17].json()["images"][0]
    print(f"50 requests in {time.time() - started:.1f}s, slowest /progress {max(latencies):.3f}s")


class FakePipe:
    """Stands in for a Pipeline where only the queue is under test."""

    components = type("FakeComponents", (), {"name": "fake"})()


def fake_worker(max_queue: int = 256):
    from sdlab.server.worker import ModelEntry, ModelRegistry, Worker
    registry = ModelRegistry(ModelEntry("fake", "fake", None), [])
    return Worker(lambda spec: FakePipe(), registry, FakePipe(), max_queue=max_queue)


def test_worker_is_fifo_and_survives_failures():
    from sdlab.server.worker import Job
    worker = fake_worker()
    gate, order = threading.Event(), []

    def task(i):
        def run(pipe, control):
            gate.wait(5)
            order.append(i)
            if i == 3:
                raise RuntimeError("boom")
            return i
        return run

    try:
        futures = [worker.submit(Job(task(i))) for i in range(8)]
        assert futures[5].cancel()  # a client that went away before its turn
        gate.set()
        assert futures[3].exception(5).args == ("boom",)
        assert [f.result(5) for i, f in enumerate(futures) if i not in (3, 5)] == [0, 1, 2, 4, 6, 7]
        assert order == [0, 1, 2, 3, 4, 6, 7]
    finally:
        worker.close()


def test_queue_is_bounded():
    from sdlab.server.worker import Job, QueueFull
    worker = fake_worker(max_queue=2)
    running, gate = threading.Event(), threading.Event()
    try:
        first = worker.submit(Job(lambda pipe, control: running.set() or gate.wait(5)))
        assert running.wait(5)
        waiting = [worker.submit(Job(lambda pipe, control: "ok")) for _ in range(2)]
        with pytest.raises(QueueFull):
            worker.submit(Job(lambda pipe, control: "one too many"))
        gate.set()
        assert first.result(5) is True and [f.result(5) for f in waiting] == ["ok", "ok"]
    finally:
        worker.close()


# --- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize("path, payload, field", [
    ("txt2img", {"steps": -1}, "steps"),
    ("txt2img", {"steps": 2.5}, "steps"),
    ("txt2img", {"width": 10000}, "width"),
    ("txt2img", {"width": 36}, "width"),
    ("txt2img", {"height": 12}, "height"),
    ("txt2img", {"width": 128, "height": 128}, "width"),  # over --max-pixels
    ("txt2img", {"steps": 1001}, "steps"),  # over --max-steps
    ("txt2img", {"batch_size": 4, "n_iter": 3}, "batch_size"),  # over --max-batch
    ("txt2img", {"cfg_scale": -1}, "cfg_scale"),
    ("txt2img", {"seed": -5}, "seed"),
    ("txt2img", {"sampler_name": "Euler z"}, "sampler_name"),
    ("txt2img", {"sampler_name": "DDIM", "scheduler": "karras"}, "sampler_name"),
    ("txt2img", {"scheduler": "wobbly"}, "scheduler"),
    ("txt2img", {"override_settings": {"sd_model_checkpoint": "no-such-model"}},
     "override_settings.sd_model_checkpoint"),
    ("txt2img", {"prompt": ["not", "a", "string"]}, "prompt"),
    ("img2img", {"init_images": ["%%% not base64 %%%"]}, "init_images.0"),
    ("img2img", {"init_images": [base64.b64encode(b"GIF89a broken").decode()]}, "init_images.0"),
    ("img2img", {"init_images": []}, "init_images"),
    ("img2img", {"init_images": ["data:image/png;base64,AAAA"] * 2}, "init_images"),
    ("img2img", {"denoising_strength": 1.5, "init_images": ["AAAA"]}, "denoising_strength"),
    ("options", {"sd_model_checkpoint": "no-such-model"}, "sd_model_checkpoint"),
    ("png-info", {"image": "data:image/png;base64,!!!!"}, "image"),
])
def test_bad_input_is_a_422_naming_the_field(client, path, payload, field):
    r = client.post(f"{API}/{path}", json={"steps": 2, **payload} if "2img" in path else payload)
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["message"].startswith(field + ":"), body["message"]
    assert isinstance(body["detail"], list)


def test_pipeline_errors_and_garbage_are_422_and_the_server_keeps_serving(client):
    r = client.post(API + "/txt2img", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "request body" in r.json()["message"]
    r = client.post(API + "/txt2img", json=["a", "list"])
    assert r.status_code == 422
    assert len(txt2img(client)["images"]) == 1


# --- models ---------------------------------------------------------------------------------

def test_switching_models_options_and_override(tiny_model, tmp_path, monkeypatch):
    """A second model (a copy named like an embedded one): /options switches the checkpoint,
    override_settings uses another model for one request and then restores."""
    import sdlab
    from fastapi.testclient import TestClient

    from sdlab import components
    from sdlab.server.app import create_app
    shutil.copytree(tiny_model, tmp_path / "shapes")
    monkeypatch.setattr(components, "EMBEDDED_DIR", tmp_path)
    loaded = []

    def factory(spec):
        loaded.append(spec)
        return sdlab.load(spec, device="cpu")

    app = create_app(str(tiny_model), pipeline_factory=factory, limits=LIMITS)
    tiny = Path(tiny_model).name
    with TestClient(app) as c:
        def model_of(**fields):
            r = c.post(API + "/txt2img", json={"prompt": "x", "steps": 1, **fields})
            assert r.status_code == 200, r.text
            return json.loads(r.json()["info"])["sd_model_name"]

        names = [m["model_name"] for m in c.get(API + "/sd-models").json()]
        assert names == [tiny, "shapes"]
        assert model_of() == tiny
        assert c.post(API + "/options", json={"sd_model_checkpoint": "shapes"}).status_code == 200
        assert c.get(API + "/options").json()["sd_model_checkpoint"].startswith("shapes [")
        assert model_of() == "shapes"
        assert model_of(override_settings={"sd_model_checkpoint": tiny}) == tiny
        assert model_of() == "shapes"  # restored afterwards
        assert model_of(override_settings={"sd_model_checkpoint": tiny},
                        override_settings_restore_afterwards=False) == tiny
        assert model_of() == tiny
    assert loaded[0] == str(tiny_model) and len(loaded) == 5


def test_unknown_model_fails_at_startup():
    from sdlab.errors import ModelLoadError
    from sdlab.server.app import create_app
    with pytest.raises(ModelLoadError, match="not found"):
        create_app("/no/such/model", device="cpu")


# --- security -------------------------------------------------------------------------------

def test_api_key_guards_everything_but_the_page(tiny_model, tiny_pipe):
    from fastapi.testclient import TestClient
    app = make_app(tiny_model, tiny_pipe, api_key="s3cret")
    with TestClient(app) as c:
        assert c.get("/").status_code == 200 and "sdlab" in c.get("/").text
        assert c.get("/static/app.js").status_code == 200
        for path in (API + "/samplers", API + "/progress", "/docs", "/openapi.json",
                     API + "/no-such-endpoint"):
            r = c.get(path)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", path
        assert c.post(API + "/txt2img", json={"steps": 1}).status_code == 401
        assert c.post(API + "/interrupt").status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert c.get(API + "/samplers", headers=wrong).status_code == 401
        good = {"Authorization": "Bearer s3cret"}
        assert c.get(API + "/samplers", headers=good).status_code == 200
        assert c.get("/docs", headers=good).status_code == 200
        r = c.post(API + "/txt2img", json={"steps": 1}, headers=good)
        assert r.status_code == 200
        assert c.get(API + "/samplers", auth=("any", "s3cret")).status_code == 200  # webuiapi's way


def test_loopback_server_refuses_foreign_host_headers(tiny_model, tiny_pipe):
    from fastapi.testclient import TestClient

    from sdlab.server.app import LOOPBACK_HOSTS
    app = make_app(tiny_model, tiny_pipe, trusted_hosts=LOOPBACK_HOSTS)
    with TestClient(app, base_url="http://127.0.0.1:7860") as c:
        assert c.get(API + "/samplers").status_code == 200
        assert c.get(API + "/samplers", headers={"host": "localhost:7860"}).status_code == 200
        assert c.get(API + "/samplers", headers={"host": "[::1]:7860"}).status_code == 200
        assert c.get(API + "/samplers", headers={"host": "evil.example:7860"}).status_code == 400


def _sdlab(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(SDLAB), *args], capture_output=True, text=True, timeout=60, **kwargs)


def test_serve_refuses_public_address_without_key_or_busy_port():
    r = _sdlab("serve", "--host", "0.0.0.0", "--port", "0")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "--api-key" in r.stderr and "--insecure" in r.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        r = _sdlab("serve", "--port", str(busy.getsockname()[1]))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "cannot listen" in r.stderr


def test_sdlab_serve_command(tiny_model):
    """The real command: loads the model, prints where it listens, answers, stops on SIGINT."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "SDLAB_API_KEY": "k"}
    proc = subprocess.Popen([str(SDLAB), "serve", "--model", str(tiny_model), "--port", "0",
                             "--device", "cpu", "--max-steps", "3"],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = ""
        while "serving" not in line and proc.poll() is None:
            line = proc.stderr.readline()
        assert "serving" in line and "with an API key" in line, line
        url = line.split(" on ")[1].split()[0].rstrip("/")
        headers = {"Authorization": "Bearer k"}
        r = httpx.post(url + API + "/txt2img", json={"steps": 2}, headers=headers, timeout=60)
        assert r.status_code == 200 and len(r.json()["images"]) == 1
        r = httpx.post(url + API + "/txt2img", json={"steps": 4}, headers=headers, timeout=60)
        assert r.status_code == 422 and "--max-steps" in r.json()["message"]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
    assert code == 0
