"""backends.cuda.optimizers: torch's AdamW/Adam as the trainer always built them, and bitsandbytes'
8-bit ones for --use_8bit_adam, refused in one line where they cannot run."""
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from backends.cuda import optimizers
from backends.cuda.optimizers import make_optimizer
from common.errors import UserError


def opt_args(**kw):
    base = dict(optim="adamw", start_learning_rate=1e-2, betas=[0.8, 0.99], adam_epsilon=1e-6,
                weight_decay=0.05, use_8bit_adam=False)
    base.update(kw)
    return SimpleNamespace(**base)


def regression(n_in=16, n_out=4):
    torch.manual_seed(0)
    model = torch.nn.Linear(n_in, n_out)
    x, y = torch.randn(32, n_in), torch.randn(32, n_out)
    return model, x, y


def train(model, opt, x, y, steps):
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("optim", ["adamw", "adam"])
def test_default_is_torch_optimizer_bitwise_on_cpu(optim):
    args = opt_args(optim=optim)
    model, x, y = regression()
    opt = make_optimizer(model.parameters(), args, "cpu")
    if optim == "adamw":
        assert type(opt) is torch.optim.AdamW and opt.param_groups[0]["weight_decay"] == 0.05
    else:
        assert type(opt) is torch.optim.Adam and opt.param_groups[0]["weight_decay"] == 0
    assert not opt.param_groups[0]["fused"]
    train(model, opt, x, y, 5)

    ref, x, y = regression()
    if optim == "adamw":
        ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05)
    else:
        ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2, betas=(0.8, 0.99), eps=1e-6)
    train(ref, ref_opt, x, y, 5)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_fused_adam_on_cpu_when_asked():
    """--fused_adam True: torch's fused CPU kernel, equal to the plain update within fp32 rounding;
    with --use_8bit_adam it is refused in one line (bitsandbytes has its own kernels)."""
    model, x, y = regression()
    opt = make_optimizer(model.parameters(), opt_args(fused_adam=True), "cpu")
    assert opt.param_groups[0]["fused"]
    train(model, opt, x, y, 5)
    ref, x, y = regression()
    train(ref, make_optimizer(ref.parameters(), opt_args(fused_adam=False), "cpu"), x, y, 5)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    with pytest.raises(UserError, match="--fused_adam .* --use_8bit_adam"):
        make_optimizer(model.parameters(), opt_args(fused_adam=True, use_8bit_adam=True), "cpu")


def test_8bit_without_bitsandbytes_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)   # import bitsandbytes -> ImportError
    model, _, _ = regression()
    with pytest.raises(UserError) as e:
        make_optimizer(model.parameters(), opt_args(use_8bit_adam=True), "cpu")
    msg = str(e.value)
    assert "\n" not in msg and "pip install bitsandbytes" in msg


def test_8bit_refused_where_its_kernels_fail(monkeypatch):
    """A bitsandbytes whose step has no kernel for the device: refused at construction, one line."""
    class NoKernel(torch.optim.Optimizer):
        def __init__(self, params, **kw):
            super().__init__(params, dict(kw))

        def step(self, closure=None):
            raise NotImplementedError("no kernel for 'bitsandbytes::optimizer_update_8bit_blockwise'\non CPU")

    fake = types.ModuleType("bitsandbytes")
    fake.__version__ = "0.0-test"
    fake.optim = SimpleNamespace(AdamW8bit=NoKernel, Adam8bit=NoKernel)
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    model, _, _ = regression()
    with pytest.raises(UserError) as e:
        make_optimizer(model.parameters(), opt_args(use_8bit_adam=True), "cpu")
    msg = str(e.value)
    assert "\n" not in msg and "0.0-test" in msg and "NoKernel" in msg and "CPU" in msg
    assert (NoKernel, "cpu") not in optimizers._PROBED


@pytest.mark.parametrize("optim", ["adamw", "adam"])
def test_8bit_runs_on_cpu_and_learns(optim):
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (optional: --use_8bit_adam)")
    args = opt_args(optim=optim, start_learning_rate=1e-2, weight_decay=1e-2, use_8bit_adam=True)
    # 8192 weights: over bitsandbytes' 4096-element threshold, so its state is 8-bit (the bias' is 32-bit)
    model, x, y = regression(n_in=2048)
    opt = make_optimizer(model.parameters(), args, "cpu")
    assert type(opt) is (bnb.optim.AdamW8bit if optim == "adamw" else bnb.optim.Adam8bit)
    group = opt.param_groups[0]
    assert (group["lr"], tuple(group["betas"]), group["eps"]) == (1e-2, (0.8, 0.99), 1e-6)
    assert group["weight_decay"] == (1e-2 if optim == "adamw" else 0)
    losses = train(model, opt, x, y, 20)
    assert losses[-1] < 0.5 * losses[0], losses
    assert opt.state[model.weight]["state1"].dtype == torch.uint8


@pytest.mark.parametrize("optim", ["adamw", "adam"])
def test_fused_kernel_asked_for_on_cuda_only(optim):
    """Construction only (no step), so it runs without a GPU: torch accepts fused=True for CPU tensors."""
    model, _, _ = regression()
    assert make_optimizer(model.parameters(), opt_args(optim=optim), torch.device("cuda")).param_groups[0]["fused"]
    assert not make_optimizer(model.parameters(), opt_args(optim=optim), "cpu").param_groups[0]["fused"]
