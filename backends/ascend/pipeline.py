"""Inference on the MindSpore backend: text encoder, UNet and VAE decoder behind numpy in/out,
compiled in GRAPH_MODE (one graph per input shape) or run in PYNATIVE_MODE."""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
from mindspore import Tensor, ops

from common.arch import ModelArch
from .device import compute_dtype, setup
from .models import build_models, load_original


class Pipeline:
    def __init__(self, arch: ModelArch, weights: Optional[Dict[str, np.ndarray]] = None, *,
                 precision: str = "auto", mode: int = 0, jit_level: Optional[str] = None, net=None):
        self.arch = arch
        self.target = setup(mode, jit_level)
        self.device_name = self.target
        if net is None:
            net = build_models(arch, compute_dtype(precision, self.target))
            load_original(net, weights, arch)
        net.set_train(False)
        self.net = net

    def encode_text(self, ids: np.ndarray) -> Tensor:
        return self.net.text_encoder(Tensor(np.asarray(ids, np.int32)))

    def concat_context(self, parts) -> Tensor:
        """Contexts of a long prompt's chunks, joined along the sequence axis."""
        return ops.concat(list(parts), 1)

    def predict(self, x: np.ndarray, t: int, context: Tensor) -> np.ndarray:
        x = np.asarray(x, np.float32)
        timesteps = Tensor(np.full((x.shape[0],), int(t), np.int32))
        return self.net.unet(Tensor(x), timesteps, context).asnumpy().astype(np.float32)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        z = Tensor(np.asarray(latents, np.float32) / np.float32(self.arch.scale_factor))
        return self.net.vae.decode(z).asnumpy().astype(np.float32)
