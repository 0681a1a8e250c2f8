"""Evaluation of generated images, framework-neutral: CLIP-T, CLIP-I and DINO scores.

Definitions (every score is a plain mean of cosine similarities of L2-normalised embeddings,
computed in float64 from the backend's float32 embeddings):

* **CLIP-T** (prompt fidelity): the mean over image-prompt pairs of cos(CLIP image embedding,
  CLIP text embedding). With P prompts and N images, N must be a multiple of P and the images are
  grouped consecutively: images [0, N/P) belong to prompt 0, the next N/P to prompt 1, ... (as
  MindONE's `eval_clip_score.py` and our `text_to_image.py --data_path` order them). Reported as
  the raw cosine (DreamBooth paper, ~0.30 for good SD samples) and x100 (MindONE's number; no clamp).
  torchmetrics' `CLIPScore` is documented as max(100 * cos, 0) per pair, but its code clamps the
  *mean*: max(mean(100 * cos), 0). We report both: `torchmetrics` (clamped mean, what torchmetrics
  returns for one call over all pairs) and `x100_clamped_pairs` (mean of per-pair clamps, the
  documented formula). All three x100 numbers agree when every cosine is positive, as with real
  CLIP models and sensible images; they differ for unrelated pairs and random models.
* **CLIP-I** (subject fidelity): the mean of the full generated x real cosine matrix of CLIP image
  embeddings (every generated image against every real image, as MindONE defines it), raw and x100.
* **DINO** (subject fidelity, the DreamBooth paper's preferred one): the same mean over DINO ViT
  CLS embeddings.

Image preprocessing is the same for both backends and all models (`PREPROCESS_HELP`).
"""
from __future__ import annotations

import datetime
import html
import importlib
import json
import logging
import os
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageOps

from common.config import BACKEND_ALIASES
from common.images import IMAGE_EXTENSIONS, to_rgb
from common.atomic import atomic_path
from common.errors import UserError
from common.images import make_grid, save_png

logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PREPROCESS_HELP = (
    "Preprocessing (identical on both backends): EXIF rotation applied, converted to RGB "
    "(transparency on white), the shorter side resized to the model's image size (224 for ViT-B-16 "
    "and DINO ViT-S/16) with PIL's bicubic filter, the centre square cropped, scaled to [0, 1] and "
    "normalised with CLIP's mean (0.4815, 0.4578, 0.4082) and std (0.2686, 0.2613, 0.2758); DINO "
    "uses ImageNet's mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225). This is open_clip's "
    "and transformers' CLIP preprocessing; MindONE first squashes every image to 224x224, which "
    "distorts non-square images.")

DEFINITIONS = {
    "clip_t": "mean over image-prompt pairs of cos(CLIP image, CLIP text); images grouped consecutively per prompt",
    "clip_t_torchmetrics": "max(mean(100 * cos), 0): torchmetrics' CLIPScore (clamps the mean at 0)",
    "clip_t_x100_clamped_pairs": "mean(max(100 * cos, 0)): the per-pair clamp of torchmetrics' documentation",
    "clip_i": "mean of the full generated x real cosine matrix of CLIP image embeddings",
    "dino": "mean of the full generated x real cosine matrix of DINO ViT CLS embeddings",
}

# DreamBooth paper, Table 1 (Stable Diffusion), and the real-image ceiling (perf_anchors §1.1).
PAPER_REFERENCE = {"dreambooth_sd": {"dino": 0.668, "clip_i": 0.803, "clip_t": 0.305},
                   "real_images": {"dino": 0.774, "clip_i": 0.885}}


# --------------------------------------------------------------------------- images

def list_eval_images(path_or_dir: str, role: str) -> List[str]:
    """One image file, or the image files directly inside a folder (sorted by name, as MindONE
    sorts). Non-image files (captions, json) are ignored; a missing path or a folder without images
    is a UserError naming it. `role` names the input in messages ("generated", "real", ...)."""
    if not path_or_dir:
        raise UserError(f"no {role} images given")
    path = os.path.expanduser(path_or_dir)
    if os.path.isfile(path):
        if not path.lower().endswith(IMAGE_EXTENSIONS):
            raise UserError(f"{role} image {path}: not an image file ({', '.join(IMAGE_EXTENSIONS)})")
        return [path]
    if not os.path.isdir(path):
        raise UserError(f"{role} images not found: {path}")
    found = sorted(os.path.join(path, n) for n in os.listdir(path)
                   if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS)
                   and os.path.isfile(os.path.join(path, n)))
    if not found:
        raise UserError(f"no {role} images ({', '.join(IMAGE_EXTENSIONS)}) in {path}")
    return found


def open_rgb(path: str) -> Image.Image:
    """Decode `path` fully as an RGB image (EXIF rotation applied), or raise a UserError naming it."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            im.load()
            return to_rgb(im)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise UserError(f"cannot read image {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def check_images(paths: Sequence[str]) -> None:
    """Decode every image once, so an unreadable file fails before any model is loaded."""
    for path in paths:
        open_rgb(path)


def resize_center_crop(im: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size` (bicubic), then the centre `size` x `size` square, with torchvision's
    arithmetic (long side truncated, crop offset rounded) so it matches open_clip's preprocess."""
    w, h = im.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    if (new_w, new_h) != (w, h):
        im = im.resize((new_w, new_h), Image.BICUBIC)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return im.crop((left, top, left + size, top + size))


def image_pixels(im: Image.Image, size: int, mean=CLIP_MEAN, std=CLIP_STD) -> np.ndarray:
    """float32 [3, size, size] of an RGB image: see PREPROCESS_HELP."""
    x = np.asarray(resize_center_crop(im, size), np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def preprocess_image(path: str, size: int, mean=CLIP_MEAN, std=CLIP_STD) -> np.ndarray:
    """float32 [3, size, size] of the image file at `path`: see PREPROCESS_HELP."""
    return image_pixels(open_rgb(path), size, mean, std)


# --------------------------------------------------------------------------- prompts

def read_prompts(prompt_or_path: str) -> List[str]:
    """A prompt, or a text file with one prompt per line (blank lines skipped), as MindONE reads
    `--prompt_or_path`. A value that looks like a file name but does not exist is an error rather
    than being taken for a prompt."""
    if prompt_or_path is None or not str(prompt_or_path).strip():
        raise UserError("no prompt given (--prompt_or_path: a prompt or a file with one prompt per line)")
    value = os.path.expanduser(str(prompt_or_path))
    if os.path.isfile(value):
        try:
            with open(value, encoding="utf-8") as f:
                prompts = [line.strip() for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read prompt file {value}: {e}") from None
        if not prompts:
            raise UserError(f"prompt file {value} has no prompts")
        return prompts
    if re.search(r"\.(txt|csv|json|jsonl|lst)$", value, re.IGNORECASE) and " " not in value:
        raise UserError(f"prompt file not found: {value}")
    return [str(prompt_or_path).strip()]


def prompt_index(n_images: int, n_prompts: int) -> np.ndarray:
    """Prompt of each image when images are grouped consecutively per prompt."""
    if n_prompts < 1:
        raise UserError("no prompts")
    if n_images < 1:
        raise UserError("no images")
    if n_images % n_prompts:
        raise UserError(f"{n_images} images cannot be split evenly over {n_prompts} prompts: the number of "
                        f"images must be a multiple of the number of prompts (images are grouped "
                        f"consecutively, N/P per prompt)")
    return np.repeat(np.arange(n_prompts), n_images // n_prompts)


def strip_identifier(prompt: str, identifier: Optional[str]) -> str:
    """`prompt` without the whole word `identifier` (e.g. "sks"), as DreamBench's CLIP-T does."""
    if not identifier:
        return prompt
    return " ".join(re.sub(rf"(?<!\w){re.escape(identifier)}(?!\w)", " ", prompt).split())


# --------------------------------------------------------------------------- scores

def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows of `x` divided by their norm (at least eps, as torch's F.normalize), in float64."""
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[len(a), len(b)] cosine similarities."""
    return l2_normalize(a) @ l2_normalize(b).T


def clip_t_scores(image_emb: np.ndarray, text_emb: np.ndarray, index: np.ndarray) -> Dict[str, Any]:
    """CLIP-T of images whose prompt (row of `text_emb`) is `index[i]` (see the module docstring)."""
    cos = np.sum(l2_normalize(image_emb) * l2_normalize(text_emb)[index], axis=-1)
    mean = float(cos.mean())
    return {"cosine": mean, "x100": 100.0 * mean, "torchmetrics": max(100.0 * mean, 0.0),
            "x100_clamped_pairs": float(np.maximum(100.0 * cos, 0.0).mean()), "pairs": int(len(cos)),
            "per_image_cosine": cos}


def pairwise_scores(gen_emb: np.ndarray, real_emb: np.ndarray) -> Dict[str, Any]:
    """CLIP-I / DINO: mean of the full generated x real cosine matrix."""
    m = cosine_matrix(gen_emb, real_emb)
    return {"cosine": float(m.mean()), "x100": 100.0 * float(m.mean()), "pairs": int(m.size),
            "per_generated_cosine": m.mean(axis=1)}


# --------------------------------------------------------------------------- encoders

def _backend_module(backend: str):
    key = BACKEND_ALIASES.get(str(backend).strip().lower())
    if key is None:
        raise UserError(f"unknown backend {backend!r}; use cuda or ascend (pt / ms)")
    packages = {"cuda": "torch, open_clip_torch and timm (pip install -e '.[cuda,eval]')",
                "ascend": "mindspore (pip install -e '.[ascend]')"}
    try:
        return importlib.import_module(f"backends.{key}.eval_models")
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] in ("torch", "open_clip", "timm", "transformers", "diffusers",
                                               "peft", "accelerate", "mindspore", "torchvision"):
            raise UserError(f"backend {key} needs {packages[key]}: {e.name} is not installed") from None
        raise


def load_clip_encoder(backend: str, source):
    """The backend's CLIP encoder for a `common.evaluation.models.ClipSource`."""
    return _backend_module(backend).ClipEncoder(source)


def load_dino_encoder(backend: str, source):
    """The backend's DINO encoder for a `common.evaluation.models.DinoSource`."""
    return _backend_module(backend).DinoEncoder(source)


def embed_images(encoder, paths: Sequence[str], mean, std, batch_size: int = 32) -> np.ndarray:
    """[N, D] float32 embeddings of the images at `paths`, preprocessed at the encoder's size."""
    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, got {batch_size}")
    out = []
    for start in range(0, len(paths), batch_size):
        batch = np.stack([preprocess_image(p, encoder.arch.image_size, mean, std)
                          for p in paths[start:start + batch_size]])
        out.append(np.asarray(encoder.encode_images(batch), np.float32))
    return np.concatenate(out)


def embed_texts(encoder, tokenizer, prompts: Sequence[str]) -> np.ndarray:
    """[P, D] float32 CLIP text embeddings."""
    return np.asarray(encoder.encode_text(tokenizer(list(prompts))), np.float32)


def describe_encoder(encoder, source) -> Dict[str, Any]:
    return {**source.describe(), "backend": encoder.backend, "library": encoder.library}


# --------------------------------------------------------------------------- evaluations

def evaluate_clip_t(encoder, tokenizer, image_paths: Sequence[str], prompts: Sequence[str],
                    batch_size: int = 32) -> Dict[str, Any]:
    """CLIP-T of `image_paths` grouped consecutively over `prompts`; per-image rows included."""
    index = prompt_index(len(image_paths), len(prompts))
    image_emb = embed_images(encoder, image_paths, CLIP_MEAN, CLIP_STD, batch_size)
    text_emb = embed_texts(encoder, tokenizer, prompts)
    scores = clip_t_scores(image_emb, text_emb, index)
    cos = scores.pop("per_image_cosine")
    scores["per_prompt_cosine"] = [float(cos[index == p].mean()) for p in range(len(prompts))]
    scores["per_image"] = [{"prompt": prompts[p], "image_path": path, "cosine": float(c), "clip_score": 100.0 * float(c)}
                           for path, p, c in zip(image_paths, index, cos)]
    return scores


def evaluate_pairwise(encoder, gen_paths: Sequence[str], real_paths: Sequence[str], mean, std,
                      batch_size: int = 32) -> Dict[str, Any]:
    """CLIP-I (CLIP mean/std) or DINO (ImageNet mean/std) of generated against real images."""
    gen = embed_images(encoder, gen_paths, mean, std, batch_size)
    real = embed_images(encoder, real_paths, mean, std, batch_size)
    scores = pairwise_scores(gen, real)
    per = scores.pop("per_generated_cosine")
    scores["per_image"] = [{"image_path": p, "cosine": float(c)} for p, c in zip(gen_paths, per)]
    scores["generated"], scores["real"] = len(gen_paths), len(real_paths)
    return scores


def prompt_groups(gen_path_or_dir: str, prompt_or_path: Optional[str]) -> List[Tuple[str, List[str]]]:
    """[(prompt, image paths)] of a DreamBooth run's generated images, from either

    * a folder of images plus `prompt_or_path` (a prompt or a prompts file): images grouped
      consecutively, N/P per prompt (what `text_to_image.py --data_path` writes), or
    * a folder with one sub-folder per prompt: its prompt is the sub-folder's `prompt.txt`, else the
      matching line of `prompt_or_path` (sub-folders in sorted order), else the folder name with
      `_` read as a space.
    """
    root = os.path.expanduser(gen_path_or_dir or "")
    subdirs = []
    if os.path.isdir(root):
        direct = [n for n in os.listdir(root) if n.lower().endswith(IMAGE_EXTENSIONS)]
        if not direct:
            subdirs = sorted(n for n in os.listdir(root) if not n.startswith(".")
                             and os.path.isdir(os.path.join(root, n)))
    if not subdirs:
        if not prompt_or_path:
            raise UserError(f"{root}: give the prompts (--prompt_or_path) for a folder of images, or use "
                            f"one sub-folder per prompt")
        paths = list_eval_images(root, "generated")
        prompts = read_prompts(prompt_or_path)
        index = prompt_index(len(paths), len(prompts))
        return [(prompt, [p for p, i in zip(paths, index) if i == k]) for k, prompt in enumerate(prompts)]
    listed = read_prompts(prompt_or_path) if prompt_or_path else None
    if listed is not None and len(listed) != len(subdirs):
        raise UserError(f"{root} has {len(subdirs)} prompt folders but {len(listed)} prompts were given")
    groups = []
    for k, name in enumerate(subdirs):
        folder = os.path.join(root, name)
        prompt_file = os.path.join(folder, "prompt.txt")
        if os.path.isfile(prompt_file):
            prompt = read_prompts(prompt_file)[0]
        else:
            prompt = listed[k] if listed else name.replace("_", " ").strip()
        groups.append((prompt, list_eval_images(folder, f"generated ({name})")))
    return groups


def evaluate_dreambooth(clip, tokenizer, groups: Sequence[Tuple[str, Sequence[str]]], real_paths: Sequence[str],
                        dino=None, identifier: Optional[str] = None, batch_size: int = 32) -> Dict[str, Any]:
    """CLIP-T, CLIP-I and (with a `dino` encoder) DINO of a DreamBooth run: overall (over all pairs)
    and per prompt. Generated images are embedded once and reused for CLIP-T and CLIP-I."""
    gen_paths = [p for _, paths in groups for p in paths]
    index = np.concatenate([np.full(len(paths), k) for k, (_, paths) in enumerate(groups)])
    text_prompts = [strip_identifier(prompt, identifier) for prompt, _ in groups]
    clip_gen = embed_images(clip, gen_paths, CLIP_MEAN, CLIP_STD, batch_size)
    clip_real = embed_images(clip, real_paths, CLIP_MEAN, CLIP_STD, batch_size)
    clip_t = clip_t_scores(clip_gen, embed_texts(clip, tokenizer, text_prompts), index)
    clip_i = pairwise_scores(clip_gen, clip_real)
    dino_s = None
    if dino is not None:
        dino_s = pairwise_scores(embed_images(dino, gen_paths, IMAGENET_MEAN, IMAGENET_STD, batch_size),
                                 embed_images(dino, real_paths, IMAGENET_MEAN, IMAGENET_STD, batch_size))
    prompts = []
    for k, (prompt, paths) in enumerate(groups):
        sel = index == k
        prompts.append({
            "prompt": prompt, "clip_t_prompt": text_prompts[k], "images": list(paths),
            "clip_t": float(clip_t["per_image_cosine"][sel].mean()),
            "clip_i": float(clip_i["per_generated_cosine"][sel].mean()),
            "dino": float(dino_s["per_generated_cosine"][sel].mean()) if dino_s else None})
    for s in (clip_t, clip_i, dino_s):
        if s:
            s.pop("per_image_cosine", None)
            s.pop("per_generated_cosine", None)
    return {"scores": {"clip_t": clip_t, "clip_i": clip_i, "dino": dino_s}, "prompts": prompts,
            "real_images": list(real_paths), "identifier_removed": identifier or None}


# --------------------------------------------------------------------------- output

def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x


def write_json(path: str, data: Dict[str, Any], overwrite: bool = True) -> None:
    """Write `data` as indented JSON through a temporary file (never a half-written result)."""
    path = os.path.expanduser(path)
    if os.path.exists(path) and not overwrite:
        raise UserError(f"{path} already exists (pass --overwrite True to replace it)")
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(_jsonable(data), f, indent=2, ensure_ascii=False)
        f.write("\n")


def thumbnail_grid(paths: Sequence[str], size: int = 128, max_images: int = 16) -> Image.Image:
    """A grid of centre-cropped `size` px thumbnails of (at most `max_images` of) `paths`."""
    thumbs = [np.asarray(resize_center_crop(open_rgb(p), size)) for p in paths[:max_images]]
    return make_grid(thumbs, rows=max(1, int(np.ceil(len(thumbs) / 4))) if len(thumbs) > 4 else 1)


def _fmt(x: Optional[float], scale: float = 1.0, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x * scale:.{digits}f}"


def _md(text: str) -> str:
    """Prompt text safe inside a markdown table cell or heading."""
    return html.escape(text).replace("|", "&#124;").replace("*", "&#42;").replace("_", "&#95;")


def write_dreambooth_report(folder: str, results: Dict[str, Any], overwrite: bool = False) -> Dict[str, str]:
    """Write `results.json`, `report.md` and `grids/*.png` (one grid per prompt and one of the real
    images) into `folder`; returns their paths. An existing report needs `overwrite`."""
    folder = os.path.expanduser(folder)
    json_path, md_path = os.path.join(folder, "results.json"), os.path.join(folder, "report.md")
    for path in (json_path, md_path):
        if os.path.exists(path) and not overwrite:
            raise UserError(f"{path} already exists (pass --overwrite True to replace it)")
    grids = os.path.join(folder, "grids")
    os.makedirs(grids, exist_ok=True)
    real_grid = os.path.join("grids", "real_images.png")
    save_png(np.asarray(thumbnail_grid(results["real_images"])), os.path.join(folder, real_grid))
    for k, entry in enumerate(results["prompts"]):
        entry["grid"] = os.path.join("grids", f"prompt_{k:03d}.png")
        save_png(np.asarray(thumbnail_grid(entry["images"])), os.path.join(folder, entry["grid"]))
    results["real_images_grid"] = real_grid
    write_json(json_path, results, overwrite=True)

    s, models = results["scores"], results["models"]
    lines = ["# DreamBooth evaluation", "",
             f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} · backend `{results['backend']}` · "
             f"{sum(len(e['images']) for e in results['prompts'])} generated images for "
             f"{len(results['prompts'])} prompt(s) · {len(results['real_images'])} real (instance) images", ""]
    for role in ("clip", "dino"):
        m = models.get(role)
        if m and m.get("description"):
            lines += [f"> **Note ({role.upper()} model):** {m['description']}", ""]
    t = s["clip_t"]
    paper, real = PAPER_REFERENCE["dreambooth_sd"], PAPER_REFERENCE["real_images"]

    def row(label, score, key=None, x100=None):
        cos = score["cosine"] if score and x100 is None else None
        shown = _fmt(x100, 1, 2) if x100 is not None else _fmt(cos, 100, 2)
        pairs = (score["pairs"] if score else "not computed") if key else ""
        return (f"| {label} | {_fmt(cos) if x100 is None else ''} | {shown} | {paper.get(key, '')} | "
                f"{real.get(key, 'n/a' if key else '')} | {pairs} |")

    lines += ["| metric | cosine | x100 | DreamBooth paper (SD) | real images | pairs |",
              "| --- | --- | --- | --- | --- | --- |",
              row("CLIP-T", t, "clip_t"),
              row("CLIP-T, torchmetrics max(mean, 0)", t, x100=t["torchmetrics"]),
              row("CLIP-T, per-pair clamp mean(max(100 cos, 0))", t, x100=t["x100_clamped_pairs"]),
              row("CLIP-I", s["clip_i"], "clip_i"), row("DINO", s["dino"], "dino"), ""]
    lines += ["Definitions: " + "; ".join(f"**{k}** = {v}" for k, v in DEFINITIONS.items()) + ". "
              "Paper numbers are for reference only: they depend on the backbone (not named in the paper) "
              "and never compare across CLIP variants or scales.", ""]
    if results.get("identifier_removed"):
        lines += [f"CLIP-T prompts had the identifier `{results['identifier_removed']}` removed.", ""]
    lines += ["## Models", ""]
    for role in ("clip", "dino"):
        m = models.get(role)
        if m:
            lines.append(f"- {role.upper()}: `{m['architecture']}` from `{m['weights']}` ({m['format']}), "
                         f"{m['backend']} backend, {m['library']}")
        else:
            lines.append(f"- {role.upper()}: not computed (no --dino_ckpt_path)")
    lines += ["", PREPROCESS_HELP, "", f"## Real (instance) images ({len(results['real_images'])})", "",
              f"![real images]({real_grid})", ""]
    for k, e in enumerate(results["prompts"]):
        lines += [f"## Prompt {k + 1}: {_md(e['prompt'])}", "",
                  f"CLIP-T {_fmt(e['clip_t'])} · CLIP-I {_fmt(e['clip_i'])} · DINO {_fmt(e['dino'])} · "
                  f"{len(e['images'])} image(s)", "", f"![prompt {k + 1}]({e['grid']})", ""]
    with atomic_path(md_path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return {"json": json_path, "report": md_path, "grids": grids}
