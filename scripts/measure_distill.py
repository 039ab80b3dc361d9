#!/usr/bin/env python
"""Few-step students against their teacher on the Shapes world.

Prompt accuracy (the geometric judge) and Frechet distance of judge features to real renders, on
the same prompts and seeds for every row:
  - teacher, DDIM at 1, 2, 4, 8 and 50 steps, and DPM++ 2M at 4, 8 and 20 steps (its default
    guidance, CFG: two UNet evaluations per step);
  - guided distillation: the stage-1 model (one pass, w as input) at its DDIM step count and at
    4 steps, every progressive round at its own step count, the final student also at w = 1;
  - LCM student at 1, 2 and 4 steps, and at w = 1.
Writes report.md (a table), report.json and report.png (accuracy and FD against UNet evaluations
per image) under --out, plus each sweep's own files from sdlab.eval.sweep.

    python scripts/measure_distill.py --teacher shapes --guided runs/distill/guided \
        --lcm runs/distill/lcm/model --out runs/distill/report
"""
from __future__ import annotations

import argparse
import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class Row:
    method: str
    model: str
    sampler: str
    steps: int
    guidance: float
    unet_evals: int  # UNet evaluations per image (a CFG step is two)
    accuracy: float
    frechet: float
    seconds_per_image: float  # generation and judging


def unet_evals(pipe, steps: int, guidance: float) -> int:
    distilled = pipe.components.unet.config.time_cond_proj_dim is not None
    return steps * (1 if distilled or guidance == 1 else 2)


def sweep_rows(method: str, pipe, prompts, setting: str, values, out: Path, seed: int,
               **fixed) -> list[Row]:
    """sdlab.eval.sweep over one setting, with the model's defaults for the rest."""
    from sdlab.eval import sweep
    d = pipe.components.defaults
    rows = []
    for r in sweep(pipe, prompts, setting, values, out, seed=seed, **fixed):
        s = {"sampler": d.sampler, "steps": d.steps, "guidance_scale": d.guidance_scale,
             **fixed, r.setting: r.value}
        rows.append(Row(method, pipe.components.name, s["sampler"], int(s["steps"]),
                        float(s["guidance_scale"]),
                        unet_evals(pipe, int(s["steps"]), float(s["guidance_scale"])),
                        r.accuracy, r.frechet, r.seconds / r.n))
    return rows


def measure(args) -> list[Row]:
    import sdlab
    from sdlab.eval import draw_prompts
    out = Path(args.out)
    prompts = draw_prompts(random.Random(args.seed), args.n, args.kind)
    common = {"batch_size": args.batch_size}
    # the teacher at the guidance the students learned (None: the teacher's own default)
    teacher_settings = dict(common)
    if args.teacher_guidance is not None:
        teacher_settings["guidance_scale"] = args.teacher_guidance
    rows: list[Row] = []

    teacher = sdlab.load(args.teacher, device=args.device)
    rows += sweep_rows("teacher DDIM", teacher, prompts, "steps", [1, 2, 4, 8, 50],
                       out / "teacher_ddim", args.seed, sampler="ddim", **teacher_settings)
    rows += sweep_rows("teacher DPM++ 2M", teacher, prompts, "steps", [2, 4, 8, 20],
                       out / "teacher_dpmpp", args.seed, sampler="dpm++_2m", **teacher_settings)
    del teacher

    if args.guided:
        run = Path(args.guided)
        stage1 = sdlab.load(str(run / "stage1"), device=args.device)
        start = stage1.components.defaults.steps
        rows += sweep_rows("guided stage 1", stage1, prompts, "steps", sorted({1, 2, 4, 8, start}),
                           out / "guided_stage1", args.seed, **common)
        rounds = sorted((p for p in run.glob("round_*") if (p / "sdlab.json").exists()),
                        key=lambda p: -int(p.name.split("_")[1]))
        for i, folder in enumerate(rounds):
            pipe = sdlab.load(str(folder), device=args.device)
            w = pipe.components.defaults.guidance_scale
            values = [w, 1.0] if i == len(rounds) - 1 and w != 1.0 else [w]
            rows += sweep_rows(f"guided PD {folder.name}", pipe, prompts, "guidance_scale", values,
                               out / f"guided_{folder.name}", args.seed, **common)

    if args.lcm:
        lcm = sdlab.load(args.lcm, device=args.device)
        rows += sweep_rows("LCM", lcm, prompts, "steps", [1, 2, 4], out / "lcm_steps",
                           args.seed, **common)
        rows += sweep_rows("LCM", lcm, prompts, "guidance_scale", [1.0], out / "lcm_w1",
                           args.seed, **common)
    return rows


def markdown(rows: list[Row], n: int, seed: int, kind: str = "mixed") -> str:
    def fmt(x):
        return "n/a" if isinstance(x, float) and math.isnan(x) else (
            f"{x:.3f}" if isinstance(x, float) else str(x))
    header = ["method", "model", "sampler", "steps", "w", "UNet evals", "accuracy", "FD",
              "s/image"]
    lines = ["# Few-step generation on Shapes: teacher vs distilled students", "",
             f"{n} prompts ({kind} clauses), seed {seed}; the same prompts and seeds in every row. "
             "Accuracy: every stated attribute seen by the judge. FD: Frechet distance of judge "
             "features to real renders (lower is better). UNet evals per image: a CFG step costs "
             "two, a distilled student's one. s/image includes judging.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r.method, r.model, r.sampler, r.steps, r.guidance, r.unet_evals, r.accuracy,
                 r.frechet, r.seconds_per_image]
        lines.append("| " + " | ".join(fmt(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    series: dict[str, list[Row]] = {}
    for r in rows:  # one line per method family, at its default guidance (w = 1 rows as points)
        key = r.method.split(" round_")[0] if r.method.startswith("guided PD") else r.method
        if r.guidance == 1.0 and not r.method.startswith("teacher"):
            key += " (w=1)"
        series.setdefault(key, []).append(r)
    fig, (acc_ax, fd_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, rs in series.items():
        rs = sorted(rs, key=lambda r: r.unet_evals)
        x = [r.unet_evals for r in rs]
        style = "o--" if "(w=1)" in key else "o-"
        acc_ax.plot(x, [r.accuracy for r in rs], style, label=key)
        fd_ax.plot(x, [r.frechet for r in rs], style, label=key)
    for ax, name in ((acc_ax, "prompt accuracy"), (fd_ax, "FD (judge features, lower is better)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("UNet evaluations per image")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    acc_ax.set_ylim(0, 1.02)
    acc_ax.legend(fontsize=7)
    fig.suptitle("Shapes: teacher samplers vs guided-distilled and LCM students")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="shapes")
    p.add_argument("--guided", default=None, help="run folder of `sdlab distill guided`")
    p.add_argument("--lcm", default=None, help="model folder of `sdlab distill lcm`")
    p.add_argument("--n", type=int, default=200, help="prompts (one image each) per row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kind", choices=["full", "color_shape", "mixed"], default="mixed",
                   help="prompt form (the issue's bar is on full prompts)")
    p.add_argument("--teacher-guidance", type=float, default=None,
                   help="the teacher's guidance scale (default: its own, with its cap)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/distill/report")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = measure(args)
    (out / "report.json").write_text(json.dumps([asdict(r) for r in rows], indent=2))
    (out / "report.md").write_text(markdown(rows, args.n, args.seed, args.kind))
    plot(rows, out / "report.png")
    print((out / "report.md").read_text())


if __name__ == "__main__":
    main()
