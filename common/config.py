"""Command-line and yaml configuration with MindONE's key names.

A training run is configured by a yaml file (`--train_config`, MindONE's keys) plus command-line
flags; every yaml key is also a flag and the flag wins. Each yaml value is converted with the
flag's own type, so `2e-6` (a string to YAML 1.1) becomes the float it means, and `True`/`False`
work for booleans as in MindONE's scripts. Unknown keys and values of the wrong type are a
`UserError` naming the key.
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Iterable, Optional, Sequence

import yaml

from common.arch import REPO_ROOT
from common.errors import UserError

BACKENDS = ("cuda", "ascend")
# MindONE's evaluation scripts say pt/ms; MindONE's own scripts run on Ascend by default.
BACKEND_ALIASES = {"cuda": "cuda", "pt": "cuda", "torch": "cuda", "pytorch": "cuda", "gpu": "cuda",
                   "ascend": "ascend", "ms": "ascend", "mindspore": "ascend"}


def str2bool(value: Any) -> bool:
    """MindONE's boolean flags take `True`/`False`; accept the usual spellings."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "y", "on"):
        return True
    if text in ("false", "0", "no", "n", "off", "none"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def backend_name(value: str) -> str:
    name = BACKEND_ALIASES.get(str(value).strip().lower())
    if name is None:
        raise argparse.ArgumentTypeError(f"unknown backend {value!r}; use one of {', '.join(BACKENDS)}")
    return name


def optional_int(value: Any) -> Optional[int]:
    """An integer, or None for `None`/`null`; `1e3` is accepted as 1000."""
    if value is None or str(value).strip().lower() in ("none", "null", ""):
        return None
    try:
        return int(value)
    except ValueError:
        number = float(value)
        if not number.is_integer():
            raise
        return int(number)


def optional_float(value: Any) -> Optional[float]:
    if value is None or str(value).strip().lower() in ("none", "null", ""):
        return None
    return float(value)


def _number(kind, value: Any):
    try:
        return optional_int(value) if kind is int else float(value)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                         f"got {value!r}") from None


def ranged(kind=int, *, low: float = None, high: float = None, low_open: bool = False,
           high_open: bool = False, optional: bool = False):
    """An argparse / yaml type: an int or float within [low, high] (either end open or absent),
    so a bad value is one line naming the flag before any work starts. `optional` accepts
    None / null as "not set"."""
    def convert(value: Any):
        if optional and (value is None or str(value).strip().lower() in ("none", "null", "")):
            return None
        number = _number(kind, value)
        if number is None or number != number:             # None from optional_int, or NaN
            raise argparse.ArgumentTypeError(f"expected a number, got {value!r}")
        if low is not None and (number < low or (low_open and number == low)):
            raise argparse.ArgumentTypeError(f"must be {'>' if low_open else '>='} {low:g}, got {value}")
        if high is not None and (number > high or (high_open and number == high)):
            raise argparse.ArgumentTypeError(f"must be {'<' if high_open else '<='} {high:g}, got {value}")
        return number
    convert.__name__ = kind.__name__                         # argparse names the type in its messages
    return convert


count = ranged(int, low=1)                                  # steps, sizes, intervals: at least 1
positive = ranged(float, low=0, low_open=True)              # learning rates, eps, norms
non_negative = ranged(float, low=0)                         # weight decay, noise strengths, weights


class UserArgumentParser(argparse.ArgumentParser):
    """argparse that reports errors as one line and exit code 2, like every user error here."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise UserError(f"{self.prog}: {message}")


def _convert(action: argparse.Action, key: str, value: Any, source: str) -> Any:
    """Convert one yaml value with the flag's type (and nargs), or raise a UserError naming it."""
    if value is None:
        return None
    try:
        if action.nargs in ("+", "*") or isinstance(action.nargs, int):
            items = value if isinstance(value, (list, tuple)) else [value]
            converted = [action.type(v) if action.type else v for v in items]
            if isinstance(action.nargs, int) and len(converted) != action.nargs:
                raise ValueError(f"needs {action.nargs} values")
            return converted
        if isinstance(value, (list, dict)):
            raise ValueError("expected a single value")
        if action.const is not None and action.nargs == 0:  # store_true / store_false
            return str2bool(value)
        converted = action.type(value) if action.type else value
        if action.choices is not None and converted not in action.choices:
            raise ValueError(f"must be one of {', '.join(map(str, action.choices))}")
        return converted
    except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
        raise UserError(f"{source}: key '{key}' has a wrong value {value!r} ({e})") from None


def load_yaml_defaults(parser: argparse.ArgumentParser, path: str) -> dict:
    """Read a train-config yaml and return {dest: converted value} for parser.set_defaults."""
    for candidate in (path, os.path.join(REPO_ROOT, path)):
        if os.path.isfile(candidate):
            path = candidate
            break
    else:
        raise UserError(f"train config not found: {path}")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise UserError(f"train config {path}: invalid yaml ({e.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise UserError(f"train config {path}: expected a mapping of keys to values")
    actions = {a.dest: a for a in parser._actions if a.dest != "help"}
    unknown = sorted(k for k in data if k not in actions)
    if unknown:
        raise UserError(f"train config {path}: unknown key(s) {', '.join(unknown)}")
    return {k: _convert(actions[k], k, v, f"train config {path}") for k, v in data.items()}


def parse_with_config(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None,
                      config_flag: str = "train_config") -> argparse.Namespace:
    """Two-pass parse: find the yaml, make its values the defaults, then let the CLI win."""
    first, _ = parser.parse_known_args(argv)
    path = getattr(first, config_flag, None)
    if path:
        parser.set_defaults(**load_yaml_defaults(parser, path))
    return parser.parse_args(argv)


def add_bool(group, *names: str, default: bool, help: str) -> None:
    """A boolean flag that takes True/False as a value (MindONE), or stands alone meaning True
    (diffusers' store_true flags such as --with_prior_preservation)."""
    group.add_argument(*names, type=str2bool, nargs="?", const=True, default=default, metavar="BOOL",
                       help=help if help == argparse.SUPPRESS else f"{help} (default: {default})")


def dump_args(args: argparse.Namespace, path: str, keys: Optional[Iterable[str]] = None) -> None:
    """Record the resolved configuration next to the outputs (a run is reproducible from it)."""
    data = {k: v for k, v in sorted(vars(args).items()) if keys is None or k in keys}
    with open(path, "w") as f:
        yaml.safe_dump(data, f, sort_keys=True)
