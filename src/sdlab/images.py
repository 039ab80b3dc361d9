"""Images out: PNGs with A1111 infotext, grids and GIFs.

A1111 stores the generation parameters in a PNG text chunk named `parameters`:

    a red circle
    Negative prompt: blue
    Steps: 20, Sampler: DPM++ 2M, CFG scale: 5, Seed: 42, Size: 64x64, Model: shapes

sdlab writes and reads exactly that, so its images and A1111's are interchangeable.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, PngImagePlugin

_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
NEGATIVE_PREFIX = "Negative prompt:"


def format_infotext(prompt: str, negative_prompt: str, fields: dict[str, object]) -> str:
    lines = [prompt]
    if negative_prompt:
        lines.append(f"{NEGATIVE_PREFIX} {negative_prompt}")
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in fields.items() if v is not None))
    return "\n".join(lines)


def _quote(value: object) -> str:
    text = str(value)
    if "," in text or "\n" in text or ":" in text:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        return re.sub(r"\\(.)", r"\1", text[1:-1])
    return text


def parse_infotext(text: str) -> dict[str, str]:
    """{'Prompt': ..., 'Negative prompt': ..., 'Steps': '20', ...} from an infotext string."""
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:  # no parameter line: everything is prompt
        lines.append(last)
        last = ""
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in lines:
        if line.startswith(NEGATIVE_PREFIX):
            in_negative = True
            line = line[len(NEGATIVE_PREFIX):].strip()
        (negative_lines if in_negative else prompt_lines).append(line)
    result = {"Prompt": "\n".join(prompt_lines), "Negative prompt": "\n".join(negative_lines)}
    for key, value in _PARAM.findall(last):
        result[key.strip()] = _unquote(value.strip())
    return result


def save_png(image: Image.Image, path: Path, infotext: str) -> Path:
    meta = PngImagePlugin.PngInfo()
    meta.add_text("parameters", infotext)
    image.save(path, pnginfo=meta)
    return path


def read_infotext(path: str | Path) -> str | None:
    with Image.open(path) as im:
        im.load()
        return im.info.get("parameters") or (im.text.get("parameters") if hasattr(im, "text") else None)


def grid(images: Sequence[Image.Image], cols: int | None = None, scale: int = 1) -> Image.Image:
    """Images tiled left to right, top to bottom; scale enlarges small images (nearest)."""
    if not images:
        raise ValueError("grid of no images")
    cols = cols or len(images)
    rows = -(-len(images) // cols)
    w, h = images[0].size
    sheet = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        sheet.paste(im, ((i % cols) * w, (i // cols) * h))
    if scale != 1:
        sheet = sheet.resize((sheet.width * scale, sheet.height * scale), Image.NEAREST)
    return sheet


def save_gif(frames: Sequence[Image.Image], path: Path, duration_ms: int = 120,
             scale: int = 1) -> Path:
    frames = [f.resize((f.width * scale, f.height * scale), Image.NEAREST) for f in frames]
    # hold the last frame so the final image is seen
    frames[0].save(path, save_all=True, append_images=list(frames[1:]) + [frames[-1]] * 5,
                   duration=duration_ms, loop=0)
    return path
