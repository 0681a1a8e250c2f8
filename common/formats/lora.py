"""LoRA and its community relatives: which layers of SD 1.x/2.x they adapt, their seeded initial
values, the file formats, and merging them into a model's weights.

In memory an adapter set is a `LoraSet`: {target: adapter}, where a target is
`unet:<diffusers module path>` or `text_encoder:<module path without text_model.>` and an adapter
is one of common.formats.adapters' kinds (LoRA/LoCon `LoraPair`, LoHa, LoKr, full diff), each
with its own update rule. Every Linear and Conv2d of the UNet and the text encoder can be a
target (`adaptable_layers`); training adapts one of the `LAYER_SETS`. Files:

- kohya / LyCORIS (what A1111, ComfyUI and civitai use): `lora_unet_<path with _>.<tensor>`
  (diffusers paths, as kohya trains SD 1.x/2.x; the original LDM paths as well) and
  `lora_te_text_model_<path with _>.<tensor>`, tensors `lora_down/lora_up/lora_mid.weight`,
  `hada_*`, `lokr_*`, `diff`, `alpha`, `dora_scale`.
- diffusers (`pytorch_lora_weights.safetensors`, what `pipe.load_lora_weights` reads):
  `unet.<path>.lora.down.weight`, `text_encoder.text_model.<path>.lora_linear_layer.down.weight`;
  no alpha is stored, loaders assume alpha = rank, so we write down pre-scaled when alpha != rank.
  Read as well: PEFT names (`lora_A` / `lora_B`, `lora_magnitude_vector`, peft LoHa / LoKr),
  diffusers' older attention-processor names (`attn1.processor.to_q_lora.down.weight`).
- MindONE's MindSpore LoRA `.ckpt`: common.formats.mindspore_layout.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Sequence, Tuple

import numpy as np

from common.arch import ModelArch
from common.errors import UserError
from common.formats import keymap
from common.formats.adapters import Adapter, FullDiff, LohaPair, LokrPair, LoraPair, apply
from common.rng import Streams

log = logging.getLogger(__name__)

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHT_NAME = "lora_kohya.safetensors"
MINDSPORE_WEIGHT_NAME = "lora_mindspore.ckpt"   # MindONE's LoRA layout (common.formats.mindspore_layout)

LoraSet = Dict[str, Adapter]

# Which layers training adapts (--lora_layers): MindONE's and diffusers' attention projections;
# kohya train_network's default (every Linear / 1x1 conv of the UNet's transformer blocks, the text
# encoder's attention and MLP); or every Linear and Conv2d of both (LoCon).
LAYER_SETS = ("attention", "kohya", "all")
_ATTENTION = re.compile(r"(\.attn[12]\.(to_q|to_k|to_v|to_out\.0)|\.self_attn\.(q|k|v|out)_proj)$")
_TEXT_PROJECTION = "text_projection"


@dataclass(frozen=True)
class Layer:
    """An adaptable layer: its weight in the original single-file layout (`rows` of it when the
    layer is one slice of a fused tensor: SD2's q/k/v in_proj) and the layer's weight shape."""
    ldm: str
    shape: Tuple[int, ...]
    rows: Optional[Tuple[int, int]] = None

    @property
    def fan_in(self) -> int:
        return int(self.shape[1])

    @property
    def fan_out(self) -> int:
        return int(self.shape[0])


@functools.lru_cache(maxsize=32)
def adaptable_layers(arch: ModelArch) -> Dict[str, Layer]:
    """Every Linear and Conv2d weight of the UNet and of the text encoder's used blocks."""
    out: Dict[str, Layer] = {}
    for e in keymap.iter_entries(arch, ("unet", "text_encoder")):
        if e.component == "extras" or not e.name.endswith(".weight") or len(e.shape) not in (2, 4) \
                or ".embeddings." in e.name:
            continue
        path = e.name[:-len(".weight")]
        component = e.part
        if component == "text_encoder":
            path = path[len(keymap.HF_TEXT_PREFIX):]
        shape, rows = keymap.target_shape(e.shape, e.transform), None
        if e.transform.startswith("part"):
            i, n = (int(x) for x in e.transform[len("part"):].split("/"))
            rows = (i * e.shape[0] // n, (i + 1) * e.shape[0] // n)
        out[f"{component}:{path}"] = Layer(e.ldm, tuple(shape), rows)
    return out


def _every_block(arch: ModelArch) -> ModelArch:
    """`arch` with every stored text-encoder block run (those a LoRA may still name)."""
    return dataclasses.replace(arch, text=dataclasses.replace(arch.text, used_layers=arch.text.layers))


def unused_layers(arch: ModelArch) -> frozenset:
    """Targets a LoRA may hold that this model knowingly never runs: text-encoder blocks past the
    used ones (SD2's last block, blocks a clip skip drops) and the text projection."""
    return frozenset(set(adaptable_layers(_every_block(arch))) - set(adaptable_layers(arch))) | {
        f"text_encoder:{_TEXT_PROJECTION}"}


def _in_set(target: str, layers: str) -> bool:
    component, path = target.split(":", 1)
    if layers == "attention":
        return bool(_ATTENTION.search("." + path))
    if layers == "kohya":
        return component == "text_encoder" or ".attentions." in path
    if layers == "all":
        return True
    names = [n.strip() for n in layers.split(",") if n.strip()]     # diffusers' --lora_layers list
    return any(path == n or path.endswith("." + n) for n in names)


def is_layer_set(layers: str) -> bool:
    """A preset name or a comma-separated list of module names (diffusers' --lora_layers form)?"""
    return layers in LAYER_SETS or bool(re.fullmatch(r"\s*[\w.]+(\s*,\s*[\w.]+)*\s*", layers or ""))


def lora_targets(arch: ModelArch, unet: bool = True, text_encoder: bool = False,
                 layers: str = "attention") -> Dict[str, Layer]:
    """The targets of a layer set (LAYER_SETS or a list of module names) in the chosen parts."""
    parts = tuple(p for p, on in (("unet:", unet), ("text_encoder:", text_encoder)) if on)
    return {t: layer for t, layer in adaptable_layers(arch).items()
            if t.startswith(parts) and _in_set(t, layers)} if parts else {}


def init_lora(arch: ModelArch, rank: int, alpha: float, seed: int, unet: bool = True,
              text_encoder: bool = False, layers: str = "attention") -> LoraSet:
    """Initial adapters, identical on both backends: down ~ N(0, (1/rank)^2) as MindONE and PEFT's
    'gaussian' init do (a conv down has the layer's kernel, its up is 1x1: LoCon / peft), up = 0
    so training starts from the base model."""
    streams = Streams(seed)
    out: LoraSet = {}
    targets = lora_targets(arch, unet, text_encoder, layers)
    if not targets:
        raise UserError(f"--lora_layers {layers} matches no layer of {arch.path}")
    for k, (target, layer) in enumerate(sorted(targets.items())):
        kernel = tuple(layer.shape[2:])
        down = streams.normal("lora.init", (rank, layer.fan_in) + kernel, k) / rank
        up = np.zeros((layer.fan_out, rank) + (1,) * len(kernel), np.float32)
        out[target] = LoraPair(down=down, up=up, alpha=float(alpha))
    return out


def select(lora: LoraSet, unet: bool, text_encoder: bool) -> LoraSet:
    """The part of a LoRA the user asked to apply (--lora_ft_unet / --lora_ft_text_encoder)."""
    keep = tuple(p for p, on in (("unet:", unet), ("text_encoder:", text_encoder)) if on)
    return {k: v for k, v in lora.items() if k.startswith(keep)} if keep else {}


def components(lora: LoraSet) -> Iterable[str]:
    return sorted({t.split(":", 1)[0] for t in lora})


def kinds(lora: LoraSet) -> str:
    """"LoRA", "LoRA+LoHa", ... for messages."""
    return "+".join(sorted({a.kind for a in lora.values()})) or "empty"


# ----------------------------------------------------------------------------- merging

def merge_loras(weights: Dict[str, np.ndarray], arch: ModelArch,
                loras: Sequence[Tuple[LoraSet, float]]) -> Dict[str, np.ndarray]:
    """`weights` (original layout) with each adapter set's update added at its scale, in order.
    Returns a new dict; adapted tensors become float32 copies, the others are shared."""
    layers = adaptable_layers(arch)
    out = dict(weights)
    copied = set()
    for lora, scale in loras:
        for target, adapter in sorted(lora.items()):
            layer = layers[target]
            if layer.ldm not in out:
                raise UserError(f"LoRA layer {target}: the model weights lack {layer.ldm}")
            if layer.ldm not in copied:
                out[layer.ldm] = np.array(out[layer.ldm], np.float32)
                copied.add(layer.ldm)
            w = out[layer.ldm]
            view = w[layer.rows[0]:layer.rows[1]] if layer.rows else w
            view[...] = apply(view.reshape(layer.shape), adapter, scale).reshape(view.shape)
    return out


# ----------------------------------------------------------------------------- writing

def _require_lora(lora: LoraSet, fmt: str) -> None:
    other = sorted({a.kind for a in lora.values() if not isinstance(a, LoraPair)})
    if other:
        raise UserError(f"the {fmt} format holds plain LoRA only; this file has {', '.join(other)} "
                        f"layers: write it in the kohya format (--to kohya)")
    if fmt != "kohya" and any(a.mid is not None or a.dora_scale is not None for a in lora.values()):
        raise UserError(f"the {fmt} format cannot hold LyCORIS Tucker (lora_mid) or DoRA layers: "
                        f"write it in the kohya format (--to kohya)")


def to_diffusers(lora: LoraSet) -> Dict[str, np.ndarray]:
    _require_lora(lora, "diffusers")
    out = {}
    for target, pair in lora.items():
        component, path = target.split(":", 1)
        # diffusers assumes alpha == rank: fold any other alpha into `down`.
        down = pair.down * np.asarray(pair.alpha / pair.rank, pair.down.dtype) if pair.alpha != pair.rank else pair.down
        if component == "unet":
            out[f"unet.{path}.lora.down.weight"] = down
            out[f"unet.{path}.lora.up.weight"] = pair.up
        else:
            out[f"text_encoder.text_model.{path}.lora_linear_layer.down.weight"] = down
            out[f"text_encoder.text_model.{path}.lora_linear_layer.up.weight"] = pair.up
    return out


def kohya_name(target: str) -> str:
    component, path = target.split(":", 1)
    return ("lora_unet_" + path if component == "unet" else "lora_te_text_model_" + path).replace(".", "_")


def to_kohya(lora: LoraSet) -> Dict[str, np.ndarray]:
    """kohya / LyCORIS naming: each adapter's own tensors, its alpha, its DoRA magnitude."""
    out = {}
    for target, adapter in lora.items():
        name = kohya_name(target)
        out.update({f"{name}.{k}": v for k, v in adapter.tensors().items()})
        if adapter.alpha is not None:
            out[f"{name}.alpha"] = np.asarray(adapter.alpha, np.float32)
        if adapter.dora_scale is not None:
            out[f"{name}.dora_scale"] = adapter.dora_scale
    return out


def kohya_metadata(arch: ModelArch, lora: LoraSet, rank: int, alpha: float, *, resolution: int,
                   steps: int, clip_skip: Optional[int], num_images: int = 0, **extra) -> Dict[str, str]:
    """kohya train_network's `ss_*` metadata, which A1111, ComfyUI and civitai read."""
    import json

    convs = [a for a in lora.values() if a.down.ndim == 4 and a.down.shape[2:] != (1, 1)]
    args = {"conv_dim": str(rank), "conv_alpha": f"{alpha:g}"} if convs else {}
    version = "sd_v2" if arch.version == "sd2" else "sd_v1"
    v_pred = arch.schedule.parameterization == "v"
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
            "ss_network_alpha": f"{alpha:g}", "ss_network_args": json.dumps(args) if args else "null",
            "ss_base_model_version": version + ("_v" if v_pred else ""), "ss_v2": str(arch.version == "sd2"),
            "ss_v_parameterization": str(v_pred), "ss_resolution": f"({resolution}, {resolution})",
            "ss_max_train_steps": str(steps), "ss_clip_skip": "None" if clip_skip is None else str(clip_skip),
            "ss_num_train_images": str(num_images),
            "ss_text_encoder_lr": "None" if "text_encoder" in components(lora) else "0"}
    meta.update({k: str(v) for k, v in extra.items()})
    return meta


# ----------------------------------------------------------------------------- reading

# tensor name after the layer name -> (adapter kind, field)
_FIELDS = {"lora_down.weight": ("lora", "down"), "lora_up.weight": ("lora", "up"),
           "lora_mid.weight": ("lora", "mid"), "alpha": ("", "alpha"), "dora_scale": ("", "dora_scale"),
           "diff": ("diff", "diff")}
_FIELDS.update({f"hada_{n}": ("loha", n) for n in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")})
_FIELDS.update({f"lokr_{n}": ("lokr", n) for n in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")})
# LyCORIS module kinds we recognise but do not apply (norm layers, OFT, (IA)^3, GLoRA, bias diffs)
_UNSUPPORTED = ("w_norm", "b_norm", "oft_blocks", "oft_diag", "oft_R", "rescale", "on_input",
                "a1.weight", "a2.weight", "b1.weight", "b2.weight", "diff_b", "bias_indices", "bias_values")
# diffusers / PEFT tensor suffixes -> our tensor names
_DIFFUSERS_SUFFIX = re.compile(
    r"(?:[._](?:lora|lora_linear_layer)\.(down|up)\.weight|\.lora_(A|B)(?:\.default)?\.weight|\.lora_(down|up)\.weight"
    r"|\.(lora_magnitude_vector)(?:\.default)?(?:\.weight)?|\.(alpha)"
    r"|\.(hada_(?:w[12]_[ab]|t[12])|lokr_(?:w[12](?:_[ab])?|t2))(?:\.default)?)$")
# diffusers' older attention-processor names: `attn1.processor.to_q_lora`, text `self_attn.to_q_lora`
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)$")
_TE_PROCESSOR = re.compile(r"\.self_attn\.(to_q|to_k|to_v|to_out)$")


@functools.lru_cache(maxsize=32)
def _kohya_index(arch: ModelArch) -> Dict[str, str]:
    """kohya's underscore names are ambiguous on their own; resolve them against the model. Both
    the diffusers paths and the original LDM paths (`lora_unet_input_blocks_1_1_proj_in`) are known."""
    index = {f"lora_te_{_TEXT_PROJECTION}": f"text_encoder:{_TEXT_PROJECTION}"}
    for target, layer in adaptable_layers(_every_block(arch)).items():
        index[kohya_name(target)] = target
        if target.startswith("unet:"):
            index["lora_unet_" + layer.ldm[len(keymap.UNET_PREFIX):-len(".weight")].replace(".", "_")] = target
    return index


def _diffusers_target(key: str, path: str) -> str:
    """A diffusers / PEFT key's module path -> our target."""
    for prefix in ("base_model.model.", "model."):
        path = path.removeprefix(prefix)
    component, _, rest = path.partition(".")
    if component not in ("unet", "text_encoder"):      # a bare PEFT model: tell by the path
        component, rest = ("text_encoder" if path.startswith(("text_model.", "encoder.layers.")) else "unet"), path
    rest = rest.removeprefix("text_model.")
    old = _PROCESSOR.search(rest) or (_TE_PROCESSOR.search(rest) if component == "text_encoder" else None)
    if old:
        name = old.group(1)
        if component == "unet":
            rest = rest[:old.start()] + "." + {"to_out": "to_out.0"}.get(name, name)
        else:
            rest = rest[:old.start()] + ".self_attn." + {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj",
                                                         "to_out": "out_proj"}[name]
    return f"{component}:{rest.replace('.processor.', '.')}"


def _group(sd: Dict[str, np.ndarray], arch: ModelArch) -> Dict[str, Dict[str, np.ndarray]]:
    """{target: {field: tensor}} from kohya / LyCORIS or diffusers / PEFT keys."""
    groups: Dict[str, Dict[str, np.ndarray]] = defaultdict(dict)
    if any(k.startswith(("lora_te1_", "lora_te2_")) for k in sd):
        raise UserError("this is an SDXL LoRA (lora_te1_/lora_te2_ keys); SD 1.x and 2.x models only")
    kohya = [k for k in sd if k.startswith(("lora_unet_", "lora_te_"))]
    if kohya:
        index = _kohya_index(arch)
        unknown = []
        for k in sd:
            name, _, tensor = k.partition(".")
            if k not in kohya or name not in index:
                unknown.append(k)
            elif tensor.endswith(_UNSUPPORTED):
                raise UserError(f"LoRA tensor {k}: this LyCORIS module type (norm, OFT, IA3, GLoRA or "
                                f"bias diff) is not supported; LoRA, LoCon, LoHa, LoKr, full diff and "
                                f"DoRA are")
            elif tensor not in _FIELDS:
                unknown.append(k)
            else:
                groups[index[name]][tensor] = sd[k]
        if unknown:
            raise UserError(f"LoRA keys that match no layer of {arch.path}: {keymap.listing(sorted(unknown))}")
        return groups
    unknown = []
    for k, v in sd.items():
        if k == "lora_rank":
            continue
        m = _DIFFUSERS_SUFFIX.search(k)
        if m is None:
            unknown.append(k)
            continue
        down_up, a_b, kohya_du, magnitude, alpha, lyco = m.groups()
        target = _diffusers_target(k, k[:m.start()])
        if down_up or kohya_du:
            field = f"lora_{down_up or kohya_du}.weight"
        elif a_b:
            field = "lora_down.weight" if a_b == "A" else "lora_up.weight"
        elif magnitude:
            field = "dora_scale"
        else:
            field = "alpha" if alpha else lyco
        groups[target][field] = v
    if unknown:
        raise UserError(f"unrecognised LoRA keys: {keymap.listing(sorted(unknown))}")
    return groups


def _complete(kind: str, v: Dict[str, np.ndarray]) -> bool:
    if kind == "lora":
        return "down" in v and "up" in v
    if kind == "loha":
        return all(n in v for n in ("w1_a", "w1_b", "w2_a", "w2_b"))
    if kind == "lokr":
        return all(f"w{i}" in v or (f"w{i}_a" in v and f"w{i}_b" in v) for i in (1, 2))
    return "diff" in v


def _adapter(target: str, fields: Dict[str, np.ndarray]) -> Adapter:
    kinds_ = {_FIELDS[f][0] for f in fields} - {""}
    if len(kinds_) != 1:
        what = ", ".join(sorted(fields))
        raise UserError(f"LoRA layer {target}: {'no weights' if not kinds_ else 'mixed adapter kinds'} ({what})")
    kind = kinds_.pop()
    values = {_FIELDS[f][1]: v for f, v in fields.items()}
    if not _complete(kind, values):
        raise UserError(f"LoRA layer {target}: incomplete {kind} tensors ({', '.join(sorted(fields))})")
    alpha = values.pop("alpha", None)
    alpha = None if alpha is None else float(np.asarray(alpha, np.float32))
    if kind == "lora":      # no alpha: diffusers' / PEFT's convention, scale 1
        return LoraPair(**values, alpha=float(values["down"].shape[0]) if alpha is None else alpha)
    if kind == "loha":
        return LohaPair(**values, alpha=float(values["w1_b"].shape[0]) if alpha is None else alpha)
    if kind == "lokr":
        return LokrPair(**values, alpha=alpha)
    return FullDiff(**values)


def from_state_dict(sd: Dict[str, np.ndarray], arch: ModelArch) -> LoraSet:
    """Read a LoRA / LoCon / LoHa / LoKr file in the kohya (LyCORIS), diffusers or PEFT naming
    (detected from its keys). Keys of no layer are an error listing them; layers the model knowingly
    never runs (unused_layers) are skipped with one log line."""
    keys = [k for k in sd if not k.endswith(".alpha") and k != "lora_rank"]
    if not keys:
        raise UserError("LoRA file holds no LoRA tensors")
    layers, unused = adaptable_layers(arch), unused_layers(arch)
    lora: LoraSet = {}
    skipped, unknown = [], []
    for target, fields in sorted(_group(sd, arch).items()):
        if target in unused:
            skipped.append(target)
        elif target not in layers:
            unknown.append(target)
        else:
            lora[target] = _checked(target, _adapter(target, fields), layers[target])
    if unknown:
        raise UserError(f"LoRA layers that {arch.path} does not have: {keymap.listing(unknown)}")
    if skipped:
        log.info("LoRA: skipped %d layer(s) this model never runs: %s", len(skipped), keymap.listing(skipped, 3))
    if not lora:
        raise UserError(f"LoRA holds no layer {arch.path} runs")
    return lora


def _checked(target: str, adapter: Adapter, layer: Layer) -> Adapter:
    """The adapter, if its update has the layer's size (from the tensor shapes, no arithmetic)."""
    shape = adapter.update_shape()
    if not shape or shape[0] != layer.fan_out or int(np.prod(shape)) != int(np.prod(layer.shape)):
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in adapter.tensors().items())
        raise UserError(f"LoRA layer {target}: {adapter.kind} tensors ({shapes}) do not fit its weight "
                        f"{layer.shape}; was it trained for another architecture?")
    return adapter
