"""The host side of a training step (common/training/train_loop.py): per-rank random inputs,
statistics read once per logging interval, the NaN/overflow rule; and the device switches
(TF32, Ascend's memory cap) that the flags set."""
from __future__ import annotations

import numpy as np
import pytest

from common.diffusion.schedule import NoiseSchedule
from common.arch import load_arch
from common.errors import UserError
from common.training.train_args import parse_train_args
from common.training.train_loop import StepLog, check_loss, step_inputs
from conftest import SUBJECT, TINY


def args_with(*extra):
    return parse_train_args(["--instance_data_dir", SUBJECT, "--instance_prompt", "p", "--with_prior_preservation",
                             "False", *extra])


@pytest.mark.parametrize("extra", [(), ("--offset_noise", "0.1", "--snr_gamma", "5")])
def test_each_rank_draws_only_its_slice_and_ranks_together_are_one_process(extra):
    schedule = NoiseSchedule(load_arch(TINY["v1"]).schedule)
    args = args_with(*extra)
    for with_class in (False, True):
        whole = step_inputs(schedule, args, 5, 0, 1, 4, (4, 8, 8), with_class)
        parts = [step_inputs(schedule, args, 5, r, 2, 2, (4, 8, 8), with_class) for r in (0, 1)]
        halves = 2 if with_class else 1
        for key, value in whole.items():
            assert value.shape[0] == 4 * halves
            per_half = [np.split(p[key], halves) for p in parts]
            joined = np.concatenate([np.concatenate([per_half[0][h], per_half[1][h]]) for h in range(halves)])
            np.testing.assert_array_equal(joined, value, err_msg=key)
    other_step = step_inputs(schedule, args, 6, 0, 1, 4, (4, 8, 8), False)
    assert not np.array_equal(other_step["noise"], whole["noise"][:4])


class Lazy:
    """A device value: counts how often it is read."""
    reads = 0

    def __init__(self, x):
        self.x = x

    def __float__(self):
        Lazy.reads += 1
        return float(self.x)


class Bar:
    def set_postfix(self, **kw):
        self.postfix = kw


def stats(loss, **more):
    return {"loss": Lazy(loss), "instance_loss": Lazy(loss), "prior_loss": Lazy(0.0), **more}


def test_statistics_are_read_once_per_interval_and_every_step_keeps_its_row(tmp_path):
    path = tmp_path / "loss.csv"
    log = StepLog(str(path), Bar(), interval=3)
    Lazy.reads = 0
    for step in (1, 2):
        log.add(step, 0, stats(1.0 / step), 1e-4, 0.0)
    assert Lazy.reads == 0 and not path.exists()          # nothing waited for the device yet
    log.add(3, 0, stats(0.25), 1e-4, 0.0)
    assert Lazy.reads == 9
    log.add(4, 1, stats(0.2), 1e-4, 0.0)
    log.flush()                                            # before a save: the rest, at once
    rows = path.read_text().strip().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4"]
    assert rows[3].split(",")[2] == "0.250000"


def test_a_nan_loss_stops_the_run_at_the_next_read_before_anything_is_saved(tmp_path):
    log = StepLog(str(tmp_path / "loss.csv"), Bar(), interval=10)
    log.add(1, 0, stats(0.5), 1e-4, 0.0)
    log.add(2, 0, stats(float("nan")), 1e-4, 0.0)
    with pytest.raises(UserError, match=r"loss became nan \(NaN/inf\) at step 2; lower the learning rate"):
        log.flush()


def test_the_overflow_rule():
    check_loss(1, {"loss": 0.3})
    check_loss(1, {"loss": 0.3, "loss_scale": 1.0})
    check_loss(2, {"loss": float("inf"), "loss_scale": 2.0})      # fp16 overflow: skipped, scale lowered
    for values in ({"loss": float("inf")}, {"loss": float("nan"), "loss_scale": 1.0},
                   {"loss": float("nan"), "loss_scale": 0.5}):
        with pytest.raises(UserError, match="loss became"):
            check_loss(3, values)


def test_tf32_uses_only_the_per_backend_precision_switches():
    torch = pytest.importorskip("torch")
    from backends.cuda.device import use_tf32
    before = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
    try:
        use_tf32(True, torch.device("cpu"))                        # nothing to do off CUDA
        assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == before
        use_tf32(True, torch.device("cuda"))
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        assert torch.backends.cudnn.conv.fp32_precision == "tf32"
        use_tf32(False, torch.device("cuda"))
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = before


def test_mindone_memory_cap_is_checked_and_data_sinking_is_off_help():
    assert args_with("--max_device_memory", "59.5GB").max_device_memory == "59.5GB"
    with pytest.raises(UserError, match="expected a size such as 30GB"):
        args_with("--max_device_memory", "30G")
    from common.training.train_args import build_train_parser
    assert "dataset_sink_mode" not in build_train_parser().format_help()
    assert args_with("--dataset_sink_mode", "True").dataset_sink_mode is True      # MindONE configs still parse
