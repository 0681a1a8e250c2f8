"""DreamBooth data pipeline shared by both backends (numpy + PIL only).

Images are decoded and resized once and kept (`_ImageCache`); each batch crops and flips them into
float32 CHW arrays in [-1, 1], optionally in worker threads ahead of the training step. Every
random choice (epoch shuffle, crop offsets, flips, class-image picks) comes from
`common.rng.Streams` keyed by (seed, epoch, global item index), so:

* the same seed and epoch give the same batches on PyTorch and MindSpore;
* with `world_size` ranks, each global batch of `batch_size * world_size` items is cut into
  contiguous per-rank slices, so the ranks read disjoint shards whose union is exactly the
  single-process epoch, and an item's augmentation does not depend on which rank reads it.

Resizing: the shorter side is scaled to `image_size` (as MindONE's SmallestMaxSize and diffusers'
Resize(int) do) with PIL's bicubic filter, which antialiases when downscaling, then a center or
random square crop is taken. Bicubic is our choice; the references use (bi)linear variants, and the
difference is far below what the VAE preserves.
"""
from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps

from common.errors import UserError
from common.images import IMAGE_EXTENSIONS, to_rgb
from common.rng import Streams

logger = logging.getLogger(__name__)


# Caption / metadata / readme files that commonly sit next to training images: ignored silently.
_SIDECAR_EXTENSIONS = (".csv", ".json", ".jsonl", ".txt", ".caption", ".yaml", ".yml", ".md")
_CROPS = ("center", "random")
DEFAULT_CACHE_BYTES = 4 << 30   # decoded, resized images kept in memory (instance + class images)


def _probe(path: str) -> bool:
    """True when PIL can fully decode the file (catches truncated and corrupt images up front)."""
    try:
        with Image.open(path) as im:
            im.draft("RGB", (64, 64))  # JPEG: decode at reduced scale, still reading the whole stream
            im.load()
        return True
    except Exception:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBomb...)
        return False


def _scan(folder: str) -> tuple[list[str], list[str]]:
    """(readable image paths, rejected file names) in sorted order; hidden files and sidecars skipped."""
    good, bad = [], []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith(".") or not os.path.isfile(path):
            continue
        ext = os.path.splitext(name)[1].lower()
        if ext in _SIDECAR_EXTENSIONS:
            continue
        if ext in IMAGE_EXTENSIONS and _probe(path):
            good.append(path)
        else:
            bad.append(name)
    return good, bad


def list_images(folder: str, role: str = "instance") -> list[str]:
    """Sorted paths of the readable images directly inside `folder` (not recursive).

    Files that are not images or cannot be decoded are skipped with one warning naming them;
    hidden files, subfolders and caption/metadata sidecars (.txt, .json, .csv, .md...) silently.
    Raises UserError when the folder is missing or holds no readable image.
    """
    if not os.path.isdir(folder):
        raise UserError(f"{role} data dir not found: {folder}")
    good, bad = _scan(folder)
    if bad:
        logger.warning("skipping %d unreadable or non-image file(s) in %s data dir %s: %s",
                       len(bad), role, folder, ", ".join(bad))
    if not good:
        raise UserError(f"{role} data dir has no readable images ({', '.join(IMAGE_EXTENSIONS)}): {folder}")
    return good


def count_images(folder: str) -> int:
    """Number of readable images in `folder` (0 when it does not exist); used to resume class-image
    generation. Half-written files from an interrupted run do not count, so they get regenerated."""
    if not os.path.isdir(folder):
        return 0
    return len(_scan(folder)[0])





INTERPOLATIONS = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
                  "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}


def load_resized(path: str, size: int, interpolation: str = "bicubic") -> np.ndarray:
    """Decode one image (EXIF orientation applied, RGB) with its shorter side resized to `size`
    (bicubic by default; PIL antialiases when shrinking), as a uint8 [H, W, 3] array: the
    expensive, deterministic part of loading, which the dataset caches."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            im = to_rgb(im)
            w, h = im.size
            scale = size / min(w, h)
            # max() guards the long side against rounding below `size` for extreme aspect ratios.
            new = (size, max(size, round(h * scale))) if w <= h else (max(size, round(w * scale)), size)
            if new != (w, h):
                im = im.resize(new, INTERPOLATIONS[interpolation])
            return np.asarray(im, dtype=np.uint8)
    except Exception as e:
        raise UserError(f"cannot decode image {path}: {e}") from e


def crop_flip(resized: np.ndarray, size: int, crop: str, flip: bool, rng: np.random.Generator | None) -> np.ndarray:
    """A `crop` ("center" or "random", offsets from `rng`) square of a `load_resized` image, mirrored
    left-right when `flip`, as a float32 [3, size, size] array in [-1, 1]."""
    if crop not in _CROPS:
        raise ValueError(f"crop must be one of {_CROPS}, got {crop!r}")
    if crop == "random" and rng is None:
        raise ValueError("crop='random' needs an rng")
    h, w = resized.shape[:2]
    if crop == "center":
        left, top = (w - size) // 2, (h - size) // 2
    else:
        top = int(rng.integers(0, h - size + 1))
        left = int(rng.integers(0, w - size + 1))
    arr = resized[top:top + size, left:left + size]
    if flip:
        arr = arr[:, ::-1]
    return np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32) / np.float32(127.5) - np.float32(1.0)


def load_image(path: str, size: int, crop: str, flip: bool, rng: np.random.Generator | None) -> np.ndarray:
    """Decode one image into a float32 [3, size, size] array in [-1, 1]: `load_resized`, then
    `crop_flip`. `rng` is only needed for crop="random"."""
    return crop_flip(load_resized(path, size), size, crop, flip, rng)


class _ImageCache:
    """`load_resized` images by path, least recently used dropped beyond `max_bytes`. Every epoch
    reads the same few instance images tens of times (train_data_repeats) and the class images
    again: decoding and resizing them once takes the host off the step's critical path."""

    def __init__(self, size: int, max_bytes: int, interpolation: str = "bicubic"):
        self.size, self.max_bytes, self.interpolation = size, int(max_bytes), interpolation
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    def get(self, path: str) -> np.ndarray:
        with self._lock:
            path_lock = self._loading.setdefault(path, threading.Lock())
        with path_lock:          # one decode per file; other files decode in parallel meanwhile
            with self._lock:
                if path in self._items:
                    self._items.move_to_end(path)
                    return self._items[path]
            arr = load_resized(path, self.size, self.interpolation)
            arr.setflags(write=False)
            with self._lock:
                if arr.nbytes <= self.max_bytes:
                    self._items[path] = arr
                    self._bytes += arr.nbytes
                    while self._bytes > self.max_bytes:
                        self._bytes -= self._items.popitem(last=False)[1].nbytes
            return arr


class DreamBoothDataset:
    """Instance images (plus optional class images for prior preservation) with their prompt ids.

    `tokenizer` maps a list of prompts to an int64 [N, 77] array; the prompts are tokenized once.
    `repeats` repeats the instance list per epoch (MindONE's train_data_repeats). `random_crop`
    False means a center crop (diffusers' --center_crop); `flip` mirrors each item with p=0.5.
    """

    def __init__(self, instance_dir: str, instance_prompt: str, tokenizer: Callable[[list[str]], np.ndarray],
                 image_size: int, *, class_dir: str | None = None, class_prompt: str | None = None,
                 repeats: int = 1, random_crop: bool = False, flip: bool = False, seed: int = 0,
                 workers: int = 0, cache_bytes: int = DEFAULT_CACHE_BYTES, interpolation: str = "bicubic"):
        if int(image_size) <= 0:
            raise UserError(f"image_size must be a positive integer, got {image_size}")
        if int(repeats) != repeats or repeats < 1:
            raise UserError(f"train_data_repeats must be a positive integer, got {repeats}")
        if class_dir is not None and not class_prompt:
            raise UserError(f"class_prompt is required when class_data_dir is set ({class_dir})")

        self.image_size = int(image_size)
        self.repeats = int(repeats)
        self.crop = "random" if random_crop else "center"
        self.flip = bool(flip)
        self.seed = int(seed)
        self._streams = Streams(self.seed)
        self.workers = int(workers)
        self._cache = _ImageCache(self.image_size, cache_bytes, interpolation)

        self.instance_paths = list_images(instance_dir, "instance")
        self.class_paths = list_images(class_dir, "class") if class_dir is not None else None

        prompts = [instance_prompt] + ([class_prompt] if self.class_paths is not None else [])
        ids = np.asarray(tokenizer(prompts))
        if ids.ndim != 2 or ids.shape[0] != len(prompts):
            raise ValueError(f"tokenizer returned shape {ids.shape} for {len(prompts)} prompts; expected [N, L]")
        ids = ids.astype(np.int64)
        self.instance_ids = ids[0]
        self.class_ids = ids[1] if self.class_paths is not None else None

    def __len__(self) -> int:
        return len(self.instance_paths) * self.repeats

    def steps_per_epoch(self, batch_size: int, world_size: int = 1, *, drop_last: bool = True) -> int:
        """Number of global batches (batch_size * world_size items each) in one epoch."""
        global_bs = self._global_batch(batch_size, world_size)
        if drop_last:
            if len(self) < global_bs:
                raise UserError(
                    f"the dataset has {len(self)} items ({len(self.instance_paths)} instance images x "
                    f"{self.repeats} repeats) but one global batch needs {global_bs} "
                    f"(train_batch_size {batch_size} x {world_size} devices); raise train_data_repeats "
                    f"or lower train_batch_size")
            return len(self) // global_bs
        return -(-len(self) // global_bs)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Instance index (into `instance_paths`) of every item of `epoch`, in reading order."""
        repeated = np.arange(len(self)) % len(self.instance_paths)
        perm = self._streams.generator("data.shuffle", epoch).permutation(len(self))
        return repeated[perm]

    def batches(self, batch_size: int, epoch: int, *, rank: int = 0, world_size: int = 1,
                drop_last: bool = True, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Yield this rank's batches for `epoch`.

        Keys: "instance_images" float32 [B, 3, S, S], "instance_ids" int64 [B, L], "instance_paths"
        (each item's file), and with a class dir "class_images" / "class_ids" / "class_paths" alike. With drop_last=False the last global
        batch is filled up by wrapping around the epoch order, so every batch keeps its shape (static
        shapes for graph mode) and every rank takes the same number of steps. `start_step` skips
        steps without decoding them (mid-epoch resume).
        """
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        global_bs = self._global_batch(batch_size, world_size)
        steps = self.steps_per_epoch(batch_size, world_size, drop_last=drop_last)
        order = np.resize(self.epoch_order(epoch), steps * global_bs)  # np.resize cycles when padding

        def batch(step: int) -> dict[str, np.ndarray]:
            first = step * global_bs + rank * batch_size
            return self._make_batch(epoch, range(first, first + batch_size), order)

        if self.workers <= 0:
            yield from map(batch, range(start_step, steps))
            return
        # Worker threads build the next batches while the device trains on this one: PIL's decode
        # and resize and numpy's copies release the GIL, and every random draw is keyed by item,
        # so the batches are the same as without workers. (Threads, not processes: nothing to
        # pickle, and no fork of a process that holds a CUDA or MindSpore context.)
        with ThreadPoolExecutor(self.workers, thread_name_prefix="data") as pool:
            ahead: deque = deque()
            next_step = start_step
            while ahead or next_step < steps:
                while next_step < steps and len(ahead) < 2 * self.workers:
                    ahead.append(pool.submit(batch, next_step))
                    next_step += 1
                yield ahead.popleft().result()

    def _make_batch(self, epoch: int, global_indices: Sequence[int], order: np.ndarray) -> dict[str, np.ndarray]:
        inst, cls, inst_paths, cls_paths = [], [], [], []
        for g in global_indices:
            aug = self._streams.generator("data.augment", epoch, g)
            inst_paths.append(self.instance_paths[order[g]])
            inst.append(self._augmented(inst_paths[-1], aug))
            if self.class_paths is not None:
                pick = int(self._streams.generator("data.class", epoch, g).integers(len(self.class_paths)))
                cls_paths.append(self.class_paths[pick])
                cls.append(self._augmented(cls_paths[-1], aug))
        n = len(inst)
        batch = {"instance_images": np.stack(inst), "instance_ids": np.repeat(self.instance_ids[None], n, 0),
                 "instance_paths": inst_paths}
        if self.class_paths is not None:
            batch["class_images"] = np.stack(cls)
            batch["class_ids"] = np.repeat(self.class_ids[None], n, 0)
            batch["class_paths"] = cls_paths
        return batch

    def _augmented(self, path: str, rng: np.random.Generator) -> np.ndarray:
        # The flip coin is drawn even when flipping is off, so turning it on does not move crops.
        coin = rng.random() < 0.5
        return crop_flip(self._cache.get(path), self.image_size, self.crop, self.flip and coin, rng)

    @staticmethod
    def _global_batch(batch_size: int, world_size: int) -> int:
        if batch_size < 1 or world_size < 1:
            raise ValueError(f"batch_size and world_size must be >= 1, got {batch_size}, {world_size}")
        return batch_size * world_size
