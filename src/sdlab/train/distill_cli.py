"""`sdlab distill guided|lcm`: few-step students of a model (see sdlab.train.distill)."""
from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    distill = sub.add_parser("distill", help="distil a model into a few-step student "
                                             "(guided progressive distillation, LCM)")
    methods = distill.add_subparsers(dest="method", required=True, metavar="METHOD")

    guided = methods.add_parser(
        "guided", help="guidance distillation + progressive distillation (Meng et al. 2022)")
    _common(guided)
    guided.add_argument("--stage1-steps", type=int, default=None,
                        help="training steps of stage 1, guidance distillation (400)")
    guided.add_argument("--start-steps", type=int, default=None,
                        help="DDIM steps of the stage-1 model, the first round's teacher (32)")
    guided.add_argument("--end-steps", type=int, default=None,
                        help="DDIM steps of the final student (4)")
    guided.add_argument("--rounds", type=int, default=None,
                        help="halvings instead of --start-steps: start = end * 2^rounds")
    guided.add_argument("--steps-per-round", type=int, default=None,
                        help="training steps of each progressive round (300)")
    guided.add_argument("--ema-decay", type=float, default=None,
                        help="export an EMA of each student (0.99; 0 turns it off)")
    guided.add_argument("--student-init", default=None,
                        help="start stage 1 from this guidance-distilled model's UNet (for example "
                             "the previous student, after the teacher was fine-tuned)")
    guided.set_defaults(func=cmd_guided)

    lcm = methods.add_parser("lcm", help="latent consistency distillation (Luo et al. 2023)")
    _common(lcm)
    lcm.add_argument("--steps", type=int, default=None, help="training steps (800)")
    lcm.add_argument("--solver-steps", type=int, default=None,
                     help="DDIM solver grid; skipping step = 1000 / this (50)")
    lcm.add_argument("--target-decay", type=float, default=None,
                     help="EMA decay of the target network (0.95)")
    lcm.add_argument("--loss", choices=["huber", "l2"], default=None)
    lcm.add_argument("--huber-c", type=float, default=None)
    lcm.add_argument("--default-steps", type=int, default=None,
                     help="sampling steps written into the student's defaults (4)")
    lcm.set_defaults(func=cmd_lcm)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="shapes", help="the teacher (name, folder, checkpoint)")
    p.add_argument("--out", required=True, help="run folder; students are written inside it")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted phase from its last checkpoint")
    p.add_argument("--w-min", type=float, default=None,
                   help="lowest guidance scale trained for (1 = no guidance; default 1)")
    p.add_argument("--w-max", type=float, default=None, help="highest guidance scale (8)")
    p.add_argument("--default-guidance", type=float, default=None,
                   help="guidance scale in the student's defaults (teacher's default)")
    p.add_argument("--batch-size", type=int, default=None, help="(32)")
    p.add_argument("--lr", type=float, default=None, help="(1e-4)")
    p.add_argument("--cond-dim", type=int, default=None,
                   help="width of the guidance embedding input (256)")
    p.add_argument("--cond-lr-scale", type=float, default=None,
                   help="learning-rate multiplier of the new guidance projection (10)")
    p.add_argument("--prompts-file", default=None,
                   help="prompts, one a line (a generic model; default: Shapes captions)")
    p.add_argument("--images", default=None,
                   help="folder of training images (captions: NAME.txt beside each, or "
                        "--prompts-file); default: rendered Shapes scenes, or with only "
                        "--prompts-file the teacher's own samples")
    p.add_argument("--pool-size", type=int, default=None,
                   help="clean latents held for noising (2048)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--checkpoint-minutes", type=float, default=None, help="(5)")
    p.add_argument("--save-dtype", choices=["fp16", "fp32"], default=None)
    p.add_argument("--name", default=None, help="the final student's model name")


_COMMON = ("w_min", "w_max", "default_guidance", "batch_size", "lr", "cond_dim", "cond_lr_scale",
           "prompts_file",
           "images", "pool_size", "seed", "checkpoint_minutes", "save_dtype", "name")


def _config_values(args: argparse.Namespace, keys: tuple[str, ...]) -> dict:
    values = {k: getattr(args, k) for k in _COMMON + keys}
    return {"model": args.model, "out_dir": args.out, **values}


def cmd_guided(args: argparse.Namespace) -> int:
    from sdlab.errors import InputError
    from sdlab.train.distill import GuidedConfig, distill_guided
    values = _config_values(args, ("stage1_steps", "start_steps", "end_steps", "steps_per_round",
                                   "ema_decay", "student_init"))
    if args.rounds is not None:
        if args.start_steps is not None:
            raise InputError("give --rounds or --start-steps, not both")
        end = args.end_steps or GuidedConfig.end_steps
        values["start_steps"] = end * 2 ** args.rounds
    cfg = _validated(GuidedConfig, values)
    final = distill_guided(cfg, resume=args.resume)
    print(f"guided student ({cfg.end_steps} DDIM steps): {final}")
    return 0


def _validated(config_cls, values: dict):
    """The config, or one InputError line (exit 2) naming what is wrong."""
    from sdlab.errors import InputError
    try:
        cfg = config_cls.from_dict(values)
        cfg.validate()
    except ValueError as e:
        raise InputError(str(e)) from e
    return cfg


def cmd_lcm(args: argparse.Namespace) -> int:
    from sdlab.train.distill import LCMConfig, distill_lcm
    values = _config_values(args, ("steps", "solver_steps", "target_decay", "loss", "huber_c",
                                   "default_steps"))
    cfg = _validated(LCMConfig, values)
    final = distill_lcm(cfg, resume=args.resume)
    print(f"LCM student ({cfg.default_steps} steps): {final}")
    return 0
