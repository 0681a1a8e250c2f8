"""The weight updates of the adapter kinds civitai users share, in numpy: LoRA / LoCon (kohya,
diffusers, PEFT), LyCORIS LoHa and LoKr, LyCORIS full `diff`, and DoRA's weight decomposition.

Every adapter computes its update `delta(scale, shape)` as a float32 array of the adapted layer's
weight shape ([out, in] for a Linear, [out, in, kh, kw] for a Conv2d), so merging into a model is
one rule for all kinds (common.formats.lora.merge_loras). The formulas are the format authors'
(LyCORIS, kohya) and agree with peft's LoHa / LoKr / DoRA layers and with diffusers' and ComfyUI's
loaders (tests check against peft and diffusers):

- LoRA:  up @ down * alpha / rank; a conv down [r, in, kh, kw] with up [out, r, 1, 1] (LoCon), or
         with LyCORIS' Tucker core `mid` [r, r, kh, kw] between a 1x1 down and a 1x1 up.
- LoHa:  (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank (Hadamard product), rank = w1_b rows; with
         Tucker cores t1 / t2, each factor is t x_1 w_a x_2 w_b (w_a then [r, out]).
- LoKr:  kron(w1, w2), each factor stored whole or as a product a @ b (w2 optionally with a
         Tucker core t2); scaled by alpha / rank only when a factor is decomposed (rank = rows of
         w2_b, else of w1_b), by 1 when both are whole: LyCORIS' rule, which diffusers follows.
- diff:  the update itself (LyCORIS "full").
- DoRA (`dora_scale`, LyCORIS / kohya): W' = (W + dW) * dora_scale / ||W + dW||, the norm per
         output row when dora_scale has `out` entries ([out, 1, ...], peft's and LyCORIS' default),
         per input column when it has `in` ([1, in, ...], LyCORIS' older wd_on_out=False). A
         strength s gives W + s * (W' - W), so 0 is the base model (ComfyUI's choice).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

import numpy as np

Shape = Tuple[int, ...]


def _f32(x: Optional[np.ndarray]) -> Optional[np.ndarray]:
    return None if x is None else np.asarray(x, np.float32)


def _tucker(core: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """LyCORIS' rebuild: core [r1, r2, kh, kw], a [r1, out], b [r2, in] -> [out, in, kh, kw]."""
    return np.einsum("ijkl,jr,ip->prkl", _f32(core), _f32(b).reshape(b.shape[0], -1),
                     _f32(a).reshape(a.shape[0], -1))


def fit(delta: np.ndarray, shape: Optional[Shape]) -> np.ndarray:
    """`delta` in the layer's weight shape (a 1x1 conv and a linear of the same size are one
    layer in two spellings: SD1's proj_in is a conv, SD2's a linear)."""
    if shape is None or tuple(delta.shape) == tuple(shape):
        return delta
    if delta.size != int(np.prod(shape)):
        raise ValueError(f"update of shape {tuple(delta.shape)} does not fit a weight of shape {tuple(shape)}")
    return delta.reshape(shape)


@dataclass
class LoraPair:
    """LoRA / LoCon: down [rank, in] or [rank, in, kh, kw], up [out, rank] or [out, rank, 1, 1];
    `mid` is LyCORIS' Tucker core [rank, rank, kh, kw] (down and up are then 1x1)."""
    down: np.ndarray
    up: np.ndarray
    alpha: float
    mid: Optional[np.ndarray] = None
    dora_scale: Optional[np.ndarray] = None

    kind = "LoRA"

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self, scale: float = 1.0, shape: Optional[Shape] = None) -> np.ndarray:
        """The weight update up @ down * alpha / rank * scale, in float32."""
        factor = np.float32(self.alpha / self.rank * scale)
        up = _f32(self.up).reshape(self.up.shape[0], -1)
        if self.mid is not None:
            return fit(_tucker(self.mid, up.T, self.down) * factor, shape)
        down = _f32(self.down)
        out = (up @ down.reshape(down.shape[0], -1)).reshape((up.shape[0],) + down.shape[1:])
        return fit(out * factor, shape)

    def update_shape(self) -> Shape:
        if self.up.shape[1] != (self.mid.shape[0] if self.mid is not None else self.rank):
            return ()                                   # inconsistent ranks: fits nothing
        inner = (self.down.shape[1],) + tuple(self.mid.shape[2:]) if self.mid is not None else self.down.shape[1:]
        return (self.up.shape[0],) + tuple(inner)

    def tensors(self) -> Dict[str, np.ndarray]:
        out = {"lora_down.weight": self.down, "lora_up.weight": self.up}
        if self.mid is not None:
            out["lora_mid.weight"] = self.mid
        return out


@dataclass
class LohaPair:
    """LyCORIS LoHa (Hadamard product of two low-rank products)."""
    w1_a: np.ndarray
    w1_b: np.ndarray
    w2_a: np.ndarray
    w2_b: np.ndarray
    alpha: float
    t1: Optional[np.ndarray] = None
    t2: Optional[np.ndarray] = None
    dora_scale: Optional[np.ndarray] = None

    kind = "LoHa"

    @property
    def rank(self) -> int:
        return int(self.w1_b.shape[0])

    def _factor(self, a, b, t) -> np.ndarray:
        return _tucker(t, a, b) if t is not None else _f32(a) @ _f32(b).reshape(b.shape[0], -1)

    def delta(self, scale: float = 1.0, shape: Optional[Shape] = None) -> np.ndarray:
        w1 = self._factor(self.w1_a, self.w1_b, self.t1)
        w2 = self._factor(self.w2_a, self.w2_b, self.t2)
        return fit(w1 * w2 * np.float32(self.alpha / self.rank * scale), shape)

    def update_shape(self) -> Shape:
        if self.t1 is not None:
            return (self.w1_a.shape[1], self.w1_b.shape[1]) + tuple(self.t1.shape[2:])
        return (self.w1_a.shape[0], int(np.prod(self.w1_b.shape[1:])))

    def tensors(self) -> Dict[str, np.ndarray]:
        out = {"hada_w1_a": self.w1_a, "hada_w1_b": self.w1_b, "hada_w2_a": self.w2_a, "hada_w2_b": self.w2_b}
        out.update({k: v for k, v in (("hada_t1", self.t1), ("hada_t2", self.t2)) if v is not None})
        return out


@dataclass
class LokrPair:
    """LyCORIS LoKr (Kronecker product); each factor whole (w1 / w2) or decomposed (_a @ _b)."""
    w1: Optional[np.ndarray] = None
    w1_a: Optional[np.ndarray] = None
    w1_b: Optional[np.ndarray] = None
    w2: Optional[np.ndarray] = None
    w2_a: Optional[np.ndarray] = None
    w2_b: Optional[np.ndarray] = None
    t2: Optional[np.ndarray] = None
    alpha: Optional[float] = None
    dora_scale: Optional[np.ndarray] = None

    kind = "LoKr"

    @property
    def rank(self) -> Optional[int]:
        """The rank alpha refers to: w2's when decomposed, else w1's, else None (no scaling)."""
        b = self.w2_b if self.w2_b is not None else self.w1_b
        return None if b is None else int(b.shape[0])

    def delta(self, scale: float = 1.0, shape: Optional[Shape] = None) -> np.ndarray:
        w1 = _f32(self.w1) if self.w1 is not None else _f32(self.w1_a) @ _f32(self.w1_b)
        if self.w2 is not None:
            w2 = _f32(self.w2)
        elif self.t2 is not None:
            w2 = _tucker(self.t2, self.w2_a, self.w2_b)
        else:
            w2 = _f32(self.w2_a) @ _f32(self.w2_b).reshape(self.w2_b.shape[0], -1)
        if w2.ndim == 4:
            w1 = w1.reshape(w1.shape + (1, 1))
        factor = scale if self.alpha is None or self.rank is None else self.alpha / self.rank * scale
        return fit(np.kron(w1, w2) * np.float32(factor), shape)

    def update_shape(self) -> Shape:
        o1, i1 = self.w1.shape if self.w1 is not None else (self.w1_a.shape[0], self.w1_b.shape[1])
        if self.w2 is not None:
            w2 = tuple(self.w2.shape)
        elif self.t2 is not None:
            w2 = (self.w2_a.shape[1], self.w2_b.shape[1]) + tuple(self.t2.shape[2:])
        else:
            w2 = (self.w2_a.shape[0], int(np.prod(self.w2_b.shape[1:])))
        return (o1 * w2[0], i1 * w2[1]) + w2[2:]

    def tensors(self) -> Dict[str, np.ndarray]:
        names = ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")
        return {f"lokr_{n}": getattr(self, n) for n in names if getattr(self, n) is not None}


@dataclass
class FullDiff:
    """LyCORIS "full": the weight update stored as it is."""
    diff: np.ndarray
    dora_scale: Optional[np.ndarray] = None
    alpha = None

    kind = "full diff"
    rank = None

    def delta(self, scale: float = 1.0, shape: Optional[Shape] = None) -> np.ndarray:
        return fit(_f32(self.diff) * np.float32(scale), shape)

    def update_shape(self) -> Shape:
        return tuple(self.diff.shape)

    def tensors(self) -> Dict[str, np.ndarray]:
        return {"diff": self.diff}


Adapter = Union[LoraPair, LohaPair, LokrPair, FullDiff]


def apply(weight: np.ndarray, adapter: Adapter, scale: float) -> np.ndarray:
    """weight (float32, the layer's shape) with the adapter's update at strength `scale`."""
    if adapter.dora_scale is None:
        return weight + adapter.delta(scale, weight.shape)
    merged = weight + adapter.delta(1.0, weight.shape)
    return weight + np.float32(scale) * (decompose(merged, adapter.dora_scale) - weight)


def decompose(merged: np.ndarray, dora_scale: np.ndarray) -> np.ndarray:
    """DoRA: the merged weight's per-row (or per-column) norm replaced by the learned magnitude."""
    magnitude = _f32(dora_scale)
    out = merged.shape[0]
    if magnitude.size == out and (magnitude.ndim <= 1 or magnitude.shape[0] == out):
        norm = np.linalg.norm(merged.reshape(out, -1), axis=1)
        shape = (out,) + (1,) * (merged.ndim - 1)
    elif magnitude.size == merged.shape[1]:
        norm = np.linalg.norm(np.swapaxes(merged, 0, 1).reshape(merged.shape[1], -1), axis=1)
        shape = (1, merged.shape[1]) + (1,) * (merged.ndim - 2)
    else:
        raise ValueError(f"dora_scale of shape {tuple(magnitude.shape)} fits neither axis of a weight "
                         f"of shape {tuple(merged.shape)}")
    norm = norm.reshape(shape) + np.finfo(np.float32).eps
    return merged * (magnitude.reshape(shape) / norm)
