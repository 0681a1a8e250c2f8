"""Device, execution mode and precision for the MindSpore backend, chosen once and explicitly."""
from __future__ import annotations

import logging
from typing import Optional

import mindspore as ms

from common.errors import UserError

log = logging.getLogger("backends.ascend")
_state = {}


JIT_LEVELS = ("O0", "O1", "O2")


def setup(mode: int = 0, jit_level: Optional[str] = None, max_device_memory: Optional[str] = None) -> str:
    """Ascend when present, otherwise CPU with a one-line notice; GRAPH_MODE (0, the default, for
    speed) or PYNATIVE_MODE (1); MindONE's graph compilation level (`jit_level`, Ascend only: the
    CPU runs MindSpore's default); MindONE's `max_device_memory` cap of the device memory pool
    (Ascend only, set before the runtime starts). Returns the device target."""
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
        if max_device_memory and target == "Ascend":
            ms.runtime.set_memory(max_size=max_device_memory)
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


class ProcessGroup:
    """This process's place among msrun's data-parallel workers (with --use_parallel; one process
    otherwise), set up before any model exists, as MindONE does it: communication init,
    DATA_PARALLEL with gradients averaged. Work that must happen once per run (the run folder,
    --overwrite, class images) is done by rank 0 between barriers."""

    def __init__(self, use_parallel: bool, mode: int = 0, max_device_memory: Optional[str] = None):
        self.mode = mode
        self.target = setup(mode, max_device_memory=max_device_memory)
        self.rank, self.world_size = 0, 1
        if use_parallel:
            from mindspore.communication import get_group_size, get_rank, init

            try:
                init()
            except Exception as e:    # not started by msrun, or no collective backend for this device
                raise UserError(f"--use_parallel True: start the run with msrun (e.g. msrun --worker_num 2 "
                                f"--local_worker_num 2 train_dreambooth.py ...); MindSpore's communication init "
                                f"failed ({e.__class__.__name__})") from None
            self.rank, self.world_size = get_rank(), get_group_size()
            ms.reset_auto_parallel_context()
            ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True,
                                         device_num=self.world_size)
        self.is_main = self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            # an all-reduce every worker must join (MindSpore's CPU target has no Barrier kernel)
            import numpy as np
            from mindspore import Tensor, ops
            ops.AllReduce()(Tensor(np.zeros(1, np.float32))).asnumpy()

    @property
    def pipeline_options(self) -> dict:
        """Pipeline(...) keywords for this process's execution mode."""
        return {"mode": self.mode}


def process_group(args) -> ProcessGroup:
    """The one ProcessGroup of this process (communication is initialised once)."""
    key = (bool(args.use_parallel), int(args.mode))
    if _state.get("group_key") != key:
        if "group" in _state and _state["group"].world_size > 1:
            raise UserError("the parallel set-up of a process cannot change once initialised")
        _state["group"], _state["group_key"] = ProcessGroup(*key, getattr(args, "max_device_memory", None)), key
    return _state["group"]
