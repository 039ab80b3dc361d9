"""`sdlab train ...`: the training recipes as commands."""
from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    train = sub.add_parser("train", help="train models (base, textual-inversion, dreambooth)")
    recipes = train.add_subparsers(dest="recipe", required=True, metavar="RECIPE")

    base = recipes.add_parser("base", help="train the embedded Shapes model from nothing")
    base.add_argument("--config", default=None, help="JSON config (see configs/shapes16.json)")
    base.add_argument("--out", default=None, help="run folder (overrides the config's out_dir)")
    base.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    base.add_argument("--stages", nargs="+", default=None,
                      choices=["data", "vae", "latents", "decoder", "unet", "export"])
    base.set_defaults(func=cmd_train_base)

    for register in _personalisation_registrars():
        register(recipes)


def _personalisation_registrars():
    try:
        from sdlab.train.personal_cli import register_all
    except ModuleNotFoundError as e:
        if e.name != "sdlab.train.personal_cli":
            raise
        return []
    return [register_all]


def cmd_train_base(args: argparse.Namespace) -> int:
    from sdlab.train.base import BaseConfig, train_base
    cfg = BaseConfig.from_file(args.config, out_dir=args.out,
                               stages=tuple(args.stages) if args.stages else None)
    model = train_base(cfg, resume=args.resume)
    print(f"model folder: {model}")
    return 0
