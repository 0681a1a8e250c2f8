"""Device and precision choices for the PyTorch backend, made once and explicitly."""
from __future__ import annotations

import logging

import torch

from common.errors import UserError

log = logging.getLogger("backends.cuda")
_noticed = False


def pick_device() -> torch.device:
    """CUDA when present, otherwise CPU with a one-line notice."""
    global _noticed
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if not _noticed:
        log.warning("backend cuda: no CUDA device found, running on CPU (fp32)")
        _noticed = True
    return torch.device("cpu")


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """'auto' means fp16 on a GPU and fp32 on the CPU; half precision on the CPU is refused
    quietly (it is slow and not what anyone wants) by falling back to fp32."""
    precision = {"no": "fp32", "fp32": "fp32", "float32": "fp32", "fp16": "fp16", "float16": "fp16",
                 "bf16": "bf16", "bfloat16": "bf16", "auto": "auto"}.get(str(precision).lower())
    if precision is None:
        raise UserError("precision must be one of auto, fp32 (no), fp16, bf16")
    if device.type != "cuda":
        return torch.float32
    if precision == "auto":
        return torch.float16
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
