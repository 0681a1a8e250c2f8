"""Device, execution mode and precision for the MindSpore backend, chosen once and explicitly."""
from __future__ import annotations

import logging
from typing import Optional

import mindspore as ms

from common.errors import UserError

log = logging.getLogger("backends.ascend")
_state = {}


JIT_LEVELS = ("O0", "O1", "O2")


def setup(mode: int = 0, jit_level: Optional[str] = None) -> str:
    """Ascend when present, otherwise CPU with a one-line notice; GRAPH_MODE (0, the default, for
    speed) or PYNATIVE_MODE (1); MindONE's graph compilation level (`jit_level`, Ascend only: the
    CPU runs MindSpore's default). Returns the device target."""
    if jit_level is not None and jit_level not in JIT_LEVELS:
        raise UserError(f"--jit_level must be one of {', '.join(JIT_LEVELS)}, got {jit_level}")
    if mode not in (0, 1):
        raise UserError(f"--mode/--ms_mode must be 0 (GRAPH_MODE) or 1 (PYNATIVE_MODE), got {mode}")
    if "target" not in _state:
        target = "Ascend" if ms.hal.is_available("Ascend") else "CPU"
        if target == "CPU":
            log.warning("backend ascend: no Ascend device found, running MindSpore on CPU (fp32)")
        try:
            ms.set_device(target)
        except RuntimeError:  # the runtime already started (e.g. another tool ran MindSpore first)
            target = ms.get_context("device_target")
        _state["target"] = target
    ms.set_context(mode=ms.GRAPH_MODE if mode == 0 else ms.PYNATIVE_MODE)
    if jit_level and _state["target"] == "Ascend":
        ms.set_context(jit_config={"jit_level": jit_level})
    return _state["target"]


def compute_dtype(precision: str, target: str):
    """'auto' = MindONE's mixed precision (fp16 Dense/Conv, fp32 norms) on Ascend, fp32 on CPU."""
    precision = {"no": "fp32", "fp32": "fp32", "float32": "fp32", "fp16": "fp16", "float16": "fp16",
                 "bf16": "bf16", "bfloat16": "bf16", "auto": "auto"}.get(str(precision).lower())
    if precision is None:
        raise UserError("precision must be one of auto, fp32 (no), fp16, bf16")
    if target != "Ascend":
        return ms.float32
    return {"auto": ms.float16, "fp32": ms.float32, "fp16": ms.float16, "bf16": ms.bfloat16}[precision]
