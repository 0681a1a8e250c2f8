"""Image helpers shared by sampling, validation and reports: array <-> PNG, grids, numbering."""
from __future__ import annotations

import math
import os
import re
from typing import List, Sequence

import numpy as np
from PIL import Image

from .atomic import atomic_path


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
