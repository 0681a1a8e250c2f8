"""Textual-inversion embeddings: files -> trigger word + vectors, and a model that knows them.

Formats, told apart by their contents (a `.pt` / `.bin` is read by the torch-free unpickler, so a
file that would run code is refused):

* A1111 / civitai `.pt`: {"string_to_param": {"*": [n, width]}, "string_to_token", "name", ...};
* A1111's `.safetensors` form: {"emb_params": [n, width]};
* diffusers' `learned_embeds.bin` / `.safetensors`: {token: [width] or [n, width]};
* MindONE's textual-inversion `.ckpt` (MindSpore): the learned rows of the embedding table, with
  `placeholder_token` and `num_vectors` beside them.

The trigger word is the file's name without extension for A1111's forms (A1111's rule; the `name`
inside a .pt is ignored, as A1111 ignores it), and the token stored in the file for diffusers' and
MindONE's forms. A model learns the embeddings as new rows of its token-embedding table in the
original-layout weights, a vocabulary grown to match (`ModelArch.with_extra_tokens`, which both
backends build from) and trigger words in the tokenizer (`CLIPTokenizer.add_trigger`).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np

from common.arch import ModelArch
from common.errors import UserError
from common.formats.checkpoint_io import (BF16, cast_array, load_mindspore_ckpt_with_strings, load_state_dict,
                                          load_torch_object, sniff_format)
from common.formats.keymap import token_embedding_name

log = logging.getLogger("embeddings")

MAX_VECTORS = 75                 # one prompt chunk (77 ids less SOT and EOT) must hold an embedding
_MODELS = {768: "SD 1.x", 1024: "SD 2.x", 1280: "SDXL"}


@dataclass(frozen=True)
class Embedding:
    trigger: str                 # the word that stands for the vectors in prompts
    vectors: np.ndarray          # float [n, width]
    path: str


def _vectors(x, path: str) -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.ndim not in (1, 2) or \
            not (x.dtype == BF16 or np.issubdtype(x.dtype, np.floating)):
        raise UserError(f"{path}: the embedding is not a float vector or [n, width] matrix "
                        f"({getattr(x, 'shape', type(x).__name__)})")
    x = cast_array(x, "fp32") if x.dtype == BF16 else x
    x = x[None] if x.ndim == 1 else x
    if not 1 <= len(x) <= MAX_VECTORS:
        raise UserError(f"{path}: the embedding has {len(x)} vectors; 1 to {MAX_VECTORS} fit in a prompt")
    return np.ascontiguousarray(x)


def _from_dict(obj, path: str, stem: str) -> Tuple[str, np.ndarray]:
    if not isinstance(obj, dict):
        raise UserError(f"{path}: holds a {type(obj).__name__}, not a textual-inversion embedding")
    if "clip_l" in obj or "clip_g" in obj:
        raise UserError(f"{path}: an SDXL embedding (clip_l / clip_g); this model is SD 1.x / 2.x")
    if "string_to_param" in obj:                                   # A1111 / civitai .pt
        params = obj["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise UserError(f"{path}: string_to_param must hold exactly one embedding "
                            f"({len(params) if isinstance(params, dict) else type(params).__name__})")
        return stem, next(iter(params.values()))
    if "emb_params" in obj:                                        # A1111's .safetensors form
        return stem, obj["emb_params"]
    if len(obj) == 1 and isinstance(next(iter(obj)), str):          # diffusers: {token: vectors}
        return next(iter(obj.items()))
    raise UserError(f"{path}: not a textual-inversion embedding (expected string_to_param, emb_params "
                    f"or one {{token: vectors}} entry; found {', '.join(map(str, list(obj)[:4]))})")


def read_embedding(path: str) -> Embedding:
    """One embedding file in any of the formats above."""
    if not os.path.isfile(path):
        raise UserError(f"textual-inversion embedding not found: {path}")
    stem = os.path.splitext(os.path.basename(path))[0]
    kind = sniff_format(path)
    if kind == "safetensors":
        trigger, x = _from_dict(load_state_dict(path), path, stem)
    elif kind == "torch":
        trigger, x = _from_dict(load_torch_object(path), path, stem)
    elif kind == "mindspore":                                      # MindONE's _ti.ckpt
        tensors, strings = load_mindspore_ckpt_with_strings(path)
        tables = [v for v in tensors.values() if v.ndim == 2]
        if len(tables) != 1:
            raise UserError(f"{path}: a MindSpore checkpoint, but not MindONE's textual-inversion file "
                            f"(expected one embedding table, found {len(tables)} matrices)")
        trigger, x = strings.get("placeholder_token") or stem, tables[0]
    else:
        raise UserError(f"{path}: not a readable textual-inversion embedding (neither a PyTorch, "
                        f"safetensors nor MindSpore file; truncated or corrupt?)")
    if not isinstance(trigger, str) or not trigger.strip():
        raise UserError(f"{path}: the embedding's token {trigger!r} is not a usable word")
    return Embedding(trigger.strip(), _vectors(x, path), path)


def _model_name(width: int) -> str:
    return f" ({_MODELS[width]})" if width in _MODELS else ""


def read_embeddings(paths: Sequence[str], arch: ModelArch) -> List[Embedding]:
    """Every file of `paths`, checked against the model: vector width, distinct trigger words."""
    out: List[Embedding] = []
    seen: Dict[str, str] = {}
    for path in paths:
        e = read_embedding(path)
        width, want = e.vectors.shape[1], arch.text.width
        if width != want:
            raise UserError(f"{path}: embedding vectors are {width} wide{_model_name(width)} but the text "
                            f"encoder of {os.path.basename(arch.path)} is {want} wide{_model_name(want)}: "
                            f"use an embedding trained for this model")
        key = e.trigger.lower()
        if key in seen:
            raise UserError(f"{path}: trigger word {e.trigger!r} is also the trigger of {seen[key]}; "
                            f"rename one of the files")
        seen[key] = path
        out.append(e)
    return out


def add_embeddings(embeddings: Sequence[Embedding], weights: Dict[str, np.ndarray], arch: ModelArch,
                   tokenizer) -> ModelArch:
    """Append the vectors to the token-embedding table in `weights` (original layout, changed in
    place), give each trigger word its new ids in `tokenizer`, and return `arch` with the grown
    vocabulary that both backends build."""
    if not embeddings:
        return arch
    name = token_embedding_name(arch)
    table = weights.get(name)
    if table is None or table.shape != (arch.text.vocab_size, arch.text.width):
        raise UserError(f"textual inversion needs the text encoder's token embedding {name} "
                        f"[{arch.text.vocab_size}, {arch.text.width}] in the checkpoint")
    rows = [e.vectors for e in embeddings]
    weights[name] = np.concatenate([table] + rows)     # fp16 table + fp32 vectors: fp32
    start = arch.text.vocab_size
    for e in embeddings:
        n = len(e.vectors)
        tokenizer.add_trigger(e.trigger, range(start, start + n))
        log.info("textual inversion: %r (%d vector%s) from %s", e.trigger, n, "s" * (n > 1), e.path)
        start += n
    return arch.with_extra_tokens(start - arch.text.vocab_size)
