"""AutoencoderKL (LDM's first stage) as MindSpore Cells, built from `common.arch.VAEArch`.

Names and shapes equal the original PyTorch layout, which MindONE keeps for its VAE
(`encoder.down.0.block.0.norm1.weight`, `encoder.mid.attn_1.q.weight` as a 1x1 conv, ...);
its GroupNorms are `mindspore.nn.GroupNorm`s named `gamma` / `beta`, as in MindONE's network
(files written with `weight` / `bias` are renamed by the checkpoint loader).
"""
from __future__ import annotations

import math

from mindspore import nn, ops

from common.arch import VAEArch
from .layers import FP32, Conv2d, GroupNorm, SiLU, compute_dtype, upsample_nearest2x


class ResnetBlock(nn.Cell):
    def __init__(self, cin: int, cout: int, groups: int, dtype=FP32):
        super().__init__()
        self.norm1 = GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = Conv2d(cin, cout, 3, padding=1, dtype=dtype)
        self.norm2 = GroupNorm(groups, cout, eps=1e-6)
        self.conv2 = Conv2d(cout, cout, 3, padding=1, dtype=dtype)
        self.silu = SiLU()
        self.has_shortcut = cin != cout
        if self.has_shortcut:
            self.nin_shortcut = Conv2d(cin, cout, 1, dtype=dtype)

    def construct(self, x):
        h = self.conv1(self.silu(self.norm1(x)))
        h = self.conv2(self.silu(self.norm2(h)))
        if self.has_shortcut:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Cell):
    """Single-head self-attention over all pixels with 1x1-conv q, k, v and proj_out."""

    def __init__(self, ch: int, groups: int, dtype=FP32):
        super().__init__()
        self.norm = GroupNorm(groups, ch, eps=1e-6)
        self.q = Conv2d(ch, ch, 1, dtype=dtype)
        self.k = Conv2d(ch, ch, 1, dtype=dtype)
        self.v = Conv2d(ch, ch, 1, dtype=dtype)
        self.proj_out = Conv2d(ch, ch, 1, dtype=dtype)
        self.scale = 1.0 / math.sqrt(ch)

    def construct(self, x):
        b, c, h, w = x.shape
        y = self.norm(x)
        q = (self.q(y) * self.scale).reshape(b, c, h * w).transpose(0, 2, 1)   # (b, hw, c), scaled first
        k = self.k(y).reshape(b, c, h * w)                          # (b, c, hw)
        v = self.v(y).reshape(b, c, h * w).transpose(0, 2, 1)       # (b, hw, c)
        probs = ops.softmax(ops.matmul(q, k).astype(FP32), -1).astype(v.dtype)
        out = ops.matmul(probs, v).transpose(0, 2, 1).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Cell):
    """Pad right/bottom by one, then a stride-2 3x3 conv without padding (LDM's asymmetric pad)."""

    def __init__(self, ch: int, dtype=FP32):
        super().__init__()
        self.conv = Conv2d(ch, ch, 3, stride=2, dtype=dtype)

    def construct(self, x):
        return self.conv(ops.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Cell):
    def __init__(self, ch: int, dtype=FP32):
        super().__init__()
        self.conv = Conv2d(ch, ch, 3, padding=1, dtype=dtype)

    def construct(self, x):
        return self.conv(upsample_nearest2x(x))


class Level(nn.Cell):
    """One resolution level: res blocks `block`, then `downsample` (encoder) or `upsample`
    (decoder) unless it is the last level."""

    def __init__(self, blocks, downsample=None, upsample=None):
        super().__init__()
        self.block = nn.CellList(blocks)
        self.attn = nn.CellList([])     # SD's VAEs have no attention outside the mid block
        self.has_downsample, self.has_upsample = downsample is not None, upsample is not None
        if downsample is not None:
            self.downsample = downsample
        if upsample is not None:
            self.upsample = upsample

    def construct(self, x):
        for blk in self.block:
            x = blk(x)
        if self.has_downsample:
            x = self.downsample(x)
        if self.has_upsample:
            x = self.upsample(x)
        return x


class Mid(nn.Cell):
    def __init__(self, ch: int, groups: int, dtype=FP32):
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch, groups, dtype)
        self.attn_1 = AttnBlock(ch, groups, dtype)
        self.block_2 = ResnetBlock(ch, ch, groups, dtype)

    def construct(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Cell):
    def __init__(self, v: VAEArch, dtype=FP32):
        super().__init__()
        g, n = v.norm_num_groups, len(v.ch_mult)
        self.conv_in = Conv2d(v.in_channels, v.ch, 3, padding=1, dtype=dtype)
        ch, levels = v.ch, []
        for i in range(n):
            cout = v.ch * v.ch_mult[i]
            blocks = []
            for _ in range(v.num_res_blocks):
                blocks.append(ResnetBlock(ch, cout, g, dtype))
                ch = cout
            levels.append(Level(blocks, downsample=Downsample(ch, dtype) if i != n - 1 else None))
        self.down = nn.CellList(levels)
        self.mid = Mid(ch, g, dtype)
        self.norm_out = GroupNorm(g, ch, eps=1e-6)
        self.silu = SiLU()
        self.conv_out = Conv2d(ch, 2 * v.z_channels if v.double_z else v.z_channels, 3, padding=1,
                               dtype=dtype)

    def construct(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(self.silu(self.norm_out(h)))


class Decoder(nn.Cell):
    def __init__(self, v: VAEArch, dtype=FP32):
        super().__init__()
        g, n = v.norm_num_groups, len(v.ch_mult)
        ch = v.ch * v.ch_mult[-1]
        self.conv_in = Conv2d(v.z_channels, ch, 3, padding=1, dtype=dtype)
        self.mid = Mid(ch, g, dtype)
        levels = [None] * n    # LDM numbers up-levels by resolution: up.0 runs last
        for i in reversed(range(n)):
            cout = v.ch * v.ch_mult[i]
            blocks = []
            for _ in range(v.num_res_blocks + 1):
                blocks.append(ResnetBlock(ch, cout, g, dtype))
                ch = cout
            levels[i] = Level(blocks, upsample=Upsample(ch, dtype) if i != 0 else None)
        self.up = nn.CellList(levels)
        self.norm_out = GroupNorm(g, ch, eps=1e-6)
        self.silu = SiLU()
        self.conv_out = Conv2d(ch, v.out_ch, 3, padding=1, dtype=dtype)

    def construct(self, z):
        h = self.mid(self.conv_in(z))
        for level in self.up[::-1]:
            h = level(h)
        return self.conv_out(self.silu(self.norm_out(h)))


class AutoencoderKL(nn.Cell):
    """`encode(x) -> (mean, logvar)` with logvar clamped to [-30, 20]; `decode(z) -> x`.
    Images are [B, 3, H, W] in [-1, 1]; latents are unscaled (multiply by the model's scale
    factor yourself). construct(x) is encode."""

    def __init__(self, v: VAEArch, dtype=FP32):
        super().__init__()
        dtype = compute_dtype(dtype)
        self.arch = v
        self.dtype = dtype
        self.encoder = Encoder(v, dtype)
        self.decoder = Decoder(v, dtype)
        z_out = 2 * v.z_channels if v.double_z else v.z_channels
        self.quant_conv = Conv2d(z_out, 2 * v.embed_dim, 1, dtype=dtype)
        self.post_quant_conv = Conv2d(v.embed_dim, v.z_channels, 1, dtype=dtype)
        self.encode_cell = _Encode(self)
        self.decode_cell = _Decode(self)

    def construct(self, x):
        return self.encode_cell(x)

    def encode(self, x):
        """(mean, logvar) of the posterior, float32."""
        return self.encode_cell(x)

    def decode(self, z):
        """Image from unscaled latents, float32."""
        return self.decode_cell(z)


class _Encode(nn.Cell):
    """Encoder + quant_conv as one compiled graph (a Cell must own its construct in graph mode);
    holds its parent by a plain reference so parameter names stay those of AutoencoderKL."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__(auto_prefix=False)
        object.__setattr__(self, "_vae", vae)

    def construct(self, x):
        vae = self._vae
        moments = vae.quant_conv(vae.encoder(x.astype(vae.dtype))).astype(FP32)
        mean, logvar = ops.chunk(moments, 2, 1)
        return mean, ops.clamp(logvar, -30.0, 20.0)


class _Decode(nn.Cell):
    def __init__(self, vae: AutoencoderKL):
        super().__init__(auto_prefix=False)
        object.__setattr__(self, "_vae", vae)

    def construct(self, z):
        vae = self._vae
        return vae.decoder(vae.post_quant_conv(z.astype(vae.dtype))).astype(FP32)
