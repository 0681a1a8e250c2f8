"""Architectures and weight layouts of the evaluation models (CLIP and DINO), framework-neutral.

CLIP is described by `ClipArch` (a standard ViT image tower plus the CLIP text transformer, as
OpenAI's and OpenCLIP's ViT models are) and DINO by `DinoArch` (a timm/DINO ViT, CLS token).
Both come from a name or a config file:

* CLIP `--model_name`: an open_clip architecture name (`ViT-B-16`, `ViT-L-14-quickgelu`, ...),
  whose JSON config is read from the installed open_clip package without importing it, or one of
  MindONE's / Hugging Face's names (`clip_vit_b_16`, `openai/clip-vit-base-patch16`), which mean the
  OpenAI (QuickGELU) variant. `--config`: an open_clip model-config JSON (or the same keys in
  yaml), a transformers CLIPConfig `config.json`, or a MindFormers yaml with the same two sub-configs.
* DINO `--model_name`: a timm ViT name (`vit_small_patch16_224`, default) or DINO's hub names
  (`dino_vits16`, ...); `--config`: a JSON/yaml with image_size, patch_size, width, layers, heads.

Canonical weight names are open_clip's for CLIP (`visual.transformer.resblocks.0.attn.in_proj_weight`,
`token_embedding.weight`, ...) and timm's for DINO (`blocks.0.attn.qkv.weight`, `cls_token`, ...).
A checkpoint in another layout is mapped here, so backends receive plain {canonical name: float32
array} dicts and never parse files:

* transformers `CLIPModel` (`text_model.*`, `vision_model.*`, q/k/v separate): q, k, v are stacked
  into `in_proj_*` and the projection matrices transposed;
* MindONE/MindFormers MindSpore CLIP (`ln_*.gamma/beta`, `attn.in_proj.weight`,
  `token_embedding.embedding_table`), which is also the parameter layout of the ascend backend's
  CLIP Cell (`open_clip_to_mindspore`);
* DINO/timm checkpoints with `module.` or `backbone.` prefixes.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
import yaml

from common.formats.checkpoint_io import checkpoint_format, load_state_dict
from common.errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_CLIP = "ViT-B-16"
DEFAULT_DINO = "vit_small_patch16_224"

# MindONE's config names and Hugging Face's OpenAI repos: OpenAI weights, so QuickGELU.
CLIP_ALIASES = {
    "clip_vit_b_16": "ViT-B-16-quickgelu", "clip_vit_b_32": "ViT-B-32-quickgelu",
    "clip_vit_l_14": "ViT-L-14-quickgelu", "clip_vit_l_14@336": "ViT-L-14-336-quickgelu",
    "openai/clip-vit-base-patch16": "ViT-B-16-quickgelu",
    "openai/clip-vit-base-patch32": "ViT-B-32-quickgelu",
    "openai/clip-vit-large-patch14": "ViT-L-14-quickgelu",
    "openai/clip-vit-large-patch14-336": "ViT-L-14-336-quickgelu",
}
# Tensors of OpenAI's TorchScript archives and old transformers files that are not weights.
_CLIP_IGNORED = ("input_resolution", "context_length", "vocab_size", "attn_mask",
                 "text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")
LOGIT_SCALE_INIT = float(np.log(1 / 0.07))


# --------------------------------------------------------------------------- architectures

@dataclass(frozen=True)
class ClipArch:
    """A CLIP with a ViT image tower and the CLIP text transformer (causal mask, EOT pooling)."""
    name: str
    embed_dim: int
    image_size: int
    patch_size: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    vision_mlp: int
    context_length: int
    vocab_size: int
    text_width: int
    text_heads: int
    text_layers: int
    text_mlp: int
    act: str = "gelu"            # "gelu" (exact, erf) or "quick_gelu" (OpenAI's weights)
    eps: float = 1e-5
    description: str = ""        # free text carried into reports (e.g. "tiny random CLIP")
    open_clip_name: Optional[str] = None   # set when the architecture is a built-in open_clip name

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def open_clip_config(self) -> dict:
        """The open_clip model config (kwargs of open_clip.CLIP) of this architecture."""
        return {
            "embed_dim": self.embed_dim, "quick_gelu": self.act == "quick_gelu",
            "vision_cfg": {"image_size": self.image_size, "patch_size": self.patch_size,
                           "width": self.vision_width, "layers": self.vision_layers,
                           "head_width": self.vision_width // self.vision_heads,
                           "mlp_ratio": self.vision_mlp / self.vision_width},
            "text_cfg": {"context_length": self.context_length, "vocab_size": self.vocab_size,
                         "width": self.text_width, "heads": self.text_heads, "layers": self.text_layers,
                         "mlp_ratio": self.text_mlp / self.text_width},
        }


@dataclass(frozen=True)
class DinoArch:
    """A timm/DINO ViT (pre-norm blocks, class token, final LayerNorm); the embedding is the CLS token."""
    name: str
    image_size: int = 224
    patch_size: int = 16
    width: int = 384
    layers: int = 12
    heads: int = 6
    mlp: int = 1536
    eps: float = 1e-6
    description: str = ""

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def timm_kwargs(self) -> dict:
        """Overrides of timm's vit_small_patch16_224 that give this architecture."""
        return {"img_size": self.image_size, "patch_size": self.patch_size, "embed_dim": self.width,
                "depth": self.layers, "num_heads": self.heads, "mlp_ratio": self.mlp / self.width}


# DINO's released backbones (ViT-S/16 is the DreamBooth paper's).
_DINO_NAMES = {
    "vit_small_patch16_224": (16, 384, 12, 6), "dino_vits16": (16, 384, 12, 6),
    "vit_small_patch8_224": (8, 384, 12, 6), "dino_vits8": (8, 384, 12, 6),
    "vit_base_patch16_224": (16, 768, 12, 12), "dino_vitb16": (16, 768, 12, 12),
    "vit_base_patch8_224": (8, 768, 12, 12), "dino_vitb8": (8, 768, 12, 12),
}


def open_clip_config_dir() -> Optional[str]:
    """open_clip's model_configs folder, found without importing open_clip (which needs torch)."""
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = os.path.join(folder, "model_configs")
        if os.path.isdir(candidate):
            return candidate
    return None


def read_config_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"model config not found: {path}")
    try:
        with open(path) as f:
            data = json.load(f) if path.lower().endswith(".json") else yaml.safe_load(f)
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise UserError(f"model config {path}: not readable JSON/yaml ({e.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise UserError(f"model config {path}: expected a mapping of keys to values")
    return data


def _int(value, what: str, source: str) -> int:
    if isinstance(value, (list, tuple)):           # open_clip allows (h, w): only square here
        if len(set(value)) != 1:
            raise UserError(f"{source}: non-square {what} {value} is not supported")
        value = value[0]
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UserError(f"{source}: {what} must be an integer, got {value!r}") from None


# open_clip config keys this evaluator builds, and the values the other keys must keep.
_OC_VISION_DEFAULTS = {"ls_init_value": None, "attentional_pool": False, "no_ln_pre": False,
                       "pos_embed_type": "learnable", "final_ln_after_pool": False, "pool_type": "tok",
                       "act_kwargs": None, "norm_kwargs": None, "block_type": None, "qk_norm": False,
                       "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False,
                       "scale_attn": False, "scale_fc": False, "timm_model_name": None}
_OC_VISION_FREE = {"layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size",
                   "patch_dropout", "output_tokens", "timm_model_pretrained", "attn_pooler_queries",
                   "attn_pooler_heads", "timm_pool", "timm_proj", "timm_proj_bias", "timm_drop",
                   "timm_drop_path"}
_OC_TEXT_DEFAULTS = {"ls_init_value": None, "embed_cls": False, "no_causal_mask": False,
                     "final_ln_after_pool": False, "pool_type": "argmax", "proj_bias": False,
                     "proj_type": "linear", "act_kwargs": None, "norm_kwargs": None, "block_type": None,
                     "qk_norm": False, "scaled_cosine_attn": False, "scale_heads": False,
                     "scale_attn_inner": False, "scale_attn": False, "scale_fc": False,
                     "hf_model_name": None, "hf_tokenizer_name": None}
_OC_TEXT_FREE = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "pad_id",
                 "eos_id", "output_tokens", "tokenizer_mode", "tokenizer_kwargs", "hf_model_pretrained",
                 "hf_proj_type", "hf_pooler_type"}
_OC_TOP_DEFAULTS = {"custom_text": False, "multimodal_cfg": None, "init_logit_bias": None}
_OC_TOP_FREE = {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg", "init_logit_scale",
                "cast_dtype", "output_dict", "description"}


def _check_supported(cfg: Mapping, defaults: Mapping, free: set, source: str, where: str) -> None:
    for key, value in cfg.items():
        if key in free:
            continue
        if key not in defaults or value != defaults[key]:
            shown = f"{where}{key}" if isinstance(value, (dict, list)) else f"{where}{key}={value!r}"
            raise UserError(f"{source}: {shown} is not supported (the evaluator builds standard ViT "
                            f"CLIP towers: ViT-B-32, ViT-B-16, ViT-L-14, ViT-H-14, ...)")


def _clip_from_open_clip(cfg: Mapping, name: str, source: str, builtin: bool) -> ClipArch:
    _check_supported(cfg, _OC_TOP_DEFAULTS, _OC_TOP_FREE, source, "")
    v, t = dict(cfg.get("vision_cfg") or {}), dict(cfg.get("text_cfg") or {})
    _check_supported(v, _OC_VISION_DEFAULTS, _OC_VISION_FREE, source, "vision_cfg.")
    _check_supported(t, _OC_TEXT_DEFAULTS, _OC_TEXT_FREE, source, "text_cfg.")
    if "embed_dim" not in cfg:
        raise UserError(f"{source}: no embed_dim (not an open_clip model config?)")
    if isinstance(v.get("layers", 12), (list, tuple)):
        raise UserError(f"{source}: a ResNet image tower is not supported (ViT models only)")
    vw = _int(v.get("width", 768), "vision_cfg.width", source)
    tw = _int(t.get("width", 512), "text_cfg.width", source)
    head_width = _int(v.get("head_width", 64), "vision_cfg.head_width", source)
    if vw % head_width:
        raise UserError(f"{source}: vision width {vw} is not a multiple of head_width {head_width}")
    return ClipArch(
        name=name, embed_dim=_int(cfg["embed_dim"], "embed_dim", source),
        image_size=_int(v.get("image_size", 224), "vision_cfg.image_size", source),
        patch_size=_int(v.get("patch_size", 16), "vision_cfg.patch_size", source),
        vision_width=vw, vision_layers=_int(v.get("layers", 12), "vision_cfg.layers", source),
        vision_heads=vw // head_width, vision_mlp=int(vw * float(v.get("mlp_ratio", 4.0))),
        context_length=_int(t.get("context_length", 77), "text_cfg.context_length", source),
        vocab_size=_int(t.get("vocab_size", 49408), "text_cfg.vocab_size", source),
        text_width=tw, text_heads=_int(t.get("heads", 8), "text_cfg.heads", source),
        text_layers=_int(t.get("layers", 12), "text_cfg.layers", source),
        text_mlp=int(tw * float(t.get("mlp_ratio", 4.0))),
        act="quick_gelu" if cfg.get("quick_gelu") else "gelu",
        description=str(cfg.get("description", "")), open_clip_name=name if builtin else None)


def _clip_from_hf(cfg: Mapping, name: str, source: str) -> ClipArch:
    """transformers CLIPConfig (config.json) or a MindFormers model_config with the same keys."""
    t, v = dict(cfg.get("text_config") or {}), dict(cfg.get("vision_config") or {})
    acts = {str(t.get("hidden_act", "quick_gelu")), str(v.get("hidden_act", "quick_gelu"))}
    if len(acts) != 1 or not acts <= {"gelu", "quick_gelu"}:
        raise UserError(f"{source}: activation(s) {sorted(acts)} not supported (gelu or quick_gelu, "
                        f"the same in both towers)")
    eps = {float(t.get("layer_norm_eps", 1e-5)), float(v.get("layer_norm_eps", 1e-5))}
    if len(eps) != 1:
        raise UserError(f"{source}: different layer_norm_eps in the two towers is not supported")
    tw = _int(t.get("hidden_size", 512), "text_config.hidden_size", source)
    vw = _int(v.get("hidden_size", 768), "vision_config.hidden_size", source)
    return ClipArch(
        name=name, embed_dim=_int(cfg.get("projection_dim", 512), "projection_dim", source),
        image_size=_int(v.get("image_size", 224), "vision_config.image_size", source),
        patch_size=_int(v.get("patch_size", 32), "vision_config.patch_size", source),
        vision_width=vw, vision_layers=_int(v.get("num_hidden_layers", 12), "vision_config.num_hidden_layers", source),
        vision_heads=_int(v.get("num_attention_heads", 12), "vision_config.num_attention_heads", source),
        vision_mlp=_int(v.get("intermediate_size", 3072), "vision_config.intermediate_size", source),
        context_length=_int(t.get("max_position_embeddings", 77), "text_config.max_position_embeddings", source),
        vocab_size=_int(t.get("vocab_size", 49408), "text_config.vocab_size", source),
        text_width=tw, text_heads=_int(t.get("num_attention_heads", 8), "text_config.num_attention_heads", source),
        text_layers=_int(t.get("num_hidden_layers", 12), "text_config.num_hidden_layers", source),
        text_mlp=_int(t.get("intermediate_size", 2048), "text_config.intermediate_size", source),
        act=acts.pop(), eps=eps.pop(), description=str(cfg.get("description", "")))


def clip_arch_from_dict(cfg: Mapping, name: str, source: str) -> ClipArch:
    """A ClipArch from an open_clip model config, a transformers CLIPConfig dict, or a MindFormers
    yaml (`model: model_config: {text_config, vision_config, projection_dim}`)."""
    if "vision_cfg" in cfg or "text_cfg" in cfg:
        return _clip_from_open_clip(cfg, name, source, builtin=False)
    if "vision_config" in cfg or "text_config" in cfg:
        return _clip_from_hf(cfg, name, source)
    nested = (cfg.get("model") or {}).get("model_config") if isinstance(cfg.get("model"), dict) else None
    if isinstance(nested, dict):
        return clip_arch_from_dict(nested, name, source)
    raise UserError(f"{source}: not a CLIP config (expected open_clip's embed_dim/vision_cfg/text_cfg "
                    f"or transformers' projection_dim/vision_config/text_config)")


def _vit(embed: int, image: int, layers: int, width: int, patch: int, text_width: int, text_heads: int,
         text_layers: int, head_width: int = 64) -> dict:
    vision = dict(image_size=image, layers=layers, width=width, patch_size=patch)
    if head_width != 64:
        vision["head_width"] = head_width
    return dict(embed_dim=embed, vision_cfg=vision, text_cfg=dict(
        context_length=77, vocab_size=49408, width=text_width, heads=text_heads, layers=text_layers))


# The CLIP ViTs SD evaluation uses, as open_clip's model_configs describe them (tested equal), for
# installs without open_clip (Ascend: open_clip needs torch). "-quickgelu" variants add quick_gelu.
BUILTIN_CLIP_CONFIGS = {
    "ViT-B-32": _vit(512, 224, 12, 768, 32, 512, 8, 12),
    "ViT-B-16": _vit(512, 224, 12, 768, 16, 512, 8, 12),
    "ViT-L-14": _vit(768, 224, 24, 1024, 14, 768, 12, 12),
    "ViT-L-14-336": _vit(768, 336, 24, 1024, 14, 768, 12, 12),
    "ViT-H-14": _vit(1024, 224, 32, 1280, 14, 1024, 16, 24, head_width=80),
}


def _builtin_clip_config(name: str) -> Optional[dict]:
    base = name[:-len("-quickgelu")] if name.endswith("-quickgelu") else name
    if base not in BUILTIN_CLIP_CONFIGS:
        return None
    return dict(BUILTIN_CLIP_CONFIGS[base], **({"quick_gelu": True} if base != name else {}))


def clip_arch(model_name: Optional[str] = None, config: Optional[str] = None) -> ClipArch:
    """The CLIP architecture named by `config` (a file; wins) or `model_name` (default ViT-B-16)."""
    if config:
        cfg = read_config_file(config)
        return clip_arch_from_dict(cfg, os.path.splitext(os.path.basename(config))[0], f"model config {config}")
    name = model_name or DEFAULT_CLIP
    resolved = CLIP_ALIASES.get(name, CLIP_ALIASES.get(name.lower(), name)).replace("/", "-")
    folder = open_clip_config_dir()
    if folder is None:
        cfg = _builtin_clip_config(resolved)
        if cfg is None:
            raise UserError(f"cannot look up CLIP architecture {name!r}: open_clip's model configs are not "
                            f"installed; use one of {', '.join(BUILTIN_CLIP_CONFIGS)} (or a '-quickgelu' "
                            f"variant), or pass --config FILE")
        return _clip_from_open_clip(cfg, resolved, f"open_clip config {resolved}", builtin=True)
    path = os.path.join(folder, resolved + ".json")
    if not os.path.isfile(path):
        known = [n for n in ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-H-14", "ViT-g-14",
                             "ViT-bigG-14") if os.path.isfile(os.path.join(folder, n + ".json"))]
        raise UserError(f"unknown CLIP architecture {name!r}; use an open_clip ViT name such as "
                        f"{', '.join(known)} (or a '-quickgelu' variant), or pass --config FILE")
    with open(path) as f:
        return _clip_from_open_clip(json.load(f), resolved, f"open_clip config {resolved}", builtin=True)


def dino_arch(model_name: Optional[str] = None, config: Optional[str] = None) -> DinoArch:
    """The DINO ViT named by `config` (a file with image_size, patch_size, width, layers, heads and
    optionally mlp_ratio; wins) or by `model_name` (default vit_small_patch16_224, DINO ViT-S/16)."""
    if config:
        cfg = read_config_file(config)
        source = f"model config {config}"

        def get(*keys, default=None):
            for k in keys:
                if k in cfg:
                    return cfg[k]
            if default is None:
                raise UserError(f"{source}: missing key {keys[0]}")
            return default

        width = _int(get("width", "embed_dim"), "width", source)
        return DinoArch(name=os.path.splitext(os.path.basename(config))[0],
                        image_size=_int(get("image_size", "img_size", default=224), "image_size", source),
                        patch_size=_int(get("patch_size"), "patch_size", source), width=width,
                        layers=_int(get("layers", "depth"), "layers", source),
                        heads=_int(get("heads", "num_heads"), "heads", source),
                        mlp=int(width * float(get("mlp_ratio", default=4.0))),
                        eps=float(get("eps", default=1e-6)), description=str(cfg.get("description", "")))
    name = model_name or DEFAULT_DINO
    if name not in _DINO_NAMES:
        raise UserError(f"unknown DINO architecture {name!r}; use one of {', '.join(_DINO_NAMES)} "
                        f"or pass --config FILE")
    patch, width, layers, heads = _DINO_NAMES[name]
    return DinoArch(name=name, patch_size=patch, width=width, layers=layers, heads=heads, mlp=4 * width)


def arch_summary(arch) -> Dict[str, Any]:
    """JSON-friendly description of an architecture (for results files and reports)."""
    return {k: v for k, v in asdict(arch).items() if v not in (None, "") and k != "description"}


# --------------------------------------------------------------------------- parameter shapes

def clip_parameter_shapes(arch: ClipArch) -> Dict[str, Tuple[int, ...]]:
    """open_clip name -> shape of every CLIP tensor (logit_scale included)."""
    shapes: Dict[str, Tuple[int, ...]] = {}

    def blocks(prefix: str, width: int, mlp: int, layers: int) -> None:
        for i in range(layers):
            p = f"{prefix}resblocks.{i}."
            shapes.update({p + "ln_1.weight": (width,), p + "ln_1.bias": (width,),
                           p + "attn.in_proj_weight": (3 * width, width), p + "attn.in_proj_bias": (3 * width,),
                           p + "attn.out_proj.weight": (width, width), p + "attn.out_proj.bias": (width,),
                           p + "ln_2.weight": (width,), p + "ln_2.bias": (width,),
                           p + "mlp.c_fc.weight": (mlp, width), p + "mlp.c_fc.bias": (mlp,),
                           p + "mlp.c_proj.weight": (width, mlp), p + "mlp.c_proj.bias": (width,)})

    vw = arch.vision_width
    shapes.update({"visual.class_embedding": (vw,), "visual.positional_embedding": (arch.grid ** 2 + 1, vw),
                   "visual.proj": (vw, arch.embed_dim),
                   "visual.conv1.weight": (vw, 3, arch.patch_size, arch.patch_size),
                   "visual.ln_pre.weight": (vw,), "visual.ln_pre.bias": (vw,)})
    blocks("visual.transformer.", vw, arch.vision_mlp, arch.vision_layers)
    shapes.update({"visual.ln_post.weight": (vw,), "visual.ln_post.bias": (vw,)})
    tw = arch.text_width
    shapes.update({"positional_embedding": (arch.context_length, tw), "text_projection": (tw, arch.embed_dim),
                   "logit_scale": (), "token_embedding.weight": (arch.vocab_size, tw)})
    blocks("transformer.", tw, arch.text_mlp, arch.text_layers)
    shapes.update({"ln_final.weight": (tw,), "ln_final.bias": (tw,)})
    return shapes


def dino_parameter_shapes(arch: DinoArch) -> Dict[str, Tuple[int, ...]]:
    """timm name -> shape of every DINO ViT tensor (no classification head)."""
    w, m = arch.width, arch.mlp
    shapes: Dict[str, Tuple[int, ...]] = {
        "cls_token": (1, 1, w), "pos_embed": (1, arch.grid ** 2 + 1, w),
        "patch_embed.proj.weight": (w, 3, arch.patch_size, arch.patch_size), "patch_embed.proj.bias": (w,)}
    for i in range(arch.layers):
        p = f"blocks.{i}."
        shapes.update({p + "norm1.weight": (w,), p + "norm1.bias": (w,),
                       p + "attn.qkv.weight": (3 * w, w), p + "attn.qkv.bias": (3 * w,),
                       p + "attn.proj.weight": (w, w), p + "attn.proj.bias": (w,),
                       p + "norm2.weight": (w,), p + "norm2.bias": (w,),
                       p + "mlp.fc1.weight": (m, w), p + "mlp.fc1.bias": (m,),
                       p + "mlp.fc2.weight": (w, m), p + "mlp.fc2.bias": (w,)})
    shapes.update({"norm.weight": (w,), "norm.bias": (w,)})
    return shapes


# --------------------------------------------------------------------------- name maps

_MS_NORM = re.compile(r"(^|\.)(ln_\w+|norm\d?)\.(weight|bias)$")


def open_clip_to_mindspore(name: str) -> str:
    """open_clip name -> MindONE/MindFormers MindSpore CLIP name (the ascend Cell's parameter)."""
    if name == "token_embedding.weight":
        return "token_embedding.embedding_table"
    if re.search(r"attn\.in_proj_(weight|bias)$", name):
        return re.sub(r"in_proj_(weight|bias)$", r"in_proj.\1", name)
    return _MS_NORM.sub(lambda m: f"{m.group(1)}{m.group(2)}.{'gamma' if m.group(3) == 'weight' else 'beta'}", name)


def timm_to_mindspore(name: str) -> str:
    """timm name -> the ascend DINO Cell's parameter name (LayerNorms hold gamma/beta)."""
    return _MS_NORM.sub(lambda m: f"{m.group(1)}{m.group(2)}.{'gamma' if m.group(3) == 'weight' else 'beta'}", name)


def _hf_to_open_clip(sd: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """transformers CLIPModel names -> open_clip names (q, k, v stacked; projections transposed)."""
    out: Dict[str, np.ndarray] = {}
    simple = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
              "text_model.embeddings.position_embedding.weight": "positional_embedding",
              "text_model.final_layer_norm.weight": "ln_final.weight",
              "text_model.final_layer_norm.bias": "ln_final.bias",
              "vision_model.embeddings.class_embedding": "visual.class_embedding",
              "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
              "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
              "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
              "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
              "vision_model.post_layernorm.weight": "visual.ln_post.weight",
              "vision_model.post_layernorm.bias": "visual.ln_post.bias",
              "logit_scale": "logit_scale"}
    layer_re = re.compile(r"^(text|vision)_model\.encoder\.layers\.(\d+)\.(.+)$")
    layer_parts = {"self_attn.out_proj.weight": "attn.out_proj.weight", "self_attn.out_proj.bias": "attn.out_proj.bias",
                   "layer_norm1.weight": "ln_1.weight", "layer_norm1.bias": "ln_1.bias",
                   "layer_norm2.weight": "ln_2.weight", "layer_norm2.bias": "ln_2.bias",
                   "mlp.fc1.weight": "mlp.c_fc.weight", "mlp.fc1.bias": "mlp.c_fc.bias",
                   "mlp.fc2.weight": "mlp.c_proj.weight", "mlp.fc2.bias": "mlp.c_proj.bias"}
    qkv: Dict[Tuple[str, str], Dict[str, np.ndarray]] = {}
    for key, value in sd.items():
        if key in simple:
            out[simple[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = np.ascontiguousarray(np.asarray(value).T)
        elif key == "visual_projection.weight":
            out["visual.proj"] = np.ascontiguousarray(np.asarray(value).T)
        elif (m := layer_re.match(key)):
            tower, i, rest = m.groups()
            prefix = f"{'visual.' if tower == 'vision' else ''}transformer.resblocks.{i}."
            if rest in layer_parts:
                out[prefix + layer_parts[rest]] = value
            elif (q := re.match(r"self_attn\.([qkv])_proj\.(weight|bias)$", rest)):
                qkv.setdefault((prefix, q.group(2)), {})[q.group(1)] = value
            else:
                out[key] = value                  # unknown: reported by the caller
        else:
            out[key] = value
    for (prefix, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise UserError(f"transformers CLIP weights: {prefix} has only {sorted(parts)} of q/k/v {kind}")
        out[f"{prefix}attn.in_proj_{kind}"] = np.concatenate([parts[c] for c in "qkv"], axis=0)
    return out


def _strip_prefix(sd: Dict[str, np.ndarray], prefixes) -> Dict[str, np.ndarray]:
    for prefix in prefixes:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _checked(sd: Mapping[str, np.ndarray], shapes: Mapping[str, Tuple[int, ...]], what: str, source: str,
             optional: Mapping[str, np.ndarray] = {}) -> Dict[str, np.ndarray]:
    """Exactly the tensors of `shapes` as float32, or a UserError naming what is missing or misshapen."""
    missing = [k for k in shapes if k not in sd and k not in optional]
    if missing:
        raise UserError(f"{source}: not a {what} checkpoint: {len(missing)} tensor(s) missing, e.g. "
                        f"{', '.join(missing[:3])} (check --model_name / --config)")
    out = {}
    for key, shape in shapes.items():
        value = np.asarray(sd[key]) if key in sd else optional[key]
        if tuple(value.shape) != tuple(shape):
            raise UserError(f"{source}: tensor {key} has shape {tuple(value.shape)} but {what} needs "
                            f"{tuple(shape)} (check --model_name / --config)")
        out[key] = np.array(value, dtype=np.float32, order="C")   # keeps 0-d (logit_scale) 0-d
    extra = sorted(k for k in sd if k not in shapes)
    if extra:
        logger.warning("%s: ignoring %d tensor(s) that %s does not use, e.g. %s", source, len(extra), what,
                       ", ".join(extra[:3]))
    return out


def canonical_clip_weights(sd: Mapping[str, np.ndarray], arch: ClipArch, source: str) -> Dict[str, np.ndarray]:
    """Any supported CLIP state dict (open_clip, transformers, MindONE/MindFormers MindSpore) ->
    exactly the open_clip tensors of `arch`, float32. A missing logit_scale gets CLIP's initial value
    (it does not enter any score)."""
    sd = _strip_prefix(dict(sd), ("module.", "model."))
    sd = {k: v for k, v in sd.items() if k not in _CLIP_IGNORED}
    shapes = clip_parameter_shapes(arch)
    if any(k.startswith(("text_model.", "vision_model.")) for k in sd):
        sd = _hf_to_open_clip(sd)
    else:
        from_ms = {open_clip_to_mindspore(k): k for k in shapes}
        if any(k in from_ms and from_ms[k] != k for k in sd):
            sd = {from_ms.get(k, k): v for k, v in sd.items()}
    return _checked(sd, shapes, f"{arch.name} CLIP", source,
                    optional={"logit_scale": np.array(LOGIT_SCALE_INIT, np.float32)})


def canonical_dino_weights(sd: Mapping[str, np.ndarray], arch: DinoArch, source: str) -> Dict[str, np.ndarray]:
    """A DINO/timm ViT state dict (optionally under module./backbone./teacher. prefixes, with or
    without a head) -> exactly the timm tensors of `arch`, float32."""
    sd = _strip_prefix(dict(sd), ("module.", "teacher.", "backbone."))
    sd = {k: v for k, v in sd.items() if not k.startswith(("head.", "fc_norm."))}
    shapes = dino_parameter_shapes(arch)
    from_ms = {timm_to_mindspore(k): k for k in shapes}
    if any(k in from_ms and from_ms[k] != k for k in sd):
        sd = {from_ms.get(k, k): v for k, v in sd.items()}
    return _checked(sd, shapes, f"{arch.name} DINO ViT", source)


# --------------------------------------------------------------------------- loading

HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def is_transformers_folder(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))


def _is_torchscript(path: str) -> bool:
    """OpenAI's CLIP .pt files (what open_clip's 'openai' tag downloads) are TorchScript archives."""
    import zipfile
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/constants.pkl") or n.split("/", 1)[-1].startswith("code/")
                       for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _load_torchscript(path: str) -> Dict[str, np.ndarray]:
    import torch  # a TorchScript archive can only be read by torch
    try:
        module = torch.jit.load(path, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - torch raises many kinds
        raise UserError(f"{path}: not a readable TorchScript archive: {str(e).splitlines()[0]}") from None
    return {k: v.detach().float().numpy() for k, v in module.state_dict().items()}


def read_weights(path: str) -> Tuple[Dict[str, np.ndarray], str]:
    """({name: array}, kind) of a weight file: .safetensors, a torch pickle (state dict or a
    {"state_dict": ...} training checkpoint), an OpenAI TorchScript archive, or a MindSpore .ckpt."""
    if not path:
        raise UserError("no checkpoint given: pass --ckpt_path with a local weight file (nothing is downloaded)")
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise UserError(f"checkpoint not found: {path} (weights are read from local files only; nothing "
                        f"is downloaded)")
    if os.path.isfile(path) and path.lower().endswith((".pt", ".pth", ".bin", ".ckpt")) and _is_torchscript(path):
        return _load_torchscript(path), "torchscript"
    kind = checkpoint_format(path) if os.path.isfile(path) else "folder"
    if kind == "folder":
        raise UserError(f"{path}: a folder, but not a transformers CLIP folder (no config.json)")
    return load_state_dict(path), kind


@dataclass
class ClipSource:
    """Where a CLIP comes from: its architecture and open_clip-named weights, or a transformers
    folder (which the cuda backend opens with CLIPModel.from_pretrained)."""
    arch: ClipArch
    path: str
    kind: str                    # safetensors / torch / torchscript / mindspore / transformers
    weights: Dict[str, np.ndarray] = field(repr=False)

    def describe(self) -> Dict[str, Any]:
        return {"architecture": self.arch.name, "weights": self.path, "format": self.kind,
                "description": self.arch.description or None, **{"config": arch_summary(self.arch)}}


def load_clip_source(ckpt_path: str, model_name: Optional[str] = None, config: Optional[str] = None) -> ClipSource:
    """Resolve `--ckpt_path` (+ `--model_name` / `--config`) into a ClipSource with its weights read
    and checked against the architecture (so a wrong file fails before any framework is loaded).

    A transformers folder brings its own config.json (it wins over model_name/config)."""
    if ckpt_path and is_transformers_folder(os.path.expanduser(ckpt_path)):
        folder = os.path.expanduser(ckpt_path)
        cfg = read_config_file(os.path.join(folder, "config.json"))
        arch = clip_arch_from_dict(cfg, os.path.basename(os.path.normpath(folder)), f"{folder}/config.json")
        files = [f for f in HF_WEIGHT_FILES if os.path.isfile(os.path.join(folder, f))]
        if not files:
            raise UserError(f"{folder}: no weight file ({' or '.join(HF_WEIGHT_FILES)}; sharded weights "
                            f"are not supported)")
        sd = load_state_dict(os.path.join(folder, files[0]))
        return ClipSource(arch, folder, "transformers", canonical_clip_weights(sd, arch, folder))
    sd, kind = read_weights(ckpt_path)
    arch = clip_arch(model_name, config)
    if kind == "torchscript" and arch.act != "quick_gelu":
        # open_clip builds OpenAI's archives with QuickGELU whatever the name says; so do we.
        logger.info("%s: an OpenAI TorchScript archive: using QuickGELU", ckpt_path)
        arch = ClipArch(**{**asdict(arch), "act": "quick_gelu", "open_clip_name": None})
    return ClipSource(arch, ckpt_path, kind, canonical_clip_weights(sd, arch, ckpt_path))


@dataclass
class DinoSource:
    arch: DinoArch
    path: str
    kind: str
    weights: Dict[str, np.ndarray] = field(repr=False)

    def describe(self) -> Dict[str, Any]:
        return {"architecture": self.arch.name, "weights": self.path, "format": self.kind,
                "description": self.arch.description or None, "config": arch_summary(self.arch)}


def load_dino_source(ckpt_path: str, model_name: Optional[str] = None, config: Optional[str] = None) -> DinoSource:
    """Resolve the DINO `--ckpt_path` (+ name / config) and read and check its weights."""
    sd, kind = read_weights(ckpt_path)
    arch = dino_arch(model_name, config)
    return DinoSource(arch, ckpt_path, kind, canonical_dino_weights(sd, arch, ckpt_path))


# --------------------------------------------------------------------------- tiny random models

TINY_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    "description": "tiny random CLIP (2+2 layers, width 32, 32 px) made by tools/make_tiny_eval_models.py: "
                   "its scores say nothing about image quality",
}
TINY_DINO_CONFIG = {
    "image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "heads": 2, "mlp_ratio": 4.0,
    "description": "tiny random DINO ViT (2 layers, width 32, 32 px) made by tools/make_tiny_eval_models.py: "
                   "its scores say nothing about image quality",
}


def random_weights(shapes: Mapping[str, Tuple[int, ...]], seed: int) -> Dict[str, np.ndarray]:
    """Deterministic random float32 weights for any shape table (numpy only, the same bytes
    everywhere): LayerNorm gains near 1, small biases, embeddings N(0, 0.5) and matrices
    N(0, 1/fan_in), so a few layers keep unit-order activations and distinct inputs stay distinct."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes.items():
        if name == "logit_scale":
            value = np.array(LOGIT_SCALE_INIT)
        elif re.search(r"(ln_\w+|norm\d?)\.weight$", name):
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name.endswith("bias"):
            value = 0.02 * rng.standard_normal(shape)
        elif name.endswith(("class_embedding", "positional_embedding", "token_embedding.weight",
                            "cls_token", "pos_embed")):
            value = 0.5 * rng.standard_normal(shape)
        else:   # x @ proj for the two CLIP projections, W @ x for Linear / Conv weights
            fan_in = shape[0] if name in ("visual.proj", "text_projection") else int(np.prod(shape[1:]))
            value = fan_in ** -0.5 * rng.standard_normal(shape)
        out[name] = np.asarray(value, np.float32)
    return out
