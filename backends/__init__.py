"""Backends: PyTorch/CUDA (`cuda`) and MindSpore/Ascend (`ascend`), imported lazily by name.

Both implement the same small interface, which everything in `common/` drives:

- ``Pipeline(arch, weights, precision=..., lora=None, lora_scale=1.0)`` for inference:
  ``encode_text(ids) -> context``, ``predict(x, t, context) -> model output``,
  ``decode(latents) -> images in [-1, 1]`` (numpy in, numpy out; the sampler arithmetic and
  classifier-free guidance live in ``common.samplers``).
- ``Trainer(arch, weights, args, lora_init)`` for training: ``train_step(batch, lr, update)``,
  ``export_weights()``, ``export_lora()``, ``save_state(path)``, ``load_state(path)``,
  ``pipeline()`` (for validation and class images), ``rank``/``world_size``.

Weights cross the boundary as original-layout ``{name: numpy array}`` dicts (see common.keymap);
backends never parse checkpoint files themselves.
"""
from __future__ import annotations

import importlib

from common.config import BACKEND_ALIASES
from common.errors import UserError

_MODULES = {"cuda": "backends.cuda", "ascend": "backends.ascend"}
_PACKAGES = {"cuda": "torch, diffusers and transformers (pip install -e '.[cuda]')",
             "ascend": "mindspore (pip install -e '.[ascend]')"}


def load_backend(name: str):
    """The backend module for 'cuda' or 'ascend' (MindONE's 'pt'/'ms' accepted)."""
    key = BACKEND_ALIASES.get(str(name).lower())
    if key is None:
        raise UserError(f"unknown backend {name!r}; use cuda or ascend")
    try:
        return importlib.import_module(_MODULES[key])
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] in ("torch", "diffusers", "transformers", "peft", "mindspore", "accelerate"):
            raise UserError(f"backend {key} needs {_PACKAGES[key]}: {e.name} is not installed") from None
        raise
