"""Inference on the PyTorch backend: text encoder, UNet and VAE decoder behind numpy in/out."""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch

from common.arch import ModelArch
from .device import compute_dtype, pick_device
from .models import load_models


class Pipeline:
    def __init__(self, arch: ModelArch, weights: Optional[Dict[str, np.ndarray]] = None, *,
                 precision: str = "auto", models=None, device: Optional[torch.device] = None):
        self.arch = arch
        self.device = device or pick_device()
        self.dtype = compute_dtype(precision, self.device)
        if models is None:
            unet, vae, text, _ = load_models(arch, weights)
            models = (unet, vae, text)
            for m in models:
                m.to(self.device).eval().requires_grad_(False)
                if self.dtype != torch.float32:
                    m.to(self.dtype)
        self.unet, self.vae, self.text_encoder = models
        self.device_name = str(self.device)

    @torch.no_grad()
    def encode_text(self, ids: np.ndarray) -> torch.Tensor:
        # on the text encoder's own device: a trainer may keep a frozen one in host memory
        ids = torch.from_numpy(np.asarray(ids, np.int64)).to(self.text_encoder.device)
        return self.text_encoder(ids)[0].to(self.device, self.dtype)

    def concat_context(self, parts) -> torch.Tensor:
        """Contexts of a long prompt's chunks, joined along the sequence axis."""
        return torch.cat(list(parts), dim=1)

    @torch.no_grad()
    def predict(self, x: np.ndarray, t: int, context: torch.Tensor) -> np.ndarray:
        sample = torch.from_numpy(np.asarray(x, np.float32)).to(self.device, self.dtype)
        timestep = torch.full((sample.shape[0],), int(t), device=self.device, dtype=torch.long)
        out = self.unet(sample, timestep, encoder_hidden_states=context.to(self.dtype)).sample
        return out.float().cpu().numpy()

    @torch.no_grad()
    def decode(self, latents: np.ndarray) -> np.ndarray:
        z = torch.from_numpy(np.asarray(latents, np.float32) / self.arch.scale_factor)
        images = self.vae.decode(z.to(self.device, self.vae.dtype)).sample
        return images.float().cpu().numpy()
