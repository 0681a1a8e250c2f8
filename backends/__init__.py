"""Backends: PyTorch/CUDA (`cuda`) and MindSpore/Ascend (`ascend`), imported lazily by name.

Both implement the same small interface, which everything in `common/` drives:

- ``Pipeline(arch, weights, precision=...)`` for inference (LoRA files are merged into the
  weights beforehand, once for both backends: ``common.formats.lora.merge_loras``):
  ``encode_text(ids [B, 77]) -> context``, ``concat_context(contexts) -> context`` (a long
  prompt's chunks joined along the sequence axis), ``predict(x, t, context) -> model output``,
  ``decode(latents) -> images in [-1, 1]`` (numpy in, numpy out; the sampler arithmetic and
  classifier-free guidance live in ``common.diffusion.samplers``).
- ``Trainer(arch, weights, args, lora_init)`` for training: ``train_step(batch, lr, update)``,
  ``export_weights()``, ``export_lora()``, ``save_state(path)``, ``load_state(path)``,
  ``pipeline()`` (for validation and class images), ``rank``/``world_size``.

Weights cross the boundary as original-layout ``{name: numpy array}`` dicts (see common.formats.keymap);
backends never parse checkpoint files themselves.
"""
from __future__ import annotations

import importlib

from common.config import BACKEND_ALIASES
from common.errors import UserError

_MODULES = {"cuda": "backends.cuda", "ascend": "backends.ascend"}
_PACKAGES = {"cuda": "torch, diffusers and transformers (pip install -e '.[cuda]')",
             "ascend": "mindspore (pip install -e '.[ascend]')"}


def lazy_export(package: str, exports: dict, name: str, frameworks: tuple, backend: str):
    """Module-level __getattr__ body of a backend package: import the submodule that defines
    `name` on first use; a missing framework is a one-line UserError naming what to install."""
    if name not in exports:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    try:
        module = importlib.import_module(f"{package}.{exports[name]}")
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] in frameworks:
            raise UserError(f"backend {backend} needs {e.name} ({_PACKAGES[backend]}): it is not installed") from None
        raise
    return getattr(module, name)


def load_backend(name: str):
    """The backend package for 'cuda' or 'ascend' (MindONE's 'pt'/'ms' accepted). Its framework is
    imported on first use of Pipeline / Trainer."""
    key = BACKEND_ALIASES.get(str(name).lower())
    if key is None:
        raise UserError(f"unknown backend {name!r}; use cuda or ascend")
    return importlib.import_module(_MODULES[key])
