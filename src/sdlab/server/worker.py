"""The job queue: one worker thread owns the Pipeline and runs requests first-in first-out.

A Pipeline runs one call at a time, so every generation (and every model switch) is a Job on a
queue.Queue read by a single thread. Requests wait on their job's Future without blocking the
event loop, which stays free to answer /progress and /interrupt. A model switch is a job too,
so requests queued before it still run on the model they were sent to.
"""
from __future__ import annotations

import base64
import hashlib
import io
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdlab.errors import InputError

if TYPE_CHECKING:
    from sdlab.generate import Pipeline, Progress

log = logging.getLogger("sdlab.server")

PipelineFactory = Callable[[str], "Pipeline"]


# --- models ---------------------------------------------------------------------------------

@dataclass
class ModelEntry:
    """A model the server may load; `spec` is what sdlab.load() takes."""

    name: str
    spec: str
    path: Path | None
    sha256: str | None = None

    @property
    def short_hash(self) -> str | None:
        return self.sha256[:10] if self.sha256 else None

    @property
    def title(self) -> str:
        return f"{self.name} [{self.short_hash}]" if self.short_hash else self.name


class ModelRegistry:
    """The models this server offers: the embedded ones and the one it was started with.

    Only these can be selected through the API, so a request can never make the server open an
    arbitrary path (single-file checkpoints may hold pickles)."""

    def __init__(self, initial: ModelEntry, others: list[ModelEntry]):
        self.initial = initial
        self._entries = [initial] + [e for e in others if e.path != initial.path or e.path is None]
        self._lock = threading.Lock()

    @classmethod
    def discover(cls, spec: str, loaded_name: str) -> "ModelRegistry":
        from sdlab.components import EMBEDDED_MODELS, resolve_model_path
        from sdlab.errors import ModelLoadError

        def entry(name: str, model: str) -> ModelEntry | None:
            try:
                return ModelEntry(name, model, resolve_model_path(model).resolve())
            except ModelLoadError:
                return None
        initial = entry(loaded_name, spec) or ModelEntry(loaded_name, spec, None)
        embedded = [e for m in EMBEDDED_MODELS if m != spec and (e := entry(m, m))]
        return cls(initial, embedded)

    def entries(self) -> list[ModelEntry]:
        return list(self._entries)

    def find(self, name: str) -> ModelEntry:
        """By name, title, "name [hash]" or the spec it was started with; InputError otherwise."""
        wanted = name.strip()
        for e in self._entries:
            if wanted in (e.name, e.spec, e.title) or wanted.split(" [")[0] == e.name:
                return e
        raise InputError(f"unknown model {name!r}; available: "
                         f"{', '.join(e.name for e in self._entries)}")

    def hashed(self, entry: ModelEntry) -> ModelEntry:
        """The entry with its sha256 filled in (computed once; reads the weights)."""
        with self._lock:
            if entry.sha256 is None and entry.path is not None:
                entry.sha256 = sha256_of(entry.path)
            return replace(entry)


def sha256_of(path: Path) -> str:
    """sha256 of a checkpoint file (as A1111 computes it), or of a model folder's files in
    sorted order, each preceded by its relative path."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if f != path:
            digest.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


# --- jobs -----------------------------------------------------------------------------------

class QueueFull(Exception):
    pass


@dataclass
class Control:
    """Handed to a running task: its progress callback and stop check."""

    on_progress: Callable[["Progress"], None]
    should_stop: Callable[[], bool]


Task = Callable[["Pipeline", Control], Any]


@dataclass
class Job:
    task: Task
    label: str = "txt2img"
    model: str | None = None  # a registry name; None runs on the current checkpoint
    keep_model: bool = False  # make `model` the current checkpoint (POST /options)
    batches: int = 1
    future: Future = field(default_factory=Future)
    stop: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class Snapshot:
    """What /progress reports; replaced whole, so readers on other threads see one state."""

    job: str = ""
    job_count: int = 0
    job_no: int = 0
    job_timestamp: str = "0"
    sampling_step: int = 0
    sampling_steps: int = 0
    fraction: float = 0.0
    started: float = 0.0
    interrupted: bool = False
    current_image: str | None = None

    @property
    def eta_relative(self) -> float:
        if self.fraction <= 0:
            return 0.0
        elapsed = time.time() - self.started
        return max(0.0, elapsed / self.fraction - elapsed)


class Worker:
    """One thread, one Pipeline at a time, jobs in arrival order."""

    def __init__(self, factory: PipelineFactory, registry: ModelRegistry, initial: "Pipeline",
                 max_queue: int = 256):
        self._factory = factory
        self.registry = registry
        self.checkpoint = registry.initial.name
        self.pipeline = initial
        self._loaded = registry.initial.name
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._max_queue = max_queue
        self._current: Job | None = None
        self._snapshot = Snapshot()
        self._preview_wanted = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sdlab-worker", daemon=True)
        self._thread.start()

    # --- called from request handlers (any thread) --------------------------------------

    def submit(self, job: Job) -> Future:
        if self._queue.qsize() >= self._max_queue:
            raise QueueFull(f"{self._max_queue} requests are already waiting")
        self._queue.put(job)
        return job.future

    def interrupt(self) -> bool:
        """Stop the running job at its next step; it returns what it has."""
        job = self._current
        if job is None:
            return False
        job.stop.set()
        self._snapshot = replace(self._snapshot, interrupted=True)
        return True

    def snapshot(self, want_image: bool = False) -> Snapshot:
        if want_image and self._current is not None:
            self._preview_wanted.set()  # decoded by the worker at its next step
        return self._snapshot

    @property
    def queue_size(self) -> int:
        return self._queue.qsize()

    def close(self, timeout: float = 10.0) -> None:
        while True:  # drop waiting jobs, stop the running one, end the thread
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.future.cancel()
        self.interrupt()
        self._queue.put(None)
        self._thread.join(timeout)

    # --- the worker thread ----------------------------------------------------------------

    def _loop(self) -> None:
        while (job := self._queue.get()) is not None:
            if not job.future.set_running_or_notify_cancel():
                continue  # its client went away while it waited
            self._current = job
            self._snapshot = Snapshot(job=job.label, job_count=job.batches, started=time.time(),
                                      job_timestamp=time.strftime("%Y%m%d%H%M%S"))
            try:
                result = self._run(job)
            except Exception as e:  # the request gets the error; the server keeps serving
                job.future.set_exception(e)
            else:
                job.future.set_result(result)
            finally:
                self._current = None
                self._snapshot = Snapshot()
                self._preview_wanted.clear()

    def _run(self, job: Job) -> Any:
        name = job.model or self.checkpoint
        pipe = self._pipeline_for(name)
        if job.keep_model:
            self.checkpoint = name
        control = Control(on_progress=lambda p: self._on_progress(job, pipe, p),
                          should_stop=job.stop.is_set)
        return job.task(pipe, control)

    def _pipeline_for(self, name: str) -> "Pipeline":
        if name != self._loaded:
            entry = self.registry.find(name)
            log.info("loading model %s", entry.spec)
            self.pipeline = self._factory(entry.spec)  # the old one is dropped only on success
            self._loaded = entry.name
            _free_memory()
        return self.pipeline

    def _on_progress(self, job: Job, pipe: "Pipeline", p: "Progress") -> None:
        image = self._snapshot.current_image
        if self._preview_wanted.is_set() and p.preview_latents is not None:
            self._preview_wanted.clear()
            image = png_base64(pipe.decode_latents(p.preview_latents[:1])[0])
        self._snapshot = replace(
            self._snapshot, sampling_step=p.step, sampling_steps=p.total,
            job_no=p.images_done // max(1, p.batch_images), fraction=p.fraction,
            job=f"Batch {p.images_done // max(1, p.batch_images) + 1} out of {job.batches}",
            interrupted=job.stop.is_set(), current_image=image)


def png_base64(image, infotext: str | None = None) -> str:
    """Raw base64 of a PNG (no data: prefix, as A1111 sends), with the `parameters` chunk."""
    from PIL import PngImagePlugin
    meta = None
    if infotext is not None:
        meta = PngImagePlugin.PngInfo()
        meta.add_text("parameters", infotext)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=meta)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _free_memory() -> None:
    import gc

    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
