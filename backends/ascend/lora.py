"""LoRA on the MindSpore backend: trainable LoRA layers injected into any Dense or Conv2d of the
UNet and the text encoder, folded into the base weights, or removed again. (Inference with LoRA
files of any kind merges them into the weights before the model is built:
common.formats.lora.merge_loras.)

Layout follows MindONE: an injected layer replaces the Dense `to_q` by a `LoRADense` whose base
layer is `to_q.linear` and whose adapters are `to_q.lora_down` / `to_q.lora_up`, giving checkpoint
names such as `model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_down.weight`.
A Conv2d becomes a `LoRAConv2d` (base `<path>.conv`, a down conv with the base's kernel, stride and
padding, a 1x1 up conv: LoCon, as peft and kohya build it).
The text encoder keeps q, k and v fused in `attn.attn.in_proj`; a `common.formats.lora.LoraSet` adapts q,
k and v separately (as diffusers / PEFT do), so the fused layer carries the three adapters side by
side (`parts=3`: down [3r, in] stacks the q / k / v downs, up [3 * width, r] their ups, each part of
the output using only its own r columns). That reproduces the per-projection LoRA exactly, and a
MindONE text-encoder LoRA (one shared down) is the special case of three equal downs.

Targets are `common.formats.lora` names (`unet:<diffusers path>`, `text_encoder:encoder.layers.N.mlp.fc1`),
mapped to cells through MindONE's parameter names (common.formats.mindspore_layout), and both
backends apply the same update `up @ down * alpha / rank * scale`.
"""
from __future__ import annotations

import functools
from typing import Dict, List, Optional, Tuple

import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import initializer

from common.arch import ModelArch
from common.errors import UserError
from common.formats.keymap import UNET_PREFIX
from common.formats.lora import LoraPair, LoraSet, adaptable_layers
from common.formats.mindspore_layout import MS_TEXT_PREFIX, mindspore_entries
from .layers import FP32, Conv2d, Dense, compute_dtype, dropout as dropout_cell
from .text_encoder import TextTransformer
from .unet import UNetModel


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


class LoRALayer(nn.Cell):
    """base(x) + scale * lora_up(lora_down(dropout(x))), scale = lora_scale * alpha / rank. The
    base cell (and its Parameter objects) is reused under the name BASE, not copied. `targets` are
    the common.formats.lora targets of the parts (None where a part has no adapter)."""
    BASE = ""

    def _setup(self, rank: int, alpha: float, lora_scale: float, parts: int, targets, dropout: float) -> None:
        self.rank, self.alpha, self.parts, self.targets = rank, float(alpha), parts, tuple(targets)
        self.lora_scale = float(lora_scale)
        self.scale = self.lora_scale * self.alpha / rank
        self.dropout = dropout_cell(dropout)

    @property
    def base(self) -> nn.Cell:
        return getattr(self, self.BASE)

    def construct(self, x):
        y = self.base(x)
        return y + (self.lora_up(self.lora_down(self.dropout(x))) * self.scale).astype(y.dtype)

    def delta(self) -> np.ndarray:
        """The weight update scale * up @ down (block-diagonal per part), base weight's shape, float32."""
        down = self.lora_down.weight.asnumpy().astype(np.float32)
        up = self.lora_up.weight.asnumpy().astype(np.float32)
        up = up.reshape(up.shape[0], -1)
        o, r = up.shape[0] // self.parts, self.rank
        flat = down.reshape(down.shape[0], -1)
        blocks = [up[i * o:(i + 1) * o] @ flat[i * r:(i + 1) * r] for i in range(self.parts)]
        return (np.concatenate(blocks, 0) * np.float32(self.scale)).reshape(self.base.weight.shape)


class LoRADense(LoRALayer):
    """A Dense with LoRA (MindONE's LoRADenseLayer naming: `linear`, `lora_down`, `lora_up`)."""
    BASE = "linear"

    def __init__(self, linear: Dense, rank: int, alpha: float, lora_scale: float = 1.0,
                 parts: int = 1, targets: Tuple[Optional[str], ...] = (None,), dtype=None, dropout: float = 0.0):
        super().__init__()
        dtype = linear.compute_dtype if dtype is None else compute_dtype(dtype)
        self.linear = linear
        self.lora_down = Dense(linear.in_channels, parts * rank, has_bias=False, dtype=dtype)
        self.lora_up = LoRAUp(rank, linear.out_channels, parts, dtype)
        self._setup(rank, alpha, lora_scale, parts, targets, dropout)


class LoRAConv2d(LoRALayer):
    """A Conv2d with LoCon: down has the base's kernel, stride and padding, up is 1x1."""
    BASE = "conv"

    def __init__(self, conv: Conv2d, rank: int, alpha: float, lora_scale: float = 1.0,
                 parts: int = 1, targets: Tuple[Optional[str], ...] = (None,), dtype=None, dropout: float = 0.0):
        super().__init__()
        dtype = conv.compute_dtype if dtype is None else compute_dtype(dtype)
        self.conv = conv
        self.lora_down = Conv2d(conv.in_channels, rank, conv.kernel_size[0], conv.stride[0], conv.padding,
                                dtype, has_bias=False)
        self.lora_up = Conv2d(rank, conv.out_channels, 1, dtype=dtype, has_bias=False)
        self._setup(rank, alpha, lora_scale, parts, targets, dropout)


# --------------------------------------------------------------------------- target -> layer

@functools.lru_cache(maxsize=8)
def _cells(arch: ModelArch) -> Dict[str, Tuple[str, str, int, int]]:
    """Every adaptable target -> (component, cell path inside that component, part, parts), through
    MindONE's parameter names (a fused text in_proj holds q, k and v as 3 parts)."""
    by_ldm = {}
    for me in mindspore_entries(arch, ("unet", "text_encoder")):
        for slot, source in enumerate(me.sources):
            by_ldm[source] = (me, slot)
    out = {}
    for target, layer in adaptable_layers(arch).items():
        me, slot = by_ldm[layer.ldm]
        component = target.split(":", 1)[0]
        path = me.ms[len(UNET_PREFIX if component == "unet" else MS_TEXT_PREFIX):-len(".weight")]
        if len(me.sources) > 1:
            part, parts = slot, len(me.sources)
        elif layer.rows:
            span = layer.rows[1] - layer.rows[0]
            part, parts = layer.rows[0] // span, me.shape[0] // span
        else:
            part, parts = 0, 1
        out[target] = (component, path, part, parts)
    return out


def layer_of(target: str, arch: ModelArch) -> Tuple[str, str, int, int]:
    """common.formats.lora target -> (component, cell path inside that component, part, parts)."""
    try:
        return _cells(arch)[target]
    except KeyError:
        raise UserError(f"LoRA target {target} is not a layer of this model ({arch.path})") from None


def _group(arch: ModelArch, lora: LoraSet) -> Dict[Tuple[str, str], List[Optional[Tuple[str, LoraPair]]]]:
    """(component, cell path) -> per part (target, pair) or None. Parts of one fused layer must
    share rank and alpha (they share one LoRADense)."""
    groups: Dict[Tuple[str, str], List] = {}
    for target in sorted(lora):
        if not isinstance(lora[target], LoraPair) or lora[target].mid is not None:
            raise UserError(f"LoRA layer {target}: only plain LoRA / LoCon adapters can be trained or "
                            f"injected ({lora[target].kind} layers are merged into the weights instead)")
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


def _base(cell: nn.Cell) -> nn.Cell:
    return cell.base if isinstance(cell, LoRALayer) else cell


def _set(param: Parameter, value: np.ndarray) -> None:
    param.set_data(Tensor(np.ascontiguousarray(value, dtype=np.float32)))


# --------------------------------------------------------------------------- public

def inject_lora(arch: ModelArch, unet: Optional[UNetModel], text_encoder: Optional[TextTransformer],
                lora: LoraSet, scale: float = 1.0, dtype=None, dropout: float = 0.0) -> Dict[str, LoRALayer]:
    """Wrap every targeted Dense / Conv2d in a LoRADense / LoRAConv2d holding `lora`'s values
    (trainable adapters, or unmerged inference like MindONE). Returns {"<component>:<cell path>":
    layer}. Re-injecting replaces earlier adapters. Dense parameter names become MindONE's
    (`.linear.`, `.lora_down.`)."""
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
        kind = LoRAConv2d if isinstance(base, Conv2d) else LoRADense
        layer = kind(base, rank, alpha, scale, len(slots), tuple(s[0] if s else None for s in slots), dtype,
                     dropout)
        _set_adapters(layer, dict(present))
        _replace(parent, name, layer)
        injected[f"{component}:{path}"] = layer
    for component, prefix in prefixes.items():
        _after_surgery(roots[component], prefix)
    return injected


def _set_adapters(layer: LoRALayer, lora: LoraSet) -> None:
    """A layer's adapters from a LoraSet (fused q/k/v parts stacked; absent parts zero)."""
    down_shape, up_shape = layer.lora_down.weight.shape, layer.lora_up.weight.shape
    r, o = layer.rank, up_shape[0] // layer.parts
    downs, ups = [], []
    for target in layer.targets:
        pair = lora.get(target) if target else None
        downs.append(np.asarray(pair.down, np.float32).reshape((r,) + tuple(down_shape[1:])) if pair
                     else np.zeros((r,) + tuple(down_shape[1:]), np.float32))
        ups.append(np.asarray(pair.up, np.float32).reshape((o,) + tuple(up_shape[1:])) if pair
                   else np.zeros((o,) + tuple(up_shape[1:]), np.float32))
    _set(layer.lora_down.weight, np.concatenate(downs, 0))
    _set(layer.lora_up.weight, np.concatenate(ups, 0))


def reset_lora(lora: LoraSet, *roots: Optional[nn.Cell]) -> None:
    """Set every injected layer's adapters to `lora`'s values (a new run on injected networks)."""
    for root in roots:
        for layer in (lora_layers(root).values() if root is not None else ()):
            _set_adapters(layer, lora)


def lora_layers(root: nn.Cell) -> Dict[str, LoRALayer]:
    """Cell path -> injected LoRA layer under `root`."""
    return {path: cell for path, cell in root.cells_and_names() if isinstance(cell, LoRALayer)}


def base_names(root: nn.Cell) -> Dict[str, Tuple[str, Optional[LoRALayer]]]:
    """Network name of each base parameter of an injected layer -> (its plain name as before the
    injection, the layer when the parameter is the weight the adapters update)."""
    out = {}
    for layer in lora_layers(root).values():
        for p in layer.base.get_parameters():
            param = p.name.rpartition(".")[2]           # the base's own parameters: `<path>.<BASE>.<param>`
            plain = p.name[:-len(f".{layer.BASE}.{param}")] + "." + param
            out[p.name] = (plain, layer if p is layer.base.weight else None)
    return out


def _unwrap(root: Optional[nn.Cell], fold: bool) -> None:
    if root is None:
        return
    prefix = _prefix(root)
    for path, layer in lora_layers(root).items():
        if fold:
            weight = layer.base.weight.asnumpy().astype(np.float32) + layer.delta()
            _set(layer.base.weight, weight)
        parent, name, _ = _locate(root, path)
        _replace(parent, name, layer.base)
    _after_surgery(root, prefix)


def fold_lora(*roots: Optional[nn.Cell]) -> None:
    """Merge injected adapters into their base weights and put the plain layers back."""
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
