"""The SD 1.x / 2.x UNet (LDM's openaimodel.UNetModel) as a MindSpore Cell, built from
`common.arch.UNetArch`.

Parameter names are MindONE's (`input_blocks.1.0.in_layers_norm.gamma`,
`input_blocks.1.0.in_layers_conv.conv.weight`, `input_blocks.3.0.op.conv.weight`,
`output_blocks.2.1.conv.conv.weight`, `out.2.conv.weight`, ...), so inside `StableDiffusion`
(backends.ascend.models) they read `model.diffusion_model.*` exactly as in a MindONE `.ckpt`.
The computation is LDM's, which diffusers' UNet2DConditionModel reproduces.
"""
from __future__ import annotations

from mindspore import nn, ops

from common.arch import UNetArch
from .layers import (FP32, Dense, Conv2d, GroupNorm, LayerNorm, SiLU, WrappedConv2d, attention,
                     compute_dtype, dropout, timestep_embedding, timestep_frequencies,
                     upsample_nearest2x)


class EmbedSequential(nn.SequentialCell):
    """LDM's TimestepEmbedSequential: every layer takes (x, emb, context) and uses what it needs."""

    def construct(self, x, emb, context):
        for cell in self.cell_list:
            x = cell(x, emb, context)
        return x


class ResBlock(nn.Cell):
    """GroupNorm-SiLU-conv, add the projected time embedding, GroupNorm-SiLU-dropout-conv, plus a
    (1x1 conv) skip connection."""

    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int, dropout_p: float = 0.0,
                 dtype=FP32):
        super().__init__()
        self.in_layers_norm = GroupNorm(groups, cin)
        self.in_layers_silu = SiLU()
        self.in_layers_conv = WrappedConv2d(cin, cout, 3, padding=1, dtype=dtype)
        self.emb_layers = nn.SequentialCell([SiLU(), Dense(emb_dim, cout, dtype=dtype)])
        self.out_layers_norm = GroupNorm(groups, cout)
        self.out_layers_silu = SiLU()
        self.out_layers_drop = dropout(dropout_p)
        self.out_layers_conv = WrappedConv2d(cout, cout, 3, padding=1, dtype=dtype)
        self.has_skip = cin != cout
        if self.has_skip:
            self.skip_connection = WrappedConv2d(cin, cout, 1, dtype=dtype)

    def construct(self, x, emb, context=None):
        h = self.in_layers_conv(self.in_layers_silu(self.in_layers_norm(x)))
        e = self.emb_layers(emb).astype(h.dtype)
        h = h + e.reshape(e.shape + (1, 1))
        h = self.out_layers_conv(self.out_layers_drop(self.out_layers_silu(self.out_layers_norm(h))))
        if self.has_skip:
            x = self.skip_connection(x)
        return x + h


class Downsample(nn.Cell):
    """Stride-2 3x3 conv (padding 1)."""

    def __init__(self, ch: int, dtype=FP32):
        super().__init__()
        self.op = WrappedConv2d(ch, ch, 3, stride=2, padding=1, dtype=dtype)

    def construct(self, x, emb=None, context=None):
        return self.op(x)


class Upsample(nn.Cell):
    """Nearest 2x upsampling then a 3x3 conv."""

    def __init__(self, ch: int, dtype=FP32):
        super().__init__()
        self.conv = WrappedConv2d(ch, ch, 3, padding=1, dtype=dtype)

    def construct(self, x, emb=None, context=None):
        return self.conv(upsample_nearest2x(x))


class CrossAttention(nn.Cell):
    """to_q / to_k / to_v (no bias) and to_out.0; self-attention when context is None."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, head_dim: int,
                 dropout_p: float = 0.0, dtype=FP32):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = Dense(query_dim, inner, has_bias=False, dtype=dtype)
        self.to_k = Dense(context_dim, inner, has_bias=False, dtype=dtype)
        self.to_v = Dense(context_dim, inner, has_bias=False, dtype=dtype)
        self.to_out = nn.SequentialCell([Dense(inner, query_dim, dtype=dtype), dropout(dropout_p)])

    def construct(self, x, context=None):
        if context is None:
            context = x
        out = attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads)
        return self.to_out(out)


class GEGLU(nn.Cell):
    """proj to 2 * inner, then value * gelu(gate) with the exact (erf) GELU."""

    def __init__(self, dim: int, inner: int, dtype=FP32):
        super().__init__()
        self.proj = Dense(dim, inner * 2, dtype=dtype)
        self.gelu = nn.GELU(approximate=False)

    def construct(self, x):
        value, gate = ops.chunk(self.proj(x), 2, -1)
        return value * self.gelu(gate)


class FeedForward(nn.Cell):
    def __init__(self, dim: int, mult: int = 4, dropout_p: float = 0.0, dtype=FP32):
        super().__init__()
        self.net = nn.SequentialCell([GEGLU(dim, dim * mult, dtype), dropout(dropout_p),
                                      Dense(dim * mult, dim, dtype=dtype)])

    def construct(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Cell):
    """Self-attention, cross-attention, GEGLU feed-forward; pre-LayerNorm, residual each."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int,
                 dropout_p: float = 0.0, dtype=FP32):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, head_dim, dropout_p, dtype)
        self.ff = FeedForward(dim, dropout_p=dropout_p, dtype=dtype)
        self.attn2 = CrossAttention(dim, context_dim, heads, head_dim, dropout_p, dtype)
        self.norm1 = LayerNorm(dim)
        self.norm2 = LayerNorm(dim)
        self.norm3 = LayerNorm(dim)

    def construct(self, x, context):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Cell):
    """GroupNorm, proj_in (1x1 conv for SD1, linear for SD2), transformer blocks over the
    flattened pixels, proj_out, residual."""

    def __init__(self, ch: int, heads: int, head_dim: int, depth: int, context_dim: int,
                 groups: int, use_linear: bool, dropout_p: float = 0.0, dtype=FP32):
        super().__init__()
        inner = heads * head_dim
        self.use_linear = use_linear
        self.norm = GroupNorm(groups, ch, eps=1e-6)
        if use_linear:
            self.proj_in = Dense(ch, inner, dtype=dtype)
            self.proj_out = Dense(inner, ch, dtype=dtype)
        else:
            self.proj_in = Conv2d(ch, inner, 1, dtype=dtype)
            self.proj_out = Conv2d(inner, ch, 1, dtype=dtype)
        self.transformer_blocks = nn.CellList([
            BasicTransformerBlock(inner, heads, head_dim, context_dim, dropout_p, dtype)
            for _ in range(depth)])

    def construct(self, x, emb, context):
        b, c, h, w = x.shape
        y = self.norm(x)
        if not self.use_linear:
            y = self.proj_in(y)
        y = y.reshape(b, y.shape[1], h * w).transpose(0, 2, 1)
        if self.use_linear:
            y = self.proj_in(y)
        for block in self.transformer_blocks:
            y = block(y, context)
        if self.use_linear:
            y = self.proj_out(y)
        y = y.transpose(0, 2, 1).reshape(b, y.shape[2], h, w)
        if not self.use_linear:
            y = self.proj_out(y)
        return x + y


class UNetModel(nn.Cell):
    """construct(x [B, C, H, W], timesteps [B], context [B, L, context_dim]) -> [B, C_out, H, W]
    float32 (eps or v, whatever the weights were trained for)."""

    def __init__(self, u: UNetArch, dtype=FP32, dropout_p: float = 0.0):
        super().__init__()
        dtype = compute_dtype(dtype)
        self.arch = u
        self.dtype = dtype
        emb = u.time_embed_dim
        g = u.norm_num_groups
        self.freqs = timestep_frequencies(u.model_channels)
        self.time_embed = nn.SequentialCell([Dense(u.model_channels, emb, dtype=dtype), SiLU(),
                                             Dense(emb, emb, dtype=dtype)])

        def transformer(level, ch):
            return SpatialTransformer(ch, u.heads(level), u.head_dim(level), u.transformer_depth,
                                      u.context_dim, g, u.use_linear_in_transformer, dropout_p, dtype)

        blocks = [EmbedSequential([WrappedConv2d(u.in_channels, u.model_channels, 3, padding=1,
                                                 dtype=dtype)])]
        ch, skips = u.model_channels, [u.model_channels]
        for level in range(u.levels):
            for _ in range(u.num_res_blocks):
                layers = [ResBlock(ch, u.channels(level), emb, g, dropout_p, dtype)]
                ch = u.channels(level)
                if u.has_attention(level):
                    layers.append(transformer(level, ch))
                blocks.append(EmbedSequential(layers))
                skips.append(ch)
            if level != u.levels - 1:
                blocks.append(EmbedSequential([Downsample(ch, dtype)]))
                skips.append(ch)
        self.input_blocks = nn.CellList(blocks)
        last = u.levels - 1
        self.middle_block = EmbedSequential([ResBlock(ch, ch, emb, g, dropout_p, dtype),
                                             transformer(last, ch),
                                             ResBlock(ch, ch, emb, g, dropout_p, dtype)])
        blocks = []
        for level in reversed(range(u.levels)):
            for j in range(u.num_res_blocks + 1):
                layers = [ResBlock(ch + skips.pop(), u.channels(level), emb, g, dropout_p, dtype)]
                ch = u.channels(level)
                if u.has_attention(level):
                    layers.append(transformer(level, ch))
                if level != 0 and j == u.num_res_blocks:
                    layers.append(Upsample(ch, dtype))
                blocks.append(EmbedSequential(layers))
        self.output_blocks = nn.CellList(blocks)
        self.out = nn.SequentialCell([GroupNorm(g, ch), SiLU(),
                                      WrappedConv2d(ch, u.out_channels, 3, padding=1, dtype=dtype)])

    def construct(self, x, timesteps, context):
        emb = self.time_embed(timestep_embedding(timesteps, self.freqs).astype(self.dtype))
        context = context.astype(self.dtype)
        h = x.astype(self.dtype)
        hs = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for i, block in enumerate(self.output_blocks):     # skips are consumed last-in first-out
            h = block(ops.concat((h, hs[-1 - i]), 1), emb, context)
        return self.out(h).astype(FP32)
