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


def use_tf32(enabled: bool, device: torch.device) -> None:
    """TF32 tensor cores for fp32 matmuls and convolutions on CUDA (Ampere and newer; ~8x the fp32
    rate at 10-bit mantissa, as diffusers' --allow_tf32). torch's per-backend `fp32_precision`
    settings only: mixing them with the legacy `allow_tf32` switches is an error in torch >= 2.9."""
    if device.type != "cuda":
        return
    precision = "tf32" if enabled else "ieee"
    torch.backends.cuda.matmul.fp32_precision = precision
    torch.backends.cudnn.conv.fp32_precision = precision


def warn_accelerate_precision(precision: str) -> None:
    """One line when the user's `accelerate config` (ACCELERATE_MIXED_PRECISION, which `accelerate
    launch` exports) asks for another precision than --mixed_precision: ours is used."""
    import os

    theirs = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    ours = {"no": "no", "fp32": "no", "float32": "no", "fp16": "fp16", "float16": "fp16", "bf16": "bf16",
            "bfloat16": "bf16"}.get(str(precision).lower(), str(precision).lower())
    if theirs not in ("no", "") and theirs != ours:
        log.warning("accelerate config asks for mixed precision %s; this run uses --mixed_precision %s "
                    "(set it there instead)", theirs, precision)


class ProcessGroup:
    """This process's place among the data-parallel processes `accelerate launch` started (one
    process otherwise), set up before any model exists: work that must happen once per run (the
    run folder, --overwrite, class images) is done by the main process between barriers, and each
    process builds on its own device."""

    def __init__(self):
        from accelerate import PartialState

        self._state = PartialState(cpu=not torch.cuda.is_available())
        self.rank, self.world_size = self._state.process_index, self._state.num_processes
        self.is_main = self._state.is_main_process
        self.device = self._state.device

    def barrier(self) -> None:
        if self.world_size > 1:
            self._state.wait_for_everyone()

    @property
    def pipeline_options(self) -> dict:
        """Pipeline(...) keywords that put it on this process's device."""
        return {"device": self.device}


def process_group(args) -> ProcessGroup:
    return ProcessGroup()
