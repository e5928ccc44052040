"""Argument checks shared across the library, so that a bad value gets the same kind of message everywhere."""

from __future__ import annotations

import math
import numbers
from typing import Optional


def integer(value, argument: str, minimum: int = 0, owner: Optional[str] = None) -> int:
    """`value` as an int if it is an integer (not a bool) >= `minimum`; otherwise a `ValueError` naming `argument`
    (and its `owner`, e.g. the class, when given)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{owner + ' ' if owner else ''}`{argument}` must be an integer >= {minimum}; got {value!r}.")
    return int(value)


def number(value, argument: str, positive: bool = False, owner: Optional[str] = None) -> float:
    """`value` as a float if it is a finite real number > 0 (`positive`) or >= 0; otherwise a `ValueError` naming
    `argument` (and its `owner`)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and (
        value > 0 if positive else value >= 0)
    if not ok:
        expected = "positive and finite" if positive else "a finite number >= 0"
        raise ValueError(f"{owner + ' ' if owner else ''}`{argument}` must be {expected}; got {value!r}.")
    return float(value)
