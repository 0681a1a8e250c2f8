"""SD's text encoders as one MindSpore Cell in MindONE's layout, built from `common.arch.TextArch`.

SD1 (OpenAI CLIP ViT-L/14, `kind="clip"`): quick-GELU, all blocks, then the final LayerNorm
(= transformers' `last_hidden_state`). SD2 (OpenCLIP ViT-H/14, `kind="openclip"`): GELU, the
first `used_layers` blocks (the penultimate layer), then `ln_final`. Both are pre-LN
transformers with a causal mask; MindONE stores both as

    embedding_table, positional_embedding, ln_final.{gamma,beta},
    transformer_layer.resblocks.N.{ln_1, ln_2, c_fc, c_proj, attn.attn.in_proj, attn.attn.out_proj}

with q, k, v fused in `in_proj` (rows in q, k, v order). Only the blocks that run are built.
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import initializer

from common.arch import TextArch
from .layers import FP32, Dense, LayerNorm, activation, attention, compute_dtype

MASKED = float(np.finfo(np.float32).min)    # added to a hidden key's scores, as transformers does


class MultiheadAttention(nn.Cell):
    """Self-attention with a fused (width -> 3 * width) input projection."""

    def __init__(self, width: int, heads: int, dtype=FP32):
        super().__init__()
        self.heads = heads
        self.in_proj = Dense(width, 3 * width, dtype=dtype)
        self.out_proj = Dense(width, width, dtype=dtype)

    def construct(self, x, mask):
        q, k, v = ops.chunk(self.in_proj(x), 3, -1)
        return self.out_proj(attention(q, k, v, self.heads, mask))


class CausalSelfAttention(nn.Cell):
    """Holds the causal mask (-inf above the diagonal) for its MultiheadAttention `attn`."""

    def __init__(self, width: int, heads: int, context_length: int, dtype=FP32):
        super().__init__()
        self.attn = MultiheadAttention(width, heads, dtype)
        self.mask = Tensor(np.triu(np.full((context_length, context_length), -np.inf, np.float32), 1))

    def construct(self, x, key_bias=None):
        n = x.shape[1]
        mask = self.mask[:n, :n]
        if key_bias is not None:               # [B, n]: padded keys hidden from every query
            mask = mask + key_bias.reshape(key_bias.shape[0], 1, 1, n)
        return self.attn(x, mask)


class ResidualAttentionBlock(nn.Cell):
    def __init__(self, t: TextArch, dtype=FP32):
        super().__init__()
        w = t.width
        self.ln_1 = LayerNorm(w, t.eps)
        self.attn = CausalSelfAttention(w, t.heads, t.context_length, dtype)
        self.ln_2 = LayerNorm(w, t.eps)
        self.c_fc = Dense(w, w * t.mlp_ratio, dtype=dtype)
        self.act = activation(t.hidden_act)
        self.c_proj = Dense(w * t.mlp_ratio, w, dtype=dtype)

    def construct(self, x, key_bias=None):
        x = x + self.attn(self.ln_1(x), key_bias)
        return x + self.c_proj(self.act(self.c_fc(self.ln_2(x))))


class Transformer(nn.Cell):
    def __init__(self, t: TextArch, dtype=FP32):
        super().__init__()
        self.resblocks = nn.CellList([ResidualAttentionBlock(t, dtype) for _ in range(t.used_layers)])

    def construct(self, x, key_bias=None):
        for block in self.resblocks:
            x = block(x, key_bias)
        return x


class TextTransformer(nn.Cell):
    """construct(ids [B, L] int, mask [B, L] float 1/0 or None) -> hidden states [B, L, width]
    float32 (SD's conditioning). `mask` hides padding from attention (diffusers'
    --text_encoder_use_attention_mask; transformers' attention_mask)."""

    def __init__(self, t: TextArch, dtype=FP32):
        super().__init__()
        dtype = compute_dtype(dtype)
        self.arch = t
        self.dtype = dtype
        self.embedding_table = Parameter(initializer("zeros", (t.vocab_size, t.width), FP32),
                                         name="embedding_table")
        self.positional_embedding = Parameter(initializer("zeros", (t.context_length, t.width), FP32),
                                              name="positional_embedding")
        self.transformer_layer = Transformer(t, dtype)
        self.ln_final = LayerNorm(t.width, t.eps)

    def construct(self, ids, mask=None):
        n = ids.shape[1]
        x = ops.gather(self.embedding_table, ids.astype(ms.int32), 0) + self.positional_embedding[:n]
        key_bias = None if mask is None else (1.0 - mask.astype(FP32)) * MASKED
        x = self.transformer_layer(x.astype(self.dtype), key_bias)
        return self.ln_final(x).astype(FP32)
