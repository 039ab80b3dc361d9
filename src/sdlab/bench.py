"""`sdlab bench`: sdlab's loop against diffusers' StableDiffusionPipeline on the same weights,
sampler, steps and seeds, timed in one run. Machines are noisy, so runs alternate between the two
engines and medians (and their ratio) are reported."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch


@dataclass
class BenchResult:
    images: int
    steps: int
    sampler: str
    sdlab_s: float
    diffusers_s: float
    extra: dict

    @property
    def ratio(self) -> float:
        return self.sdlab_s / self.diffusers_s


def diffusers_pipeline(pipe, sampler: str):
    """A StableDiffusionPipeline sharing the sdlab pipeline's modules (same weights, no copy)."""
    from diffusers import StableDiffusionPipeline

    from sdlab.samplers import make_scheduler
    c = pipe.components
    sd = StableDiffusionPipeline(vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer,
                                 unet=c.unet, scheduler=make_scheduler(sampler, c.scheduler_config),
                                 safety_checker=None, feature_extractor=None,
                                 requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    return sd


def _timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench(pipe, *, images: int = 8, steps: int | None = None, sampler: str | None = None,
          repeats: int = 5, prompt: str = "a red circle in the top left on a blue background",
          compare_steps: int | None = None) -> BenchResult:
    s = pipe.settings(steps=steps, sampler=sampler)
    sd = diffusers_pipeline(pipe, s.sampler)
    seeds = list(range(images))

    def run_sdlab(n_steps: int = s.steps):
        pipe.generate(prompt, seed=0, num_images=images, steps=n_steps, sampler=s.sampler,
                      guidance_scale=s.guidance_scale, width=s.width, height=s.height)

    def run_diffusers():
        from sdlab.samplers import make_scheduler
        sd.scheduler = make_scheduler(s.sampler, pipe.components.scheduler_config)
        with torch.inference_mode():
            sd(prompt, num_inference_steps=s.steps, guidance_scale=s.guidance_scale,
               num_images_per_prompt=images, width=s.width, height=s.height,
               generator=[torch.Generator("cpu").manual_seed(x) for x in seeds])

    run_sdlab()  # warm-up: allocator, kernels, lazy imports
    run_diffusers()
    ours, theirs, other = [], [], []
    for _ in range(repeats):
        ours.append(_timed(run_sdlab))
        theirs.append(_timed(run_diffusers))
        if compare_steps:
            other.append(_timed(lambda: run_sdlab(compare_steps)))
    extra = {}
    if compare_steps:
        extra = {"compare_steps": compare_steps, "compare_s": statistics.median(other)}
    return BenchResult(images, s.steps, s.sampler, statistics.median(ours),
                       statistics.median(theirs), extra)


def run_bench(args) -> BenchResult:
    import sdlab
    from sdlab.components import quiet_library_logs
    quiet_library_logs()
    pipe = sdlab.load(args.model, device=args.device, dtype=args.dtype, safety_checker=False)
    r = bench(pipe, images=args.images, steps=args.steps, sampler=args.sampler,
              repeats=args.repeats, compare_steps=args.compare_steps)
    c = pipe.components
    print(f"model {c.name} on {c.device} ({str(c.dtype).replace('torch.', '')}), {r.images} images, "
          f"{r.steps} steps, {r.sampler}, median of {args.repeats} runs")
    print(f"sdlab      {r.sdlab_s:8.3f} s  ({r.sdlab_s / r.images * 1000:.1f} ms/image)")
    print(f"diffusers  {r.diffusers_s:8.3f} s  ({r.diffusers_s / r.images * 1000:.1f} ms/image)")
    print(f"ratio sdlab/diffusers: {r.ratio:.3f} ({'faster' if r.ratio < 1 else 'slower'})")
    if r.extra:
        print(f"at {r.extra['compare_steps']} steps: {r.extra['compare_s']:.3f} s; "
              f"{r.steps}-step run is {r.extra['compare_s'] / r.sdlab_s:.1f}x cheaper")
    return r
