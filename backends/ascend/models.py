"""Stable Diffusion for the MindSpore backend: the three models under one Cell whose parameter
names are MindONE's checkpoint layout, and weight loading into it.

    StableDiffusion
      model.diffusion_model.*   UNetModel        (backends.ascend.unet)
      first_stage_model.*       AutoencoderKL    (backends.ascend.vae)
      cond_stage_model.transformer.*  TextTransformer (backends.ascend.text_encoder)

so `mindspore.load_param_into_net(StableDiffusion(arch), mindspore.load_checkpoint(path))` loads
a MindONE `.ckpt` as it is. The components also work on their own (names then lack the prefix).
"""
from __future__ import annotations

from typing import Dict, Iterable, Set

import numpy as np
from mindspore import Tensor, nn

from common.arch import ModelArch
from common.formats.checkpoint_io import BF16, cast_array
from common.errors import UserError
from common.formats.mindspore_layout import ldm_to_mindspore, legacy_vae_norm_name, mindspore_entries
from .layers import FP32, compute_dtype
from .text_encoder import TextTransformer
from .unet import UNetModel
from .vae import AutoencoderKL

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."


class _DiffusionWrapper(nn.Cell):
    """LDM's DiffusionWrapper: only here for the `model.diffusion_model.` name level."""

    def __init__(self, unet: UNetModel):
        super().__init__()
        self.diffusion_model = unet


class _CondStage(nn.Cell):
    """MindONE's FrozenCLIPEmbedder / FrozenOpenCLIPEmbedder: the `cond_stage_model.transformer.` level."""

    def __init__(self, text: TextTransformer):
        super().__init__()
        self.transformer = text


class StableDiffusion(nn.Cell):
    """UNet, VAE and text encoder of one architecture, named like a MindONE checkpoint.

    `dtype`: compute dtype of Dense / Conv layers (float32, or float16 for MindONE-style mixed
    precision on Ascend; norms and softmax stay float32). `dropout`: UNet dropout (training only).
    """

    def __init__(self, arch: ModelArch, dtype=FP32, dropout: float = 0.0):
        super().__init__()
        dtype = compute_dtype(dtype)
        self.arch = arch
        self.model = _DiffusionWrapper(UNetModel(arch.unet, dtype, dropout))
        self.first_stage_model = AutoencoderKL(arch.vae, dtype)
        self.cond_stage_model = _CondStage(TextTransformer(arch.text, dtype))

    @property
    def unet(self) -> UNetModel:
        return self.model.diffusion_model

    @property
    def vae(self) -> AutoencoderKL:
        return self.first_stage_model

    @property
    def text_encoder(self) -> TextTransformer:
        return self.cond_stage_model.transformer


def build_models(arch: ModelArch, dtype=FP32, dropout: float = 0.0) -> StableDiffusion:
    """A zero-initialised StableDiffusion (load weights next); instant even at full size."""
    return StableDiffusion(arch, dtype, dropout)


def parameter_shapes(net: nn.Cell) -> Dict[str, tuple]:
    """Parameter name -> shape, as a checkpoint of `net` would list them."""
    return {p.name: tuple(p.shape) for p in net.get_parameters()}


def load_mindspore(net: nn.Cell, params: Dict[str, np.ndarray], prefix: str = "",
                   strict: bool = True, optional: Iterable[str] = (), what: str = "checkpoint") -> None:
    """Copy MindONE-layout arrays into `net`'s parameters (cast to the parameter dtype).

    `params` keys are full MindONE names; `prefix` is prepended to `net`'s own parameter names
    when `net` is a component built on its own (e.g. "model.diffusion_model." for a UNetModel).
    strict: every parameter must be present, and no tensor under `prefix` may be left over except
    the `optional` names (tensors SD does not run, see `optional_names`). Shapes must match
    exactly. VAE GroupNorms written as weight / bias (before MindONE's gamma / beta was followed)
    are accepted; fp16 / bf16 arrays (MindONE
    stores its embedding tables in Float16) are cast to the parameter dtype.
    """
    used, missing, bad = set(), [], []
    for p in net.get_parameters():
        key = prefix + p.name
        if key not in params:
            legacy = legacy_vae_norm_name(key)
            key = legacy if legacy in params else key
        if key not in params:
            missing.append(prefix + p.name)
            continue
        value = np.asarray(params[key])
        if value.dtype == BF16:                 # checkpoint_io keeps bf16 as raw bits
            value = cast_array(value, "fp32")
        if tuple(value.shape) != tuple(p.shape):
            bad.append(f"{key} {tuple(value.shape)} != {tuple(p.shape)}")
            continue
        p.set_data(Tensor(value, dtype=p.dtype))
        used.add(key)
    if bad:
        raise UserError(f"{what}: {len(bad)} tensor(s) have the wrong shape for this model config "
                        f"(wrong --config for the checkpoint?): {', '.join(bad[:4])}")
    if strict and missing:
        raise UserError(f"{what} lacks {len(missing)} tensor(s) the model needs: "
                        f"{', '.join(sorted(missing)[:5])}{' ...' if len(missing) > 5 else ''}")
    if strict:
        optional = set(optional)
        extra = sorted(k for k in params if k.startswith(prefix) and k not in used
                       and k not in optional)
        if extra:
            raise UserError(f"{what} has {len(extra)} tensor(s) the model does not define: "
                            f"{', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")


def optional_names(arch: ModelArch) -> Set[str]:
    """MindONE-layout names a checkpoint may carry that the model does not run (text blocks past
    `used_layers`, OpenCLIP's text_projection / logit_scale); loading skips them."""
    return {e.ms for e in mindspore_entries(arch) if e.optional}


def load_original(net: nn.Cell, sd: Dict[str, np.ndarray], arch: ModelArch, prefix: str = "",
                  strict: bool = True) -> None:
    """Load an original single-file (LDM layout) state dict into `net` (a StableDiffusion, or a
    component with its `prefix`) through `common.formats.mindspore_layout.ldm_to_mindspore` (renames,
    SD1 q/k/v fused into in_proj, validation)."""
    load_mindspore(net, ldm_to_mindspore(sd, arch), prefix=prefix, strict=strict,
                   optional=optional_names(arch))
