"""common.training.lr_schedules against diffusers' schedulers driving a real torch optimizer: the
MindSpore backend has no LambdaLR, so both backends take the lr from these formulas, which must
give what diffusers gives (its quirks included)."""
import subprocess
import sys

import pytest

from conftest import ROOT
from common.errors import UserError
from common.training.lr_schedules import DIFFUSERS_SCHEDULERS, SCHEDULERS, LRSchedule

LR = 3e-4
STEPS = 50  # past total_steps (40 below): what each schedule does after the end counts too


def diffusers_lrs(make, steps=STEPS, lr=LR):
    """The lr of each optimizer update under a diffusers scheduler: read before each scheduler.step()."""
    import torch

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = make(optimizer)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def ours(schedule, steps=STEPS):
    return [schedule(step) for step in range(steps)]


# (name, get_scheduler kwargs); ours gets the same values under its own names
CASES = [
    ("constant", dict(num_warmup_steps=5)),  # warmup ignored, as in diffusers
    ("constant_with_warmup", dict(num_warmup_steps=5)),
    ("constant_with_warmup", dict(num_warmup_steps=0)),
    ("linear", dict(num_warmup_steps=5, num_training_steps=40)),
    ("linear", dict(num_warmup_steps=0, num_training_steps=40)),
    ("linear", dict(num_warmup_steps=10, num_training_steps=7)),
    ("cosine", dict(num_warmup_steps=5, num_training_steps=40)),
    ("cosine", dict(num_warmup_steps=0, num_training_steps=40, num_cycles=3)),  # get_scheduler drops num_cycles
    ("cosine_with_restarts", dict(num_warmup_steps=5, num_training_steps=40)),
    ("cosine_with_restarts", dict(num_warmup_steps=5, num_training_steps=40, num_cycles=2)),
    ("cosine_with_restarts", dict(num_warmup_steps=0, num_training_steps=40, num_cycles=3)),
    ("polynomial", dict(num_warmup_steps=5, num_training_steps=40)),
    ("polynomial", dict(num_warmup_steps=0, num_training_steps=40, power=2.0)),
    ("piecewise_constant", dict(step_rules="1:10,0.1:20,0.01:30,0.005")),
    ("piecewise_constant", dict(step_rules="0.5:30,2:5,0.7:5,0.25")),  # unsorted, a repeated threshold
]


def close(a, b):
    return a == pytest.approx(b, rel=1e-12, abs=1e-30)


@pytest.mark.parametrize("name,kwargs", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_matches_get_scheduler(name, kwargs):
    from diffusers.optimization import get_scheduler

    expected = diffusers_lrs(lambda opt: get_scheduler(name, opt, **kwargs))
    if name == "cosine":
        kwargs = {k: v for k, v in kwargs.items() if k != "num_cycles"}  # to match what diffusers used
    schedule = LRSchedule(name, LR, warmup_steps=kwargs.get("num_warmup_steps", 0),
                          total_steps=kwargs.get("num_training_steps"), num_cycles=kwargs.get("num_cycles"),
                          power=kwargs.get("power", 1.0), step_rules=kwargs.get("step_rules"))
    assert close(ours(schedule), expected)


@pytest.mark.parametrize("warmup,cycles", [(5, 0.3), (5, 2.0), (0, 0.5)])
def test_cosine_cycles_match_diffusers(warmup, cycles):
    from diffusers.optimization import get_cosine_schedule_with_warmup

    expected = diffusers_lrs(lambda opt: get_cosine_schedule_with_warmup(opt, warmup, 40, num_cycles=cycles))
    assert close(ours(LRSchedule("cosine", LR, warmup, 40, num_cycles=cycles)), expected)


@pytest.mark.parametrize("lr_end,power", [(1e-5, 0.5), (0.0, 3.0)])
def test_polynomial_lr_end_matches_diffusers(lr_end, power):
    from diffusers.optimization import get_polynomial_decay_schedule_with_warmup

    expected = diffusers_lrs(lambda opt: get_polynomial_decay_schedule_with_warmup(opt, 5, 40, lr_end, power))
    lrs = ours(LRSchedule("polynomial", LR, 5, 40, power=power, lr_end=lr_end))
    assert close(lrs, expected)
    assert lrs[40] == lrs[-1] == pytest.approx(lr_end, abs=1e-18)


def test_covers_every_diffusers_scheduler():
    from diffusers.optimization import SchedulerType

    assert {t.value for t in SchedulerType} == set(DIFFUSERS_SCHEDULERS)
    assert set(SCHEDULERS) == set(DIFFUSERS_SCHEDULERS) | {"mindone"}


def test_quirks():
    assert LRSchedule("linear", LR, 5, 40)(0) == 0.0  # warmup starts at 0
    assert LRSchedule("constant", LR, 5)(0) == LR  # warmup ignored
    restarts = LRSchedule("cosine_with_restarts", LR, 0, 40, num_cycles=2)
    assert restarts(19) < 0.01 * LR and restarts(20) == LR and restarts(40) == 0.0
    cosine = LRSchedule("cosine", LR, 0, 40)
    assert cosine.num_cycles == 0.5 and cosine(40) == 0.0 and cosine(60) == pytest.approx(LR / 2)
    assert LRSchedule("polynomial", LR, 0, 40)(40) == pytest.approx(1e-7)


def test_mindone_by_hand():
    warm = LRSchedule("mindone", 1e-4, warmup_steps=4)
    assert close(ours(warm, 7), [2.5e-5, 5e-5, 7.5e-5, 1e-4, 1e-4, 1e-4, 1e-4])
    decay = LRSchedule("mindone", 1e-4, warmup_steps=4, decay_steps=10, end_lr=0.0)
    assert close([decay(s) for s in (3, 4, 9, 13, 14, 30)], [1e-4, 1e-4, 5e-5, 1e-5, 0.0, 0.0])
    no_warmup = LRSchedule("mindone", 1e-4, decay_steps=4, end_lr=2e-5)
    assert close(ours(no_warmup, 6), [1e-4, 8e-5, 6e-5, 4e-5, 2e-5, 2e-5])
    assert ours(LRSchedule("mindone", 1e-4, decay_steps=4), 6) == [1e-4] * 6  # no end_lr: constant
    assert ours(LRSchedule("mindone", 1e-4, end_lr=0.0), 3) == [1e-4] * 3  # no decay_steps: constant


@pytest.mark.parametrize("kwargs,match", [
    (dict(name="cosine_annealing", base_lr=LR), "unknown lr scheduler 'cosine_annealing'"),
    (dict(name="cosine", base_lr=LR, warmup_steps=5), "needs the total number"),
    (dict(name="linear", base_lr=LR, total_steps=0), "total_steps must be an integer >= 1"),
    (dict(name="linear", base_lr=LR, total_steps=40, warmup_steps=-1), "warmup_steps must be an integer >= 0"),
    (dict(name="linear", base_lr=LR, total_steps=40, warmup_steps=2.5), "warmup_steps must be an integer"),
    (dict(name="constant", base_lr=0.0), "base_lr must be a number > 0"),
    (dict(name="constant", base_lr=float("nan")), "base_lr"),
    (dict(name="polynomial", base_lr=1e-7, total_steps=40), r"lr_end \(1e-07\) must be smaller"),
    (dict(name="polynomial", base_lr=LR, total_steps=40, lr_end=1e-3), "must be smaller"),
    (dict(name="polynomial", base_lr=LR, total_steps=5, warmup_steps=5), "total_steps"),
    (dict(name="cosine_with_restarts", base_lr=LR, total_steps=40, num_cycles=0), "num_cycles must be a number > 0"),
    (dict(name="piecewise_constant", base_lr=LR), "needs step_rules"),
    (dict(name="piecewise_constant", base_lr=LR, step_rules="1:10,x"), "bad step_rules"),
    (dict(name="piecewise_constant", base_lr=LR, step_rules="1:ten,0.1"), "bad step_rules"),
    (dict(name="piecewise_constant", base_lr=LR, step_rules="1:10,"), "bad step_rules"),
    (dict(name="mindone", base_lr=LR, decay_steps=10, end_lr=1e-3), "end_lr .* must not exceed"),
])
def test_errors(kwargs, match):
    with pytest.raises(UserError, match=match) as info:
        LRSchedule(**kwargs)
    assert "\n" not in str(info.value)


def test_bad_step():
    schedule = LRSchedule("constant", LR)
    with pytest.raises(ValueError):
        schedule(-1)
    with pytest.raises(TypeError):
        schedule(1.5)


def test_pure_python():
    """Shared by both backends: importing it must not import torch or MindSpore."""
    code = ("import sys; import common.training.lr_schedules; "
            "assert not {'torch', 'mindspore', 'diffusers'} & set(sys.modules), sorted(sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
