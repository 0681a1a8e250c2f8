"""backends.ascend.layers.Conv2d on CPU (im2col + matmul) against MindSpore's native convolution:
outputs and gradients (input, weight, bias) for the 1x1 / 3x3 / strided shapes the models use, in
GRAPH_MODE and PYNATIVE_MODE. Small shapes: the native CPU convolution is the slow side."""
from __future__ import annotations

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")
from mindspore import nn, ops  # noqa: E402

# (batch, in, out, kernel, stride, padding, input height, input width). Conv2d takes one of two
# matmul forms by shape: "wide" layers at low resolution (and batch 1) one 2-D matmul, the others a
# batched matmul; both are covered.
SHAPES = {"1x1": (2, 8, 12, 1, 1, 0, 6, 5), "3x3": (2, 6, 10, 3, 1, 1, 7, 9),
          "1x1-wide": (2, 48, 40, 1, 1, 0, 2, 3), "3x3-wide": (3, 24, 32, 3, 1, 1, 4, 4),
          "3x3-batch1": (1, 6, 10, 3, 1, 1, 7, 9), "3x3-stride2": (2, 4, 6, 3, 2, 1, 16, 12),
          "3x3-stride2-wide": (2, 8, 8, 3, 2, 1, 8, 8),
          "3x3-stride2-valid": (2, 5, 7, 3, 2, 0, 9, 8)}


@pytest.fixture(scope="module", autouse=True)
def device():
    from backends.ascend.device import setup
    if setup(mode=0) != "CPU":
        pytest.skip("the matmul convolution is the CPU path")
    yield
    ms.set_context(mode=ms.GRAPH_MODE)


class Native(nn.Cell):
    """The reference: ops.Conv2D + bias on the same parameters as `conv`."""

    def __init__(self, conv):
        super().__init__()
        self.conv = conv
        self.op = ops.Conv2D(conv.out_channels, conv.kernel_size, pad_mode="pad", pad=conv.padding,
                             stride=conv.stride)

    def construct(self, x):
        return ops.bias_add(self.op(x, self.conv.weight), self.conv.bias)


class Loss(nn.Cell):
    def __init__(self, net, probe):
        super().__init__()
        self.net, self.probe = net, probe

    def construct(self, x):
        return (self.net(x) * self.probe).sum()


def outputs(net, conv, x, probe):
    """Forward output, then d(sum(out * probe)) / d(input, weight, bias)."""
    y = net(x).asnumpy()
    params = ms.ParameterTuple([conv.weight, conv.bias])
    grad = ops.GradOperation(get_all=True, get_by_list=True)(Loss(net, probe), params)
    (gx,), (gw, gb) = grad(x)
    return [y, gx.asnumpy(), gw.asnumpy(), gb.asnumpy()]


@pytest.mark.parametrize("mode", [ms.GRAPH_MODE, ms.PYNATIVE_MODE], ids=["graph", "pynative"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_matmul_conv_equals_native(shape, mode):
    from backends.ascend.layers import Conv2d
    batch, cin, cout, k, stride, pad, h, w = SHAPES[shape]
    ms.set_context(mode=mode)
    rng = np.random.default_rng(0)
    conv = Conv2d(cin, cout, k, stride, pad)
    assert conv.use_matmul
    conv.weight.set_data(ms.Tensor(rng.standard_normal((cout, cin, k, k)).astype(np.float32)))
    conv.bias.set_data(ms.Tensor(rng.standard_normal(cout).astype(np.float32)))
    x = ms.Tensor(rng.standard_normal((batch, cin, h, w)).astype(np.float32))
    ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    probe = ms.Tensor(rng.standard_normal((batch, cout, ho, wo)).astype(np.float32))
    got = outputs(conv, conv, x, probe)
    want = outputs(Native(conv), conv, x, probe)
    for name, g, r in zip(("output", "d input", "d weight", "d bias"), got, want):
        assert g.shape == r.shape, name
        assert np.abs(g - r).max() <= 1e-5 * np.abs(r).max(), name
