"""Weights from any source a user names: a model checkpoint in any supported format -> the original
single-file layout (`load_model_weights`), a LoRA file or training LoRA folder -> a LoraSet
(`load_lora_file`). The top of `common.formats`: it uses the file readers and every key map."""
from __future__ import annotations

import os
from typing import Dict, Optional

import numpy as np

from common.arch import ModelArch, load_arch
from common.errors import UserError
from common.formats import keymap, mindspore_layout
from common.formats.checkpoint_io import (checkpoint_format, load_diffusers_folder, load_state_dict,
                                          safetensors_metadata)
from common.formats.lora import (DIFFUSERS_WEIGHT_NAME, KOHYA_WEIGHT_NAME, MINDSPORE_WEIGHT_NAME, LoraSet,
                                 from_state_dict)
from common.formats.mindspore_layout import is_mindspore_lora, lora_from_mindspore


DEFAULT_MODEL_CONFIG = "configs/v2-inference.yaml"      # MindONE's default architecture


def model_arch(config: Optional[str], weights_path: Optional[str]) -> ModelArch:
    """The architecture a run uses: the yaml given; otherwise, for a diffusers folder, the one its
    configs describe (diffusers users pass no yaml); otherwise MindONE's default (SD 2.x)."""
    if config:
        return load_arch(config)
    if weights_path and os.path.isdir(weights_path) and checkpoint_format(weights_path) == "diffusers":
        from common.formats.diffusers_arch import arch_from_diffusers
        return arch_from_diffusers(weights_path)
    return load_arch(DEFAULT_MODEL_CONFIG)


def load_model_weights(path: str, arch, *, ema: bool = False, keep_bf16: bool = False,
                       parts=None) -> Dict[str, np.ndarray]:
    """Weights in the original single-file layout from any supported source: an original-layout
    .safetensors / torch pickle, a MindONE MindSpore .ckpt, or a diffusers folder. Only known
    tensors are returned (buffers dropped); `ema` takes the UNet from model_ema.*; `parts`
    (default: whichever the source has) limits the parts. Unknown or missing tensors raise
    UserError listing them."""
    kind = checkpoint_format(path)
    if kind == "diffusers":
        if ema:
            raise UserError(f"{path}: a diffusers folder has no EMA weights to choose")
        comps = load_diffusers_folder(path, keep_bf16=keep_bf16)
        if parts is not None:
            comps = {c: v for c, v in comps.items() if c in parts or c == "extras"}
        return keymap.diffusers_to_ldm(comps, arch)
    sd = load_state_dict(path, keep_bf16=keep_bf16)
    if kind == "mindspore":
        if ema:
            raise UserError(f"{path}: MindONE checkpoints hold no separate EMA weights")
        return mindspore_layout.mindspore_to_ldm(sd, arch, parts=parts)
    return mindspore_layout.canonical_ldm(sd, arch, parts=parts, ema=ema)


def base_model_version(metadata: Dict[str, str]) -> Optional[str]:
    """"sd1", "sd2" or "sdxl" as a kohya LoRA's metadata states it (ss_base_model_version, else
    ss_v2), or None when it does not say."""
    version = metadata.get("ss_base_model_version", "").lower()
    if version.startswith("sdxl"):
        return "sdxl"
    if version.startswith(("sd_v1", "sd_1")):
        return "sd1"
    if version.startswith(("sd_v2", "sd_2")):
        return "sd2"
    v2 = metadata.get("ss_v2", "").lower()
    return {"true": "sd2", "false": "sd1"}.get(v2)


def check_base_model(metadata: Dict[str, str], arch: ModelArch, path: str) -> None:
    """A LoRA whose metadata names another base model than `arch` is a one-line error."""
    names = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
    wanted = base_model_version(metadata)
    if wanted is not None and wanted != arch.version:
        raise UserError(f"LoRA {path} was trained for {names[wanted]} (its metadata says so) but "
                        f"{arch.path} is {names[arch.version]}: use a LoRA for this model or the "
                        f"matching --config")


def _lora_file(path: str) -> str:
    """A LoRA file, or the file inside a training LoRA folder (the kohya one first: it carries
    the metadata)."""
    if not os.path.isdir(path):
        if not os.path.isfile(path):
            raise UserError(f"LoRA file not found: {path}")
        return path
    names = (KOHYA_WEIGHT_NAME, DIFFUSERS_WEIGHT_NAME, MINDSPORE_WEIGHT_NAME)
    found = [os.path.join(path, n) for n in names if os.path.isfile(os.path.join(path, n))]
    if not found:
        raise UserError(f"no {', '.join(names)} in LoRA folder {path}")
    return found[0]


def load_lora_file(path: str, arch: ModelArch) -> LoraSet:
    """A LoRA (LoCon, LoHa, LoKr, ...) from a file in any supported format (kohya / LyCORIS,
    diffusers, PEFT, MindONE's MindSpore .ckpt), or from a training checkpoint folder."""
    path = _lora_file(path)
    check_base_model(safetensors_metadata(path), arch, path)
    sd = load_state_dict(path)
    return lora_from_mindspore(sd, arch) if is_mindspore_lora(sd) else from_state_dict(sd, arch)


def lora_clip_skip(paths) -> Optional[int]:
    """The clip skip kohya's metadata (`ss_clip_skip`) records for the first of `paths` that states
    one, or None."""
    for path in paths:
        value = safetensors_metadata(_lora_file(path)).get("ss_clip_skip", "None")
        if value.strip().isdigit() and int(value) >= 1:
            return int(value)
    return None
