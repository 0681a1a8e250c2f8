"""Learning rate per optimizer step, for both backends.

Why here: the CUDA backend could use diffusers' LambdaLR schedulers, the MindSpore one cannot, and a
run must get the same learning rates on either. So this module re-derives the formulas of diffusers'
`get_scheduler` (quirks included, tests compare against diffusers itself) plus MindONE's own
schedule, as plain Python floats; a backend sets lr = schedule(step) before each update.

`step` counts optimizer updates already taken: schedule(step) is the lr of update step+1, i.e. what
a torch LambdaLR stepped `step` times gives (base_lr * lambda(step)).

diffusers quirks kept on purpose:
- warmup ramps from 0: with warmup_steps > 0 the first update (step 0) gets lr 0;
- "constant" and "piecewise_constant" ignore warmup_steps;
- "cosine" does not stop at total_steps (past it the half cosine climbs back up), "linear" stays at
  0 there, "cosine_with_restarts" is 0 from total_steps on, "polynomial" stays at lr_end;
- "polynomial" ends at lr_end (default 1e-7), not 0, and lr_end must be below base_lr;
- piecewise step_rules "1:10,0.1:20,0.01:30,0.005" are absolute step thresholds: factor 1 for
  steps < 10, 0.1 for steps < 20, 0.01 for steps < 30, then 0.005;
- get_scheduler never passes num_cycles to "cosine" (nor lr_end to "polynomial"): diffusers'
  DreamBooth scripts always get 0.5 cycles and 1e-7 whatever --lr_num_cycles says. Leave those
  None / default here to match the scripts; a value given is honoured as diffusers'
  get_cosine_schedule_with_warmup / get_polynomial_decay_schedule_with_warmup would.
"""
from __future__ import annotations

import math
import numbers
import operator
from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Optional, Tuple

from common.errors import UserError

DIFFUSERS_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                        "polynomial", "piecewise_constant")
# "mindone": linear warmup to base_lr reaching it at the last warmup step, then constant, or a linear
# decay to end_lr over decay_steps (MindONE's flags, which MindONE itself parses but ignores).
SCHEDULERS = ("mindone",) + DIFFUSERS_SCHEDULERS
_NEEDS_TOTAL = ("linear", "cosine", "cosine_with_restarts", "polynomial")
_DEFAULT_CYCLES = {"cosine": 0.5, "cosine_with_restarts": 1}


def _number(what: str, value, low: float = -math.inf, integer: bool = False, above: bool = False):
    """value as int or float, else a UserError naming `what`."""
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) \
            or value < low or (above and value == low):
        need = "an integer" if integer else "a number"
        bound = "" if low == -math.inf else f" {'>' if above else '>='} {low:g}"
        raise UserError(f"lr schedule: {what} must be {need}{bound}, got {value!r}")
    return int(value) if integer else float(value)


def _parse_rules(rules) -> Tuple[Tuple[int, ...], Tuple[float, ...], float]:
    """diffusers' step_rules "f1:s1,f2:s2,...,f_last" -> (sorted thresholds, their factors, f_last).
    A threshold given twice keeps its last factor, as diffusers' dict does."""
    if not isinstance(rules, str) or not rules.strip():
        raise UserError("lr schedule: piecewise_constant needs step_rules such as '1:10,0.1:20,0.005'")
    *pairs, last = rules.split(",")
    try:
        table = {}
        for pair in pairs:
            factor, steps = pair.split(":")
            table[int(steps)] = float(factor)
        last_factor = float(last)
    except ValueError:
        raise UserError(f"lr schedule: bad step_rules {rules!r}; expected 'factor:step,...,last_factor', "
                        f"e.g. '1:10,0.1:20,0.005'") from None
    steps = tuple(sorted(table))
    return steps, tuple(table[s] for s in steps), last_factor


@dataclass(frozen=True)
class LRSchedule:
    """The lr of each optimizer step: LRSchedule("cosine", 1e-4, warmup_steps=50, total_steps=800)(step).

    Parameters are diffusers' (num_warmup_steps -> warmup_steps, num_training_steps -> total_steps);
    decay_steps and end_lr are used by "mindone" only, step_rules by "piecewise_constant" only.
    num_cycles None means the scheduler's default (0.5 for cosine, 1 for cosine_with_restarts).
    """
    name: str
    base_lr: float
    warmup_steps: int = 0
    total_steps: Optional[int] = None
    num_cycles: Optional[float] = None
    power: float = 1.0
    lr_end: float = 1e-7
    decay_steps: int = 0
    end_lr: Optional[float] = None
    step_rules: Optional[str] = None
    _rules: tuple = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.name not in SCHEDULERS:
            raise UserError(f"unknown lr scheduler {self.name!r}; expected one of {', '.join(SCHEDULERS)}")

        def put(key, value):  # the dataclass is frozen
            object.__setattr__(self, key, value)

        put("base_lr", _number("base_lr", self.base_lr, 0, above=True))
        put("warmup_steps", _number("warmup_steps", self.warmup_steps, 0, integer=True))
        if self.total_steps is None:
            if self.name in _NEEDS_TOTAL:
                raise UserError(f"lr scheduler {self.name} needs the total number of training steps")
        else:
            put("total_steps", _number("total_steps", self.total_steps, 1, integer=True))
        if self.name in _DEFAULT_CYCLES:
            cycles = _DEFAULT_CYCLES[self.name] if self.num_cycles is None else self.num_cycles
            put("num_cycles", _number("num_cycles", cycles, 0, above=True))
        if self.name == "polynomial":
            put("power", _number("power", self.power, 0))
            put("lr_end", _number("lr_end", self.lr_end, 0))
            if not self.lr_end < self.base_lr:  # diffusers raises the same
                raise UserError(f"lr schedule: polynomial lr_end ({self.lr_end:g}) must be smaller than "
                                f"the learning rate ({self.base_lr:g})")
            if self.total_steps <= self.warmup_steps:  # no decay phase (diffusers: 0/0 when equal)
                raise UserError(f"lr schedule: polynomial needs total_steps ({self.total_steps}) > "
                                f"warmup_steps ({self.warmup_steps})")
        if self.name == "piecewise_constant":
            put("_rules", _parse_rules(self.step_rules))
        if self.name == "mindone":
            put("decay_steps", _number("decay_steps", self.decay_steps, 0, integer=True))
            if self.end_lr is not None:
                put("end_lr", _number("end_lr", self.end_lr, 0))
                if self.end_lr > self.base_lr:
                    raise UserError(f"lr schedule: end_lr ({self.end_lr:g}) must not exceed the learning "
                                    f"rate ({self.base_lr:g})")

    def __call__(self, step: int) -> float:
        step = operator.index(step)
        if step < 0:
            raise ValueError(f"optimizer step must be >= 0, got {step}")
        if self.name == "mindone":
            return float(self._mindone(step))
        # as LambdaLR: base_lr times diffusers' multiplier (same rounding as torch)
        return float(self.base_lr * self._factor(step))

    def _mindone(self, step: int) -> float:
        lr, warmup = self.base_lr, self.warmup_steps
        if warmup and step < warmup:
            return lr * (step + 1) / warmup  # reaches lr at the last warmup step, not after it
        if self.decay_steps and self.end_lr is not None:
            progress = min(1.0, (step - warmup) / self.decay_steps)
            return lr + (self.end_lr - lr) * progress
        return lr

    def _factor(self, step: int) -> float:
        """diffusers' lr_lambda(step)."""
        name, warmup, total = self.name, self.warmup_steps, self.total_steps
        if name == "constant":
            return 1.0
        if name == "piecewise_constant":
            steps, factors, last = self._rules
            i = bisect_right(steps, step)  # first threshold > step
            return factors[i] if i < len(steps) else last
        if step < warmup:
            return step / max(1, warmup)
        if name == "constant_with_warmup":
            return 1.0
        if name == "linear":
            return max(0.0, (total - step) / max(1, total - warmup))
        progress = (step - warmup) / max(1, total - warmup)
        if name == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * self.num_cycles * 2.0 * progress)))
        if name == "cosine_with_restarts":
            if progress >= 1.0:
                return 0.0
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((self.num_cycles * progress) % 1.0))))
        # polynomial: from base_lr down to lr_end, as a fraction of base_lr
        if step > total:
            return self.lr_end / self.base_lr
        remaining = 1 - (step - warmup) / (total - warmup)
        return ((self.base_lr - self.lr_end) * remaining ** self.power + self.lr_end) / self.base_lr
