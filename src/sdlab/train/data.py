"""Training images for personalisation: a folder of pictures, their captions, their latents.

- Any size and common format: each image is scaled to cover the training resolution and
  centre-cropped to it (aspect kept), as img2img prepares its input.
- A caption file beside an image (`cat.png` + `cat.txt`) overrides the recipe's prompt for that
  image; `{}` in it stands for the token (textual inversion) or the instance prompt (Dreambooth).
- Latents are encoded once (both orientations when `flip` is on): steps never touch the VAE.
- Batches are a pure function of (seed, step, process): the order is an endless sequence of
  epochs, each a shuffle of every image `repeats` times, so `--resume` continues with exactly the
  batches an uninterrupted run would have seen.

Horizontal flips are off by default: in the Shapes world position is part of the caption.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdlab.errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_SUFFIX = ".txt"


@dataclass
class TrainImage:
    path: Path
    pixels: torch.Tensor  # (3, size, size) in [-1, 1]
    caption: str | None  # from a caption file beside the image, else None


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly in `folder`, sorted; InputError if there is none."""
    path = Path(folder)
    if not path.is_dir():
        raise InputError(f"image folder {path} does not exist")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"no images in {path} (looked for {', '.join(IMAGE_SUFFIXES)})")
    return files


def load_image(path: Path, size: int) -> Image.Image:
    """RGB, scaled to cover size x size and centre-cropped; InputError naming an unreadable file."""
    from sdlab.generate import prepare_init_image
    try:
        with Image.open(path) as im:
            im.load()
            image = im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"cannot read training image {path}: {e}") from e
    return prepare_init_image(image, size, size)


def check_readable(paths: list[Path]) -> None:
    """InputError naming the first file PIL cannot decode (cheap; before a model loads)."""
    for path in paths:
        try:
            with Image.open(path) as im:
                im.load()
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise InputError(f"cannot read training image {path}: {e}") from e


def read_caption(image_path: Path) -> str | None:
    caption_file = image_path.with_suffix(CAPTION_SUFFIX)
    if not caption_file.is_file():
        return None
    text = caption_file.read_text(encoding="utf-8").strip()
    return text or None


def to_tensor(image: Image.Image) -> torch.Tensor:
    arr = np.asarray(image, dtype=np.float32) / 127.5 - 1
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def load_folder(folder: str | Path, size: int) -> list[TrainImage]:
    return [TrainImage(p, to_tensor(load_image(p, size)), read_caption(p))
            for p in list_images(folder)]


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, flip: bool, batch: int = 16) -> torch.Tensor:
    """(N, F, C, h, w) scaled latents, F = 2 (as is, mirrored) with flip, else 1.

    The mean of the VAE's posterior, scaled exactly as the pipeline scales img2img latents."""
    views = [pixels, pixels.flip(-1)] if flip else [pixels]
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    out = []
    for view in views:
        chunks = []
        for x in view.split(batch):
            x = x.to(vae.device, vae.dtype)
            chunks.append(((vae.encode(x).latent_dist.mean - shift)
                           * vae.config.scaling_factor).float().cpu())
        out.append(torch.cat(chunks))
    return torch.stack(out, dim=1)


@dataclass
class Sampler:
    """Deterministic batches over N items: an endless run of shuffled epochs of N * repeats."""

    n: int
    repeats: int = 1
    seed: int = 0
    views: int = 1  # orientations per item (2 with flip); one is drawn per sample

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise InputError(f"repeats must be >= 1, got {self.repeats}")
        self._epoch, self._order = -1, []

    def _epoch_order(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            order = [i for i in range(self.n) for _ in range(self.repeats)]
            random.Random(f"{self.seed}/epoch/{epoch}").shuffle(order)
            self._epoch, self._order = epoch, order
        return self._order

    def indices(self, step: int, batch_size: int, process: int = 0,
                processes: int = 1) -> list[tuple[int, int]]:
        """(item, view) pairs of one process's batch at `step`."""
        per_epoch = self.n * self.repeats
        first = (step * processes + process) * batch_size
        out = []
        for k in range(first, first + batch_size):
            item = self._epoch_order(k // per_epoch)[k % per_epoch]
            view = random.Random(f"{self.seed}/view/{k}").randrange(self.views)
            out.append((item, view))
        return out
