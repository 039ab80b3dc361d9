"""The training loop every recipe shares: accelerate, a progress bar with ETA, loss logging,
time-based checkpoints and --resume.

A recipe supplies the models and optimiser, an endless iterator of batches and a loss function;
the loop owns everything else, so multi-process training, checkpoints and logs behave the same in
the base recipe, personalisation and distillation.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "loop_state.json"


@dataclass
class LoopConfig:
    steps: int
    out_dir: Path
    lr: float = 1e-4
    warmup_steps: int = 0
    cosine_decay: bool = False
    checkpoint_minutes: float = 5.0
    log_every: int = 10
    max_grad_norm: float = 1.0
    desc: str = "train"
    resume: bool = False


@dataclass
class Hooks:
    """Optional callbacks: after each optimiser step, at each checkpoint and every N steps."""

    after_step: Callable[[int], None] | None = None
    every_n: int = 0
    every_n_fn: Callable[[int], None] | None = None
    on_checkpoint: Callable[[int], None] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def lr_lambda(config: LoopConfig) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if config.warmup_steps and step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if config.cosine_decay:
            progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0
    return factor


def run(config: LoopConfig, accelerator, params: list[torch.nn.Parameter], batches: Iterator,
        loss_fn: Callable[[Any, int], torch.Tensor], hooks: Hooks | None = None,
        optimizer: torch.optim.Optimizer | None = None) -> int:
    """Train until config.steps optimiser steps are done; returns the final step.

    `loss_fn(batch, step)` returns a scalar loss; models it uses must already have gone through
    accelerator.prepare. State registered with accelerator.register_for_checkpointing (EMA, ...)
    is saved and restored with the rest.
    """
    hooks = hooks or Hooks()
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    optimizer = optimizer or torch.optim.AdamW(params, lr=config.lr, weight_decay=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    optimizer, scheduler = accelerator.prepare(optimizer, scheduler)

    step = 0
    ckpt = out / CHECKPOINT_DIR
    if config.resume and (ckpt / STATE_FILE).exists():
        accelerator.load_state(str(ckpt))
        step = json.loads((ckpt / STATE_FILE).read_text())["step"]
        accelerator.print(f"resumed from {ckpt} at step {step}")

    def save_checkpoint() -> None:
        accelerator.wait_for_everyone()
        accelerator.save_state(str(ckpt))
        if accelerator.is_main_process:
            (ckpt / STATE_FILE).write_text(json.dumps({"step": step}))
        if hooks.on_checkpoint:
            hooks.on_checkpoint(step)

    log_path = out / "loss.jsonl"
    bar = tqdm(total=config.steps, initial=step, desc=config.desc, dynamic_ncols=True,
               disable=not accelerator.is_local_main_process)
    last_ckpt, running = time.monotonic(), []
    while step < config.steps:
        batch = next(batches)
        loss = loss_fn(batch, step)
        accelerator.backward(loss)
        if config.max_grad_norm and accelerator.sync_gradients:
            accelerator.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        running.append(loss.detach().float().item())
        if hooks.after_step:
            hooks.after_step(step)
        if step % config.log_every == 0 or step == config.steps:
            mean = sum(running) / len(running)
            running.clear()
            bar.set_postfix(loss=f"{mean:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if accelerator.is_main_process:
                with log_path.open("a") as f:
                    f.write(json.dumps({"step": step, "loss": mean, "time": time.time()}) + "\n")
        if hooks.every_n and hooks.every_n_fn and step % hooks.every_n == 0:
            hooks.every_n_fn(step)
        if time.monotonic() - last_ckpt > config.checkpoint_minutes * 60 and step < config.steps:
            save_checkpoint()
            last_ckpt = time.monotonic()
        bar.update(1)
    bar.close()
    save_checkpoint()
    return step


class EMA:
    """Exponential moving average of parameters, checkpointable through accelerate."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float = 0.999):
        self.decay = decay
        self.shadow = [p.detach().clone().float() for p in params]
        self.num_updates = 0

    @torch.no_grad()
    def update(self, params: list[torch.nn.Parameter]) -> None:
        self.num_updates += 1
        # warm-up: average over what has been seen so far until the horizon is reached
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for s, p in zip(self.shadow, params):
            s.lerp_(p.detach().float(), 1 - decay)

    @torch.no_grad()
    def copy_to(self, params: list[torch.nn.Parameter]) -> None:
        for s, p in zip(self.shadow, params):
            p.copy_(s.to(p.dtype))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.num_updates = state["decay"], state["num_updates"]
        for s, t in zip(self.shadow, state["shadow"]):
            s.copy_(t)
