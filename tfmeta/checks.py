"""Argument checks shared across the library, so that a bad value gets the same kind of message everywhere."""

from __future__ import annotations

import numbers
from typing import Optional


def integer(value, argument: str, minimum: int = 0, owner: Optional[str] = None) -> int:
    """`value` as an int if it is an integer (not a bool) >= `minimum`; otherwise a `ValueError` naming `argument`
    (and its `owner`, e.g. the class, when given)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{owner + ' ' if owner else ''}`{argument}` must be an integer >= {minimum}; got {value!r}.")
    return int(value)
