"""Evaluation encoders on MindSpore: a CLIP (ViT image tower + text transformer, both projected)
and a DINO ViT as `nn.Cell`s, fed with the weights `common.evaluation.models` has read and checked.

The CLIP Cell's parameters carry MindONE's / MindFormers' names (`visual.ln_pre.gamma`,
`transformer.resblocks.0.attn.in_proj.weight`, `token_embedding.embedding_table`, ...), so
`mindspore.save_checkpoint` of it gives a file MindONE's CLIP loads, and the open_clip names map
onto it through `common.evaluation.models.open_clip_to_mindspore`. The DINO Cell uses timm's names with
LayerNorm gamma/beta (`timm_to_mindspore`). Only classic `mindspore.nn` / `mindspore.ops` layers
are used (they have CPU and Ascend kernels); everything is float32.
"""
from __future__ import annotations

from typing import Callable, Dict

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from common.errors import UserError
from common.evaluation.models import (ClipArch, ClipSource, DinoArch, DinoSource, open_clip_to_mindspore,
                                      timm_to_mindspore)


def _zeros(*shape) -> Parameter:
    return Parameter(Tensor(np.zeros(shape, np.float32)))


class QuickGELU(nn.Cell):
    def construct(self, x):
        return x * ops.sigmoid(1.702 * x)


def _activation(name: str) -> nn.Cell:
    return QuickGELU() if name == "quick_gelu" else nn.GELU(approximate=False)


def _layer_norm(width: int, eps: float) -> nn.LayerNorm:
    return nn.LayerNorm((width,), epsilon=eps)


def _attend(qkv, heads: int, mask=None):
    """Multi-head self-attention from fused q, k, v projections (B, N, 3 * W) -> (B, N, W)."""
    b, n, w3 = qkv.shape
    d = w3 // 3 // heads
    qkv = qkv.reshape(b, n, 3, heads, d).transpose(2, 0, 3, 1, 4)      # 3, B, heads, N, d
    q, k, v = qkv[0], qkv[1], qkv[2]
    scores = ops.matmul(q * (d ** -0.5), k.transpose(0, 1, 3, 2))
    if mask is not None:
        scores = scores + mask
    out = ops.matmul(ops.softmax(scores, -1), v)
    return out.transpose(0, 2, 1, 3).reshape(b, n, heads * d)


class _Mlp(nn.Cell):
    def __init__(self, width: int, hidden: int, act: str, names=("c_fc", "c_proj")):
        super().__init__()
        self._names = names
        setattr(self, names[0], nn.Dense(width, hidden))
        self.act = _activation(act)
        setattr(self, names[1], nn.Dense(hidden, width))

    def construct(self, x):
        return getattr(self, self._names[1])(self.act(getattr(self, self._names[0])(x)))


class _ClipAttention(nn.Cell):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj = nn.Dense(width, 3 * width)
        self.out_proj = nn.Dense(width, width)

    def construct(self, x, mask=None):
        return self.out_proj(_attend(self.in_proj(x), self.heads, mask))


class ResidualAttentionBlock(nn.Cell):
    """CLIP's pre-LN block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp: int, act: str, eps: float):
        super().__init__()
        self.ln_1 = _layer_norm(width, eps)
        self.attn = _ClipAttention(width, heads)
        self.ln_2 = _layer_norm(width, eps)
        self.mlp = _Mlp(width, mlp, act)

    def construct(self, x, mask=None):
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Cell):
    def __init__(self, width: int, layers: int, heads: int, mlp: int, act: str, eps: float):
        super().__init__()
        self.resblocks = nn.CellList([ResidualAttentionBlock(width, heads, mlp, act, eps) for _ in range(layers)])

    def construct(self, x, mask=None):
        for block in self.resblocks:
            x = block(x, mask)
        return x


class VisionTransformer(nn.Cell):
    """CLIP's image tower: patches + class token + positions, ln_pre, blocks, ln_post(CLS) @ proj."""

    def __init__(self, a: ClipArch):
        super().__init__()
        w = a.vision_width
        self.conv1 = nn.Conv2d(3, w, a.patch_size, stride=a.patch_size, pad_mode="valid", has_bias=False,
                               weight_init="zeros")
        self.class_embedding = _zeros(w)
        self.positional_embedding = _zeros(a.grid ** 2 + 1, w)
        self.ln_pre = _layer_norm(w, a.eps)
        self.transformer = Transformer(w, a.vision_layers, a.vision_heads, a.vision_mlp, a.act, a.eps)
        self.ln_post = _layer_norm(w, a.eps)
        self.proj = _zeros(w, a.embed_dim)

    def construct(self, pixels):
        x = self.conv1(pixels)                                   # B, W, g, g
        b, w = x.shape[0], x.shape[1]
        x = x.reshape(b, w, -1).transpose(0, 2, 1)               # B, g*g, W
        cls = ops.broadcast_to(self.class_embedding.reshape(1, 1, w), (b, 1, w))
        x = ops.concat((cls, x), 1) + self.positional_embedding
        x = self.transformer(self.ln_pre(x))
        return ops.matmul(self.ln_post(x[:, 0]), self.proj)


class ClipModel(nn.Cell):
    """Both CLIP towers under MindONE's names: `encode_image(pixels)`, `encode_text(ids, eot)`."""

    def __init__(self, a: ClipArch):
        super().__init__()
        self.visual = VisionTransformer(a)
        self.transformer = Transformer(a.text_width, a.text_layers, a.text_heads, a.text_mlp, a.act, a.eps)
        self.token_embedding = nn.Embedding(a.vocab_size, a.text_width, embedding_table="zeros")
        self.positional_embedding = _zeros(a.context_length, a.text_width)
        self.ln_final = _layer_norm(a.text_width, a.eps)
        self.text_projection = _zeros(a.text_width, a.embed_dim)
        self.logit_scale = Parameter(Tensor(np.zeros((), np.float32)))
        n = a.context_length
        self.causal_mask = Tensor(np.triu(np.full((n, n), -np.inf, np.float32), 1))

    def encode_image(self, pixels):
        return self.visual(pixels)

    def encode_text(self, ids, eot_index):
        """ids (B, L) int32; eot_index (B, 2) int32 rows of [b, position of b's end token]."""
        x = self.token_embedding(ids) + self.positional_embedding
        x = self.ln_final(self.transformer(x, self.causal_mask))
        return ops.matmul(ops.gather_nd(x, eot_index), self.text_projection)


class _DinoAttention(nn.Cell):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Dense(width, 3 * width)
        self.proj = nn.Dense(width, width)

    def construct(self, x):
        return self.proj(_attend(self.qkv(x), self.heads))


class DinoBlock(nn.Cell):
    def __init__(self, a: DinoArch):
        super().__init__()
        self.norm1 = _layer_norm(a.width, a.eps)
        self.attn = _DinoAttention(a.width, a.heads)
        self.norm2 = _layer_norm(a.width, a.eps)
        self.mlp = _Mlp(a.width, a.mlp, "gelu", names=("fc1", "fc2"))

    def construct(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Cell):
    def __init__(self, a: DinoArch):
        super().__init__()
        self.proj = nn.Conv2d(3, a.width, a.patch_size, stride=a.patch_size, pad_mode="valid", has_bias=True,
                              weight_init="zeros", bias_init="zeros")

    def construct(self, pixels):
        x = self.proj(pixels)
        return x.reshape(x.shape[0], x.shape[1], -1).transpose(0, 2, 1)


class DinoViT(nn.Cell):
    """DINO's ViT (timm layout): the embedding is the CLS token after the final LayerNorm."""

    def __init__(self, a: DinoArch):
        super().__init__()
        self.patch_embed = _PatchEmbed(a)
        self.cls_token = _zeros(1, 1, a.width)
        self.pos_embed = _zeros(1, a.grid ** 2 + 1, a.width)
        self.blocks = nn.CellList([DinoBlock(a) for _ in range(a.layers)])
        self.norm = _layer_norm(a.width, a.eps)

    def construct(self, pixels):
        x = self.patch_embed(pixels)
        b, w = x.shape[0], x.shape[2]
        x = ops.concat((ops.broadcast_to(self.cls_token, (b, 1, w)), x), 1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]


def load_weights(net: nn.Cell, weights: Dict[str, np.ndarray], to_ms: Callable[[str], str], what: str) -> None:
    """Set every parameter of `net` from canonical-named arrays (`to_ms` maps a name to the Cell's)."""
    by_ms = {to_ms(k): v for k, v in weights.items()}
    params = dict(net.parameters_and_names())
    if set(params) != set(by_ms):
        missing = sorted(set(params) - set(by_ms))[:3]
        extra = sorted(set(by_ms) - set(params))[:3]
        raise UserError(f"{what}: weights do not fit the MindSpore model (missing {missing}, extra {extra})")
    for name, param in params.items():
        value = by_ms[name]
        if tuple(param.shape) != tuple(value.shape):
            raise UserError(f"{what}: {name} has shape {tuple(value.shape)}, the model needs {tuple(param.shape)}")
        param.set_data(Tensor(np.array(value, np.float32, order="C")))


class ClipEncoder:
    """CLIP image and text embeddings (projected, not normalised) of a `ClipSource`."""

    backend = "ascend"
    library = f"mindspore {ms.__version__}"

    def __init__(self, source: ClipSource):
        self.arch = source.arch
        self.net = ClipModel(source.arch)
        self.net.set_train(False)
        load_weights(self.net, source.weights, open_clip_to_mindspore, source.path)

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        return self.net.encode_image(Tensor(np.ascontiguousarray(pixels, np.float32))).asnumpy()

    def encode_text(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        # CLIP pools the end-of-text token, the highest id of each row (first one if repeated).
        eot = np.stack([np.arange(len(ids)), ids.argmax(-1)], 1).astype(np.int32)
        return self.net.encode_text(Tensor(ids.astype(np.int32)), Tensor(eot)).asnumpy()


class DinoEncoder:
    """DINO CLS embeddings of a `DinoSource`."""

    backend = "ascend"
    library = f"mindspore {ms.__version__}"

    def __init__(self, source: DinoSource):
        self.arch = source.arch
        self.net = DinoViT(source.arch)
        self.net.set_train(False)
        load_weights(self.net, source.weights, timm_to_mindspore, source.path)

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        return self.net(Tensor(np.ascontiguousarray(pixels, np.float32))).asnumpy()
