"""LoRA: which layers get adapters, their seeded initial values, and the file formats.

In memory a LoRA is a `LoraSet`: {target: LoraPair}, where a target is
`unet:<diffusers module path>` or `text_encoder:<module path without text_model.>`, and a pair holds
`down` [rank, in], `up` [out, rank] and `alpha` (the update is up @ down * alpha / rank). Both
backends train and apply exactly this; the formats below are views of it:

- diffusers (`pytorch_lora_weights.safetensors`, what `pipe.load_lora_weights` reads):
  `unet.<path>.lora.down.weight`, `text_encoder.text_model.<path>.lora_linear_layer.down.weight`;
  no alpha is stored, loaders assume alpha = rank, so we write down pre-scaled when alpha != rank.
- kohya (what A1111 and ComfyUI read): `lora_unet_<path with _>.lora_down.weight`, `.lora_up.weight`,
  `.alpha`; text encoder `lora_te_text_model_<path with _>`.
- PEFT state dicts (`<prefix><path>.lora_A.weight` / `lora_B`) are read too.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Tuple

import numpy as np

from common.arch import ModelArch
from common.errors import UserError
from common.rng import Streams

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHT_NAME = "lora_kohya.safetensors"
MINDSPORE_WEIGHT_NAME = "lora_mindspore.ckpt"   # MindONE's LoRA layout (common.formats.mindspore_layout)


@dataclass
class LoraPair:
    down: np.ndarray   # [rank, in]
    up: np.ndarray     # [out, rank]
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self, scale: float = 1.0) -> np.ndarray:
        """The weight update up @ down * alpha / rank * scale, in float32."""
        return (self.up.astype(np.float32) @ self.down.astype(np.float32)) * (self.alpha / self.rank * scale)


LoraSet = Dict[str, LoraPair]


def unet_attention_blocks(arch: ModelArch) -> List[Tuple[str, int]]:
    """(diffusers path of each Transformer2DModel's transformer block, its channel width)."""
    u = arch.unet
    out = []
    for level in range(u.levels):
        if u.has_attention(level):
            for j in range(u.num_res_blocks):
                for d in range(u.transformer_depth):
                    out.append((f"down_blocks.{level}.attentions.{j}.transformer_blocks.{d}", u.channels(level)))
    for d in range(u.transformer_depth):
        out.append((f"mid_block.attentions.0.transformer_blocks.{d}", u.channels(u.levels - 1)))
    for i, level in enumerate(reversed(range(u.levels))):
        if u.has_attention(level):
            for j in range(u.num_res_blocks + 1):
                for d in range(u.transformer_depth):
                    out.append((f"up_blocks.{i}.attentions.{j}.transformer_blocks.{d}", u.channels(level)))
    return out


def lora_targets(arch: ModelArch, unet: bool = True, text_encoder: bool = False) -> Dict[str, Tuple[int, int]]:
    """Every LoRA target of the model -> (in_features, out_features)."""
    targets: Dict[str, Tuple[int, int]] = {}
    if unet:
        ctx = arch.unet.context_dim
        for block, ch in unet_attention_blocks(arch):
            for attn in ("attn1", "attn2"):
                kv_in = ch if attn == "attn1" else ctx
                targets[f"unet:{block}.{attn}.to_q"] = (ch, ch)
                targets[f"unet:{block}.{attn}.to_k"] = (kv_in, ch)
                targets[f"unet:{block}.{attn}.to_v"] = (kv_in, ch)
                targets[f"unet:{block}.{attn}.to_out.0"] = (ch, ch)
    if text_encoder:
        w = arch.text.width
        for n in range(arch.text.used_layers):
            for proj in TEXT_TARGETS:
                targets[f"text_encoder:encoder.layers.{n}.self_attn.{proj}"] = (w, w)
    return targets


def init_lora(arch: ModelArch, rank: int, alpha: float, seed: int, unet: bool = True,
              text_encoder: bool = False) -> LoraSet:
    """Initial adapters, identical on both backends: down ~ N(0, (1/rank)^2) as MindONE and PEFT's
    'gaussian' init do, up = 0 so training starts from the base model."""
    streams = Streams(seed)
    out: LoraSet = {}
    for k, (target, (fan_in, fan_out)) in enumerate(sorted(lora_targets(arch, unet, text_encoder).items())):
        down = streams.normal("lora.init", (rank, fan_in), k) / rank
        out[target] = LoraPair(down=down, up=np.zeros((fan_out, rank), np.float32), alpha=float(alpha))
    return out


# ----------------------------------------------------------------------------- file formats

def _component_prefix(target: str) -> Tuple[str, str]:
    component, path = target.split(":", 1)
    return component, path


def to_diffusers(lora: LoraSet) -> Dict[str, np.ndarray]:
    out = {}
    for target, pair in lora.items():
        component, path = _component_prefix(target)
        # diffusers assumes alpha == rank: fold any other alpha into `down`.
        down = pair.down * np.asarray(pair.alpha / pair.rank, pair.down.dtype) if pair.alpha != pair.rank else pair.down
        if component == "unet":
            out[f"unet.{path}.lora.down.weight"] = down
            out[f"unet.{path}.lora.up.weight"] = pair.up
        else:
            out[f"text_encoder.text_model.{path}.lora_linear_layer.down.weight"] = down
            out[f"text_encoder.text_model.{path}.lora_linear_layer.up.weight"] = pair.up
    return out


def to_kohya(lora: LoraSet) -> Dict[str, np.ndarray]:
    out = {}
    for target, pair in lora.items():
        component, path = _component_prefix(target)
        name = ("lora_unet_" + path if component == "unet" else "lora_te_text_model_" + path).replace(".", "_")
        out[f"{name}.lora_down.weight"] = pair.down
        out[f"{name}.lora_up.weight"] = pair.up
        out[f"{name}.alpha"] = np.asarray(pair.alpha, np.float32)
    return out


_DIFFUSERS_SUFFIX = re.compile(r"\.(lora\.(down|up)|lora_linear_layer\.(down|up)|lora_(A|B)|lora_(down|up))\.weight$")


def _kohya_index(arch: ModelArch) -> Dict[str, str]:
    """kohya's underscore names are ambiguous on their own; resolve them against the model."""
    index = {}
    for target in lora_targets(arch, True, True):
        component, path = _component_prefix(target)
        name = ("lora_unet_" + path if component == "unet" else "lora_te_text_model_" + path).replace(".", "_")
        index[name] = target
    return index


def from_state_dict(sd: Dict[str, np.ndarray], arch: ModelArch) -> LoraSet:
    """Read a LoRA in the diffusers, kohya or PEFT format (detected from its keys)."""
    keys = [k for k in sd if not k.endswith(".alpha") and k not in ("lora_rank",)]
    if not keys:
        raise UserError("LoRA file holds no LoRA tensors")
    downs: Dict[str, np.ndarray] = {}
    ups: Dict[str, np.ndarray] = {}
    alphas: Dict[str, float] = {}
    valid = lora_targets(arch, True, True)
    if all(k.startswith(("lora_unet_", "lora_te_")) for k in sd):
        index = _kohya_index(arch)
        for k, v in sd.items():
            name, _, kind = k.partition(".")
            target = index.get(name)
            if target is None:
                raise UserError(f"LoRA key {k} does not match a layer of this model ({arch.path})")
            if kind == "alpha":
                alphas[target] = float(np.asarray(v))
            elif kind == "lora_down.weight":
                downs[target] = v
            elif kind == "lora_up.weight":
                ups[target] = v
            else:
                raise UserError(f"unsupported LoRA tensor {k} (only plain LoRA is supported)")
    else:
        for k, v in sd.items():
            if k == "lora_rank":
                continue
            m = _DIFFUSERS_SUFFIX.search(k)
            if m is None or not k.startswith(("unet.", "text_encoder.")):
                raise UserError(f"unrecognised LoRA key {k}")
            path = k[:m.start()]
            component, _, path = path.partition(".")
            path = path.replace(".processor.", ".")
            if component == "text_encoder" and path.startswith("text_model."):
                path = path[len("text_model."):]
            target = f"{component}:{path}"
            if target not in valid:
                raise UserError(f"LoRA key {k} does not match a layer of this model ({arch.path})")
            kind = m.group(1)
            (downs if kind.endswith(("down", "A")) else ups)[target] = v
    lora: LoraSet = {}
    for target, down in downs.items():
        if target not in ups:
            raise UserError(f"LoRA layer {target} has a down matrix but no up matrix")
        fan_in, fan_out = valid[target]
        up = ups[target]
        if down.shape[1] != fan_in or up.shape[0] != fan_out or up.shape[1] != down.shape[0]:
            raise UserError(f"LoRA layer {target}: shapes {down.shape}/{up.shape} do not fit this model "
                            f"({fan_in} -> {fan_out}); was it trained for another architecture?")
        lora[target] = LoraPair(down=down, up=up, alpha=alphas.get(target, float(down.shape[0])))
    return lora


def select(lora: LoraSet, unet: bool, text_encoder: bool) -> LoraSet:
    """The part of a LoRA the user asked to apply (--lora_ft_unet / --lora_ft_text_encoder)."""
    keep = tuple(p for p, on in (("unet:", unet), ("text_encoder:", text_encoder)) if on)
    return {k: v for k, v in lora.items() if k.startswith(keep)} if keep else {}


def components(lora: LoraSet) -> Iterable[str]:
    return sorted({t.split(":", 1)[0] for t in lora})
