"""LoRA training on the PyTorch backend: PEFT adapters on any Linear / Conv2d target. (Inference
merges LoRA files of any kind into the weights before the model is built: common.formats.lora.merge_loras.)

Adapters are injected with peft's own `inject_adapter_in_model` on the UNet and the text encoder
alike, not through diffusers' / transformers' `add_adapter` integrations: those gate on their own
idea of the peft version (transformers 5 refuses every peft the registry had when this was
written), while peft's API has been stable since 0.6."""
from __future__ import annotations

from typing import Dict

import numpy as np
import torch
from peft import LoraConfig, inject_adapter_in_model

from common.formats.lora import LoraPair, LoraSet
from common.errors import UserError


def _module(root: torch.nn.Module, path: str) -> torch.nn.Module:
    """Find a module by its on-disk path, with or without transformers' `text_model.` level."""
    for candidate in (path, "text_model." + path, path.removeprefix("text_model.")):
        try:
            return root.get_submodule(candidate)
        except AttributeError:
            continue
    raise UserError(f"LoRA layer {path} not found in the model")


def _roots(unet, text_encoder) -> Dict[str, torch.nn.Module]:
    return {"unet": unet, "text_encoder": text_encoder}


def add_adapters(unet, text_encoder, lora: LoraSet, rank: int, alpha: float, dropout: float = 0.0) -> None:
    """Attach trainable PEFT adapters to exactly the targets of `lora` (Linear, or Conv2d with a
    kernel-sized down and a 1x1 up: LoCon) and set them to its (seeded) initial values."""
    roots = _roots(unet, text_encoder)
    for component, root in roots.items():
        paths = sorted(t.split(":", 1)[1] for t in lora if t.startswith(component + ":"))
        if paths:
            names = {n for n, _ in root.named_modules()}
            modules = [p if p in names else "text_model." + p for p in paths]
            # initial values are set below from the shared seeded streams, so peft's own init is moot
            inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=modules,
                                               lora_dropout=dropout, init_lora_weights="gaussian"), root)
    with torch.no_grad():
        for target, pair in lora.items():
            component, path = target.split(":", 1)
            layer = _module(roots[component], path)
            layer.lora_A["default"].weight.copy_(torch.from_numpy(pair.down))
            layer.lora_B["default"].weight.copy_(torch.from_numpy(pair.up))


def lora_parameters(unet, text_encoder, targets) -> Dict[str, torch.nn.Parameter]:
    roots = _roots(unet, text_encoder)
    out = {}
    for target in targets:
        component, path = target.split(":", 1)
        layer = _module(roots[component], path)
        out[target + ".down"] = layer.lora_A["default"].weight
        out[target + ".up"] = layer.lora_B["default"].weight
    return out


def export_lora(unet, text_encoder, targets, alpha: float) -> LoraSet:
    params = lora_parameters(unet, text_encoder, targets)
    def copy(p: torch.Tensor) -> np.ndarray:  # a copy, never a view of the live (possibly swapped) weights
        return p.detach().to("cpu", torch.float32, copy=True).numpy()

    return {t: LoraPair(down=copy(params[t + ".down"]), up=copy(params[t + ".up"]), alpha=float(alpha))
            for t in targets}
