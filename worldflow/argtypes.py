"""argparse ``type=`` callables that validate a number when the command line is parsed.

argparse turns the ArgumentTypeError into ``worldflow COMMAND: error: argument --flag: <message>`` with
exit code 2, so every bad number names its own flag before any work starts.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

__all__ = ["positive_int", "nonneg_int", "positive_float", "probability", "power_of_two", "int_in",
           "float_in"]


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def positive_int(text: str) -> int:
    """An int >= 1."""
    n = _int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def nonneg_int(text: str) -> int:
    """An int >= 0 (seeds)."""
    n = _int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {n}")
    return n


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def positive_float(text: str) -> float:
    """A finite float > 0 (frame rates: ``--fps 29.97``)."""
    x = _float(text)
    if not (x > 0 and math.isfinite(x)):
        raise argparse.ArgumentTypeError(f"must be a number above 0, got {text}")
    return x


def _in(parse: Callable[[str], Any], lo: float, hi: float, note: str) -> Callable[[str], Any]:
    def check(text: str) -> Any:
        x = parse(text)
        if not lo <= x <= hi:
            raise argparse.ArgumentTypeError(f"must be in [{lo}, {hi}]{note}, got {x}")
        return x

    return check


def int_in(lo: int, hi: int, note: str = "") -> Callable[[str], int]:
    """An int in [lo, hi]; ``note`` follows the range in the error (say what an end value means)."""
    return _in(_int, lo, hi, note)


def float_in(lo: float, hi: float, note: str = "") -> Callable[[str], float]:
    """A float in [lo, hi]; ``note`` as for :func:`int_in`."""
    return _in(_float, lo, hi, note)


probability = float_in(0, 1)  # a float in [0, 1]


def power_of_two(text: str) -> int:
    """A power of two >= 1: shortcut models are trained at step sizes d = 1/2^k (Shortcut Models §3)."""
    n = positive_int(text)
    if n & (n - 1):
        raise argparse.ArgumentTypeError(
            f"{n} is not a power of two (1, 2, 4, 8, ...): the model is trained at step sizes d = 1/2^k")
    return n
