"""Sampler names -> fresh diffusers schedulers.

A scheduler holds state (its step index, a multistep solver's history), so sdlab builds a new one
for every image of every generation, from the model's own scheduler config (its betas and
prediction type) plus the sampler's settings. Names follow sdlab's short form (`dpm++_2m_karras`)
and AUTOMATIC1111's (`DPM++ 2M Karras`), case and spacing ignored.
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from sdlab.errors import InputError


@dataclass(frozen=True)
class Sampler:
    name: str
    a1111_name: str
    scheduler_class: str
    options: dict[str, Any] = field(default_factory=dict)
    stochastic: bool = False  # draws fresh noise at each step (needs one scheduler per image)


SAMPLERS: dict[str, Sampler] = {s.name: s for s in [
    Sampler("ddim", "DDIM", "DDIMScheduler"),
    Sampler("ddpm", "DDPM", "DDPMScheduler", stochastic=True),
    Sampler("pndm", "PLMS", "PNDMScheduler", {"skip_prk_steps": True}),
    Sampler("lms", "LMS", "LMSDiscreteScheduler"),
    Sampler("lms_karras", "LMS Karras", "LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    Sampler("heun", "Heun", "HeunDiscreteScheduler"),
    Sampler("euler", "Euler", "EulerDiscreteScheduler"),
    Sampler("euler_a", "Euler a", "EulerAncestralDiscreteScheduler", stochastic=True),
    Sampler("dpm2", "DPM2", "KDPM2DiscreteScheduler"),
    Sampler("dpm++_2m", "DPM++ 2M", "DPMSolverMultistepScheduler",
            {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    Sampler("dpm++_2m_karras", "DPM++ 2M Karras", "DPMSolverMultistepScheduler",
            {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    Sampler("dpm++_2m_sde_karras", "DPM++ 2M SDE Karras", "DPMSolverMultistepScheduler",
            {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
            stochastic=True),
    Sampler("dpm++_sde_karras", "DPM++ SDE Karras", "DPMSolverSDEScheduler",
            {"use_karras_sigmas": True}, stochastic=True),
    Sampler("unipc", "UniPC", "UniPCMultistepScheduler"),
    Sampler("lcm", "LCM", "LCMScheduler", stochastic=True),
]}


def _normalise(name: str) -> str:
    return name.strip().lower().replace(" ", "_").replace("-", "_").replace("++_", "++_")


_ALIASES = {_normalise(s.a1111_name): s.name for s in SAMPLERS.values()}
_ALIASES.update({"dpm++2m": "dpm++_2m", "dpmpp_2m": "dpm++_2m", "dpmpp_2m_karras": "dpm++_2m_karras",
                 "dpmpp_sde_karras": "dpm++_sde_karras", "euler_ancestral": "euler_a", "plms": "pndm"})


def resolve(name: str) -> Sampler:
    """The sampler for a name in either spelling; InputError listing the valid names otherwise."""
    key = _normalise(name)
    key = key if key in SAMPLERS else _ALIASES.get(key, key)
    if key not in SAMPLERS:
        raise InputError(f"unknown sampler {name!r}; valid: {', '.join(SAMPLERS)}")
    return SAMPLERS[key]


# Options a model's scheduler config carries that belong to one scheduler family only.
_FOREIGN_KEYS = {"skip_prk_steps", "use_karras_sigmas", "algorithm_type", "solver_order",
                 "noise_sampler_seed"}


def make_scheduler(name: str, model_config: dict, **extra: Any):
    """A fresh scheduler for sampler `name`, configured with the model's schedule."""
    import diffusers
    sampler = resolve(name)
    cls = getattr(diffusers, sampler.scheduler_class)
    accepted = _init_params(cls)
    config = {k: v for k, v in model_config.items()
              if not k.startswith("_") and k not in _FOREIGN_KEYS and k in accepted}
    config.update({k: v for k, v in {**sampler.options, **extra}.items() if k in accepted})
    diffusers_logger = logging.getLogger("diffusers")
    level = diffusers_logger.level
    diffusers_logger.setLevel(logging.ERROR)  # from_config warns about every unused key
    try:
        return cls.from_config(config)
    finally:
        diffusers_logger.setLevel(level)


@cache
def _init_params(cls) -> frozenset[str]:
    return frozenset(inspect.signature(cls.__init__).parameters)


@cache
def step_params(cls) -> frozenset[str]:
    """Keyword arguments that cls.step accepts (generator, eta, ...)."""
    return frozenset(inspect.signature(cls.step).parameters)


def describe() -> list[tuple[str, str, str]]:
    """(sdlab name, A1111 name, diffusers class) for `sdlab samplers`."""
    return [(s.name, s.a1111_name, s.scheduler_class) for s in SAMPLERS.values()]
