"""LoRA on the MindSpore backend: LoRA dense layers injected into the UNet attention projections
and the text encoder's attention, merged into the base weights, or removed again.

Layout follows MindONE: an injected layer replaces the Dense `to_q` by a `LoRADense` whose base
layer is `to_q.linear` and whose adapters are `to_q.lora_down` / `to_q.lora_up`, giving checkpoint
names such as `model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_down.weight`.
The text encoder keeps q, k and v fused in `attn.attn.in_proj`; a `common.formats.lora.LoraSet` adapts q,
k and v separately (as diffusers / PEFT do), so the fused layer carries the three adapters side by
side (`parts=3`: down [3r, in] stacks the q / k / v downs, up [3 * width, r] their ups, each part of
the output using only its own r columns). That reproduces the per-projection LoRA exactly, and a
MindONE text-encoder LoRA (one shared down) is the special case of three equal downs.

Targets are `common.formats.lora` names (`unet:<diffusers path>`, `text_encoder:encoder.layers.N.self_attn.q_proj`),
so LoRA files in any format the core reads work here, and both backends apply the same update
`up @ down * alpha / rank * scale`.
"""
from __future__ import annotations

import functools
from typing import Dict, List, Optional, Tuple

import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import initializer

from common.formats import keymap
from common.arch import ModelArch
from common.errors import UserError
from common.formats.lora import LoraPair, LoraSet
from .layers import FP32, Dense, compute_dtype
from .text_encoder import TextTransformer
from .unet import UNetModel

_QKV = ("q_proj", "k_proj", "v_proj")
_UNET_LAYERS = tuple(f"{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0"))


class LoRAUp(nn.Cell):
    """The up projection [out, r]; with parts > 1 the output's i-th block of out/parts rows reads
    only the i-th block of r input columns (block-diagonal, stored densely per part)."""

    def __init__(self, rank: int, out_channels: int, parts: int = 1, dtype=FP32):
        super().__init__()
        self.rank, self.parts, self.out_channels = rank, parts, out_channels
        self.compute_dtype = compute_dtype(dtype)
        self.weight = Parameter(initializer("zeros", (out_channels, rank), FP32), name="weight")

    def construct(self, h):
        shape = h.shape
        w = self.weight.astype(self.compute_dtype)
        h = h.reshape(-1, shape[-1]).astype(self.compute_dtype)
        if self.parts == 1:
            y = ops.matmul(h, w.transpose(1, 0))
        else:
            n, p = h.shape[0], self.parts
            hp = h.reshape(n, p, self.rank).transpose(1, 0, 2)                     # (p, n, r)
            wp = w.reshape(p, self.out_channels // p, self.rank).transpose(0, 2, 1)  # (p, r, o)
            y = ops.matmul(hp, wp).transpose(1, 0, 2).reshape(n, self.out_channels)
        return y.reshape(shape[:-1] + (self.out_channels,))


class LoRADense(nn.Cell):
    """linear(x) + scale * lora_up(lora_down(x)), scale = lora_scale * alpha / rank.

    The base Dense (and its Parameter objects) is reused as `linear`, not copied. `targets` are the
    common.formats.lora targets of the parts (None where a part has no adapter, e.g. a LoRA without k)."""

    def __init__(self, linear: Dense, rank: int, alpha: float, lora_scale: float = 1.0,
                 parts: int = 1, targets: Tuple[Optional[str], ...] = (None,), dtype=None):
        super().__init__()
        dtype = linear.compute_dtype if dtype is None else compute_dtype(dtype)
        self.linear = linear
        self.lora_down = Dense(linear.in_channels, parts * rank, has_bias=False, dtype=dtype)
        self.lora_up = LoRAUp(rank, linear.out_channels, parts, dtype)
        self.rank, self.alpha, self.parts, self.targets = rank, float(alpha), parts, tuple(targets)
        self.lora_scale = float(lora_scale)
        self.scale = self.lora_scale * self.alpha / rank

    def construct(self, x):
        y = self.linear(x)
        return y + (self.lora_up(self.lora_down(x)) * self.scale).astype(y.dtype)

    def delta(self) -> np.ndarray:
        """The weight update scale * up @ down (block-diagonal per part) as [out, in] float32."""
        down = self.lora_down.weight.asnumpy().astype(np.float32)
        up = self.lora_up.weight.asnumpy().astype(np.float32)
        o, r = up.shape[0] // self.parts, self.rank
        blocks = [up[i * o:(i + 1) * o] @ down[i * r:(i + 1) * r] for i in range(self.parts)]
        return np.concatenate(blocks, 0) * np.float32(self.scale)


# --------------------------------------------------------------------------- target -> layer

@functools.lru_cache(maxsize=8)
def _unet_paths(arch: ModelArch) -> Dict[str, str]:
    """diffusers path of each UNet attention projection -> its path inside UNetModel (LDM's)."""
    out = {}
    for e in keymap.iter_entries(arch, ("unet",)):
        name = e.name[:-len(".weight")]
        if e.name.endswith(".weight") and name.endswith(_UNET_LAYERS):
            out[name] = e.ldm[len(keymap.UNET_PREFIX):-len(".weight")]
    return out


def layer_of(target: str, arch: ModelArch) -> Tuple[str, str, int, int]:
    """common.formats.lora target -> (component, cell path inside that component, part, parts)."""
    component, _, path = target.partition(":")
    if component == "unet" and path in _unet_paths(arch):
        return "unet", _unet_paths(arch)[path], 0, 1
    if component == "text_encoder":
        p = path.split(".")
        if (len(p) == 5 and p[:2] == ["encoder", "layers"] and p[2].isdigit() and p[3] == "self_attn"
                and int(p[2]) < arch.text.used_layers and p[4] in _QKV + ("out_proj",)):
            base = f"transformer_layer.resblocks.{p[2]}.attn.attn."
            if p[4] == "out_proj":
                return "text_encoder", base + "out_proj", 0, 1
            return "text_encoder", base + "in_proj", _QKV.index(p[4]), 3
    raise UserError(f"LoRA target {target} is not a LoRA layer of this model ({arch.path})")


def _group(arch: ModelArch, lora: LoraSet) -> Dict[Tuple[str, str], List[Optional[Tuple[str, LoraPair]]]]:
    """(component, cell path) -> per part (target, pair) or None. Parts of one fused layer must
    share rank and alpha (they share one LoRADense)."""
    groups: Dict[Tuple[str, str], List] = {}
    for target in sorted(lora):
        component, path, part, parts = layer_of(target, arch)
        slots = groups.setdefault((component, path), [None] * parts)
        slots[part] = (target, lora[target])
    for (component, path), slots in groups.items():
        shapes = {(pair.rank, pair.alpha) for _, pair in filter(None, slots)}
        if len(shapes) > 1:
            raise UserError(f"LoRA for {component} {path}: q, k and v adapters have different "
                            f"rank/alpha {sorted(shapes)}; the fused in_proj needs them equal")
    return groups


# --------------------------------------------------------------------------- cell surgery

def _locate(root: nn.Cell, path: str) -> Tuple[nn.Cell, str, nn.Cell]:
    parent, names = root, path.split(".")
    for name in names[:-1]:
        parent = parent._cells[name]           # pylint: disable=protected-access
    return parent, names[-1], parent._cells[names[-1]]  # pylint: disable=protected-access


def _replace(parent: nn.Cell, name: str, cell: nn.Cell) -> None:
    if isinstance(parent, (nn.SequentialCell, nn.CellList)):
        parent[int(name)] = cell               # keeps SequentialCell's cell_list in step
    else:
        setattr(parent, name, cell)


def _prefix(root: nn.Cell) -> str:
    """The name prefix of root's parameters (e.g. 'model.diffusion_model.' inside StableDiffusion)."""
    for path, param in root.parameters_and_names():
        return param.name[:len(param.name) - len(path)] if param.name.endswith(path) else ""
    return ""


def _rename(root: nn.Cell, prefix: str) -> None:
    """Parameter names = prefix + cell path, as after a fresh build (surgery leaves stale ones)."""
    for path, param in root.parameters_and_names():
        param.name = prefix + path


def _forget_compiled(root: nn.Cell) -> None:
    """GRAPH_MODE caches a compiled graph per Cell and does not notice replaced children; drop the
    graphs of every Cell under root so the next call recompiles. (A wrapper Cell above root
    compiled before the surgery is not reached: inject LoRA before building train wrappers.)"""
    from mindspore.graph.api import _cell_graph_executor   # no public API for this in 2.10

    for _, cell in root.cells_and_names():
        if cell.compile_cache:
            _cell_graph_executor.del_net_res(cell, cell.compile_cache)
            cell.compile_cache.clear()


def _after_surgery(root: nn.Cell, prefix: str) -> None:
    _rename(root, prefix)
    _forget_compiled(root)


def _roots(unet, text_encoder) -> Dict[str, nn.Cell]:
    return {"unet": unet, "text_encoder": text_encoder}


def _base(cell: nn.Cell) -> Dense:
    return cell.linear if isinstance(cell, LoRADense) else cell


def _set(param: Parameter, value: np.ndarray) -> None:
    param.set_data(Tensor(np.ascontiguousarray(value, dtype=np.float32)))


# --------------------------------------------------------------------------- public

def inject_lora(arch: ModelArch, unet: Optional[UNetModel], text_encoder: Optional[TextTransformer],
                lora: LoraSet, scale: float = 1.0, dtype=None) -> Dict[str, LoRADense]:
    """Wrap every targeted Dense in a LoRADense holding `lora`'s values (trainable adapters, or
    unmerged inference like MindONE). Returns {"<component>:<cell path>": layer}. Re-injecting
    replaces earlier adapters. Parameter names become MindONE's (`.linear.`, `.lora_down.`)."""
    roots, injected = _roots(unet, text_encoder), {}
    groups = _group(arch, lora)
    for component in sorted({c for c, _ in groups}):
        if roots[component] is None:
            raise UserError(f"LoRA has {component} layers but no {component} was given")
    prefixes = {c: _prefix(r) for c, r in roots.items() if r is not None}
    for (component, path), slots in groups.items():
        parent, name, cell = _locate(roots[component], path)
        base = _base(cell)
        present = [s for s in slots if s is not None]
        rank, alpha = present[0][1].rank, present[0][1].alpha
        layer = LoRADense(base, rank, alpha, scale, len(slots),
                          tuple(s[0] if s else None for s in slots), dtype)
        o = base.out_channels // len(slots)
        zeros_d, zeros_u = np.zeros((rank, base.in_channels), np.float32), np.zeros((o, rank), np.float32)
        _set(layer.lora_down.weight, np.concatenate([s[1].down if s else zeros_d for s in slots], 0))
        _set(layer.lora_up.weight, np.concatenate([s[1].up if s else zeros_u for s in slots], 0))
        _replace(parent, name, layer)
        injected[f"{component}:{path}"] = layer
    for component, prefix in prefixes.items():
        _after_surgery(roots[component], prefix)
    return injected


def merge_lora(arch: ModelArch, unet: Optional[UNetModel], text_encoder: Optional[TextTransformer],
               lora: LoraSet, scale: float = 1.0) -> None:
    """W += up @ down * alpha / rank * scale for every target, in place, without injecting
    anything (inference: no extra matmuls per step, no recompilation)."""
    roots = _roots(unet, text_encoder)
    for (component, path), slots in _group(arch, lora).items():
        if roots[component] is None:
            raise UserError(f"LoRA has {component} layers but no {component} was given")
        base = _base(_locate(roots[component], path)[2])
        weight = base.weight.asnumpy().astype(np.float32)
        o = weight.shape[0] // len(slots)
        for i, slot in enumerate(slots):
            if slot is not None:
                weight[i * o:(i + 1) * o] += slot[1].delta(scale)
        _set(base.weight, weight)


def lora_layers(root: nn.Cell) -> Dict[str, LoRADense]:
    """Cell path -> injected LoRADense under `root`."""
    return {path: cell for path, cell in root.cells_and_names() if isinstance(cell, LoRADense)}


def _unwrap(root: Optional[nn.Cell], fold: bool) -> None:
    if root is None:
        return
    prefix = _prefix(root)
    for path, layer in lora_layers(root).items():
        if fold:
            weight = layer.linear.weight.asnumpy().astype(np.float32) + layer.delta()
            _set(layer.linear.weight, weight)
        parent, name, _ = _locate(root, path)
        _replace(parent, name, layer.linear)
    _after_surgery(root, prefix)


def fold_lora(*roots: Optional[nn.Cell]) -> None:
    """Merge injected adapters into their base weights and put the plain Dense layers back."""
    for root in roots:
        _unwrap(root, fold=True)


def remove_lora(*roots: Optional[nn.Cell]) -> None:
    """Drop injected adapters, leaving the base weights untouched."""
    for root in roots:
        _unwrap(root, fold=False)


def lora_parameters(*roots: Optional[nn.Cell]) -> List[Parameter]:
    """The adapter parameters (lora_down / lora_up) under the given roots, e.g. to train them."""
    out = []
    for root in roots:
        for layer in (lora_layers(root).values() if root is not None else ()):
            out += [layer.lora_down.weight, layer.lora_up.weight]
    return out


def export_lora(*roots: Optional[nn.Cell]) -> LoraSet:
    """The injected adapters as a common.formats.lora LoraSet (fused q/k/v split back per target)."""
    out: LoraSet = {}
    for root in roots:
        for layer in (lora_layers(root).values() if root is not None else ()):
            down = layer.lora_down.weight.asnumpy().astype(np.float32)
            up = layer.lora_up.weight.asnumpy().astype(np.float32)
            r, o = layer.rank, up.shape[0] // layer.parts
            for i, target in enumerate(layer.targets):
                if target is not None:
                    out[target] = LoraPair(down=down[i * r:(i + 1) * r].copy(),
                                           up=up[i * o:(i + 1) * o].copy(), alpha=layer.alpha)
    return out
