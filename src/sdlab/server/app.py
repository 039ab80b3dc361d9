"""The FastAPI app: AUTOMATIC1111's `/sdapi/v1` API over sdlab's Pipeline, and a web page at `/`.

Handlers never generate themselves: they validate, put a Job on the Worker's queue and await its
future, so the event loop keeps answering /progress and /interrupt while images are made. Bad
input is a 422 whose `message` names the field; an sdlab error from the pipeline is a 422 too.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import re
import secrets
from collections.abc import Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

from fastapi import Body, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image

import sdlab
from sdlab.errors import InputError
from sdlab.server.schemas import (
    EmbeddingsResponse, GenerationRequest, Img2ImgRequest, ImageResponse, Limits, PNGInfoRequest,
    PNGInfoResponse, ProgressResponse, ProgressState, SamplerItem, SDModelItem, Txt2ImgRequest,
)
from sdlab.server.worker import (
    Control, Job, ModelRegistry, PipelineFactory, QueueFull, Worker, png_base64,
)

log = logging.getLogger("sdlab.server")

STATIC_DIR = Path(__file__).parent / "static"
API = "/sdapi/v1"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
_DATA_URL = re.compile(r"^data:[\w/+.-]*;base64,", re.IGNORECASE)


def create_app(model: str = "shapes", *, api_key: str | None = None, limits: Limits = Limits(),
               device: str = "auto", pipeline_factory: PipelineFactory | None = None,
               trusted_hosts: tuple[str, ...] | None = None, embeddings: Sequence[str] = (),
               loras: Sequence[str] = ()) -> FastAPI:
    """Load `model` (SdlabError if it cannot be) and build the app around a started Worker.

    pipeline_factory(spec) -> Pipeline replaces sdlab.load (tests inject a loaded Pipeline).
    With api_key, everything but the page needs `Authorization: Bearer KEY`; with
    trusted_hosts, other Host headers are refused (DNS rebinding onto a loopback server).
    `embeddings` (FILE[:TOKEN]) and `loras` (FILE[:WEIGHT]) are loaded into every checkpoint the
    server loads, as `sdlab generate --embedding/--lora` would."""
    static = StaticFiles(directory=STATIC_DIR)
    factory = pipeline_factory or partial(sdlab.load, device=device)
    if embeddings or loras:
        factory = partial(_personalized, factory, tuple(embeddings), tuple(loras))
    pipe = factory(model)
    registry = ModelRegistry.discover(model, pipe.components.name)
    worker = Worker(factory, registry, pipe, max_queue=limits.max_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        worker.close()

    app = FastAPI(title="sdlab", version=sdlab.__version__, lifespan=lifespan,
                  description="Stable Diffusion over an API compatible with AUTOMATIC1111's.")
    app.state.worker = worker
    Api(worker, limits).register(app)
    _add_error_handlers(app)
    app.mount("/static", static, name="static")
    app.add_api_route("/", lambda: FileResponse(STATIC_DIR / "index.html"), methods=["GET"],
                      include_in_schema=False)
    if api_key:
        app.add_middleware(BearerAuth, key=api_key)
    if trusted_hosts:
        app.add_middleware(TrustedHosts, hosts=trusted_hosts)
    return app


def _personalized(factory: PipelineFactory, embeddings: tuple[str, ...], loras: tuple[str, ...],
                  spec: str):
    from sdlab.personalize import apply_personalization
    pipe = factory(spec)
    pipe.personalization = apply_personalization(pipe, embeddings=embeddings, loras=loras)
    return pipe


# --- the API ----------------------------------------------------------------------------------

class Api:
    """The /sdapi/v1 handlers over one Worker."""

    def __init__(self, worker: Worker, limits: Limits):
        self.worker = worker
        self.limits = limits

    def register(self, app: FastAPI) -> None:
        routes = [
            ("/txt2img", self.txt2img, "POST", ImageResponse),
            ("/img2img", self.img2img, "POST", ImageResponse),
            ("/progress", self.progress, "GET", ProgressResponse),
            ("/interrupt", self.interrupt, "POST", None),
            ("/samplers", self.samplers, "GET", list[SamplerItem]),
            ("/sd-models", self.sd_models, "GET", list[SDModelItem]),
            ("/embeddings", self.embeddings, "GET", EmbeddingsResponse),
            ("/png-info", self.png_info, "POST", PNGInfoResponse),
            ("/options", self.get_options, "GET", None),
            ("/options", self.set_options, "POST", None),
            ("/scripts", self.scripts, "GET", None),
        ]
        for path, handler, method, model in routes:
            app.add_api_route(API + path, handler, methods=[method], response_model=model,
                              summary=(handler.__doc__ or "").strip().split("\n")[0] or None)

    # --- generation -------------------------------------------------------------------------

    async def txt2img(self, req: Txt2ImgRequest) -> dict:
        """Text to image (A1111 fields; unset sizes/steps/cfg use the model's defaults)."""
        sampler, model = self._validate(req)
        job = self._job(req, "txt2img", model, partial(_run_txt2img, req, sampler))
        results = await self._await(job)
        return await run_in_threadpool(image_response, req, results)

    async def img2img(self, req: Img2ImgRequest) -> dict:
        """Image to image from base64 init_images (raw or data: URLs)."""
        sampler, model = self._validate(req)
        inits = await run_in_threadpool(self._decode_inits, req)
        job = self._job(req, "img2img", model, partial(_run_img2img, req, sampler, inits))
        results = await self._await(job)
        return await run_in_threadpool(image_response, req, results)

    def _validate(self, req: GenerationRequest) -> tuple[str | None, str | None]:
        """The checks pydantic cannot make; returns (sampler, model override)."""
        self._check_limits(req)
        return self._sampler(req), self._override_model(req)

    @staticmethod
    def _job(req: GenerationRequest, label: str, model: str | None, task) -> Job:
        return Job(task, label=label, model=model, batches=req.n_iter,
                   keep_model=model is not None and not req.override_settings_restore_afterwards)

    async def _await(self, job: Job) -> Any:
        """Queue the job and wait for it without holding the event loop."""
        return await asyncio.wrap_future(self.worker.submit(job))

    def _check_limits(self, req: GenerationRequest) -> None:
        lim, defaults = self.limits, self.worker.pipeline.components.defaults
        steps = req.steps if req.steps is not None else defaults.steps
        if steps > lim.max_steps:
            raise field_error("steps", f"{steps} steps is over this server's limit of "
                                       f"{lim.max_steps} (--max-steps)", steps)
        if req.num_images > lim.max_batch:
            raise field_error("batch_size", f"batch_size x n_iter = {req.num_images} images is "
                                            f"over this server's limit of {lim.max_batch} "
                                            f"(--max-batch)", req.batch_size)
        width, height = req.width or defaults.width, req.height or defaults.height
        if width * height > lim.max_pixels:
            name = "width" if req.width else "height"
            raise field_error(name, f"{width}x{height} = {width * height} pixels is over this "
                                    f"server's limit of {lim.max_pixels} (--max-pixels)",
                              getattr(req, name))

    def _sampler(self, req: GenerationRequest) -> str | None:
        try:
            return req.sampler()
        except InputError as e:
            raise field_error("sampler_name", str(e), req.sampler_name) from None

    def _override_model(self, req: GenerationRequest) -> str | None:
        name = req.checkpoint()
        if name is None:
            return None
        try:
            return self.worker.registry.find(name).name
        except InputError as e:
            raise field_error(("override_settings", "sd_model_checkpoint"), str(e), name) from None

    def _decode_inits(self, req: Img2ImgRequest) -> list[Image.Image]:
        if len(req.init_images) not in (1, req.num_images):
            raise field_error("init_images", f"{len(req.init_images)} init images for "
                                             f"{req.num_images} images: send 1, or one per image")
        return [decode_image(text, ("init_images", i), self.limits.max_init_pixels)
                for i, text in enumerate(req.init_images)]

    # --- state ------------------------------------------------------------------------------

    async def progress(self, skip_current_image: bool = False) -> ProgressResponse:
        """Progress of the running request (0..1), its step, and a preview image."""
        snap = self.worker.snapshot(want_image=not skip_current_image)
        state = ProgressState(interrupted=snap.interrupted, job=snap.job,
                              job_count=snap.job_count, job_no=snap.job_no,
                              job_timestamp=snap.job_timestamp, sampling_step=snap.sampling_step,
                              sampling_steps=snap.sampling_steps,
                              queue_size=self.worker.queue_size)
        return ProgressResponse(progress=min(1.0, snap.fraction), eta_relative=snap.eta_relative,
                                state=state, current_task=snap.job or None,
                                current_image=None if skip_current_image else snap.current_image)

    async def interrupt(self) -> dict:
        """Stop the running request at its next step; it returns the images so far."""
        self.worker.interrupt()
        return {}

    async def samplers(self) -> list[dict]:
        """The samplers, by A1111 name, with sdlab's name as alias."""
        from sdlab.samplers import SAMPLERS
        return [{"name": s.a1111_name, "aliases": [s.name], "options": dict(s.options)}
                for s in SAMPLERS.values()]

    def sd_models(self) -> list[dict]:
        """The models this server can switch to (sha256 computed on first call)."""
        return [_model_item(self.worker.registry.hashed(e)) for e in self.worker.registry.entries()]

    async def embeddings(self) -> dict:
        """Textual-inversion embeddings loaded with `sdlab serve --embedding` (A1111's fields)."""
        pipe = self.worker.pipeline
        loaded = getattr(getattr(pipe, "personalization", None), "embeddings", {})
        return {"loaded": {token: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                   "shape": dim, "vectors": vectors}
                           for token, (vectors, dim) in loaded.items()},
                "skipped": {}}

    async def scripts(self) -> dict:
        """No A1111 scripts; here so clients that probe for extensions get an answer."""
        return {"txt2img": [], "img2img": []}

    async def png_info(self, req: PNGInfoRequest) -> dict:
        """The generation parameters written into a PNG (A1111 infotext)."""
        if not req.image.strip():
            return {"info": "", "items": {}, "parameters": {}}
        image = await run_in_threadpool(decode_image, req.image, ("image",),
                                        self.limits.max_init_pixels, False)
        return png_info(image)

    def get_options(self) -> dict:
        """Settings: the current checkpoint (A1111 names) and the model's defaults."""
        entry = self.worker.registry.hashed(self.worker.registry.find(self.worker.checkpoint))
        d = self.worker.pipeline.components.defaults
        from sdlab.samplers import resolve
        return {"sd_model_checkpoint": entry.title, "sd_checkpoint_hash": entry.sha256,
                "samples_format": "png",
                "sdlab_model_defaults": {"steps": d.steps, "cfg_scale": d.guidance_scale,
                                         "sampler_name": resolve(d.sampler).a1111_name,
                                         "width": d.width, "height": d.height}}

    async def set_options(self, options: dict[str, Any] = Body(
            ..., examples=[{"sd_model_checkpoint": "shapes"}])) -> None:
        """Switch the checkpoint: {"sd_model_checkpoint": name or title}. Other keys are ignored."""
        name = options.get("sd_model_checkpoint")
        if name is None:
            return None
        try:
            entry = self.worker.registry.find(str(name))
        except InputError as e:
            raise field_error("sd_model_checkpoint", str(e), name) from None
        await self._await(Job(lambda pipe, control: None, label="load model", model=entry.name,
                              keep_model=True))
        return None


# --- tasks (run on the worker thread) ---------------------------------------------------------

def _run_txt2img(req: Txt2ImgRequest, sampler: str | None, pipe, control: Control):
    return pipe.generate(req.prompt, req.negative_prompt, steps=req.steps,
                         guidance_scale=req.cfg_scale, sampler=sampler, seed=req.seed,
                         num_images=req.num_images, batch_size=req.batch_size, width=req.width,
                         height=req.height, on_progress=control.on_progress,
                         should_stop=control.should_stop)


def _run_img2img(req: Img2ImgRequest, sampler: str | None, inits: list[Image.Image], pipe,
                 control: Control):
    s = pipe.settings(req.steps, req.cfg_scale, sampler, req.width, req.height)
    inits = [resize_init(im, s.width, s.height, req.resize_mode) for im in inits]
    return pipe.img2img(inits, req.prompt, req.negative_prompt, strength=req.denoising_strength,
                        steps=s.steps, guidance_scale=s.guidance_scale, sampler=s.sampler,
                        seed=req.seed, num_images=req.num_images, batch_size=req.batch_size,
                        width=s.width, height=s.height, on_progress=control.on_progress,
                        should_stop=control.should_stop)


def resize_init(image: Image.Image, width: int, height: int, mode: int) -> Image.Image:
    """A1111 resize modes: 0 stretch to size, 1 scale and crop (the pipeline's own way),
    2 scale to fit and fill the rest with the stretched image."""
    if mode == 1 or image.size == (width, height):
        return image
    stretched = image.resize((width, height), Image.LANCZOS)
    if mode == 0:
        return stretched
    scale = min(width / image.width, height / image.height)
    fitted = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                          Image.LANCZOS)
    stretched.paste(fitted, ((width - fitted.width) // 2, (height - fitted.height) // 2))
    return stretched


# --- responses --------------------------------------------------------------------------------

def image_response(req: GenerationRequest, results: list) -> dict:
    """A1111's shape: base64 PNGs, the request echoed, and info as a JSON string."""
    images = [png_base64(r.image, r.params.infotext()) for r in results] if req.send_images else []
    parameters = req.model_dump()
    if isinstance(req, Img2ImgRequest) and not req.include_init_images:
        parameters["init_images"] = None
    return {"images": images, "parameters": parameters, "info": json.dumps(info(req, results))}


def info(req: GenerationRequest, results: list) -> dict:
    from sdlab.samplers import resolve
    params = [r.params for r in results]
    first = params[0] if params else None
    return {
        "prompt": first.prompt if first else req.prompt,
        "all_prompts": [p.prompt for p in params],
        "negative_prompt": first.negative_prompt if first else req.negative_prompt,
        "all_negative_prompts": [p.negative_prompt for p in params],
        "seed": first.seed if first else req.seed,
        "all_seeds": [p.seed for p in params],
        "subseed": -1, "all_subseeds": [-1] * len(params), "subseed_strength": 0,
        "width": first.width if first else req.width,
        "height": first.height if first else req.height,
        "sampler_name": resolve(first.sampler).a1111_name if first else req.sampler_name,
        "cfg_scale": first.guidance_scale if first else req.cfg_scale,
        "steps": first.steps if first else req.steps,
        "batch_size": req.batch_size,
        "restore_faces": False,
        "sd_model_name": first.model if first else None,
        "denoising_strength": first.denoising_strength if first else None,
        "extra_generation_params": dict(first.extras) if first else {},
        "index_of_first_image": 0,
        "infotexts": [p.infotext() for p in params],
        "styles": req.styles,
        "clip_skip": 1,
        "version": f"sdlab {sdlab.__version__}",
        "interrupted": any(r.interrupted for r in results),
        "nsfw": [r.nsfw for r in results],
    }


def png_info(image: Image.Image) -> dict:
    from sdlab.images import parse_infotext
    text = image.info.get("parameters") or ""
    items = {k: v for k, v in image.info.items()
             if k != "parameters" and isinstance(k, str) and isinstance(v, (str, int, float))}
    parameters: dict[str, Any] = parse_infotext(text) if text.strip() else {}
    if "x" in parameters.get("Size", ""):
        parameters["Size-1"], parameters["Size-2"] = parameters["Size"].split("x", 1)
    return {"info": text, "items": items, "parameters": parameters}


def _model_item(entry) -> dict:
    return {"title": entry.title, "model_name": entry.name, "hash": entry.short_hash,
            "sha256": entry.sha256, "filename": str(entry.path or entry.spec), "config": None}


def decode_image(text: str, loc: tuple, max_pixels: int, rgb: bool = True) -> Image.Image:
    """A base64 image, raw or a data: URL; a 422 naming `loc` if it is not one."""
    raw = "".join(_DATA_URL.sub("", text.strip(), count=1).split())
    try:
        data = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise field_error(loc, "not valid base64") from None
    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > max_pixels:
            raise field_error(loc, f"image of {image.width}x{image.height} pixels is over the "
                                   f"limit of {max_pixels}")
        image.load()
        return image.convert("RGB") if rgb else image
    except RequestValidationError:
        raise
    except Exception as e:  # PIL raises many kinds for broken data
        raise field_error(loc, f"not a readable image ({type(e).__name__})") from None


# --- errors -----------------------------------------------------------------------------------

def field_error(loc: str | tuple, msg: str, value: Any = None) -> RequestValidationError:
    """A 422 in FastAPI's own format, for checks pydantic cannot make (limits, models)."""
    loc = (loc,) if isinstance(loc, str) else tuple(loc)
    return RequestValidationError([{"type": "value_error", "loc": ("body", *loc), "msg": msg,
                                    "input": value}])


def _one_line(errors: list[dict]) -> str:
    parts = []
    for e in errors:
        loc = [str(x) for x in e.get("loc", ()) if x not in ("body", "query")]
        where = "request body" if e.get("type") == "json_invalid" else ".".join(loc) or "request"
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return "; ".join(parts)


def _short(value: Any) -> Any:
    """Long inputs (base64 images) are not echoed back in errors."""
    return value[:80] + "..." if isinstance(value, str) and len(value) > 100 else value


def _add_error_handlers(app: FastAPI) -> None:
    async def validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{**e, "input": _short(e.get("input"))} for e in exc.errors()]
        for e in errors:
            e.pop("url", None)
            if "ctx" in e:
                e["ctx"] = {k: str(v) for k, v in e["ctx"].items()}
        return JSONResponse({"error": "ValidationError", "message": _one_line(errors),
                             "detail": jsonable_encoder(errors)}, status_code=422)

    async def value_error(request: Request, exc: ValueError) -> JSONResponse:
        """sdlab's errors, and ValueErrors, which libraries raise for values they cannot use
        (diffusers: more steps than the schedule has)."""
        return JSONResponse({"error": type(exc).__name__, "message": str(exc),
                             "detail": str(exc)}, status_code=422)

    async def busy(request: Request, exc: QueueFull) -> JSONResponse:
        return JSONResponse({"error": "Busy", "message": f"server busy: {exc}",
                             "detail": str(exc)}, status_code=503)

    async def failure(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed: %s", request.url.path)
        return JSONResponse({"error": type(exc).__name__, "message": f"generation failed: {exc}",
                             "detail": str(exc)}, status_code=500)

    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(ValueError, value_error)  # SdlabError is one
    app.add_exception_handler(QueueFull, busy)
    app.add_exception_handler(Exception, failure)


# --- security ---------------------------------------------------------------------------------

def _is_public(path: str) -> bool:
    return path == "/" or path.startswith("/static/")


class BearerAuth:
    """Every path but the page itself needs `Authorization: Bearer KEY` (or HTTP Basic with
    KEY as the password, which A1111 clients such as webuiapi can send)."""

    def __init__(self, app, key: str):
        self.app = app
        self.key = key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or _is_public(scope["path"]) or self._authorized(scope):
            return await self.app(scope, receive, send)
        response = JSONResponse({"error": "Unauthorized", "detail": "Not authenticated",
                                 "message": "this server needs an API key: "
                                            "send 'Authorization: Bearer KEY'"},
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)

    def _authorized(self, scope) -> bool:
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, value = header.partition(b" ")
        if scheme.lower() == b"bearer":
            return secrets.compare_digest(value.strip(), self.key)
        if scheme.lower() == b"basic":
            try:
                password = base64.b64decode(value.strip(), validate=True).partition(b":")[2]
            except (binascii.Error, ValueError):
                return False
            return secrets.compare_digest(password, self.key)
        return False


class TrustedHosts:
    """Refuse requests whose Host header is not one of ours: a web page on another site that
    rebinds its DNS name to 127.0.0.1 would otherwise reach a loopback server."""

    def __init__(self, app, hosts: tuple[str, ...]):
        self.app = app
        self.hosts = {h.lower() for h in hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or self._host(scope) in self.hosts:
            return await self.app(scope, receive, send)
        response = JSONResponse({"error": "BadHost", "detail": "Invalid host header",
                                 "message": "this server only answers to " + ", ".join(self.hosts)},
                                status_code=400)
        await response(scope, receive, send)

    @staticmethod
    def _host(scope) -> str:
        host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1").lower()
        if host.startswith("["):
            return host[: host.find("]") + 1]
        return host.split(":")[0]
