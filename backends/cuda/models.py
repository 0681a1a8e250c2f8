"""Stable Diffusion models for the PyTorch backend: diffusers' UNet2DConditionModel and
AutoencoderKL and transformers' CLIPTextModel, built from an architecture config and loaded from an
original-layout weight dict through common.formats.keymap."""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from common.formats import keymap
from common.arch import ModelArch
from common.errors import UserError

TEXT_PREFIX = "text_model."


def build_models(arch: ModelArch) -> Tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel]:
    unet = UNet2DConditionModel(**keymap.diffusers_unet_config(arch))
    vae = AutoencoderKL(**keymap.diffusers_vae_config(arch))
    text = CLIPTextModel(CLIPTextConfig(**keymap.clip_text_config(arch)))
    return unet, vae, text


def _live_names(module: torch.nn.Module, names: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """transformers >= 5.6 drops the `text_model.` level from live CLIPTextModel names; the files
    keep it. Adapt the file names to whatever this module uses."""
    live = set(module.state_dict())
    if any(k.startswith(TEXT_PREFIX) for k in live):
        return {(k if k.startswith(TEXT_PREFIX) else TEXT_PREFIX + k): v for k, v in names.items()}
    return {(k[len(TEXT_PREFIX):] if k.startswith(TEXT_PREFIX) else k): v for k, v in names.items()}


def load_weights(module: torch.nn.Module, weights: Dict[str, np.ndarray], what: str) -> None:
    """Strict load of numpy weights into a module (dtype follows the module)."""
    weights = _live_names(module, weights)
    own = module.state_dict()
    missing = sorted(k for k in own if k not in weights and not k.endswith("position_ids"))
    unexpected = sorted(k for k in weights if k not in own)
    if missing or unexpected:
        raise UserError(f"{what} weights do not fit the architecture: missing {missing[:5]}"
                        f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                        f"{'...' if len(unexpected) > 5 else ''}")
    for k, v in weights.items():
        if tuple(own[k].shape) != tuple(v.shape):
            raise UserError(f"{what} weight {k} has shape {tuple(v.shape)}, the architecture wants "
                            f"{tuple(own[k].shape)}: wrong --config for this checkpoint?")
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}
    module.load_state_dict(tensors, strict=False)


def module_weights(module: torch.nn.Module) -> Dict[str, np.ndarray]:
    """A module's weights as numpy float32 arrays under on-disk names (text_model. re-inserted)."""
    out = {}
    is_text = isinstance(module, CLIPTextModel)
    for k, v in module.state_dict().items():
        if k.endswith("position_ids"):
            continue
        if is_text and not k.startswith(TEXT_PREFIX):
            k = TEXT_PREFIX + k
        out[k] = v.detach().to("cpu", torch.float32, copy=True).numpy()  # a copy: not a view of live weights
    return out


def load_models(arch: ModelArch, weights: Dict[str, np.ndarray]):
    """Build the three models and load an original-layout weight dict into them (float32, CPU).
    Returns (unet, vae, text_encoder, parts) where parts is the diffusers view of `weights`."""
    parts = keymap.ldm_to_diffusers(weights, arch)
    unet, vae, text = build_models(arch)
    for module, key in ((unet, "unet"), (vae, "vae"), (text, "text_encoder")):
        if not parts.get(key):
            raise UserError(f"checkpoint has no {key} weights")
        load_weights(module, parts[key], key)
    return unet, vae, text, parts
