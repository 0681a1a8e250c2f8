"""Image helpers shared by sampling, validation and reports: array <-> PNG, grids, numbering."""
from __future__ import annotations

import math
import os
import re
from typing import List, Sequence

import numpy as np
from PIL import Image

from common.atomic import atomic_path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] NCHW float -> NHWC uint8, rounded (as diffusers does; MindONE truncates)."""
    x = np.clip((np.asarray(images, np.float32) + 1.0) / 2.0, 0.0, 1.0)
    return np.round(x * 255.0).astype(np.uint8).transpose(0, 2, 3, 1)


def make_grid(images: Sequence[np.ndarray], rows: int = 0, cols: int = 0) -> Image.Image:
    """Tile HWC uint8 images into one picture, row by row: `cols` images per row, or `rows` rows
    (neither: as square as possible)."""
    n = len(images)
    if cols:
        rows = int(math.ceil(n / cols))
    rows = rows or max(1, int(math.floor(math.sqrt(n))))
    cols = cols or int(math.ceil(n / rows))
    h, w = images[0].shape[:2]
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, img in enumerate(images):
        grid.paste(Image.fromarray(img), ((i % cols) * w, (i // cols) * h))
    return grid


def next_index(folder: str, pattern: str = r"^(\d{5})\.png$") -> int:
    """Numbering continues after the files already in `folder` (MindONE's samples/00000.png...)."""
    if not os.path.isdir(folder):
        return 0
    found = [int(m.group(1)) for f in os.listdir(folder) if (m := re.match(pattern, f))]
    return max(found) + 1 if found else 0


def save_png(image: np.ndarray, path: str) -> None:
    """Write through a temporary name so an interrupted run never leaves a broken image."""
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def save_images(images: np.ndarray, folder: str, start: int) -> List[str]:
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        path = os.path.join(folder, f"{start + i:05d}.png")
        save_png(img, path)
        paths.append(path)
    return paths


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparent pixels become white (not black), 16-bit data is rescaled."""
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if im.mode.startswith("I") or im.mode == "F":
        # PIL clips 16-bit and 32-bit values to 255 when converting to L, which whites out the image.
        # "I;16*" and "I" (how 16-bit PNG/TIFF open) are scaled from 0..65535; "F" is taken as 0..1
        # when it fits there, else as 0..255.
        a = np.asarray(im, dtype=np.float64)
        if im.mode == "F":
            a = a * 255.0 if a.size and a.max() <= 1.0 else a
        else:
            a = a / 257.0
        gray = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
        return gray.convert("RGB")
    return im.convert("RGB")
