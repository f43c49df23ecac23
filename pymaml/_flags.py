"""What the command line's flags are made of: argparse value types and the error of a flag found
wrong after parsing. A module of its own because both pymaml.cli and the algorithms' own flags
(pymaml.algorithms: `flags`, `train_kwargs`) use them, and the command line imports the
algorithms."""

from __future__ import annotations

import argparse
import ast
import math
import os

import torch


class FlagError(ValueError):
    """A flag's value found wrong after parsing: exit code 2, as argparse's own."""


def count(minimum):
    """argparse type: an int >= minimum, with an error that names the bound."""
    def parse(text):
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    parse.__name__ = "int"  # argparse names the type in its "invalid int value" message
    return parse


def real(positive: bool):
    """argparse type: a finite number (positive: above 0 too), with an error that says so."""
    def parse(text):
        value = float(text)
        if not math.isfinite(value) or (positive and value <= 0):
            want = "a positive finite number" if positive else "a finite number"
            raise argparse.ArgumentTypeError(f"must be {want}, got {text}")
        return value
    parse.__name__ = "float"  # argparse names the type in its "invalid float value" message
    return parse


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def threads(text):
    """argparse type for --threads: 1 up to the CPUs this process may run on (torch crashes
    on a huge count, and more threads than CPUs cannot run at once)."""
    value = count(1)(text)
    cpus = available_cpus()
    if value > cpus:
        raise argparse.ArgumentTypeError(f"must be at most {cpus}, the CPUs available to this "
                                         f"process, got {value}")
    return value


def int_list(text):
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,40,40,1, "
                                         f"got {text!r}") from None


def optimizer(text):
    if text.lower() in ("sgd", "adam"):
        return text.lower()
    cls = getattr(torch.optim, text, None)
    if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer):
        return cls
    raise argparse.ArgumentTypeError(f"expected sgd, adam or a torch.optim class name such as "
                                     f"AdamW or RMSprop, got {text!r}")


def key_value(text):
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE such as momentum=0.9, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value  # a plain string
