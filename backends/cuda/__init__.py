"""PyTorch/CUDA backend: diffusers/transformers/PEFT models, accelerate for data parallelism.

Submodules are imported on first use, so e.g. the evaluation tools do not pay for diffusers:

- device:       CUDA when present, else CPU; compute dtype; process_group (data-parallel place)
- models:       UNet2DConditionModel / AutoencoderKL / CLIPTextModel from an architecture config
- lora:         PEFT adapters for training, merged LoRA for inference
- pipeline:     Pipeline (the backend interface for text_to_image and class images)
- trainer:      Trainer (the backend interface for train_dreambooth)
- eval_models:  open_clip / transformers CLIP and timm DINO encoders for tools/eval
"""
from __future__ import annotations

_EXPORTS = {"Pipeline": "pipeline", "Trainer": "trainer", "process_group": "device",
            "ClipEncoder": "eval_models", "DinoEncoder": "eval_models"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    from backends import lazy_export
    return lazy_export(__name__, _EXPORTS, name,
                       ("torch", "diffusers", "transformers", "peft", "accelerate", "open_clip", "timm"), "cuda")
