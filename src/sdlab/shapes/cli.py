"""`sdlab shapes render`: the Shapes world as PNGs plus a captions JSONL."""
from __future__ import annotations

import json
import random


def add_parser(sub) -> None:
    p = sub.add_parser("shapes", help="the Shapes world: render scenes with captions")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    r = actions.add_parser("render", help="render N random scenes to PNGs + captions.jsonl")
    r.add_argument("--n", type=int, default=16)
    r.add_argument("--out", required=True)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--shape", default=None, help="fix the shape (held-out ones allowed: star, ring)")
    r.add_argument("--color", default=None, help="fix the object colour")
    r.add_argument("--held-out", action="store_true",
                   help="allow the held-out combination (green triangle)")
    r.set_defaults(func=cmd_render)


def cmd_render(args) -> int:
    from PIL import Image

    from sdlab.cli import UsageError, check_output_folder
    from sdlab.shapes.world import ALL_SHAPES, BASE_SHAPES, caption, render, sample_scene
    if args.n < 1:
        raise UsageError(f"--n must be >= 1, got {args.n}")
    fixed = {k: v for k, v in {"shape": args.shape, "color": args.color}.items() if v}
    rng = random.Random(args.seed)
    shapes = ALL_SHAPES if args.shape else BASE_SHAPES
    scenes = [sample_scene(rng, shapes=shapes, allow_held_out_combination=args.held_out, **fixed)
              for _ in range(args.n)]
    out = check_output_folder(args.out)
    with open(out / "captions.jsonl", "w") as f:
        for i, scene in enumerate(scenes):
            name = f"{i:05d}.png"
            Image.fromarray(render(scene)).save(out / name)
            f.write(json.dumps({"file": name, "caption": caption(scene), "shape": scene.shape,
                                "color": scene.color, "size": scene.size,
                                "position": scene.position, "background": scene.background,
                                "side": scene.side, "center": list(scene.center)}) + "\n")
    print(f"wrote {args.n} images and captions.jsonl to {out}")
    return 0
