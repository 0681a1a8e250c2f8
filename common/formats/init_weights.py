"""Deterministic random weights in the original single-file layout, for any architecture.

Used for the embedded tiny models (tools/make_tiny_model.py) and for
--unet_initialize_random. Drawn in numpy from common.rng, so both backends see the same model.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional

import numpy as np

from common.formats import keymap
from common.arch import ModelArch
from common.rng import Streams

_EMBEDDINGS = ("token_embedding", "position_embedding", "positional_embedding")


def init_tensor(name: str, shape, gen: np.random.Generator) -> np.ndarray:
    """Norm weights 1, biases 0, embeddings N(0, 0.02), other weights N(0, 1/fan_in) so that
    activations keep unit scale through a deep random network."""
    shape = tuple(int(s) for s in shape)
    if name.endswith("logit_scale"):
        return np.asarray(np.log(1 / 0.07), np.float32)
    if name.endswith((".bias", "_bias", ".beta")):
        return np.zeros(shape, np.float32)
    if len(shape) == 1:  # every 1-D weight in SD is a GroupNorm/LayerNorm scale
        return np.ones(shape, np.float32)
    if any(e in name for e in _EMBEDDINGS):
        return (gen.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)
    fan_in = int(np.prod(shape[1:])) if name.endswith("weight") else shape[0]
    return (gen.standard_normal(shape, dtype=np.float32) / np.sqrt(fan_in)).astype(np.float32)


def random_weights(arch: ModelArch, seed: int = 0, prefixes: Optional[Iterable[str]] = None) -> Dict[str, np.ndarray]:
    """Every tensor of the original layout (optionally only those under `prefixes`)."""
    streams = Streams(seed)
    prefixes = tuple(prefixes) if prefixes else None
    out = {}
    for i, (name, shape) in enumerate(sorted(keymap.ldm_shapes(arch).items())):
        if prefixes and not name.startswith(prefixes):
            continue
        out[name] = init_tensor(name, shape, streams.generator("init", i))
    return out
