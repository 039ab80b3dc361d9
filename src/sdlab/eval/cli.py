"""`sdlab eval`: prompt accuracy of a model on the Shapes world, judged attribute by attribute."""
from __future__ import annotations

import json
import random
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="prompt accuracy, per-attribute accuracy, Frechet distance, sweeps")
    p.add_argument("--model", default="shapes")
    p.add_argument("--device", default="auto")
    p.add_argument("--n", type=int, default=200, help="prompts (one image each)")
    p.add_argument("--kind", default="full", choices=["full", "color_shape", "mixed"],
                   help="prompt form: all five clauses, colour+shape only, or random clauses")
    p.add_argument("--prompt-seed", type=int, default=1234, help="seed for drawing prompts")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed+i")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--sampler", default=None)
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--sweep", action="append", default=[], metavar="SETTING=V1,V2,...",
                   help="e.g. guidance=1,3,5,7.5,10 or steps=1,2,4,8 (writes a table and a plot)")
    p.add_argument("--checks", action="store_true",
                   help="also measure the negative-prompt effect and the held-out green triangle")
    p.add_argument("--out", default="outputs/eval", help="folder for tables, plots and JSON")
    p.set_defaults(func=cmd_eval)


def _parse_sweep(text: str) -> tuple[str, list]:
    from sdlab.errors import InputError
    if "=" not in text:
        raise InputError(f"--sweep takes SETTING=V1,V2,..., got {text!r}")
    name, values = text.split("=", 1)
    convert = {"steps": int, "guidance": float, "guidance_scale": float, "sampler": str}
    if name not in convert:
        raise InputError(f"cannot sweep {name!r}; valid: guidance, steps, sampler")
    try:
        return name, [convert[name](v) for v in values.split(",") if v]
    except ValueError as e:
        raise InputError(f"--sweep {name}: {e}") from e


def cmd_eval(args) -> int:
    from sdlab.cli import check_output_folder
    sweeps = [_parse_sweep(s) for s in args.sweep]
    out = check_output_folder(args.out)
    import sdlab
    from sdlab.components import quiet_library_logs
    from sdlab.eval import draw_prompts, evaluate, held_out_rate, negative_prompt_effect, sweep
    quiet_library_logs()
    pipe = sdlab.load(args.model, device=args.device)
    settings = {k: v for k, v in {"steps": args.steps, "sampler": args.sampler,
                                  "guidance_scale": args.guidance_scale,
                                  "batch_size": args.batch_size}.items() if v is not None}
    resolved = pipe.settings(args.steps, args.guidance_scale, args.sampler)
    prompts = draw_prompts(random.Random(args.prompt_seed), args.n, args.kind)
    print(f"model {pipe.components.name}: {args.n} {args.kind} prompts, sampler {resolved.sampler}, "
          f"{resolved.steps} steps, guidance {resolved.guidance_scale:g}")
    summary: dict = {"model": pipe.components.name, "kind": args.kind, "n": args.n}
    if not sweeps:
        report = evaluate(pipe, prompts, seed=args.seed, **settings)
        print(f"prompt accuracy {report.accuracy:.3f}   Frechet distance {report.frechet:.4f}")
        for attr, acc in report.attribute_accuracy.items():
            print(f"  {attr:<11}{acc:.3f}  (n={report.attribute_counts[attr]})")
        summary["report"] = report.to_dict(with_records=False)
        (out / "records.jsonl").write_text(
            "\n".join(json.dumps(r.to_dict()) for r in report.records) + "\n")
    for name, values in sweeps:
        fixed = {k: v for k, v in settings.items() if k not in (name, "guidance_scale" if name == "guidance" else name)}
        rows = sweep(pipe, prompts, name, values, out, seed=args.seed, **fixed)
        print(f"sweep {name}:")
        for row in rows:
            print(f"  {row.value!s:>8}  accuracy {row.accuracy:.3f}  FD {row.frechet:.4f}")
        summary[f"sweep_{name}"] = [r.flat() for r in rows]
    if args.checks:
        neg = negative_prompt_effect(pipe, args.n, seed=args.seed, **settings)
        held = held_out_rate(pipe, args.n, seed=args.seed, **settings)
        print(f"negative prompt 'blue' on 'a circle': blue share {neg['blue_share_without']:.3f} -> "
              f"{neg['blue_share_with']:.3f} (drop {neg['relative_drop']:.0%})")
        print(f"'a green triangle' (never seen): right in {held['rate']:.3f} "
              f"(colour {held['color_rate']:.3f}, shape {held['shape_rate']:.3f})")
        summary["negative_prompt"], summary["held_out"] = neg, held
    path = Path(out) / "summary.json"
    path.write_text(json.dumps(summary, indent=2, default=str))
    print(f"wrote {path}")
    return 0
