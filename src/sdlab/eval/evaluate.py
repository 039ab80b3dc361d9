"""Honest numbers for a text-to-image pipeline on the Shapes world (../shared/shapes-spec.md).

Every image is judged attribute by attribute by `sdlab.shapes.judge`, the way the spec defines
prompt accuracy; a Frechet distance between the judge's feature vectors of generated images and of
real renders of scenes matching the same prompts adds a measure of realism (are the colours, sizes
and outlines those of the world, not only the right names?).

The pipeline is anything with the `generate` method of `sdlab.generate` (a list of prompts gives
one image per prompt, image i with seed + i), so tests can pass a fake one.
"""
from __future__ import annotations

import csv
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
from PIL import Image

from sdlab.shapes.judge import ATTRIBUTES, Judgement, is_right, judge, parse_prompt
from sdlab.shapes.world import ALL_SHAPES, caption, random_caption, render, sample_scene

PROMPT_KINDS = ("full", "color_shape", "mixed")
SWEEPABLE = ("guidance_scale", "steps", "sampler")
SETTING_ALIASES = {"guidance": "guidance_scale"}
DEFAULT_CHUNK = 64  # prompts per generate() call; the pipe batches within it by its batch_size


class Pipe(Protocol):
    def generate(self, *, prompt: Any, seed: int, **settings: Any) -> list[Any]: ...


# --------------------------------------------------------------------------------------- prompts

def draw_prompts(rng: random.Random, n: int, kind: str = "mixed") -> list[str]:
    """`n` captions of random base-shape scenes: all clauses ("full"), colour and shape only
    ("color_shape") or each optional clause kept with probability 0.5 ("mixed").

    Scenes come from `sample_scene`, so never the held-out green triangle and never an object the
    colour of its background.
    """
    if kind not in PROMPT_KINDS:
        raise ValueError(f"unknown prompt kind {kind!r}; valid: {', '.join(PROMPT_KINDS)}")
    prompts = []
    for _ in range(n):
        scene = sample_scene(rng)
        if kind == "full":
            prompts.append(caption(scene))
        elif kind == "color_shape":
            prompts.append(caption(scene, size=False, position=False, background=False))
        else:
            prompts.append(random_caption(scene, rng, keep=0.5))
    return prompts


# -------------------------------------------------------------------------------------- frechet

def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (negative round-off clipped)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two sets of feature vectors (rows).

    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2), where tr (S_a S_b)^1/2 is computed as
    tr (S_a^1/2 S_b S_a^1/2)^1/2: only symmetric square roots, so no complex round-off (as
    scipy.linalg.sqrtm gives) and no scipy. NaN with fewer than two vectors in either set.
    """
    a, b = np.atleast_2d(np.asarray(a, dtype=np.float64)), np.atleast_2d(np.asarray(b, dtype=np.float64))
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    if len(a) < 2 or len(b) < 2:
        return math.nan
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = _sqrt_psd(cov_a)
    cross = np.trace(_sqrt_psd(root_a @ cov_b @ root_a))
    mean_term = float(((a.mean(0) - b.mean(0)) ** 2).sum())
    return max(0.0, mean_term + float(np.trace(cov_a) + np.trace(cov_b) - 2 * cross))


# ------------------------------------------------------------------------------------ evaluation

@dataclass
class ImageRecord:
    """One generated image: its prompt and seed, what the judge saw, and which stated attributes
    were seen."""

    prompt: str
    seed: int
    judged: dict[str, str | None]
    right: dict[str, bool]
    image: Image.Image | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return all(self.right.values())

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "seed": self.seed, "ok": self.ok, "judged": self.judged,
                "right": self.right}


@dataclass
class EvalReport:
    """Prompt accuracy, per-attribute accuracy over the prompts stating it, and Frechet distance."""

    n: int
    accuracy: float
    attribute_accuracy: dict[str, float]  # only attributes that at least one prompt states
    attribute_counts: dict[str, int]  # prompts stating each attribute
    frechet: float
    seed: int
    settings: dict[str, Any]
    seconds: float
    records: list[ImageRecord] = field(repr=False)

    def summary(self) -> str:
        attrs = ", ".join(f"{k} {v:.3f}" for k, v in self.attribute_accuracy.items())
        return (f"n={self.n} accuracy={self.accuracy:.3f} FD={self.frechet:.4f} ({attrs}) "
                f"in {self.seconds:.1f}s")

    def to_dict(self, *, with_records: bool = True) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "records"}
        if with_records:
            out["records"] = [r.to_dict() for r in self.records]
        return out


def _given(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings the caller actually gave: None means the model's default, so it is not sent."""
    return {k: v for k, v in settings.items() if v is not None}


def generate_images(pipe: Pipe, prompts: Sequence[str], *, seed: int = 0,
                    chunk: int = DEFAULT_CHUNK, **settings: Any) -> list[tuple[Image.Image, int]]:
    """(image, seed) per prompt, in calls of `chunk` prompts; image i gets seed + i as the pipe
    would give it in one call, so chunking changes nothing."""
    settings = _given(settings)
    out: list[tuple[Image.Image, int]] = []
    for start in range(0, len(prompts), chunk):
        batch = list(prompts[start:start + chunk])
        results = pipe.generate(prompt=batch, seed=seed + start, **settings)
        if len(results) != len(batch):
            raise RuntimeError(f"generate() returned {len(results)} images for {len(batch)} prompts")
        for i, result in enumerate(results):
            params = getattr(result, "params", None)
            out.append((result.image, int(getattr(params, "seed", seed + start + i))))
    return out


def real_features(prompts: Sequence[str], seed: int = 0) -> np.ndarray:
    """Judge features of real renders of scenes drawn for the prompts: the reference set for FD.

    Unstated attributes are drawn uniformly, as in the training data, with the spec's jitter.
    """
    rng = random.Random(seed)
    rows = []
    for prompt in prompts:
        scene = sample_scene(rng, shapes=ALL_SHAPES, allow_held_out_combination=True,
                             **parse_prompt(prompt))
        rows.append(judge(render(scene)).features)
    return np.array(rows)


def _attribute_accuracy(records: list[ImageRecord]) -> tuple[dict[str, float], dict[str, int]]:
    counts = {a: sum(a in r.right for r in records) for a in ATTRIBUTES}
    accuracy = {a: sum(r.right[a] for r in records if a in r.right) / counts[a]
                for a in ATTRIBUTES if counts[a]}
    return accuracy, {a: c for a, c in counts.items() if c}


def evaluate(pipe: Pipe, prompts: Sequence[str], *, seed: int = 0, chunk: int = DEFAULT_CHUNK,
             keep_images: bool = False, **settings: Any) -> EvalReport:
    """Generate one image per prompt (seed + i), judge it against what its prompt states, and
    compare the judge features with real renders for the same prompts.

    `settings` (steps, guidance_scale, sampler, negative_prompt, batch_size...) go to
    `pipe.generate` unchanged, except None values, which are left to the model's defaults.
    """
    if not prompts:
        raise ValueError("no prompts to evaluate")
    stated = [parse_prompt(p) for p in prompts]  # fail on a bad prompt before generating
    settings = _given(settings)
    start = time.perf_counter()
    generated = generate_images(pipe, prompts, seed=seed, chunk=chunk, **settings)
    records, features = [], []
    for prompt, wanted, (image, image_seed) in zip(prompts, stated, generated):
        judgement: Judgement = judge(image)
        features.append(judgement.features)
        records.append(ImageRecord(prompt, image_seed, judgement.attributes(),
                                   is_right(judgement, wanted), image if keep_images else None))
    accuracy, counts = _attribute_accuracy(records)
    return EvalReport(
        n=len(records),
        accuracy=sum(r.ok for r in records) / len(records),
        attribute_accuracy=accuracy,
        attribute_counts=counts,
        frechet=frechet_distance(np.array(features), real_features(prompts, seed)),
        seed=seed,
        settings=settings,
        seconds=time.perf_counter() - start,
        records=records,
    )


# ------------------------------------------------------------------------------------- sweeping

@dataclass
class SweepRow:
    """One value of the swept setting and what it scored on the same prompts and seeds."""

    setting: str
    value: Any
    n: int
    accuracy: float
    frechet: float
    seconds: float
    attribute_accuracy: dict[str, float]

    def flat(self) -> dict[str, Any]:
        row = {k: v for k, v in asdict(self).items() if k != "attribute_accuracy"}
        row.update({f"acc_{a}": self.attribute_accuracy.get(a, math.nan) for a in ATTRIBUTES})
        return row


def canonical_setting(setting: str) -> str:
    """guidance_scale, steps or sampler ("guidance" accepted for guidance_scale)."""
    name = SETTING_ALIASES.get(setting, setting)
    if name not in SWEEPABLE:
        raise ValueError(f"cannot sweep {setting!r}; valid: {', '.join(SWEEPABLE)} (or guidance)")
    return name


def sweep(pipe: Pipe, prompts: Sequence[str], setting: str, values: Sequence[Any],
          out_dir: str | Path, *, seed: int = 0, **settings: Any) -> list[SweepRow]:
    """Evaluate the same prompts and seeds at each value of one setting; write
    sweep_<setting>.csv, .md (a table) and .png (accuracy and FD against the setting)."""
    name = canonical_setting(setting)
    if name in _given(settings) or setting in _given(settings):
        raise ValueError(f"{name} is the swept setting; give its values in `values` only")
    if not values:
        raise ValueError("no values to sweep")
    rows = []
    for value in values:
        report = evaluate(pipe, prompts, seed=seed, **settings, **{name: value})
        rows.append(SweepRow(name, value, report.n, report.accuracy, report.frechet,
                             report.seconds, report.attribute_accuracy))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(rows, out / f"sweep_{name}.csv")
    (out / f"sweep_{name}.md").write_text(_markdown_table(rows, settings, seed))
    _plot(rows, out / f"sweep_{name}.png")
    return rows


def _write_csv(rows: list[SweepRow], path: Path) -> None:
    flat = [r.flat() for r in rows]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(flat[0]))
        writer.writeheader()
        writer.writerows(flat)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def _markdown_table(rows: list[SweepRow], settings: dict[str, Any], seed: int) -> str:
    name = rows[0].setting
    fixed = ", ".join(f"{k}={v}" for k, v in _given(settings).items()) or "model defaults"
    header = [name, "accuracy", "FD", *ATTRIBUTES, "n", "seconds"]
    lines = [f"# Sweep over {name}", "",
             f"{rows[0].n} prompts, seed {seed}, other settings: {fixed}. Accuracy per attribute "
             "is over the prompts stating it; FD is the Frechet distance of judge features to "
             "real renders (lower is better).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r.value, r.accuracy, r.frechet,
                 *(r.attribute_accuracy.get(a, math.nan) for a in ATTRIBUTES), r.n, r.seconds]
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _plot(rows: list[SweepRow], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = rows[0].setting
    numeric = all(isinstance(r.value, (int, float)) for r in rows)
    x = [r.value for r in rows] if numeric else list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, [r.accuracy for r in rows], "o-", color="tab:blue", label="prompt accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(name)
    ax.set_ylabel("prompt accuracy", color="tab:blue")
    if not numeric:
        ax.set_xticks(x, [str(r.value) for r in rows])
    fd_ax = ax.twinx()
    fd_ax.plot(x, [r.frechet for r in rows], "s--", color="tab:red", label="FD")
    fd_ax.set_ylabel("Frechet distance (judge features)", color="tab:red")
    ax.set_title(f"Shapes: accuracy and FD vs {name} (n={rows[0].n})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------- single-purpose checks

NEGATIVE_PROMPT_TEST = ("a circle", "blue")  # prompt, and the palette colour to keep out of it


def _blue_share(images: list[tuple[Image.Image, int]], color: str) -> float:
    judged = [judge(image) for image, _ in images]
    return sum(j.color == color or j.background == color for j in judged) / len(judged)


def negative_prompt_effect(pipe: Pipe, n: int, seed: int = 0, **settings: Any) -> dict[str, Any]:
    """Share of "a circle" images where blue is seen (object or background), without and with
    negative_prompt="blue" on the same seeds, and the relative drop (NaN if never blue)."""
    prompt, negative = NEGATIVE_PROMPT_TEST
    settings = _given(settings)
    if "negative_prompt" in settings:
        raise ValueError("negative_prompt is what this check varies; do not give it")
    without = _blue_share(generate_images(pipe, [prompt] * n, seed=seed, **settings), negative)
    with_negative = _blue_share(generate_images(pipe, [prompt] * n, seed=seed,
                                                negative_prompt=negative, **settings), negative)
    drop = (without - with_negative) / without if without else math.nan
    return {"prompt": prompt, "negative_prompt": negative, "n": n, "seed": seed,
            "blue_share_without": without, "blue_share_with": with_negative,
            "relative_drop": drop}


def held_out_rate(pipe: Pipe, n: int, seed: int = 0, **settings: Any) -> dict[str, Any]:
    """How often "a green triangle" (never in the base training set) comes out as one; colour
    and shape rates too, to tell which half of the combination the model misses."""
    report = evaluate(pipe, ["a green triangle"] * n, seed=seed, **settings)
    return {"prompt": "a green triangle", "n": n, "seed": seed, "rate": report.accuracy,
            "color_rate": report.attribute_accuracy["color"],
            "shape_rate": report.attribute_accuracy["shape"]}


def judge_self_check(n: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The judge's accuracy on real renders of all five shapes, every attribute stated: what its
    verdicts on generated images are worth. Includes up to 10 failures to look at."""
    rng = random.Random(seed)
    right = {a: 0 for a in ATTRIBUTES}
    per_shape: dict[str, list[int]] = {s: [0, 0] for s in ALL_SHAPES}
    all_right, failures = 0, []
    for _ in range(n):
        scene = sample_scene(rng, shapes=ALL_SHAPES, allow_held_out_combination=True)
        seen = judge(render(scene)).attributes()
        ok = {a: seen[a] == getattr(scene, a) for a in ATTRIBUTES}
        for a in ATTRIBUTES:
            right[a] += ok[a]
        per_shape[scene.shape][0] += all(ok.values())
        per_shape[scene.shape][1] += 1
        all_right += all(ok.values())
        if not all(ok.values()) and len(failures) < 10:
            failures.append({"scene": asdict(scene), "judged": seen})
    return {"n": n, "seed": seed, "accuracy": all_right / n,
            "attribute_accuracy": {a: right[a] / n for a in ATTRIBUTES},
            "shape_accuracy": {s: ok / total for s, (ok, total) in per_shape.items() if total},
            "failures": failures}
