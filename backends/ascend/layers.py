"""Building blocks shared by the MindSpore models: dense / conv layers with a compute dtype, norms
that always normalise in float32, activations and attention.

Mixed precision follows MindONE: parameters are stored in float32; with `dtype=float16` the Dense
and Conv layers cast their input and weights to float16 for the matmul / convolution, while
GroupNorm / LayerNorm and softmax run in float32. On CPU everything stays float32.

All weights are created as zeros: a model is always loaded from a checkpoint after it is built,
and zero initialisation is lazy and instant, so building full-size SD costs no time or memory.
Only classic `mindspore.nn` layers and `mindspore.ops` with CPU and Ascend kernels are used.
"""
from __future__ import annotations

import math

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

FP32 = ms.float32


def compute_dtype(dtype) -> ms.Type:
    """'fp32' / 'fp16' / 'bf16' or a MindSpore dtype -> the MindSpore dtype."""
    if isinstance(dtype, str):
        return {"fp32": ms.float32, "float32": ms.float32, "fp16": ms.float16,
                "float16": ms.float16, "bf16": ms.bfloat16, "bfloat16": ms.bfloat16}[dtype]
    return dtype or ms.float32


class Dense(nn.Dense):
    """nn.Dense whose matmul runs in `dtype` (parameters stay float32)."""

    def __init__(self, in_channels: int, out_channels: int, has_bias: bool = True, dtype=FP32):
        super().__init__(in_channels, out_channels, weight_init="zeros", bias_init="zeros",
                         has_bias=has_bias)
        self.compute_dtype = compute_dtype(dtype)

    def construct(self, x):
        shape = x.shape
        y = self.matmul(x.reshape(-1, shape[-1]).astype(self.compute_dtype),
                        self.weight.astype(self.compute_dtype))
        if self.has_bias:
            y = self.bias_add(y, self.bias.astype(self.compute_dtype))
        return y.reshape(shape[:-1] + (self.out_channels,))


class Conv2d(nn.Conv2d):
    """nn.Conv2d with explicit zero padding (pad_mode="pad") whose convolution runs in `dtype`.

    On a CPU device target the convolution is computed as im2col (`ops.unfold`) + matmul:
    MindSpore's CPU 3x3 conv kernels are 60-200x slower than this (forward and backward, mindspore
    2.10, benchmarks/results/backends_cpu.md), and it gives the same numbers up to float rounding.
    Decided once, when the layer is built (after backends.ascend.device.setup); on Ascend the
    native convolution stays.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, dtype=FP32, has_bias: bool = True):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, pad_mode="pad",
                         padding=padding, has_bias=has_bias, weight_init="zeros", bias_init="zeros")
        self.compute_dtype = compute_dtype(dtype)
        self.use_matmul = ms.get_context("device_target") == "CPU"
        self.pointwise = kernel_size == 1 and stride == 1 and padding == 0
        self.matmul = ops.MatMul()
        self.bmm = ops.BatchMatMul()

    def construct(self, x):
        x = x.astype(self.compute_dtype)
        w = self.weight.astype(self.compute_dtype)
        if self.use_matmul:
            y = self._matmul_conv(x, w)
        else:
            y = self.conv2d(x, w)
        return self.bias_add(y, self.bias.astype(self.compute_dtype)) if self.has_bias else y

    def _matmul_conv(self, x, w):
        b, c, h, wd = x.shape
        kh, kw = self.kernel_size
        sh, sw = self.stride
        p = self.padding
        ho = (h + 2 * p - kh) // sh + 1
        wo = (wd + 2 * p - kw) // sw + 1
        o, k, n = self.out_channels, c * kh * kw, ho * wo
        if self.pointwise:
            cols = x.reshape(b, c, n)
        else:   # (B, C*kh*kw, Ho*Wo), channel-major like weight.reshape(out, -1)
            cols = ops.unfold(x, (kh, kw), 1, p, (sh, sw))
        w = w.reshape(o, k)
        # Shapes are static, so this choice is made at compile time. Few pixels per weight (low
        # resolutions, wide layers): one 2-D matmul over all images' columns; moving the batch
        # axis copies less than a broadcast weight, and 2-D MatMul's backward is the fastest.
        if b == 1 or n * (k + o) < 4 * o * k:
            if b > 1:
                cols = cols.transpose(1, 0, 2)
            y = self.matmul(w, cols.reshape(k, b * n)).reshape(o, b, ho, wo)
            return y.transpose(1, 0, 2, 3) if b > 1 else y.reshape(1, o, ho, wo)
        # Many pixels per weight: batched matmul on an explicitly broadcast weight (autodiff of
        # matmul's implicit broadcast is ~2x slower).
        return self.bmm(ops.broadcast_to(w.reshape(1, o, k), (b, o, k)), cols).reshape(b, o, ho, wo)


class WrappedConv2d(nn.Cell):
    """A Conv2d one name level down (`<name>.conv.weight`), as MindONE's UNet stores its convs.
    Ignores extra (emb, context) arguments so it can sit in a UNet block list."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, dtype=FP32):
        super().__init__()
        self.conv = Conv2d(in_channels, out_channels, kernel_size, stride, padding, dtype)

    def construct(self, x, emb=None, context=None):
        return self.conv(x)


class GroupNorm(nn.GroupNorm):
    """GroupNorm with `gamma` / `beta` (as MindONE names every GroupNorm), normalising in float32."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5):
        super().__init__(num_groups, num_channels, eps=eps)

    def construct(self, x):
        y = ops.group_norm(x.astype(FP32), self.num_groups, self.gamma, self.beta, self.eps)
        return y.astype(x.dtype)


class LayerNorm(nn.LayerNorm):
    """LayerNorm over the last axis with `gamma` / `beta`, normalising in float32."""

    def __init__(self, width: int, eps: float = 1e-5):
        super().__init__((width,), epsilon=eps)

    def construct(self, x):
        y, _, _ = self.layer_norm(x.astype(FP32), self.gamma, self.beta)
        return y.astype(x.dtype)


class SiLU(nn.Cell):
    def construct(self, x):
        return x * ops.sigmoid(x)


class QuickGELU(nn.Cell):
    """OpenAI CLIP's activation x * sigmoid(1.702 x)."""

    def construct(self, x):
        return x * ops.sigmoid(1.702 * x)


def activation(name: str) -> nn.Cell:
    """'quick_gelu' or exact (erf) 'gelu', the two activations SD's text encoders use."""
    if name == "quick_gelu":
        return QuickGELU()
    if name in ("gelu", "gelu_exact"):
        return nn.GELU(approximate=False)
    raise ValueError(f"unsupported text encoder activation {name!r}")


def dropout(p: float) -> nn.Cell:
    """Dropout(p), or a no-op placeholder that keeps MindONE's child numbering when p == 0."""
    return nn.Dropout(p=p) if p > 0 else nn.Identity()


def attention(q, k, v, heads: int, mask=None):
    """Multi-head scaled dot-product attention on (B, N, heads * D) inputs.

    q is scaled by 1/sqrt(D) before q.k^T (in half precision the product then keeps sqrt(D) times
    more headroom below fp16's maximum, as PyTorch's SDPA does); scores and softmax are float32
    whatever the compute dtype (MindONE upcasts them too); `mask` is added to the scores (e.g. a
    causal mask with -inf above the diagonal).
    """
    b, n, width = q.shape
    m = k.shape[1]
    d = width // heads
    q = (q * (1.0 / math.sqrt(d))).reshape(b, n, heads, d).transpose(0, 2, 1, 3)
    k = k.reshape(b, m, heads, d).transpose(0, 2, 1, 3)
    v = v.reshape(b, m, heads, d).transpose(0, 2, 1, 3)
    scores = ops.matmul(q, k.transpose(0, 1, 3, 2)).astype(FP32)
    if mask is not None:
        scores = scores + mask
    probs = ops.softmax(scores, -1).astype(v.dtype)
    out = ops.matmul(probs, v)
    return out.transpose(0, 2, 1, 3).reshape(b, n, width)


def upsample_nearest2x(x):
    """2x nearest-neighbour upsampling by broadcasting (exact, no interpolation kernel needed)."""
    b, c, h, w = x.shape
    x = ops.broadcast_to(x.reshape(b, c, h, 1, w, 1), (b, c, h, 2, w, 2))
    return x.reshape(b, c, h * 2, w * 2)


def timestep_frequencies(dim: int, max_period: float = 10000.0) -> Tensor:
    """exp(-ln(max_period) * i / (dim/2)), i < dim/2, in float32 as diffusers computes it."""
    half = dim // 2
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)
    return Tensor(np.exp(exponent / np.float32(half)).astype(np.float32))


def timestep_embedding(t, freqs):
    """LDM's sinusoidal timestep embedding, [cos | sin] (diffusers flip_sin_to_cos=True,
    freq_shift=0). `t`: (B,) timesteps of any numeric dtype."""
    args = t.astype(FP32).reshape(-1, 1) * freqs.reshape(1, -1)
    return ops.concat((ops.cos(args), ops.sin(args)), -1)
