"""MindSpore backend (`--backend ascend`): Stable Diffusion as MindSpore Cells in MindONE's
checkpoint layout, running on Ascend or, for development and CI, on CPU, in GRAPH_MODE or
PYNATIVE_MODE.

Modules (imported on first use, so `import backends.ascend` does not load MindSpore):

- layers:        Dense / Conv2d with a compute dtype, float32 norms, attention, timestep embedding
- unet:          UNetModel (LDM openaimodel; SD1 conv / SD2 linear proj_in, per-level heads)
- vae:           AutoencoderKL (encode -> mean, logvar; decode)
- text_encoder:  TextTransformer (SD1 CLIP, SD2 OpenCLIP penultimate layer)
- models:        StableDiffusion (all three under MindONE's names), build_models, load_original,
                 load_mindspore
- lora:          LoRADense, LoRAConv2d, inject_lora, fold_lora, remove_lora, export_lora
- pipeline:      Pipeline (the backend interface for text_to_image and class images)
"""
from __future__ import annotations

import os
import tempfile

# MindSpore writes rank_0/om/analyze_fail.ir into the working directory when a graph fails to
# compile (it reads MS_OM_PATH when it writes): keep it out of the user's folders.
os.environ.setdefault("MS_OM_PATH", os.path.join(tempfile.gettempdir(), f"dualbooth-mindspore-{os.getuid()}"))

_EXPORTS = {
    "StableDiffusion": "models", "build_models": "models", "load_original": "models",
    "load_mindspore": "models", "parameter_shapes": "models", "optional_names": "models",
    "UNetModel": "unet", "AutoencoderKL": "vae", "TextTransformer": "text_encoder",
    "LoRADense": "lora", "LoRAConv2d": "lora", "inject_lora": "lora", "fold_lora": "lora",
    "remove_lora": "lora", "export_lora": "lora", "lora_parameters": "lora",
    "Pipeline": "pipeline", "Trainer": "trainer", "process_group": "device",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    from backends import lazy_export
    return lazy_export(__name__, _EXPORTS, name, ("mindspore",), "ascend")
