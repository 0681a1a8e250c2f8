"""The PyTorch trainer's optimizer: torch's AdamW/Adam (the fused kernel on CUDA), or bitsandbytes'
8-bit AdamW/Adam for diffusers' `--use_8bit_adam`."""
from __future__ import annotations

from typing import Iterable, Set, Tuple

import torch

from common.errors import UserError

# (optimizer class, device) pairs whose 8-bit step already ran once in this process
_PROBED: Set[Tuple[type, str]] = set()


def make_optimizer(params: Iterable[torch.Tensor], args, device) -> torch.optim.Optimizer:
    """The optimizer over `params` (already on `device`) that `args` asks for.

    args: optim ("adamw" or "adam"), start_learning_rate, betas (2 floats), adam_epsilon,
    weight_decay, use_8bit_adam and fused_adam (None: fused on CUDA only). Weight decay is AdamW's
    decoupled one; "adam" has none, with or without 8 bits, as before. Raises UserError when
    `use_8bit_adam` cannot be honoured here, or is asked together with `fused_adam`.
    """
    params = list(params)
    device = torch.device(device)
    lr, betas, eps = args.start_learning_rate, tuple(args.betas), args.adam_epsilon
    adamw = args.optim == "adamw"
    if getattr(args, "use_8bit_adam", False):
        if getattr(args, "fused_adam", None):
            raise UserError("--fused_adam is torch's AdamW kernel; --use_8bit_adam uses bitsandbytes' own: pass one")
        bnb = _bitsandbytes()
        cls = bnb.optim.AdamW8bit if adamw else bnb.optim.Adam8bit
        _check_runs(cls, device, getattr(bnb, "__version__", "?"))
        if adamw:
            return cls(params, lr=lr, betas=betas, eps=eps, weight_decay=args.weight_decay)
        return cls(params, lr=lr, betas=betas, eps=eps)
    # fused: one kernel for every parameter instead of a loop or foreach kernels per step, the same
    # arithmetic within fp32 rounding (FMA). On CUDA always, unless --fused_adam False. On the CPU only
    # when asked: CPU training is mostly tests and debugging, where being bitwise equal to a plain
    # torch.optim.AdamW (and to states saved before) matters more than speed, and the fused CPU kernel
    # differs from it in the last bit.
    want = getattr(args, "fused_adam", None)
    fused = {"fused": True} if (device.type == "cuda" if want is None else want) else {}
    if adamw:
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=args.weight_decay, **fused)
    return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, **fused)


def _bitsandbytes():
    try:
        import bitsandbytes
    except ImportError:
        raise UserError("--use_8bit_adam needs the bitsandbytes package: pip install bitsandbytes") from None
    except Exception as e:  # a broken install: its native library or CUDA setup fails on import
        raise UserError(f"--use_8bit_adam: bitsandbytes cannot be loaded ({_one_line(e)})") from None
    return bitsandbytes


def _check_runs(cls: type, device: torch.device, version: str) -> None:
    """One step on two throwaway parameters on `device`: bitsandbytes keeps 8-bit state only for
    tensors of at least 4096 elements (32-bit below), so both kernels run. A build without
    kernels for this device fails here, at start-up, rather than at the first training step."""
    key = (cls, str(device))
    if key in _PROBED:
        return
    try:
        probe = [torch.zeros(4096, device=device, requires_grad=True),
                 torch.zeros(1, device=device, requires_grad=True)]
        for p in probe:
            p.grad = torch.ones_like(p)
        cls(probe, lr=1e-3).step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as e:
        where = "the CPU" if device.type == "cpu" else str(device)
        hint = "; use a CUDA GPU or drop --use_8bit_adam" if device.type != "cuda" else ""
        raise UserError(f"--use_8bit_adam: bitsandbytes {version} cannot run {cls.__name__} on {where} "
                        f"({_one_line(e)}){hint}") from None
    _PROBED.add(key)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
